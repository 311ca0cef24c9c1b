//! CLIP-style preprocessing, in the two flavours seer has to reproduce:
//!
//! * [`preprocess_hf`]: transformers' `CLIPImageProcessorPil` (5.x), which is
//!   what a Hugging Face checkpoint's `preprocessor_config.json` describes:
//!   resize the shortest edge, center crop, rescale, normalize.
//! * [`preprocess_llamacpp_llava`]: what llama.cpp's `tools/mtmd` does for a
//!   LLaVA-1.5 projector (`PROJECTOR_TYPE_MLP`) without pinpoints: letterbox
//!   into a square (resize to fit, pad with a fixed grey), normalize.
//!
//! Both resize with Pillow's algorithm (see [`crate::resample`]) on u8 pixels;
//! all float work happens after the last u8 step, in the same precision and
//! order as the reference, so outputs match bit for bit.

use std::path::Path;

use image::{Rgb, RgbImage};
use serde::Deserialize;
use serde_json::Value;

use crate::resample::{self, Filter, PassOrder};
use crate::VisionError;

/// A preprocessed image: `channels` planes of `height`×`width` f32 (CHW).
#[derive(Clone, Debug, PartialEq)]
pub struct Pixels {
    pub data: Vec<f32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Pixels {
    /// The value at channel `c`, row `y`, column `x`.
    pub fn get(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }
}

/// CLIP's defaults (`OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD` in transformers).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Where `do_resize` sends the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SizeJson")]
pub enum ResizeTarget {
    /// Scale so the shorter side equals this, keeping the aspect ratio.
    ShortestEdge(u32),
    /// Stretch to exactly this size.
    Exact { height: u32, width: u32 },
}

/// The `crop_size` of a center crop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SizeJson")]
pub struct CropSize {
    pub height: u32,
    pub width: u32,
}

/// `size` / `crop_size` as they appear in configs: a bare integer (older
/// CLIP checkpoints) or a dict.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeJson {
    Int(u32),
    Dict {
        shortest_edge: Option<u32>,
        longest_edge: Option<u32>,
        height: Option<u32>,
        width: Option<u32>,
    },
}

impl SizeJson {
    fn has_zero(&self) -> bool {
        match self {
            SizeJson::Int(n) => *n == 0,
            SizeJson::Dict {
                shortest_edge,
                longest_edge,
                height,
                width,
            } => [shortest_edge, longest_edge, height, width]
                .iter()
                .any(|v| **v == Some(0)),
        }
    }
}

impl TryFrom<SizeJson> for ResizeTarget {
    type Error = String;
    fn try_from(json: SizeJson) -> Result<Self, String> {
        if json.has_zero() {
            return Err("size must not be zero".into());
        }
        // CLIP resizes with default_to_square=False, so a bare int is the shortest edge.
        match json {
            SizeJson::Int(n) => Ok(ResizeTarget::ShortestEdge(n)),
            SizeJson::Dict {
                shortest_edge: Some(n),
                longest_edge: None,
                ..
            } => Ok(ResizeTarget::ShortestEdge(n)),
            SizeJson::Dict {
                shortest_edge: None,
                height: Some(height),
                width: Some(width),
                ..
            } => Ok(ResizeTarget::Exact { height, width }),
            _ => Err(
                "size must be an integer, {\"shortest_edge\": n} or {\"height\", \"width\"} \
                      (longest_edge is not supported)"
                    .into(),
            ),
        }
    }
}

impl TryFrom<SizeJson> for CropSize {
    type Error = String;
    fn try_from(json: SizeJson) -> Result<Self, String> {
        if json.has_zero() {
            return Err("crop_size must not be zero".into());
        }
        match json {
            SizeJson::Int(n) => Ok(CropSize {
                height: n,
                width: n,
            }),
            SizeJson::Dict {
                height: Some(height),
                width: Some(width),
                ..
            } => Ok(CropSize { height, width }),
            _ => Err("crop_size must be an integer or {\"height\", \"width\"}".into()),
        }
    }
}

/// A mean or std: three per-channel values, or one for all channels.
#[derive(Deserialize)]
#[serde(untagged)]
enum ChannelsJson {
    One(f64),
    Three([f64; 3]),
}

pub(crate) fn channel_values<'de, D: serde::Deserializer<'de>>(
    de: D,
) -> Result<[f64; 3], D::Error> {
    match ChannelsJson::deserialize(de) {
        Ok(ChannelsJson::One(v)) => Ok([v; 3]),
        Ok(ChannelsJson::Three(v)) => Ok(v),
        Err(_) => Err(serde::de::Error::custom(
            "image_mean / image_std must be one number or a list of three",
        )),
    }
}

pub(crate) fn pil_filter<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Filter, D::Error> {
    let code = u32::deserialize(de)?;
    Filter::from_pil_code(code).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "resample {code} is not supported (1-5: Pillow convolution filters)"
        ))
    })
}

/// The settings of a CLIP image processor, as in `preprocessor_config.json`.
/// Missing fields take `CLIPImageProcessor`'s defaults; unknown ones are ignored.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipProcessorConfig {
    pub do_resize: bool,
    pub size: ResizeTarget,
    /// Stored in configs as a `PIL.Image.Resampling` code (3 = bicubic).
    #[serde(deserialize_with = "pil_filter")]
    pub resample: Filter,
    pub do_center_crop: bool,
    pub crop_size: CropSize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    #[serde(deserialize_with = "channel_values")]
    pub image_mean: [f64; 3],
    #[serde(deserialize_with = "channel_values")]
    pub image_std: [f64; 3],
    /// Always effectively true here: [`preprocess_hf`] takes an RGB image.
    pub do_convert_rgb: bool,
}

impl Default for ClipProcessorConfig {
    fn default() -> Self {
        ClipProcessorConfig {
            do_resize: true,
            size: ResizeTarget::ShortestEdge(224),
            resample: Filter::Bicubic,
            do_center_crop: true,
            crop_size: CropSize {
                height: 224,
                width: 224,
            },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            do_convert_rgb: true,
        }
    }
}

impl ClipProcessorConfig {
    /// Read `preprocessor_config.json`, or a transformers-5 `processor_config.json`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, VisionError> {
        Self::from_json_value(&read_json_config(path.as_ref())?)
    }

    /// Accepts the flat image-processor dict, or a processor dict that nests it
    /// under `"image_processor"` (how transformers 5 saves `processor_config.json`).
    pub fn from_json_value(value: &Value) -> Result<Self, VisionError> {
        ClipProcessorConfig::deserialize(image_processor_dict(value)?)
            .map_err(|e| VisionError::BadConfig(e.to_string()))
    }
}

/// Parse a processor config file as JSON.
pub(crate) fn read_json_config(path: &Path) -> Result<Value, VisionError> {
    let text = std::fs::read_to_string(path).map_err(|source| VisionError::ConfigUnreadable {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| VisionError::BadConfig(format!("{}: {e}", path.display())))
}

/// Read the processor config at `path` with `parse` (a `from_json_value`), naming the
/// file in a config error.
pub(crate) fn read_processor_config<T>(
    path: &Path,
    parse: impl FnOnce(&Value) -> Result<T, VisionError>,
) -> Result<T, VisionError> {
    parse(&read_json_config(path)?).map_err(|e| match e {
        VisionError::BadConfig(msg) => VisionError::BadConfig(format!("{}: {msg}", path.display())),
        other => other,
    })
}

/// The image processor's settings: `value` itself (a flat
/// `preprocessor_config.json`), or its `"image_processor"` object (how
/// transformers 5 nests it in `processor_config.json`).
pub(crate) fn image_processor_dict(value: &Value) -> Result<&Value, VisionError> {
    let dict = match value.get("image_processor") {
        Some(nested) if nested.is_object() => nested,
        _ => value,
    };
    if !dict.is_object() {
        return Err(VisionError::BadConfig(
            "image processor config is not a JSON object".into(),
        ));
    }
    Ok(dict)
}

/// The output size of transformers' `get_resize_output_image_size` with
/// `default_to_square=False`: the short side becomes `shortest_edge`, the long
/// side is scaled and truncated (not rounded). Returns `(width, height)`.
pub fn shortest_edge_size(width: u32, height: u32, shortest_edge: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Python's int * int / int: exact product, then one correctly rounded division.
    let new_long = (u64::from(shortest_edge) * u64::from(long)) as f64 / f64::from(short);
    let new_long = new_long as u32;
    if width <= height {
        (shortest_edge, new_long)
    } else {
        (new_long, shortest_edge)
    }
}

/// Where transformers' numpy `center_crop` puts a `crop` of an image of
/// `width`×`height`: the (left, top) offset, floor((size - crop) / 2), which
/// is negative where the image is smaller than the crop (that part is padded
/// with zeros).
fn crop_offset(width: u32, height: u32, crop: CropSize) -> (i64, i64) {
    let left = (i64::from(width) - i64::from(crop.width)).div_euclid(2);
    let top = (i64::from(height) - i64::from(crop.height)).div_euclid(2);
    (left, top)
}

/// The range of `0..size` that a crop starting at `offset` keeps.
fn kept(offset: i64, crop_len: u32, size: u32) -> std::ops::Range<u32> {
    let start = offset.clamp(0, i64::from(size));
    let end = (offset + i64::from(crop_len)).clamp(0, i64::from(size));
    start as u32..end as u32
}

/// transformers' numpy `center_crop`, zero padding included.
pub fn center_crop(img: &RgbImage, crop: CropSize) -> RgbImage {
    let (left, top) = crop_offset(img.width(), img.height(), crop);
    let (cols, rows) = (
        kept(left, crop.width, img.width()),
        kept(top, crop.height, img.height()),
    );
    let inside = image::imageops::crop_imm(
        img,
        cols.start,
        rows.start,
        cols.len() as u32,
        rows.len() as u32,
    );
    paste_on_black(
        &inside.to_image(),
        crop,
        cols.start as i64 - left,
        rows.start as i64 - top,
    )
}

fn paste_on_black(part: &RgbImage, crop: CropSize, x: i64, y: i64) -> RgbImage {
    let mut canvas = RgbImage::new(crop.width, crop.height);
    image::imageops::replace(&mut canvas, part, x, y);
    canvas
}

/// The u8 stages of [`preprocess_hf`]: resize (Pillow 13 semantics) and center
/// crop. Only the pixels the crop keeps are resized (see
/// [`resample::resize_window`]), so extreme aspect ratios stay cheap.
pub fn hf_resize_and_crop(img: &RgbImage, cfg: &ClipProcessorConfig) -> RgbImage {
    let (width, height) = match (cfg.do_resize, cfg.size) {
        (false, _) => img.dimensions(),
        (true, ResizeTarget::ShortestEdge(n)) => shortest_edge_size(img.width(), img.height(), n),
        (true, ResizeTarget::Exact { height, width }) => (width, height),
    };
    let resize = |cols, rows| {
        resample::resize_window(
            img,
            width,
            height,
            cols,
            rows,
            cfg.resample,
            PassOrder::Pillow13,
        )
    };
    if !cfg.do_center_crop {
        return if cfg.do_resize {
            resize(0..width, 0..height)
        } else {
            img.clone()
        };
    }
    if !cfg.do_resize {
        return center_crop(img, cfg.crop_size);
    }
    let (left, top) = crop_offset(width, height, cfg.crop_size);
    let (cols, rows) = (
        kept(left, cfg.crop_size.width, width),
        kept(top, cfg.crop_size.height, height),
    );
    let (x, y) = (cols.start as i64 - left, rows.start as i64 - top);
    paste_on_black(&resize(cols, rows), cfg.crop_size, x, y)
}

/// transformers' `CLIPImageProcessorPil` on an RGB image. Pixel values equal
/// transformers 5.23 with Pillow 13 exactly (see the crate's tests). For an
/// image with transparency, transformers first composites it onto white: load
/// it with [`crate::AlphaMode::OverWhite`] to do the same.
pub fn preprocess_hf(img: &RgbImage, cfg: &ClipProcessorConfig) -> Pixels {
    let rescale = cfg.do_rescale.then_some(cfg.rescale_factor);
    let normalize = cfg.do_normalize.then_some((cfg.image_mean, cfg.image_std));
    rescale_normalize(&hf_resize_and_crop(img, cfg), rescale, normalize)
}

/// transformers' numpy `rescale` then `normalize` on a u8 image, to CHW:
/// rescale in f64 then round to f32 (transformers upcasts for this step),
/// normalize in f32.
pub(crate) fn rescale_normalize(
    img: &RgbImage,
    rescale: Option<f64>,
    normalize: Option<([f64; 3], [f64; 3])>,
) -> Pixels {
    let normalize = normalize.map(|(mean, std)| (mean.map(|m| m as f32), std.map(|s| s as f32)));
    to_pixels(img, |c, v| {
        let value = match rescale {
            Some(factor) => (f64::from(v) * factor) as f32,
            None => f32::from(v),
        };
        match normalize {
            Some((mean, std)) => (value - mean[c]) / std[c],
            None => value,
        }
    })
}

/// llama.cpp's padding colour for LLaVA-style projectors
/// (`hparams.image_pad_color`): the CLIP mean × 255, truncated. It is fixed
/// in clip.cpp, not derived from the model's mean.
pub const LLAMACPP_LLAVA_PAD: [u8; 3] = [122, 116, 104];

/// The u8 stage of [`preprocess_llamacpp_llava`]: [`llamacpp_letterbox`] to
/// `image_size`² on a canvas of [`LLAMACPP_LLAVA_PAD`].
pub fn llamacpp_llava_letterbox(img: &RgbImage, image_size: u32) -> RgbImage {
    llamacpp_letterbox(img, image_size, image_size, LLAMACPP_LLAVA_PAD)
}

/// llama.cpp's `img_tool::resize(.., PAD_CEIL, ..)` to `width`×`height`: the
/// image scaled to fit ([`llamacpp_fit`]), resized with llama.cpp's port of
/// Pillow's bicubic (always horizontal pass first), and pasted centred on a
/// canvas of `pad`. An input of the target size is copied unchanged.
pub fn llamacpp_letterbox(img: &RgbImage, width: u32, height: u32, pad: [u8; 3]) -> RgbImage {
    llamacpp_letterbox_with(img, width, height, pad, Filter::Bicubic)
}

/// [`llamacpp_letterbox`] with another of llama.cpp's resize filters (Gemma 3's
/// projector resizes bilinearly).
pub fn llamacpp_letterbox_with(img: &RgbImage, width: u32, height: u32, pad: [u8; 3], filter: Filter) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    let ((new_w, new_h), (x, y)) = llamacpp_fit(img.dimensions(), (width, height));
    let resized = resample::resize(img, new_w, new_h, filter, PassOrder::HorizontalFirst);
    let mut canvas = RgbImage::from_pixel(width, height, Rgb(pad));
    image::imageops::replace(&mut canvas, &resized, i64::from(x), i64::from(y));
    canvas
}

/// Where [`llamacpp_letterbox`] puts a `from` = (width, height) image on a
/// `to` canvas: the content's (width, height), scaled to fit with the scale
/// and the rounded-up sides computed in f32 as llama.cpp does, and its top
/// left corner (x, y), centred with the offsets rounded down.
pub fn llamacpp_fit(from: (u32, u32), to: (u32, u32)) -> ((u32, u32), (u32, u32)) {
    let scale = (to.0 as f32 / from.0 as f32).min(to.1 as f32 / from.1 as f32);
    let w = ((from.0 as f32 * scale).ceil() as u32).min(to.0);
    let h = ((from.1 as f32 * scale).ceil() as u32).min(to.1);
    ((w, h), ((to.0 - w) / 2, (to.1 - h) / 2))
}

/// llama.cpp mtmd's preprocessing for a LLaVA-1.5 (`PROJECTOR_TYPE_MLP`)
/// projector: [`llamacpp_llava_letterbox`], then `x / 255` and
/// `(x - mean) / std`, all in f32 like `clip_image_f32::normalize`.
/// llama.cpp keeps pixels interleaved (HWC); this returns CHW like every
/// [`Pixels`]. Panics if `image_size` is zero.
pub fn preprocess_llamacpp_llava(
    img: &RgbImage,
    image_size: usize,
    mean: [f32; 3],
    std: [f32; 3],
) -> Pixels {
    let size = u32::try_from(image_size).expect("image_size fits in u32");
    let boxed = llamacpp_llava_letterbox(img, size);
    llamacpp_normalize(&boxed, mean, std)
}

/// llama.cpp mtmd's preprocessing for Gemma 3's projector: letterboxed on black with
/// its bilinear resize, then normalized as [`preprocess_llamacpp_llava`] does.
pub fn preprocess_llamacpp_gemma3(img: &RgbImage, image_size: u32, mean: [f32; 3], std: [f32; 3]) -> Pixels {
    let boxed = llamacpp_letterbox_with(img, image_size, image_size, [0, 0, 0], Filter::Bilinear);
    llamacpp_normalize(&boxed, mean, std)
}

/// `x / 255`, then `(x - mean) / std`, in f32 like `clip_image_f32::normalize`.
fn llamacpp_normalize(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Pixels {
    to_pixels(img, |c, v| (f32::from(v) / 255.0 - mean[c]) / std[c])
}

/// Convert an RGB8 image to CHW f32 with a per-channel value map.
fn to_pixels(img: &RgbImage, value: impl Fn(usize, u8) -> f32) -> Pixels {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0.0f32; 3 * width * height];
    for (i, pixel) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * width * height + i] = value(c, pixel[c]);
        }
    }
    Pixels {
        data,
        channels: 3,
        height,
        width,
    }
}
