//! Getting an image from wherever the user points at it (a file, an http(s)
//! URL, base64 or a data URL, raw bytes) into an RGB8 buffer, refusing inputs
//! that are too big before paying for them.

use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, Engine};
use image::{ImageError, ImageFormat, ImageReader, RgbImage};

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageInput {
    Path(PathBuf),
    Url(String),
    /// Raw base64, or a `data:` URL.
    Base64(String),
    Bytes(Vec<u8>),
    /// Already decoded (a server decodes in its request handler, so a bad image is
    /// refused before the request waits for the model). Loading passes it through.
    Decoded(Arc<RgbImage>),
}

impl ImageInput {
    /// Guess what a user-supplied string is: `scheme://...` is a URL (only
    /// http and https will load), `data:...` a data URL, an existing file a
    /// path, a long run of base64 characters base64; anything else is taken
    /// as a path, so a typo reports "not found" rather than "bad base64".
    pub fn parse(s: &str) -> ImageInput {
        if has_url_scheme(s) {
            ImageInput::Url(s.to_string())
        } else if starts_with_ignore_case(s, "data:") {
            ImageInput::Base64(s.to_string())
        } else if Path::new(s).exists() {
            ImageInput::Path(PathBuf::from(s))
        } else if looks_like_base64(s) {
            ImageInput::Base64(s.to_string())
        } else {
            ImageInput::Path(PathBuf::from(s))
        }
    }
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// `scheme://` with an RFC 3986 scheme of two or more characters (so a
/// Windows drive letter is not a scheme).
fn has_url_scheme(s: &str) -> bool {
    let Some((scheme, _)) = s.split_once("://") else {
        return false;
    };
    scheme.len() >= 2
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

/// Short strings are more likely mistyped paths than images.
const MIN_BASE64_LEN: usize = 64;

/// Whether a string is plausibly base64 image data (and not, say, a file name).
pub fn looks_like_base64(s: &str) -> bool {
    let mut count = 0;
    for c in s.chars().filter(|c| !c.is_ascii_whitespace()) {
        if !(c.is_ascii_alphanumeric() || "+/=-_".contains(c)) {
            return false;
        }
        count += 1;
    }
    count >= MIN_BASE64_LEN
}

/// Limits on what [`load_image`] accepts.
#[derive(Clone, Debug)]
pub struct ImageLimits {
    /// Largest encoded image (file, download or decoded base64).
    pub max_bytes: usize,
    /// Largest width × height, checked from the header before decoding.
    pub max_pixels: u64,
    pub connect_timeout: Duration,
    /// For a whole URL fetch, redirects and body included.
    pub total_timeout: Duration,
    pub max_redirects: usize,
    /// Allow URLs whose host is (or resolves to) a loopback, private,
    /// link-local or otherwise non-public address. Off by default so that a
    /// server taking image URLs from clients cannot be pointed at its own
    /// network.
    pub allow_private_urls: bool,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_bytes: 20 << 20,
            max_pixels: 50_000_000,
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            max_redirects: 5,
            allow_private_urls: false,
        }
    }
}

/// Everything that can go wrong getting an image (or a preprocessing config).
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error("image file not found: {}", path.display())]
    NotFound { path: PathBuf },
    #[error("cannot read image file {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not an image: the data is not in a recognised image format")]
    NotAnImage,
    #[error("unsupported image format {0} (supported: JPEG, PNG, WebP, GIF, BMP)")]
    UnsupportedFormat(String),
    #[error("broken image: {0}")]
    Broken(String),
    #[error("image data too large: {size} bytes or more, the limit is {limit}")]
    TooManyBytes { size: u64, limit: usize },
    #[error("image too large: {width}x{height} pixels, the limit is {limit} pixels")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("image of {width}x{height} pixels is too narrow: its sides may differ by a factor of {max} at most")]
    AspectRatio { width: u32, height: u32, max: f64 },
    #[error("invalid base64 image data: {0}")]
    BadBase64(String),
    #[error("invalid data URL: {0}")]
    BadDataUrl(String),
    #[error("invalid URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("unsupported URL scheme {scheme:?} in {url}: only http and https")]
    BadScheme { url: String, scheme: String },
    #[error("refused to fetch {url}: {host} is a non-public address ({addr}); set allow_private_urls to allow it")]
    PrivateAddress {
        url: String,
        host: String,
        addr: std::net::IpAddr,
    },
    #[error("fetching {url} failed: HTTP status {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("fetching {url} timed out")]
    Timeout { url: String },
    #[error("fetching {url} failed: more than {limit} redirects")]
    TooManyRedirects { url: String, limit: usize },
    #[error("fetching {url} failed: {reason}")]
    Fetch { url: String, reason: String },
    #[error("cannot read processor config {}: {source}", path.display())]
    ConfigUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid processor config: {0}")]
    BadConfig(String),
    #[error("the prompt has {placeholders} image placeholders but {images} images were given")]
    ImageCountMismatch { placeholders: usize, images: usize },
}

/// How transparency is flattened away when an image becomes RGB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AlphaMode {
    /// Keep the colour channels and ignore alpha: `PIL.Image.convert("RGB")`,
    /// transformers' `load_image` helper, llama.cpp (stb_image).
    #[default]
    Drop,
    /// Composite onto opaque white, rounding as Pillow's `alpha_composite`
    /// does: what transformers' image processors (`convert_to_rgb`) do to an
    /// image that has alpha.
    OverWhite,
}

/// Load any [`ImageInput`] as RGB8, within `limits`, dropping any alpha.
pub fn load_image(input: &ImageInput, limits: &ImageLimits) -> Result<RgbImage, VisionError> {
    load_image_with(input, limits, AlphaMode::Drop)
}

/// [`load_image`] with a choice of what happens to transparency.
pub fn load_image_with(
    input: &ImageInput,
    limits: &ImageLimits,
    alpha: AlphaMode,
) -> Result<RgbImage, VisionError> {
    match input {
        ImageInput::Path(path) => load_image_bytes_with(&read_file(path, limits)?, limits, alpha),
        ImageInput::Url(url) => {
            load_image_bytes_with(&crate::fetch::fetch(url, limits)?, limits, alpha)
        }
        ImageInput::Base64(text) => {
            load_image_bytes_with(&decode_base64(text, limits)?, limits, alpha)
        }
        ImageInput::Bytes(bytes) => load_image_bytes_with(bytes, limits, alpha),
        ImageInput::Decoded(img) => Ok(RgbImage::clone(img)),
    }
}

/// Read a file, refusing it once it passes `max_bytes` (the size is read
/// through `take`, so a growing file or a device cannot run away).
fn read_file(path: &Path, limits: &ImageLimits) -> Result<Vec<u8>, VisionError> {
    let unreadable = |source: std::io::Error| match source.kind() {
        ErrorKind::NotFound => VisionError::NotFound {
            path: path.to_path_buf(),
        },
        _ => VisionError::Unreadable {
            path: path.to_path_buf(),
            source,
        },
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    file.take(limits.max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() > limits.max_bytes {
        return Err(VisionError::TooManyBytes {
            size: bytes.len() as u64,
            limit: limits.max_bytes,
        });
    }
    Ok(bytes)
}

/// Decode raw base64 (standard or URL-safe alphabet, padding optional,
/// whitespace ignored) or a `data:[<type>];base64,<data>` URL.
fn decode_base64(text: &str, limits: &ImageLimits) -> Result<Vec<u8>, VisionError> {
    let payload = if starts_with_ignore_case(text, "data:") {
        data_url_payload(text)?
    } else {
        text
    };
    let compact: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let decoded_len = compact.len() / 4 * 3;
    if decoded_len > limits.max_bytes + 3 {
        return Err(VisionError::TooManyBytes {
            size: decoded_len as u64,
            limit: limits.max_bytes,
        });
    }
    let alphabet = if compact.contains(['-', '_']) {
        &base64::alphabet::URL_SAFE
    } else {
        &base64::alphabet::STANDARD
    };
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let bytes = GeneralPurpose::new(alphabet, config)
        .decode(compact.as_bytes())
        .map_err(|e| VisionError::BadBase64(e.to_string()))?;
    if bytes.is_empty() {
        return Err(VisionError::BadBase64("no data".into()));
    }
    Ok(bytes)
}

fn data_url_payload(url: &str) -> Result<&str, VisionError> {
    let rest = &url["data:".len()..];
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(VisionError::BadDataUrl(
            "no ',' between the media type and the data".into(),
        ));
    };
    // Only base64 payloads: percent-encoded binary images are not worth supporting.
    if !meta
        .split(';')
        .skip(1)
        .any(|param| param.trim().eq_ignore_ascii_case("base64"))
    {
        return Err(VisionError::BadDataUrl(
            "only base64 data URLs (data:<type>;base64,...) are supported".into(),
        ));
    }
    Ok(payload)
}

const SUPPORTED_FORMATS: [ImageFormat; 5] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
];

/// Decode encoded image bytes (JPEG, PNG, WebP, GIF's first frame, BMP) to
/// RGB8. Grey is replicated, 16-bit is scaled to 8-bit, alpha is dropped
/// (as `PIL.Image.convert("RGB")` and llama.cpp's stb_image do). EXIF
/// orientation is not applied, as in llama.cpp. JPEG is decoded by
/// libjpeg-turbo's decoder with Pillow's settings, so the pixels are exactly
/// those `PIL.Image.open(f).convert("RGB")` gives (CMYK included).
pub fn load_image_bytes(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, VisionError> {
    load_image_bytes_with(bytes, limits, AlphaMode::Drop)
}

/// [`load_image_bytes`] with a choice of what happens to transparency.
pub fn load_image_bytes_with(
    bytes: &[u8],
    limits: &ImageLimits,
    alpha: AlphaMode,
) -> Result<RgbImage, VisionError> {
    if bytes.len() > limits.max_bytes {
        return Err(VisionError::TooManyBytes {
            size: bytes.len() as u64,
            limit: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| VisionError::NotAnImage)?;
    if !SUPPORTED_FORMATS.contains(&format) {
        return Err(VisionError::UnsupportedFormat(format!("{format:?}")));
    }
    if format == ImageFormat::Jpeg {
        // libjpeg-turbo, as in Pillow, for transformers' exact pixels (JPEG
        // has no alpha); it checks max_pixels from the header itself.
        return crate::jpeg::decode(bytes, limits.max_pixels);
    }
    // Read only the header first, so that a small file claiming an enormous
    // size is refused before anything is allocated for it.
    let (width, height) = reader(bytes, format)
        .into_dimensions()
        .map_err(decode_error)?;
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(VisionError::TooManyPixels {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    let decoded = reader(bytes, format).decode().map_err(decode_error)?;
    Ok(match alpha {
        AlphaMode::OverWhite if decoded.color().has_alpha() => over_white(&decoded.to_rgba8()),
        _ => decoded.to_rgb8(),
    })
}

/// Pillow's `alpha_composite(white, img).convert("RGB")`. With an opaque
/// white destination its integer formula reduces to: weight the colour by
/// alpha and white by 255 - alpha, in units of 1/255 with 7 extra bits, then
/// divide by 255 with its shift-based rounding.
fn over_white(img: &image::RgbaImage) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b, a] = img.get_pixel(x, y).0;
        image::Rgb([r, g, b].map(|v| blend_with_white(v, a)))
    })
}

fn blend_with_white(value: u8, alpha: u8) -> u8 {
    const EXTRA_BITS: u32 = 7;
    let (v, a) = (u32::from(value), u32::from(alpha));
    let weighted = (v * a + 255 * (255 - a)) << EXTRA_BITS;
    let rounded = weighted + (0x80 << EXTRA_BITS);
    // Pillow's SHIFTFORDIV255: x / 255 as ((x >> 8) + x) >> 8.
    ((((rounded >> 8) + rounded) >> 8) >> EXTRA_BITS) as u8
}

/// A reader with image's default allocation limit (512 MiB) as a backstop
/// behind the pixel check.
fn reader(bytes: &[u8], format: ImageFormat) -> ImageReader<std::io::Cursor<&[u8]>> {
    ImageReader::with_format(std::io::Cursor::new(bytes), format)
}

fn decode_error(err: ImageError) -> VisionError {
    match err {
        ImageError::Unsupported(e) => VisionError::UnsupportedFormat(e.to_string()),
        ImageError::Limits(e) => VisionError::Broken(format!("exceeds decoder limits: {e}")),
        ImageError::IoError(e) if e.kind() == ErrorKind::UnexpectedEof => {
            VisionError::Broken("the data ends early (truncated image)".into())
        }
        other => VisionError::Broken(other.to_string()),
    }
}
