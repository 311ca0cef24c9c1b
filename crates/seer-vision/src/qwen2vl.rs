//! Qwen2-VL / Qwen2.5-VL preprocessing: transformers 5.23's
//! `Qwen2VLImageProcessorPil` (the PIL class; both families share it).
//!
//! Per image:
//!
//! 1. [`smart_resize`]: both sides to multiples of `patch_size * merge_size`
//!    (28), the area kept within `min_pixels..=max_pixels`, the aspect ratio
//!    kept as well as that allows;
//! 2. resize to that size with Pillow's algorithm (Pillow 13 pass order) and
//!    the configured filter (bicubic);
//! 3. rescale (f64, rounded to f32) and normalize (f32), as [`crate::clip`];
//! 4. cut into `patch_size` squares and flatten ([`flatten_patches`]): one row
//!    of `channels * temporal_patch_size * patch * patch` values per patch, the
//!    patches grouped by `merge_size`² merge blocks, so that the vision tower's
//!    merger finds each block's patches in consecutive rows.
//!
//! A still image is one temporal patch: the frame is repeated
//! `temporal_patch_size` times inside each row, and its grid is `[1, h, w]`.
//!
//! llama.cpp's mtmd sizes and resamples differently (a [`Qwen2VlStyle`] in the
//! config): [`llamacpp_size`] instead of step 1, and in step 2 the image keeps
//! its aspect ratio inside that size, centred on black.

use std::path::Path;

use image::RgbImage;
use serde::Deserialize;
use serde_json::Value;

use crate::clip::{
    channel_values, image_processor_dict, llamacpp_letterbox, pil_filter, read_processor_config,
    rescale_normalize, Pixels, CLIP_MEAN, CLIP_STD,
};
use crate::resample::{self, Filter, PassOrder};
use crate::VisionError;

/// The text the chat template writes once per image, between
/// `<|vision_start|>` and `<|vision_end|>`; the processor repeats it once per
/// merged token.
pub const IMAGE_PAD: &str = "<|image_pad|>";

/// transformers refuses images whose sides differ by more than this factor.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// `size` as transformers 5 saves it: the pixel bounds under their old names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
struct SizeJson {
    shortest_edge: u64,
    longest_edge: u64,
}

/// Whose rules turn an image into the size the tower reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Qwen2VlStyle {
    /// transformers' processor: [`smart_resize`], then stretched to that size
    /// (Pillow 13 pass order).
    #[default]
    Transformers,
    /// llama.cpp's mtmd for `qwen2vl_merger` / `qwen2.5vl_merger` projectors:
    /// [`llamacpp_size`], then fitted inside that size keeping the aspect
    /// ratio and centred on black (`PAD_CEIL`, horizontal pass first; see
    /// [`crate::clip::llamacpp_letterbox`]).
    LlamaCpp,
}

/// The image processor's settings (`processor_config.json`, nested, or a
/// flat `preprocessor_config.json`). Missing fields take transformers'
/// defaults; unknown ones are ignored.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct Qwen2VlProcessorConfig {
    /// Always effectively true: [`preprocess`] takes an RGB image.
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    /// Smallest area after resizing (`size.shortest_edge`, or `min_pixels`).
    #[serde(skip)]
    pub min_pixels: u64,
    /// Largest area after resizing (`size.longest_edge`, or `max_pixels`).
    #[serde(skip)]
    pub max_pixels: u64,
    /// A `PIL.Image.Resampling` code in configs (3 = bicubic).
    #[serde(deserialize_with = "pil_filter")]
    pub resample: Filter,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    #[serde(deserialize_with = "channel_values")]
    pub image_mean: [f64; 3],
    #[serde(deserialize_with = "channel_values")]
    pub image_std: [f64; 3],
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    /// Never in a config file: who seer follows ([`Qwen2VlStyle`]).
    #[serde(skip)]
    pub style: Qwen2VlStyle,
}

impl Default for Qwen2VlProcessorConfig {
    fn default() -> Self {
        Qwen2VlProcessorConfig {
            do_convert_rgb: true,
            do_resize: true,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            resample: Filter::Bicubic,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            style: Qwen2VlStyle::Transformers,
        }
    }
}

impl Qwen2VlProcessorConfig {
    /// Read `processor_config.json` (nested) or `preprocessor_config.json` (flat).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, VisionError> {
        read_processor_config(path.as_ref(), Self::from_json_value)
    }

    /// Accepts the flat image-processor dict or a processor dict nesting it
    /// under `"image_processor"`. Pixel bounds come from `size` and, as in
    /// transformers' constructor, `min_pixels` / `max_pixels` override it (the
    /// hub's Qwen2-VL configs only have those).
    pub fn from_json_value(value: &Value) -> Result<Self, VisionError> {
        let dict = image_processor_dict(value)?;
        let bad = |e: serde_json::Error| VisionError::BadConfig(e.to_string());
        let mut cfg = Qwen2VlProcessorConfig::deserialize(dict).map_err(bad)?;
        if let Some(size) = dict.get("size").filter(|s| !s.is_null()) {
            let size = SizeJson::deserialize(size).map_err(bad)?;
            (cfg.min_pixels, cfg.max_pixels) = (size.shortest_edge, size.longest_edge);
        }
        let pixels = |key: &str| dict.get(key).filter(|v| !v.is_null()).map(u64::deserialize);
        if let Some(min) = pixels("min_pixels") {
            cfg.min_pixels = min.map_err(bad)?;
        }
        if let Some(max) = pixels("max_pixels") {
            cfg.max_pixels = max.map_err(bad)?;
        }
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), VisionError> {
        let sizes = [self.patch_size, self.temporal_patch_size, self.merge_size];
        if sizes.contains(&0) {
            return Err(VisionError::BadConfig(
                "patch_size, temporal_patch_size and merge_size must not be zero".into(),
            ));
        }
        if self.max_pixels == 0 || self.min_pixels > self.max_pixels {
            return Err(VisionError::BadConfig(format!(
                "pixel bounds {}..{} are empty",
                self.min_pixels, self.max_pixels
            )));
        }
        Ok(())
    }

    /// The side every resized size is a multiple of: `patch_size * merge_size`.
    pub fn factor(&self) -> u32 {
        (self.patch_size * self.merge_size) as u32
    }
}

/// transformers' `smart_resize`, returning `(width, height)`: each side
/// rounded to a multiple of `factor` (Python's `round`, halves to even); if
/// the area then exceeds `max_pixels`, both sides scaled down by
/// `sqrt(area / max_pixels)` and floored to multiples of `factor` (at least
/// one `factor`); if it falls below `min_pixels`, scaled up and ceiled. All in
/// f64, as Python computes it. Errors where transformers does: an aspect
/// ratio above [`MAX_ASPECT_RATIO`] (and an empty image); a side that rounds
/// to zero (possible only with a tiny `min_pixels`) is refused too.
pub fn smart_resize(
    width: u32,
    height: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32), VisionError> {
    let (h, w, f) = (f64::from(height), f64::from(width), f64::from(factor));
    if width == 0 || height == 0 || h.max(w) / h.min(w) > MAX_ASPECT_RATIO {
        return Err(VisionError::AspectRatio {
            width,
            height,
            max: MAX_ASPECT_RATIO,
        });
    }
    let area = u64::from(width) * u64::from(height);
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (area as f64 / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / area as f64).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if w_bar == 0.0 || h_bar == 0.0 {
        return Err(VisionError::BadConfig(format!(
            "min_pixels {min_pixels} lets a {width}x{height} image round to nothing"
        )));
    }
    Ok((w_bar as u32, h_bar as u32))
}

/// The output for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2VlImage {
    /// `grid_t * grid_h * grid_w` rows of [`Qwen2VlImage::patch_dim`] values.
    pub patches: Vec<f32>,
    /// `[grid_t, grid_h, grid_w]` in patches: transformers' `image_grid_thw`.
    pub grid_thw: [usize; 3],
    /// `channels * temporal_patch_size * patch_size²`.
    pub patch_dim: usize,
}

impl Qwen2VlImage {
    /// `<|image_pad|>` tokens this image takes in the prompt (one per merged token).
    pub fn tokens(&self, merge_size: usize) -> usize {
        image_tokens(self.grid_thw, merge_size)
    }
}

/// Tokens an image of grid `grid_thw` becomes after the `merge_size`² merge.
pub fn image_tokens(grid_thw: [usize; 3], merge_size: usize) -> usize {
    grid_thw.iter().product::<usize>() / (merge_size * merge_size)
}

/// The size step 2 resizes a `width × height` image to, `(width, height)`.
pub fn resized_size(
    width: u32,
    height: u32,
    cfg: &Qwen2VlProcessorConfig,
) -> Result<(u32, u32), VisionError> {
    if !cfg.do_resize {
        return Ok((width, height));
    }
    let rule = match cfg.style {
        Qwen2VlStyle::Transformers => smart_resize,
        Qwen2VlStyle::LlamaCpp => llamacpp_size,
    };
    rule(width, height, cfg.factor(), cfg.min_pixels, cfg.max_pixels)
}

/// llama.cpp's `img_tool::calc_size_preserved_ratio` (mtmd-image.cpp), the
/// size mtmd gives the tower, as `(width, height)`: [`smart_resize`]'s rule in
/// f32, with C's `round` (halves away from zero: 70 pixels become 84, not
/// 56), each side at least `factor` from the start, and no aspect-ratio limit.
/// A bound of 0 is no bound.
pub fn llamacpp_size(
    width: u32,
    height: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32), VisionError> {
    if width == 0 || height == 0 {
        return Err(VisionError::Broken(format!("{width}x{height} image")));
    }
    let (w, h, f) = (width as f32, height as f32, factor as f32);
    let by_factor = |x: f32, op: fn(f32) -> f32| op(x / f) as u32 * factor;
    let mut w_bar = factor.max(by_factor(w, f32::round));
    let mut h_bar = factor.max(by_factor(h, f32::round));
    let area = u64::from(w_bar) * u64::from(h_bar);
    if max_pixels > 0 && area > max_pixels {
        let beta = (h * w / max_pixels as f32).sqrt();
        h_bar = factor.max(by_factor(h / beta, f32::floor));
        w_bar = factor.max(by_factor(w / beta, f32::floor));
    } else if min_pixels > 0 && area < min_pixels {
        let beta = (min_pixels as f32 / (h * w)).sqrt();
        h_bar = by_factor(h * beta, f32::ceil);
        w_bar = by_factor(w * beta, f32::ceil);
    }
    Ok((w_bar, h_bar))
}

/// The grid `[1, h, w]` (in patches) of a `width × height` image, from its
/// size alone, so prompts can be laid out before any pixel is resampled.
pub fn grid(
    width: u32,
    height: u32,
    cfg: &Qwen2VlProcessorConfig,
) -> Result<[usize; 3], VisionError> {
    let (w, h) = resized_size(width, height, cfg)?;
    Ok([1, h as usize / cfg.patch_size, w as usize / cfg.patch_size])
}

/// Steps 1 and 2: the resized u8 image (Pillow 13 pass order, as transformers
/// with Pillow 13; llama.cpp's letterbox for [`Qwen2VlStyle::LlamaCpp`]).
/// Without `do_resize`, an image whose sides are not multiples of the factor
/// is refused (transformers' reshape fails there too).
pub fn resize(img: &RgbImage, cfg: &Qwen2VlProcessorConfig) -> Result<RgbImage, VisionError> {
    let (w, h) = resized_size(img.width(), img.height(), cfg)?;
    if w % cfg.factor() != 0 || h % cfg.factor() != 0 {
        return Err(VisionError::BadConfig(format!(
            "without do_resize the image's sides must be multiples of {}, got {w}x{h}",
            cfg.factor()
        )));
    }
    if (w, h) == img.dimensions() {
        return Ok(img.clone());
    }
    Ok(match cfg.style {
        Qwen2VlStyle::Transformers => {
            resample::resize(img, w, h, cfg.resample, PassOrder::Pillow13)
        }
        // mtmd's `image_pad_color` for these projectors is black.
        Qwen2VlStyle::LlamaCpp => llamacpp_letterbox(img, w, h, [0, 0, 0]),
    })
}

/// transformers' `Qwen2VLImageProcessorPil` on one RGB image. Pixel values
/// equal transformers 5.23 with Pillow 13 exactly (see the crate's tests).
/// Load images with [`crate::AlphaMode::OverWhite`] to flatten transparency
/// as transformers does.
pub fn preprocess(
    img: &RgbImage,
    cfg: &Qwen2VlProcessorConfig,
) -> Result<Qwen2VlImage, VisionError> {
    let resized = resize(img, cfg)?;
    let rescale = cfg.do_rescale.then_some(cfg.rescale_factor);
    let normalize = cfg.do_normalize.then_some((cfg.image_mean, cfg.image_std));
    let pixels = rescale_normalize(&resized, rescale, normalize);
    Ok(flatten_patches(&pixels, cfg))
}

/// Step 4, the processor's `patchify`: the CHW image (sides multiples of
/// `patch_size * merge_size`) as rows `[channel, temporal, row, col]`, one
/// per patch, patches in merge-block order (blocks row-major, the block's
/// patches row-major inside it). Every temporal slot holds the same frame.
pub fn flatten_patches(pixels: &Pixels, cfg: &Qwen2VlProcessorConfig) -> Qwen2VlImage {
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (pixels.height / p, pixels.width / p);
    let patch_dim = pixels.channels * tp * p * p;
    let mut patches = Vec::with_capacity(gh * gw * patch_dim);
    for (bh, bw) in row_major(gh / m, gw / m) {
        for (i, j) in row_major(m, m) {
            let (py, px) = ((bh * m + i) * p, (bw * m + j) * p);
            for c in 0..pixels.channels {
                for _ in 0..tp {
                    for y in py..py + p {
                        let row = (c * pixels.height + y) * pixels.width;
                        patches.extend_from_slice(&pixels.data[row + px..row + px + p]);
                    }
                }
            }
        }
    }
    Qwen2VlImage {
        patches,
        grid_thw: [1, gh, gw],
        patch_dim,
    }
}

fn row_major(rows: usize, cols: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).flat_map(move |r| (0..cols).map(move |c| (r, c)))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::clip::llamacpp_fit;
    use crate::resample::Filter;
    use crate::{load_image, ImageInput, ImageLimits};

    /// `--image-min-tokens` / `--image-max-tokens` of a reference's command, else
    /// llama.cpp's defaults for Qwen2-VL (clip.cpp: 8 .. 4096 merged tokens).
    fn token_bounds(command: &[Value]) -> (u64, u64) {
        let arg = |flag: &str| {
            let at = command.iter().position(|a| a == flag)?;
            command[at + 1].as_str()?.parse().ok()
        };
        (
            arg("--image-min-tokens").unwrap_or(8),
            arg("--image-max-tokens").unwrap_or(4096),
        )
    }

    /// Every image of the llama-mtmd-cli references (`llamacpp_images`): the size
    /// mtmd gave the tower, the content box and offset inside it, the grid, and a
    /// canvas that is black outside the content box.
    #[test]
    fn llamacpp_sizes_and_canvas_follow_mtmd() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2vl");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir.join("gguf")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("llamacpp-") || name.ends_with("-check.json") {
                continue;
            }
            let r: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let command = r["command"].as_array().unwrap();
            let (min, max) = token_bounds(command);
            let cfg = Qwen2VlProcessorConfig {
                min_pixels: min * 28 * 28,
                max_pixels: max * 28 * 28,
                style: Qwen2VlStyle::LlamaCpp,
                ..Default::default()
            };
            let files = command
                .windows(2)
                .filter(|w| w[0] == "--image")
                .map(|w| w[1].as_str().unwrap());
            for (file, info) in files.zip(r["llamacpp_images"].as_array().unwrap()) {
                let pair = |key: &str| -> (u32, u32) {
                    serde_json::from_value(info[key].clone()).unwrap()
                };
                let (size, target) = (pair("size"), pair("target"));
                assert_eq!(
                    resized_size(size.0, size.1, &cfg).unwrap(),
                    target,
                    "{name}: size"
                );
                assert_eq!(
                    llamacpp_fit(size, target),
                    (pair("content"), pair("offset")),
                    "{name}: content box"
                );
                let want_grid: [usize; 3] =
                    serde_json::from_value(info["grid_thw"].clone()).unwrap();
                assert_eq!(
                    grid(size.0, size.1, &cfg).unwrap(),
                    want_grid,
                    "{name}: grid"
                );
                assert_eq!(
                    image_tokens(want_grid, 2) as u64,
                    info["tokens"].as_u64().unwrap(),
                    "{name}: tokens"
                );
                let img =
                    load_image(&ImageInput::Path(dir.join(file)), &ImageLimits::default()).unwrap();
                check_canvas(
                    &resize(&img, &cfg).unwrap(),
                    &img,
                    pair("content"),
                    pair("offset"),
                );
                seen += 1;
            }
        }
        assert!(
            seen >= 20,
            "expected the F16 and Q8_0 references of both models, found {seen} images"
        );
    }

    /// `canvas` holds `img` resized to `content` (horizontal pass first) at `offset`,
    /// black elsewhere.
    fn check_canvas(canvas: &RgbImage, img: &RgbImage, content: (u32, u32), offset: (u32, u32)) {
        let inner = resample::resize(
            img,
            content.0,
            content.1,
            Filter::Bicubic,
            PassOrder::HorizontalFirst,
        );
        for (x, y, p) in canvas.enumerate_pixels() {
            let (cx, cy) = (x.wrapping_sub(offset.0), y.wrapping_sub(offset.1));
            let want = if cx < content.0 && cy < content.1 {
                *inner.get_pixel(cx, cy)
            } else {
                image::Rgb([0, 0, 0])
            };
            assert_eq!(*p, want, "pixel ({x}, {y})");
        }
    }

    #[test]
    fn llamacpp_size_rounds_halves_away_and_has_no_aspect_limit() {
        assert_eq!(llamacpp_size(70, 70, 28, 0, 0).unwrap(), (84, 84));
        assert_eq!(
            smart_resize(70, 70, 28, 0, 1 << 20).unwrap(),
            (56, 56),
            "Python rounds halves to even"
        );
        assert_eq!(
            llamacpp_size(10, 3000, 28, 8 * 784, 4096 * 784).unwrap(),
            (28, 3000 / 28 * 28)
        );
        assert!(smart_resize(10, 3000, 28, 8 * 784, 4096 * 784).is_err());
        assert!(llamacpp_size(0, 5, 28, 0, 0).is_err());
    }
}
