//! Llama 3.2 Vision's tiles (transformers' `MllamaImageProcessorPil`): the image is
//! resized, keeping its aspect ratio, into the best canvas of at most `max_image_tiles`
//! tiles, padded with black at the bottom and right, and cut into tiles row by row. The
//! canvas's shape in tiles is the image's aspect ratio, which the model embeds by its id.

use image::RgbImage;
use serde_json::Value;

use crate::clip::{rescale_normalize, ClipProcessorConfig, Pixels, ResizeTarget};
use crate::resample::{self, PassOrder};
use crate::VisionError;

#[derive(Clone, Debug, PartialEq)]
pub struct MllamaProcessorConfig {
    /// Resize filter, rescale and normalization (its `size` is the tile).
    pub clip: ClipProcessorConfig,
    pub tile: u32,
    pub max_tiles: usize,
}

impl MllamaProcessorConfig {
    pub fn from_json_value(value: &Value) -> Result<Self, VisionError> {
        let clip = ClipProcessorConfig::from_json_value(value)?;
        let tile = match clip.size {
            ResizeTarget::Exact { height, width } if height == width => height,
            other => return Err(VisionError::BadConfig(format!("Llama 3.2 Vision's tiles are square; size is {other:?}"))),
        };
        let dict = crate::clip::image_processor_dict(value)?;
        let max_tiles = dict.get("max_image_tiles").and_then(Value::as_u64).unwrap_or(4) as usize;
        if max_tiles == 0 || tile == 0 {
            return Err(VisionError::BadConfig("max_image_tiles and the tile size must be positive".into()));
        }
        Ok(MllamaProcessorConfig { clip, tile, max_tiles })
    }
}

/// One image, preprocessed.
#[derive(Clone, Debug, PartialEq)]
pub struct MllamaImage {
    /// Row by row.
    pub tiles: Vec<Pixels>,
    /// Tiles down and across.
    pub grid: (usize, usize),
    /// 1 + the grid's place in [`aspect_ratios`] (0 is batch padding).
    pub aspect_ratio_id: usize,
}

/// Every tile arrangement of at most `max_tiles` tiles, in transformers' order: (a, b)
/// for a, then b, from 1; read as (down, across) wherever it is used.
pub fn aspect_ratios(max_tiles: usize) -> Vec<(usize, usize)> {
    (1..=max_tiles).flat_map(|a| (1..=max_tiles).filter(move |b| a * b <= max_tiles).map(move |b| (a, b))).collect()
}

/// transformers' `get_optimal_tiled_canvas`: the canvas (height, width) in pixels that
/// needs the least upscaling, or if every one shrinks the image, the least shrinking; of
/// equal scales, the smallest area (the first such).
pub fn optimal_canvas(height: u32, width: u32, max_tiles: usize, tile: u32) -> (u32, u32) {
    let canvases: Vec<(u32, u32)> = aspect_ratios(max_tiles).into_iter().map(|(a, b)| (a as u32 * tile, b as u32 * tile)).collect();
    let scale = |&(ch, cw): &(u32, u32)| f64::min(ch as f64 / height as f64, cw as f64 / width as f64);
    let scales: Vec<f64> = canvases.iter().map(scale).collect();
    let up = scales.iter().copied().filter(|&s| s >= 1.0).fold(f64::INFINITY, f64::min);
    let chosen = if up.is_finite() { up } else { scales.iter().copied().fold(f64::NEG_INFINITY, f64::max) };
    let mut best: Option<(u32, u32)> = None;
    for (c, s) in canvases.iter().zip(&scales) {
        if *s == chosen && best.is_none_or(|b| c.0 * c.1 < b.0 * b.1) {
            best = Some(*c);
        }
    }
    best.unwrap_or((tile, tile))
}

/// transformers' `get_image_size_fit_to_canvas`: the image's new (height, width), its
/// sides brought between the tile and the canvas, scaled by the smaller factor, floored.
pub fn fit_to_canvas(height: u32, width: u32, canvas: (u32, u32), tile: u32) -> (u32, u32) {
    let target_w = width.clamp(tile, canvas.1);
    let target_h = height.clamp(tile, canvas.0);
    let (scale_h, scale_w) = (target_h as f64 / height as f64, target_w as f64 / width as f64);
    if scale_w < scale_h {
        (((height as f64 * scale_w).floor() as u32).max(1).min(target_h), target_w)
    } else {
        (target_h, ((width as f64 * scale_h).floor() as u32).max(1).min(target_w))
    }
}

pub fn preprocess(img: &RgbImage, cfg: &MllamaProcessorConfig) -> MllamaImage {
    let tile = cfg.tile;
    let canvas = optimal_canvas(img.height(), img.width(), cfg.max_tiles, tile);
    let (nh, nw) = fit_to_canvas(img.height(), img.width(), canvas, tile);
    let resized = if img.dimensions() == (nw, nh) { img.clone() } else { resample::resize(img, nw, nh, cfg.clip.resample, PassOrder::Pillow13) };
    // Black at the bottom and right, before normalization.
    let mut padded = RgbImage::new(canvas.1, canvas.0);
    image::imageops::replace(&mut padded, &resized, 0, 0);
    let grid = ((canvas.0 / tile) as usize, (canvas.1 / tile) as usize);
    let rescale = cfg.clip.do_rescale.then_some(cfg.clip.rescale_factor);
    let normalize = cfg.clip.do_normalize.then_some((cfg.clip.image_mean, cfg.clip.image_std));
    let tiles = (0..grid.0)
        .flat_map(|i| (0..grid.1).map(move |j| (i, j)))
        .map(|(i, j)| rescale_normalize(&image::imageops::crop_imm(&padded, j as u32 * tile, i as u32 * tile, tile, tile).to_image(), rescale, normalize))
        .collect();
    let aspect_ratio_id = aspect_ratios(cfg.max_tiles).iter().position(|&r| r == grid).map_or(0, |i| i + 1);
    MllamaImage { tiles, grid, aspect_ratio_id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aspect_ratios_in_transformers_order() {
        assert_eq!(aspect_ratios(4), vec![(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]);
    }

    #[test]
    fn canvas_and_fit_follow_the_processor() {
        // Worked by hand from transformers' functions, tile 560, four tiles.
        // 800x600 (w x h): only the 2x2 canvas needs no shrinking (min(1120/600, 1120/800)
        // = 1.4); the image is not enlarged past its own size, only padded.
        assert_eq!(optimal_canvas(600, 800, 4, 560), (1120, 1120));
        assert_eq!(fit_to_canvas(600, 800, (1120, 1120), 560), (600, 800));
        // A small image fits one tile and is brought up to it.
        assert_eq!(optimal_canvas(100, 100, 4, 560), (560, 560));
        assert_eq!(fit_to_canvas(100, 100, (560, 560), 560), (560, 560));
        // A very wide one: one row of four.
        assert_eq!(optimal_canvas(300, 3000, 4, 560), (560, 2240));
        assert_eq!(fit_to_canvas(300, 3000, (560, 2240), 560), (224, 2240));
    }
}
