//! SmolVLM / Idefics3 preprocessing: transformers 5.23's
//! `Idefics3ImageProcessorPil` (the PIL class) and the prompt expansion of
//! `Idefics3Processor`.
//!
//! Per image (all resizes are Pillow's, on u8, with the configured filter):
//!
//! 1. resize so the longest edge is `size.longest_edge`, the other side
//!    truncated and bumped to even ([`resize_output_size`]);
//! 2. with `do_image_splitting`: resize both sides up to multiples of
//!    `max_image_size.longest_edge` ([`vision_encoder_size`]), cut into a
//!    row-major grid of square tiles and append the global image (the step-2
//!    image resized to one tile). An image that ends up a single tile is
//!    sent alone, as the global image, with a 0×0 grid. Without splitting the
//!    image is squashed to one tile, also with a 0×0 grid;
//! 3. rescale (f64, rounded to f32) and normalize (f32), as [`crate::clip`].
//!
//! Every tile is `max_image_size` square, so transformers' padding never
//! changes one: `pixel_attention_mask` is all ones for real tiles. Padding
//! only appears in a batch whose samples have different tile counts, where
//! the missing tiles are all zero with an all-zero mask.

use std::path::Path;

use image::RgbImage;
use serde::Deserialize;
use serde_json::Value;

use crate::clip::{
    channel_values, image_processor_dict, pil_filter, read_json_config, rescale_normalize, Pixels,
};
use crate::resample::{self, Filter, PassOrder};
use crate::VisionError;

/// The text the processor replaces, once per image.
pub const IMAGE_TOKEN: &str = "<image>";
/// Opens every tile and closes the global image.
pub const FAKE_IMAGE_TOKEN: &str = "<fake_token_around_image>";
/// Tags the global (whole-image) tile.
pub const GLOBAL_IMAGE_TAG: &str = "<global-img>";

/// transformers' `MAX_IMAGE_SIZE`: no side exceeds this after step 1.
pub const MAX_IMAGE_SIZE: u32 = 4096;

/// `size` of the first resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SizeJson")]
pub enum Idefics3Size {
    /// Scale so the longer side is this (SmolVLM's configs).
    LongestEdge(u32),
    /// Stretch to exactly this size.
    Exact { height: u32, width: u32 },
}

#[derive(Deserialize)]
struct SizeJson {
    longest_edge: Option<u32>,
    height: Option<u32>,
    width: Option<u32>,
}

impl TryFrom<SizeJson> for Idefics3Size {
    type Error = String;
    fn try_from(json: SizeJson) -> Result<Self, String> {
        if [json.longest_edge, json.height, json.width].contains(&Some(0)) {
            return Err("size must not be zero".into());
        }
        match json {
            SizeJson {
                longest_edge: Some(n),
                ..
            } => Ok(Idefics3Size::LongestEdge(n)),
            SizeJson {
                height: Some(height),
                width: Some(width),
                ..
            } => Ok(Idefics3Size::Exact { height, width }),
            _ => Err("size must be {\"longest_edge\": n} or {\"height\", \"width\"}".into()),
        }
    }
}

#[derive(Deserialize)]
struct MaxImageSizeJson {
    longest_edge: u32,
}

fn max_image_size<'de, D: serde::Deserializer<'de>>(de: D) -> Result<u32, D::Error> {
    let json = MaxImageSizeJson::deserialize(de)?;
    if json.longest_edge == 0 {
        return Err(serde::de::Error::custom(
            "max_image_size.longest_edge must not be zero",
        ));
    }
    Ok(json.longest_edge)
}

/// The image processor's settings (`preprocessor_config.json`, or nested in a
/// transformers-5 `processor_config.json`), plus the processor's
/// `image_seq_len`. Missing fields take transformers' defaults.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct Idefics3ProcessorConfig {
    /// Always effectively true: [`preprocess`] takes an RGB image (load
    /// images with [`crate::AlphaMode::OverWhite`] to match transformers).
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub size: Idefics3Size,
    /// A `PIL.Image.Resampling` code in configs (1 = Lanczos).
    #[serde(deserialize_with = "pil_filter")]
    pub resample: Filter,
    pub do_image_splitting: bool,
    /// `max_image_size.longest_edge`: the side of every tile.
    #[serde(deserialize_with = "max_image_size")]
    pub max_image_size: u32,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    #[serde(deserialize_with = "channel_values")]
    pub image_mean: [f64; 3],
    #[serde(deserialize_with = "channel_values")]
    pub image_std: [f64; 3],
    /// Has no effect on a single image's tiles (see the module docs).
    pub do_pad: bool,
    /// `<image>` tokens per tile; a processor-level setting, read from the
    /// top level of the JSON.
    pub image_seq_len: usize,
}

impl Default for Idefics3ProcessorConfig {
    fn default() -> Self {
        Idefics3ProcessorConfig {
            do_convert_rgb: true,
            do_resize: true,
            size: Idefics3Size::LongestEdge(4 * 364),
            resample: Filter::Lanczos,
            do_image_splitting: true,
            max_image_size: 364,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            do_pad: true,
            image_seq_len: 169,
        }
    }
}

impl Idefics3ProcessorConfig {
    /// Read `processor_config.json` (nested) or `preprocessor_config.json` (flat).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, VisionError> {
        let path = path.as_ref();
        Self::from_json_value(&read_json_config(path)?).map_err(|e| match e {
            VisionError::BadConfig(msg) => {
                VisionError::BadConfig(format!("{}: {msg}", path.display()))
            }
            other => other,
        })
    }

    /// Accepts the flat image-processor dict or a processor dict nesting it
    /// under `"image_processor"`; `image_seq_len` is taken from the top level
    /// when present.
    pub fn from_json_value(value: &Value) -> Result<Self, VisionError> {
        let dict = image_processor_dict(value)?;
        let mut cfg = Idefics3ProcessorConfig::deserialize(dict)
            .map_err(|e| VisionError::BadConfig(e.to_string()))?;
        if let Some(len) = value.get("image_seq_len") {
            cfg.image_seq_len = len
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    VisionError::BadConfig("image_seq_len must be a non-negative integer".into())
                })?;
        }
        Ok(cfg)
    }
}

/// The image processor's output for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Idefics3Image {
    /// `rows * cols` tiles in row-major order, then the global image; just
    /// the global image when `rows == cols == 0`. Each is 3×tile×tile.
    pub tiles: Vec<Pixels>,
    pub rows: usize,
    pub cols: usize,
}

impl Idefics3Image {
    /// The processor's text for this image's `<image>` ([`prompt_for_image`]).
    pub fn prompt(&self, image_seq_len: usize) -> String {
        prompt_for_image(self.rows, self.cols, image_seq_len)
    }
}

/// Python's `int(a / b)` for positive operands: one correctly rounded f64
/// division, truncated.
fn int_div(a: f64, b: f64) -> u32 {
    (a / b) as u32
}

/// Step 1's size, `(width, height)`: transformers'
/// `_resize_output_size_rescale_to_max_len` (the shorter side truncated, +1
/// if odd) then `_resize_output_size_scale_below_upper_bound` with
/// [`MAX_IMAGE_SIZE`].
pub fn resize_output_size(width: u32, height: u32, longest_edge: u32) -> (u32, u32) {
    let aspect = f64::from(width) / f64::from(height);
    let (mut w, mut h) = if width >= height {
        let h = int_div(f64::from(longest_edge), aspect);
        (longest_edge, h + h % 2)
    } else {
        let w = (f64::from(longest_edge) * aspect) as u32;
        (w + w % 2, longest_edge)
    };
    w = w.max(1);
    h = h.max(1);
    let aspect = f64::from(w) / f64::from(h);
    if w >= h && w > MAX_IMAGE_SIZE {
        w = MAX_IMAGE_SIZE;
        h = int_div(f64::from(w), aspect);
    } else if h > w && h > MAX_IMAGE_SIZE {
        h = MAX_IMAGE_SIZE;
        w = (f64::from(h) * aspect) as u32;
    }
    (w.max(1), h.max(1))
}

/// Step 2's size, `(width, height)`: transformers' `resize_for_vision_encoder`.
/// The longer side goes up to a multiple of `tile`; the shorter is that over
/// the aspect ratio, truncated, then also up to a multiple of `tile`.
pub fn vision_encoder_size(width: u32, height: u32, tile: u32) -> (u32, u32) {
    let up = |n: u32| n.div_ceil(tile).max(1) * tile;
    let aspect = f64::from(width) / f64::from(height);
    if width >= height {
        let w = up(width);
        (w, up(int_div(f64::from(w), aspect)))
    } else {
        let h = up(height);
        (up((f64::from(h) * aspect) as u32), h)
    }
}

/// The u8 tiles of one image (row-major, global last) and the grid, with
/// resizes in `order`. [`PassOrder::Pillow13`] is what transformers does
/// with Pillow 13.
pub fn tiles_u8(
    img: &RgbImage,
    cfg: &Idefics3ProcessorConfig,
    order: PassOrder,
) -> (Vec<RgbImage>, usize, usize) {
    let resize = |img: &RgbImage, (w, h): (u32, u32)| {
        if img.dimensions() == (w, h) {
            img.clone()
        } else {
            resample::resize(img, w, h, cfg.resample, order)
        }
    };
    let tile = cfg.max_image_size;
    let resized = if cfg.do_resize {
        let target = match cfg.size {
            Idefics3Size::LongestEdge(n) => resize_output_size(img.width(), img.height(), n),
            Idefics3Size::Exact { height, width } => (width, height),
        };
        resize(img, target)
    } else {
        img.clone()
    };
    if !cfg.do_image_splitting {
        return (vec![resize(&resized, (tile, tile))], 0, 0);
    }
    let refined = resize(
        &resized,
        vision_encoder_size(resized.width(), resized.height(), tile),
    );
    let (width, height) = refined.dimensions();
    if width <= tile && height <= tile {
        return (vec![refined], 0, 0);
    }
    let (rows, cols) = (height / tile, width / tile);
    let mut tiles = Vec::with_capacity((rows * cols + 1) as usize);
    for r in 0..rows {
        for c in 0..cols {
            tiles.push(
                image::imageops::crop_imm(&refined, c * tile, r * tile, tile, tile).to_image(),
            );
        }
    }
    tiles.push(resize(&refined, (tile, tile)));
    (tiles, rows as usize, cols as usize)
}

/// transformers' `Idefics3ImageProcessorPil` on one RGB image (Pillow 13
/// resize order). Pixel values equal transformers 5.23 exactly (see the
/// crate's tests).
/// The tile grid `(rows, cols)` [`tiles_u8`] makes of a `width × height` image, from its
/// size alone: `(0, 0)` when the image becomes a single tile. Prompts are laid out from
/// this before any pixel is resampled.
pub fn grid(width: u32, height: u32, cfg: &Idefics3ProcessorConfig) -> (usize, usize) {
    let tile = cfg.max_image_size;
    if !cfg.do_image_splitting {
        return (0, 0);
    }
    let (w, h) = if cfg.do_resize {
        match cfg.size {
            Idefics3Size::LongestEdge(n) => resize_output_size(width, height, n),
            Idefics3Size::Exact { height, width } => (width, height),
        }
    } else {
        (width, height)
    };
    let (w, h) = vision_encoder_size(w, h, tile);
    if w <= tile && h <= tile {
        return (0, 0);
    }
    ((h / tile) as usize, (w / tile) as usize)
}

pub fn preprocess(img: &RgbImage, cfg: &Idefics3ProcessorConfig) -> Idefics3Image {
    preprocess_with_order(img, cfg, PassOrder::Pillow13)
}

/// [`preprocess`] with a choice of resize pass order
/// ([`PassOrder::HorizontalFirst`] is Pillow <= 12 and llama.cpp's port).
pub fn preprocess_with_order(
    img: &RgbImage,
    cfg: &Idefics3ProcessorConfig,
    order: PassOrder,
) -> Idefics3Image {
    let (tiles, rows, cols) = tiles_u8(img, cfg, order);
    let rescale = cfg.do_rescale.then_some(cfg.rescale_factor);
    let normalize = cfg.do_normalize.then_some((cfg.image_mean, cfg.image_std));
    let tiles = tiles
        .iter()
        .map(|t| rescale_normalize(t, rescale, normalize))
        .collect();
    Idefics3Image { tiles, rows, cols }
}

/// The text `Idefics3Processor` puts in place of one `<image>`: per tile
/// `<fake_token_around_image><row_r_col_c>` + `image_seq_len` × `<image>`, a
/// `\n` after each row, then `\n<fake_token_around_image><global-img>` +
/// `<image>`s + `<fake_token_around_image>`. With a 0×0 grid only the global
/// part, without the leading `\n`.
pub fn prompt_for_image(rows: usize, cols: usize, image_seq_len: usize) -> String {
    let images = IMAGE_TOKEN.repeat(image_seq_len);
    let global = format!("{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TAG}{images}{FAKE_IMAGE_TOKEN}");
    if rows == 0 && cols == 0 {
        return global;
    }
    let mut text = String::new();
    for r in 1..=rows {
        for c in 1..=cols {
            text.push_str(FAKE_IMAGE_TOKEN);
            text.push_str(&format!("<row_{r}_col_{c}>"));
            text.push_str(&images);
        }
        text.push('\n');
    }
    text.push('\n');
    text.push_str(&global);
    text
}

/// Replace each `<image>` of `text`, in order, with [`prompt_for_image`] of
/// the matching `(rows, cols)` grid. Errors when the counts differ, as the
/// processor does.
pub fn expand_prompt(
    text: &str,
    grids: &[(usize, usize)],
    image_seq_len: usize,
) -> Result<String, VisionError> {
    let parts: Vec<&str> = text.split(IMAGE_TOKEN).collect();
    if parts.len() - 1 != grids.len() {
        return Err(VisionError::ImageCountMismatch {
            placeholders: parts.len() - 1,
            images: grids.len(),
        });
    }
    let mut out = String::from(parts[0]);
    for (part, &(rows, cols)) in parts[1..].iter().zip(grids) {
        out.push_str(&prompt_for_image(rows, cols, image_seq_len));
        out.push_str(part);
    }
    Ok(out)
}
