//! JPEG decoding with libjpeg-turbo's decoder (as vendored by mozjpeg-sys),
//! set up the way Pillow sets it up, so that seer sees the same pixels as
//! transformers (which opens images with Pillow): the default integer
//! ("islow") IDCT, fancy upsampling, YCbCr → RGB by libjpeg's own tables.
//! Another decoder (the image crate's zune-jpeg) differs from it by a few
//! levels on a good share of the values of a subsampled JPEG. mozjpeg-sys
//! builds libjpeg-turbo's C code without SIMD (no nasm needed); the SIMD
//! versions of these steps are bit-exact with it, and Pillow's libjpeg-turbo
//! (3.2 in Pillow 13) decodes the same as this older copy: the fixtures from
//! scripts/make_vision_fixtures.py check it on every kind of JPEG Pillow
//! writes.
//!
//! libjpeg reports a fatal error by calling `error_exit`, which must not
//! return. Here it unwinds (the C code is built with `-fexceptions` and the
//! callbacks are `extern "C-unwind"`) back to a `catch_unwind` in [`decode`],
//! where the error becomes a [`VisionError`]. This relies on `panic =
//! "unwind"`, Rust's default; with `panic = "abort"` a broken JPEG would end
//! the process.
//!
//! What Pillow does, and so what this does:
//! * grey JPEGs come out grey and become RGB by replicating the value;
//! * four-channel (CMYK, or YCCK that libjpeg turns into CMYK) JPEGs are
//!   read as Adobe-style inverted CMYK and turned into RGB with Pillow's
//!   `cmyk2rgb` arithmetic (no colour management, ICC profiles ignored);
//! * warnings about corrupt data are ignored and decoding goes on (libjpeg
//!   fills in what it cannot read), but data that ends early, even if only
//!   the final EOI marker is missing, is an error ("image file is
//!   truncated" in Pillow);
//! * EXIF orientation is not applied.
//!
//! One addition: a JPEG with more than [`MAX_SCANS`] scans is refused, since
//! every scan of a progressive JPEG can revisit the whole image and a small
//! file with very many scans would otherwise take minutes to decode.

use std::ffi::{c_int, c_ulong};
use std::mem;
use std::panic::{self, AssertUnwindSafe};

use image::RgbImage;
use mozjpeg_sys::{
    jpeg_common_struct, jpeg_create_decompress, jpeg_decompress_struct, jpeg_destroy_decompress,
    jpeg_error_mgr, jpeg_finish_decompress, jpeg_mem_src, jpeg_progress_mgr, jpeg_read_header,
    jpeg_read_scanlines, jpeg_start_decompress, jpeg_std_error, JSAMPROW_MUT, JWRN_JPEG_EOF,
    J_COLOR_SPACE,
};

use crate::input::VisionError;

/// More scans than any encoder writes (libjpeg's progressive scripts have
/// about ten; one per coefficient and bit would be 64 × 11 × 4), few enough
/// to bound the work a hostile file can ask for.
pub const MAX_SCANS: c_int = 1000;

/// libjpeg's `JMSG_LENGTH_MAX`: the buffer `format_message` writes into.
const MESSAGE_LENGTH: usize = 200;

/// What an unwind out of libjpeg carries back to [`decode`].
struct Abort(VisionError);

/// Decode a JPEG to RGB8 as `PIL.Image.open(...).convert("RGB")` does,
/// refusing it before decoding if its header claims more than `max_pixels`.
pub(crate) fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, VisionError> {
    match panic::catch_unwind(AssertUnwindSafe(|| decode_unwinding(bytes, max_pixels))) {
        Ok(result) => result,
        Err(payload) => match payload.downcast::<Abort>() {
            Ok(abort) => Err(abort.0),
            // A bug of ours, not libjpeg's: let it be the panic it is.
            Err(payload) => panic::resume_unwind(payload),
        },
    }
}

/// A libjpeg decompressor with its error and progress handlers; destroyed
/// (all of libjpeg's memory freed) when dropped, including while unwinding.
struct Decompressor {
    // Boxed so that libjpeg's pointers to them stay valid when this moves.
    cinfo: Box<jpeg_decompress_struct>,
    _err: Box<jpeg_error_mgr>,
    _progress: Box<jpeg_progress_mgr>,
}

impl Decompressor {
    fn new() -> Decompressor {
        // SAFETY: all-zero is a valid value of these C structs (null
        // pointers, `None` callbacks, the first variant of each enum), and
        // what libjpeg itself expects before jpeg_std_error and
        // jpeg_create_decompress fill them in.
        unsafe {
            let mut err: Box<jpeg_error_mgr> = Box::new(mem::zeroed());
            jpeg_std_error(&mut err);
            err.error_exit = Some(error_exit);
            err.emit_message = Some(emit_message);
            let mut progress: Box<jpeg_progress_mgr> = Box::new(mem::zeroed());
            progress.progress_monitor = Some(limit_scans);
            let mut cinfo: Box<jpeg_decompress_struct> = Box::new(mem::zeroed());
            cinfo.common.err = &mut *err;
            // Can only fail on a library/header version mismatch.
            jpeg_create_decompress(&mut *cinfo);
            cinfo.common.progress = &mut *progress;
            Decompressor {
                cinfo,
                _err: err,
                _progress: progress,
            }
        }
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: created by jpeg_create_decompress; destroying is allowed in
        // any state, including after an error unwound out of libjpeg.
        unsafe { jpeg_destroy_decompress(&mut self.cinfo) }
    }
}

/// The body of [`decode`]: libjpeg errors unwind out of it with an [`Abort`].
fn decode_unwinding(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, VisionError> {
    let size = c_ulong::try_from(bytes.len())
        .map_err(|_| VisionError::Broken("JPEG data too large for libjpeg".into()))?;
    let mut dec = Decompressor::new();
    let cinfo = &mut *dec.cinfo;
    // SAFETY: `bytes` outlives `dec`, the only user of the source; the
    // calls follow libjpeg's sequence (header, parameters, start, scanlines,
    // finish), and every error leaves by unwinding instead of returning.
    unsafe {
        jpeg_mem_src(cinfo, bytes.as_ptr(), size);
        // require_image: a tables-only stream is an error, not a return code.
        jpeg_read_header(cinfo, 1);
    }

    // Only the header has been read: refuse a huge image before libjpeg
    // allocates anything for its pixels or coefficients.
    let (width, height) = (cinfo.image_width, cinfo.image_height);
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(VisionError::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        });
    }

    let cmyk = match (cinfo.num_components, cinfo.jpeg_color_space) {
        // libjpeg replicates grey into R, G and B, as Pillow's L -> RGB does.
        (1, J_COLOR_SPACE::JCS_GRAYSCALE)
        | (3, J_COLOR_SPACE::JCS_YCbCr | J_COLOR_SPACE::JCS_RGB) => false,
        (4, J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK) => true,
        (n, _) => {
            return Err(VisionError::UnsupportedFormat(format!(
                "JPEG with {n} colour components"
            )))
        }
    };
    cinfo.out_color_space = if cmyk {
        J_COLOR_SPACE::JCS_CMYK
    } else {
        J_COLOR_SPACE::JCS_RGB
    };

    // SAFETY: as above; jpeg_read_scanlines writes at most
    // `output_height - output_scanline` rows of `output_width *
    // output_components` bytes, each into its own slice of `pixels`.
    let (out_width, channels, pixels) = unsafe {
        jpeg_start_decompress(cinfo);
        let out_width = cinfo.output_width as usize;
        let out_height = cinfo.output_height as usize;
        let channels = cinfo.output_components as usize;
        assert_eq!(
            (out_width, out_height, channels),
            (width as usize, height as usize, if cmyk { 4 } else { 3 }),
            "libjpeg's output is not the size asked for"
        );
        let stride = out_width * channels;
        let mut pixels = vec![0u8; stride * out_height];
        let mut rows: Vec<JSAMPROW_MUT> = pixels
            .chunks_exact_mut(stride)
            .map(|row| row.as_mut_ptr())
            .collect();
        while (cinfo.output_scanline as usize) < out_height {
            let done = cinfo.output_scanline as usize;
            let read =
                jpeg_read_scanlines(cinfo, rows[done..].as_mut_ptr(), (out_height - done) as u32);
            // A memory source never suspends; no progress would loop forever.
            if read == 0 {
                return Err(VisionError::Broken("libjpeg returned no scanlines".into()));
            }
        }
        // Reads up to the EOI marker: Pillow refuses a JPEG that lacks one.
        jpeg_finish_decompress(cinfo);
        (out_width, channels, pixels)
    };
    drop(dec);

    let rgb = if cmyk {
        pixels
            .chunks_exact(channels)
            .flat_map(inverted_cmyk_to_rgb)
            .collect()
    } else {
        pixels
    };
    debug_assert_eq!(rgb.len(), out_width * height as usize * 3);
    Ok(RgbImage::from_raw(width, height, rgb).expect("buffer is width x height x 3"))
}

/// Pillow's reading of a four-channel JPEG: it takes libjpeg's CMYK as
/// inverted ("CMYK;I", the Adobe convention), then `convert("RGB")` runs
/// `cmyk2rgb`, which with n = 255 − k is n − n × c / 255 per channel, the
/// product rounded by Pillow's shift-based division by 255. With the
/// inversion undone this is `k − (255 − v) × k / 255` for each stored v.
fn inverted_cmyk_to_rgb(stored: &[u8]) -> [u8; 3] {
    let k = u32::from(stored[3]); // 255 − inverted k
    let channel = |v: u8| {
        let product = (255 - u32::from(v)) * k + 128;
        let ink = ((product >> 8) + product) >> 8;
        (k - ink) as u8 // ink <= k, so no clipping is needed
    };
    [channel(stored[0]), channel(stored[1]), channel(stored[2])]
}

/// libjpeg's message for the error or warning being reported.
fn message(cinfo: &mut jpeg_common_struct) -> String {
    let mut buffer = [0u8; MESSAGE_LENGTH];
    // SAFETY: `err` is our error manager, set up by jpeg_std_error, whose
    // format_message writes at most JMSG_LENGTH_MAX bytes including the NUL.
    // mozjpeg-sys types the buffer as `&[u8; 80]`, but the C function writes
    // into it, so it is called through a pointer type that says so.
    unsafe {
        let Some(format) = (*cinfo.err).format_message else {
            return format!("libjpeg error {}", (*cinfo.err).msg_code);
        };
        let format: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8) =
            mem::transmute(format);
        format(cinfo, buffer.as_mut_ptr());
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

/// Fatal errors: unwind back to [`decode`] instead of returning.
unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let text = message(cinfo);
    // resume_unwind, unlike panic!, does not print through the panic hook.
    panic::resume_unwind(Box::new(Abort(VisionError::Broken(format!(
        "JPEG: {text}"
    )))));
}

/// Warnings (level −1) and trace messages: ignored, except that running out
/// of data is an error, as in Pillow.
unsafe extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    // SAFETY: `err` is our error manager; msg_code is the message being emitted.
    if level < 0 && unsafe { (*cinfo.err).msg_code } == JWRN_JPEG_EOF {
        panic::resume_unwind(Box::new(Abort(VisionError::Broken(
            "the data ends early (truncated image)".into(),
        ))));
    }
}

/// libjpeg's progress hook, called as it reads input: stop at too many scans.
unsafe extern "C-unwind" fn limit_scans(cinfo: &mut jpeg_common_struct) {
    if cinfo.is_decompressor == 0 {
        return;
    }
    // SAFETY: a decompressor's common struct is the first field of its
    // jpeg_decompress_struct (repr(C)).
    let scans = unsafe {
        (*(cinfo as *mut jpeg_common_struct as *const jpeg_decompress_struct)).input_scan_number
    };
    if scans > MAX_SCANS {
        panic::resume_unwind(Box::new(Abort(VisionError::Broken(format!(
            "JPEG has more than {MAX_SCANS} scans"
        )))));
    }
}
