//! LLaVA-NeXT's "any resolution" images, as transformers' `LlavaNextImageProcessorPil`
//! and `LlavaNextProcessor` do them: the image is fitted into the best of the model's
//! grid resolutions (`image_grid_pinpoints`), padded with black to it, and cut into
//! tiles of the vision tower's size; the whole image, squashed to one tile, goes first.
//! The model then drops the feature rows or columns that only saw padding ("unpadding"):
//! [`Layout`] says which, so the prompt's token count and the model's packing agree.

use image::RgbImage;
use serde_json::Value;

use crate::clip::{rescale_normalize, ClipProcessorConfig, CropSize, Pixels, ResizeTarget};
use crate::resample::{self, PassOrder};
use crate::VisionError;

/// The CLIP settings plus the grid resolutions, `(height, width)` in pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaNextProcessorConfig {
    pub clip: ClipProcessorConfig,
    pub pinpoints: Vec<(u32, u32)>,
    /// Pillow 13's pass order (transformers), or the horizontal pass first always
    /// (llama.cpp's resampler, for GGUF projectors).
    pub order: PassOrder,
}

impl LlavaNextProcessorConfig {
    /// From the image processor's settings; `fallback_pinpoints` (the model config's
    /// `image_grid_pinpoints`) where the processor has none.
    pub fn from_json_value(value: &Value, fallback_pinpoints: Option<&Value>) -> Result<Self, VisionError> {
        let clip = ClipProcessorConfig::from_json_value(value)?;
        let dict = crate::clip::image_processor_dict(value)?;
        let points = dict.get("image_grid_pinpoints").or(fallback_pinpoints).ok_or_else(|| VisionError::BadConfig("no image_grid_pinpoints".into()))?;
        let pinpoints = points
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| match p.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect::<Vec<_>>()).as_deref() {
                Some(&[h, w]) if h > 0 && w > 0 => Ok((h as u32, w as u32)),
                _ => Err(VisionError::BadConfig(format!("image_grid_pinpoints entry {p} is not [height, width]"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if pinpoints.is_empty() {
            return Err(VisionError::BadConfig("image_grid_pinpoints is empty".into()));
        }
        let tile = clip.crop_size;
        if let Some((h, w)) = pinpoints.iter().find(|(h, w)| h % tile.height != 0 || w % tile.width != 0) {
            return Err(VisionError::BadConfig(format!("grid resolution {h}x{w} is not a whole number of {}x{} tiles", tile.height, tile.width)));
        }
        Ok(LlavaNextProcessorConfig { clip, pinpoints, order: PassOrder::Pillow13 })
    }

    /// Where a `width × height` image's features land, for a model whose tiles are
    /// `cells`² feature cells.
    pub fn layout(&self, width: u32, height: u32, cells: usize) -> Layout {
        layout(width, height, &self.pinpoints, self.tile().height, cells)
    }

    /// The tile size: the crop size (the vision tower's input).
    pub fn tile(&self) -> CropSize {
        self.clip.crop_size
    }
}

/// transformers' `select_best_resolution`: the grid resolution that keeps the most of
/// the image's pixels, then wastes the fewest. Sizes are `(height, width)`.
pub fn best_resolution(height: u32, width: u32, pinpoints: &[(u32, u32)]) -> (u32, u32) {
    let (mut best, mut most_kept, mut least_wasted) = (pinpoints[0], 0u64, u64::MAX);
    for &(h, w) in pinpoints {
        let scale = f64::min(w as f64 / width as f64, h as f64 / height as f64);
        let (dw, dh) = ((width as f64 * scale) as u64, (height as f64 * scale) as u64);
        let kept = (dw * dh).min(width as u64 * height as u64);
        let wasted = w as u64 * h as u64 - kept;
        if kept > most_kept || (kept == most_kept && wasted < least_wasted) {
            (best, most_kept, least_wasted) = ((h, w), kept, wasted);
        }
    }
    best
}

/// Where one image's features land: its tile grid and, in the grid of feature cells
/// those tiles make, the window that saw the image rather than padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Tiles down and across.
    pub tiles: (usize, usize),
    /// The first kept feature row and column.
    pub offset: (usize, usize),
    /// Kept feature rows and columns.
    pub kept: (usize, usize),
}

impl Layout {
    /// The embeddings the image becomes: the base tile's, then each kept feature row
    /// with one `image_newline` after it.
    pub fn tokens(&self, base_tokens: usize) -> usize {
        base_tokens + self.kept.0 * (self.kept.1 + 1)
    }
}

/// The layout of a `width × height` image whose tiles are `tile`² pixels, each `cells`²
/// feature cells (transformers' `get_anyres_image_grid_shape` and `unpad_image`).
pub fn layout(width: u32, height: u32, pinpoints: &[(u32, u32)], tile: u32, cells: usize) -> Layout {
    let (bh, bw) = best_resolution(height, width, pinpoints);
    let tiles = ((bh / tile) as usize, (bw / tile) as usize);
    let (rows, cols) = (tiles.0 * cells, tiles.1 * cells);
    // Python's int(round(x, 7)): rounded to 7 decimals, then truncated.
    let round7 = |x: f64| ((x * 1e7).round() / 1e7) as usize;
    if width as f64 / height as f64 > cols as f64 / rows as f64 {
        let new_rows = round7(height as f64 * (cols as f64 / width as f64));
        let pad = rows.saturating_sub(new_rows) / 2;
        Layout { tiles, offset: (pad, 0), kept: (rows - 2 * pad, cols) }
    } else {
        let new_cols = round7(width as f64 * (rows as f64 / height as f64));
        let pad = cols.saturating_sub(new_cols) / 2;
        Layout { tiles, offset: (0, pad), kept: (rows, cols - 2 * pad) }
    }
}

/// The pixel blocks of one image: the whole image squashed to one tile, then the tiles
/// row by row.
pub fn preprocess(img: &RgbImage, cfg: &LlavaNextProcessorConfig) -> Vec<Pixels> {
    let tile = cfg.tile();
    let (bh, bw) = best_resolution(img.height(), img.width(), &cfg.pinpoints);
    let (nh, nw) = fit(img.height(), img.width(), bh, bw);
    let fitted = resize(img, nw, nh, cfg);
    // Centred on black, as np.pad with zeros does before normalization.
    let mut canvas = RgbImage::new(bw, bh);
    image::imageops::replace(&mut canvas, &fitted, i64::from((bw - nw) / 2), i64::from((bh - nh) / 2));
    let base_side = match cfg.clip.size {
        ResizeTarget::ShortestEdge(n) => (n, n),
        ResizeTarget::Exact { height, width } => (width, height),
    };
    let mut blocks = vec![resize(img, base_side.0, base_side.1, cfg)];
    for y in (0..bh).step_by(tile.height as usize) {
        for x in (0..bw).step_by(tile.width as usize) {
            blocks.push(image::imageops::crop_imm(&canvas, x, y, tile.width, tile.height).to_image());
        }
    }
    let rescale = cfg.clip.do_rescale.then_some(cfg.clip.rescale_factor);
    let normalize = cfg.clip.do_normalize.then_some((cfg.clip.image_mean, cfg.clip.image_std));
    // Each block then goes through the CLIP steps; on a tile-sized block the resize and
    // the crop leave it as it is.
    blocks.iter().map(|b| rescale_normalize(&crate::clip::hf_resize_and_crop(b, &cfg.clip), rescale, normalize)).collect()
}

/// transformers' `get_patch_output_size`: the image scaled to fit `(bh, bw)`, the
/// scaled side rounded up. Returns `(height, width)`.
fn fit(height: u32, width: u32, bh: u32, bw: u32) -> (u32, u32) {
    let (scale_w, scale_h) = (bw as f64 / width as f64, bh as f64 / height as f64);
    if scale_w < scale_h {
        (((height as f64 * scale_w).ceil() as u32).min(bh), bw)
    } else {
        (bh, ((width as f64 * scale_h).ceil() as u32).min(bw))
    }
}

/// PIL's resize; a same-size resize is a copy, as in Pillow.
fn resize(img: &RgbImage, width: u32, height: u32, cfg: &LlavaNextProcessorConfig) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    resample::resize(img, width.max(1), height.max(1), cfg.clip.resample, cfg.order)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINPOINTS: [(u32, u32); 5] = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

    #[test]
    fn best_resolution_follows_transformers() {
        // Values worked out by hand from transformers' select_best_resolution.
        assert_eq!(best_resolution(480, 640, &PINPOINTS), (672, 672));
        assert_eq!(best_resolution(100, 1000, &PINPOINTS), (336, 1008));
        assert_eq!(best_resolution(1000, 100, &PINPOINTS), (1008, 336));
        assert_eq!(best_resolution(336, 336, &PINPOINTS), (336, 672));
    }

    #[test]
    fn layout_counts_as_the_processor() {
        // llava-v1.6 with a 640x480 image: 2x2 tiles of 24x24 cells, 48x48 cells, the
        // image is wider, so rows are cut: 480 * 48 / 640 = 36 rows, 6 padding rows each side.
        let l = layout(640, 480, &PINPOINTS, 336, 24);
        assert_eq!(l, Layout { tiles: (2, 2), offset: (6, 0), kept: (36, 48) });
        assert_eq!(l.tokens(576), 576 + 36 * 49);
    }
}
