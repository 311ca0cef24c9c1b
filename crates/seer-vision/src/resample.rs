//! Pillow-compatible resizing of RGB8 images.
//!
//! Both reference preprocessors seer has to reproduce resize with Pillow's
//! algorithm: transformers' PIL image processors call `PIL.Image.resize`, and
//! llama.cpp's `tools/mtmd` carries its own port of Pillow's `Resample.c`. The
//! algorithm is a separable convolution (one pass per axis, rounded to u8 in
//! between) whose filter support widens with the downscale factor, with
//! weights in 22-bit fixed point. Results are only identical if every one of
//! those details matches, so they are spelled out here rather than delegated
//! to a general-purpose resizer: fast_image_resize's CatmullRom (i16 weights,
//! variable precision) differs from Pillow on 15% of values, by up to 10
//! levels, on the 640×480 → 448×336 fixture.

use std::ops::Range;

use image::RgbImage;

/// Fractional bits of the fixed-point weights: 32 bits, minus 8 for the pixel
/// value, minus 2 of headroom for filters whose lobes overshoot.
const PRECISION_BITS: u32 = 22;

/// A Pillow convolution filter. `NEAREST` (code 0) is not a convolution in
/// Pillow and is not supported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Box,
    Bilinear,
    Hamming,
    Bicubic,
    Lanczos,
}

impl Filter {
    /// Map a `PIL.Image.Resampling` code (as stored in `preprocessor_config.json`).
    pub fn from_pil_code(code: u32) -> Option<Filter> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            4 => Some(Filter::Box),
            5 => Some(Filter::Hamming),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// The filter kernel, evaluated exactly as Pillow does (same branches,
    /// same constants, including Hamming's single-precision 0.54/0.46).
    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => hamming(x.abs()),
            Filter::Bicubic => bicubic(x.abs()),
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Keys cubic with a = -0.5 (Catmull-Rom), Pillow's BICUBIC.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn hamming(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * std::f64::consts::PI;
    // Pillow writes these constants as C floats, so they are rounded to f32.
    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Which axis is resampled first when both change. The intermediate image is
/// rounded to u8, so the order changes the result by a level here and there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassOrder {
    /// Always horizontal, then vertical: Pillow up to 12.x and llama.cpp.
    HorizontalFirst,
    /// Pillow 13 (python-pillow/Pillow#9549): vertical first when the height
    /// shrinks by more than twice as many pixels as the width does.
    Pillow13,
}

impl PassOrder {
    fn vertical_first(self, from: (u32, u32), to: (u32, u32)) -> bool {
        let (in_w, in_h) = (i64::from(from.0), i64::from(from.1));
        let (out_w, out_h) = (i64::from(to.0), i64::from(to.1));
        self == PassOrder::Pillow13 && out_h < in_h && in_h - out_h > 2 * (in_w - out_w)
    }
}

/// Fixed-point taps for one axis: the `i`-th output of the window reads input
/// indices `first[i]..first[i] + weights[i].len()`.
struct AxisTaps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Taps for outputs `window` of a resize from `in_size` to `out_size`.
fn axis_taps(in_size: u32, out_size: u32, window: Range<u32>, filter: Filter) -> AxisTaps {
    let scale = f64::from(in_size) / f64::from(out_size);
    // Downscaling widens the kernel so every input pixel contributes.
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    // Pillow multiplies by this reciprocal rather than dividing by the scale;
    // the two can differ in the last bit.
    let inv_scale = 1.0 / filter_scale;
    let mut taps = AxisTaps {
        first: Vec::new(),
        weights: Vec::new(),
    };
    for out in window {
        let center = (f64::from(out) + 0.5) * scale;
        // `as i64` truncates toward zero, like the C casts this mirrors.
        let lo = ((center - support + 0.5) as i64).max(0);
        let hi = ((center + support + 0.5) as i64).min(i64::from(in_size));
        let raw: Vec<f64> = (lo..hi)
            .map(|i| filter.weight((i as f64 - center + 0.5) * inv_scale))
            .collect();
        taps.first.push(lo as usize);
        taps.weights.push(to_fixed_point(&raw));
    }
    taps
}

/// Normalise the weights to sum to one, then round them half away from zero
/// into fixed point.
fn to_fixed_point(raw: &[f64]) -> Vec<i32> {
    let total = raw.iter().fold(0.0, |sum, w| sum + w);
    let one = f64::from(1u32 << PRECISION_BITS);
    raw.iter()
        .map(|&w| {
            let w = if total != 0.0 { w / total } else { w };
            let rounding = if w < 0.0 { -0.5 } else { 0.5 };
            (w * one + rounding) as i32
        })
        .collect()
}

/// Weighted sum of samples `stride` bytes apart (one per weight), rounded and
/// clamped to u8.
fn convolve(src: &[u8], start: usize, stride: usize, weights: &[i32]) -> u8 {
    // Start at one half so the final shift rounds to nearest.
    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
    for (k, &w) in weights.iter().enumerate() {
        acc += i64::from(src[start + k * stride]) * i64::from(w);
    }
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Columns `cols` of `src` resized to `out_w` wide; Pillow leaves an axis
/// whose size does not change unfiltered.
fn horizontal(src: &RgbImage, out_w: u32, cols: Range<u32>, filter: Filter) -> RgbImage {
    let (in_w, h) = src.dimensions();
    if out_w == in_w {
        return image::imageops::crop_imm(src, cols.start, 0, cols.len() as u32, h).to_image();
    }
    let taps = axis_taps(in_w, out_w, cols.clone(), filter);
    let raw = src.as_raw();
    let mut out = RgbImage::new(cols.len() as u32, h);
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        let (first, weights) = (taps.first[x as usize], &taps.weights[x as usize]);
        let start = (y as usize * in_w as usize + first) * 3;
        for c in 0..3 {
            pixel[c] = convolve(raw, start + c, 3, weights);
        }
    }
    out
}

/// Rows `rows` of `src` resized to `out_h` high.
fn vertical(src: &RgbImage, out_h: u32, rows: Range<u32>, filter: Filter) -> RgbImage {
    let (w, in_h) = src.dimensions();
    if out_h == in_h {
        return image::imageops::crop_imm(src, 0, rows.start, w, rows.len() as u32).to_image();
    }
    let taps = axis_taps(in_h, out_h, rows.clone(), filter);
    let raw = src.as_raw();
    let row_len = w as usize * 3;
    let mut out = RgbImage::new(w, rows.len() as u32);
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        let (first, weights) = (taps.first[y as usize], &taps.weights[y as usize]);
        let start = first * row_len + x as usize * 3;
        for c in 0..3 {
            pixel[c] = convolve(raw, start + c, row_len, weights);
        }
    }
    out
}

/// Resize to `width`×`height` exactly as `PIL.Image.resize(size, filter)` does
/// for an RGB image (no `box`, no `reducing_gap`).
///
/// Panics if a target dimension is zero.
pub fn resize(
    img: &RgbImage,
    width: u32,
    height: u32,
    filter: Filter,
    order: PassOrder,
) -> RgbImage {
    resize_window(img, width, height, 0..width, 0..height, filter, order)
}

/// Columns `cols` and rows `rows` of what [`resize`] would return, computing
/// only those. Every output pixel depends on the input alone, so the window
/// is identical to the same region of the full resize; a center crop after an
/// extreme upscale (a 1×10000 image to a shortest edge of 336) then costs the
/// crop, not the 3.4 GB intermediate.
///
/// Panics if the window is empty or does not fit in `width`×`height`.
pub fn resize_window(
    img: &RgbImage,
    width: u32,
    height: u32,
    cols: Range<u32>,
    rows: Range<u32>,
    filter: Filter,
    order: PassOrder,
) -> RgbImage {
    assert!(
        !cols.is_empty() && cols.end <= width,
        "columns {cols:?} outside 0..{width}"
    );
    assert!(
        !rows.is_empty() && rows.end <= height,
        "rows {rows:?} outside 0..{height}"
    );
    if order.vertical_first(img.dimensions(), (width, height)) {
        horizontal(&vertical(img, height, rows, filter), width, cols, filter)
    } else {
        vertical(&horizontal(img, width, cols, filter), height, rows, filter)
    }
}
