//! Image input: formats, conversions, base64, limits, and URL fetching
//! (only ever to 127.0.0.1; private addresses are refused before connecting).

#[path = "support/http_server.rs"]
mod http_server;

use std::io::Cursor;
use std::net::TcpListener;

use base64::Engine;
use http_server::{serve, Reply};
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb, RgbImage, Rgba};
use seer_vision::{load_image, load_image_bytes, ImageInput, ImageLimits, VisionError};

/// A small image with few distinct colours, so that GIF's palette keeps it exact.
fn test_image() -> RgbImage {
    let colours = [
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [250, 250, 250],
        [10, 20, 30],
        [128, 64, 32],
    ];
    RgbImage::from_fn(12, 7, |x, y| Rgb(colours[((x / 2 + y) % 6) as usize]))
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn png(img: &RgbImage) -> Vec<u8> {
    encode(&DynamicImage::ImageRgb8(img.clone()), ImageFormat::Png)
}

fn load(bytes: &[u8]) -> Result<RgbImage, VisionError> {
    load_image_bytes(bytes, &ImageLimits::default())
}

#[test]
fn lossless_formats_decode_exactly() {
    let img = test_image();
    let rgba = DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(img.clone()).to_rgba8());
    let cases = [
        (
            "png",
            encode(&DynamicImage::ImageRgb8(img.clone()), ImageFormat::Png),
        ),
        (
            "bmp",
            encode(&DynamicImage::ImageRgb8(img.clone()), ImageFormat::Bmp),
        ),
        (
            "webp",
            encode(&DynamicImage::ImageRgb8(img.clone()), ImageFormat::WebP),
        ),
        ("gif", encode(&rgba, ImageFormat::Gif)),
    ];
    for (name, bytes) in cases {
        let decoded = load(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(decoded, img, "{name} did not round-trip");
    }
}

#[test]
fn jpeg_decodes_close_to_the_original() {
    let img = test_image();
    let decoded = load(&encode(
        &DynamicImage::ImageRgb8(img.clone()),
        ImageFormat::Jpeg,
    ))
    .unwrap();
    assert_eq!(decoded.dimensions(), img.dimensions());
    let mean_error: f64 = decoded
        .as_raw()
        .iter()
        .zip(img.as_raw())
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs())
        .sum::<f64>()
        / img.as_raw().len() as f64;
    assert!(
        mean_error < 20.0,
        "JPEG too far from the original: {mean_error}"
    );
}

fn vision_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/vision")
        .join(name)
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(vision_fixture(name)).unwrap()
}

/// Every JPEG that scripts/make_vision_fixtures.py wrote (4:2:0, 4:2:2, 4:4:4,
/// progressive, grey, CMYK, RGB, restart markers, odd sizes, corrupt data,
/// and the LLaVA fixture image) decodes to exactly the RGB bytes of PIL's
/// `Image.open(f).convert("RGB")`, which is what transformers starts from.
#[test]
fn jpeg_decodes_exactly_like_pil() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&fixture_bytes("manifest.json")).unwrap();
    let cases = manifest["jpeg"].as_array().unwrap();
    assert!(cases.len() >= 10, "{} JPEG cases", cases.len());
    for case in cases {
        let jpeg = case["jpeg"].as_str().unwrap();
        let ours = load_image(
            &ImageInput::Path(vision_fixture(jpeg)),
            &ImageLimits::default(),
        )
        .unwrap_or_else(|e| panic!("{jpeg}: {e}"));
        let size = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        assert_eq!(ours.dimensions(), size, "{jpeg}");
        let pil = fixture_bytes(case["rgb"].as_str().unwrap());
        let diffs: Vec<u8> = ours
            .as_raw()
            .iter()
            .zip(&pil)
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let off = diffs.iter().filter(|&&d| d != 0).count();
        assert!(
            pil.len() == diffs.len() && off == 0,
            "{jpeg}: {off} of {} values differ from PIL, by up to {}",
            pil.len(),
            diffs.iter().max().unwrap()
        );
    }
}

/// A JPEG whose SOF claims another size (the scan data no longer fits it).
fn jpeg_claiming(mut jpeg: Vec<u8>, width: u16, height: u16) -> Vec<u8> {
    let sof = jpeg
        .windows(2)
        .position(|m| m[0] == 0xFF && (m[1] == 0xC0 || m[1] == 0xC2))
        .expect("a SOF0 or SOF2 marker");
    // FF Cn, length (2), precision (1), height (2), width (2)
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

#[test]
fn huge_jpeg_dimensions_are_refused_from_the_header() {
    let huge = jpeg_claiming(fixture_bytes("jpeg_420_q75.jpg"), 60_000, 50_000);
    let err = load(&huge).unwrap_err();
    assert!(
        matches!(
            err,
            VisionError::TooManyPixels {
                width: 60_000,
                height: 50_000,
                ..
            }
        ),
        "{err}"
    );
    let small_limit = ImageLimits {
        max_pixels: 121 * 73 - 1,
        ..ImageLimits::default()
    };
    let err = load_image_bytes(&fixture_bytes("jpeg_420_q75.jpg"), &small_limit).unwrap_err();
    assert!(
        matches!(
            err,
            VisionError::TooManyPixels {
                width: 121,
                height: 73,
                ..
            }
        ),
        "{err}"
    );
}

/// libjpeg's fatal errors come back as errors (unwound out of the C code),
/// never a panic or an abort; running out of data is an error even where
/// libjpeg would make do, as in PIL ("image file is truncated").
#[test]
fn broken_jpegs_are_errors_not_crashes() {
    let baseline = fixture_bytes("jpeg_420_q75.jpg");
    let progressive = fixture_bytes("jpeg_progressive_420_q75.jpg");
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for (kind, jpeg) in [("baseline", &baseline), ("progressive", &progressive)] {
        for keep in [4, 20, 200, jpeg.len() / 2, jpeg.len() - 3, jpeg.len() - 2] {
            cases.push((format!("{kind} cut to {keep} bytes"), jpeg[..keep].to_vec()));
        }
    }
    let mut garbage = b"\xFF\xD8\xFF".to_vec();
    garbage.extend((0..500u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    cases.push(("garbage after the JPEG signature".into(), garbage));
    let sof = baseline.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
    let mut twelve_bit = baseline.clone();
    twelve_bit[sof + 4] = 12;
    cases.push(("12-bit samples".into(), twelve_bit));
    let mut bad_length = baseline.clone();
    bad_length[sof + 2..sof + 4].copy_from_slice(&[0, 3]);
    cases.push(("bad SOF length".into(), bad_length));
    cases.push(("zero width".into(), jpeg_claiming(baseline.clone(), 0, 73)));
    for (what, bytes) in cases {
        match load(&bytes) {
            Err(VisionError::Broken(message)) => {
                assert!(!message.is_empty(), "{what}");
                println!("{what}: {message}");
            }
            Err(other) => panic!("{what}: {other}"),
            Ok(img) => panic!("{what}: decoded as {:?}", img.dimensions()),
        }
    }
    let err = load(&baseline[..baseline.len() / 2]).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");

    // Scan data that ends (at the EOI marker) before the image does is only
    // a warning to libjpeg, which fills the rest with grey; PIL returns that.
    let short = load(&jpeg_claiming(baseline, 1210, 730)).unwrap();
    assert_eq!(short.dimensions(), (1210, 730));
    assert_eq!(short.get_pixel(1209, 729).0, [128, 128, 128]);
}

/// Each scan of a progressive JPEG can revisit the whole image: a small file
/// with thousands of scans is refused instead of keeping a core busy.
#[test]
fn jpegs_with_too_many_scans_are_refused() {
    let jpeg = fixture_bytes("jpeg_progressive_420_q75.jpg");
    let sos: Vec<usize> = jpeg
        .windows(2)
        .enumerate()
        .filter(|(_, m)| m == &[0xFF, 0xDA])
        .map(|(i, _)| i)
        .collect();
    assert!(sos.len() > 2, "progressive: several scans");
    // Repeat the first (DC) scan: libjpeg only warns about the odd
    // progression, so without a limit it would decode them all.
    let first_scan = &jpeg[sos[0]..sos[1]];
    let with_repeats = |repeats: usize| {
        let mut out = jpeg[..sos[1]].to_vec();
        for _ in 0..repeats {
            out.extend_from_slice(first_scan);
        }
        out.extend_from_slice(&jpeg[sos[1]..]);
        out
    };
    assert!(
        load(&with_repeats(10)).is_ok(),
        "a few extra scans are fine"
    );
    let err = load(&with_repeats(1000)).unwrap_err();
    assert!(
        matches!(&err, VisionError::Broken(m) if m.contains("scans")),
        "{err}"
    );
}

#[test]
fn grey_is_replicated_to_rgb() {
    let grey = ImageBuffer::from_fn(5, 3, |x, y| Luma([(x * 40 + y) as u8]));
    let decoded = load(&encode(
        &DynamicImage::ImageLuma8(grey.clone()),
        ImageFormat::Png,
    ))
    .unwrap();
    for (x, y, p) in decoded.enumerate_pixels() {
        let v = grey.get_pixel(x, y)[0];
        assert_eq!(p.0, [v, v, v]);
    }
}

#[test]
fn alpha_is_dropped_like_pil_convert_rgb() {
    let rgba = ImageBuffer::from_fn(4, 4, |x, y| {
        Rgba([x as u8 * 60, y as u8 * 60, 200, (x * y * 20) as u8])
    });
    let decoded = load(&encode(
        &DynamicImage::ImageRgba8(rgba.clone()),
        ImageFormat::Png,
    ))
    .unwrap();
    for (x, y, p) in decoded.enumerate_pixels() {
        let q = rgba.get_pixel(x, y);
        assert_eq!(
            p.0,
            [q[0], q[1], q[2]],
            "fully transparent pixels keep their colour too"
        );
    }
}

#[test]
fn sixteen_bit_is_scaled_to_eight() {
    let deep = ImageBuffer::from_fn(3, 1, |x, _| Rgb([[0u16, 257 * 100, 65535][x as usize]; 3]));
    let decoded = load(&encode(&DynamicImage::ImageRgb16(deep), ImageFormat::Png)).unwrap();
    let firsts: Vec<u8> = decoded.pixels().map(|p| p[0]).collect();
    assert_eq!(firsts, [0, 100, 255]);
}

#[test]
fn base64_raw_urlsafe_and_data_url() {
    let img = test_image();
    let bytes = png(&img);
    let standard = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
    let wrapped: String = standard
        .as_bytes()
        .chunks(76)
        .map(|line| std::str::from_utf8(line).unwrap().to_string() + "\n")
        .collect();
    let inputs = [
        standard.clone(),
        url_safe,
        wrapped,
        format!("data:image/png;base64,{standard}"),
        format!("DATA:image/png;charset=binary;BASE64,{standard}"),
    ];
    for text in inputs {
        assert!(
            matches!(ImageInput::parse(&text), ImageInput::Base64(_)),
            "{}",
            &text[..20]
        );
        let decoded = load_image(&ImageInput::Base64(text.clone()), &ImageLimits::default())
            .unwrap_or_else(|e| panic!("{}: {e}", &text[..20]));
        assert_eq!(decoded, img);
    }
}

#[test]
fn bad_base64_and_data_urls_are_refused() {
    let limits = ImageLimits::default();
    let cases = [
        ("not*base64!", "invalid base64"),
        ("data:image/png;base64", "invalid data URL"),
        ("data:image/png,iVBORw0KGgo=", "only base64 data URLs"),
        ("data:image/png;base64,@@@@", "invalid base64"),
    ];
    for (text, expected) in cases {
        let err = load_image(&ImageInput::Base64(text.into()), &limits).unwrap_err();
        assert!(err.to_string().contains(expected), "{text}: {err}");
    }
    // Valid base64 of something that is not an image.
    let err = load_image(&ImageInput::Base64("aGVsbG8gd29ybGQ=".into()), &limits).unwrap_err();
    assert!(matches!(err, VisionError::NotAnImage), "{err}");
}

#[test]
fn parse_tells_inputs_apart() {
    let dir = std::env::temp_dir().join(format!("seer-vision-parse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cat.png");
    std::fs::write(&file, png(&test_image())).unwrap();
    let file_str = file.to_str().unwrap();

    assert_eq!(
        ImageInput::parse("https://example.com/a.png"),
        ImageInput::Url("https://example.com/a.png".into())
    );
    assert_eq!(
        ImageInput::parse("HTTP://example.com/a.png"),
        ImageInput::Url("HTTP://example.com/a.png".into())
    );
    assert_eq!(
        ImageInput::parse("ftp://example.com/a.png"),
        ImageInput::Url("ftp://example.com/a.png".into())
    );
    assert!(matches!(
        ImageInput::parse("data:image/png;base64,AAAA"),
        ImageInput::Base64(_)
    ));
    assert_eq!(ImageInput::parse(file_str), ImageInput::Path(file.clone()));
    assert_eq!(
        ImageInput::parse("missing/cat.png"),
        ImageInput::Path("missing/cat.png".into())
    );
    assert_eq!(
        ImageInput::parse("C://not-a-scheme.png"),
        ImageInput::Path("C://not-a-scheme.png".into())
    );
    assert!(matches!(
        ImageInput::parse(&"QUJD".repeat(20)),
        ImageInput::Base64(_)
    ));
    assert!(
        matches!(ImageInput::parse("QUJDRA=="), ImageInput::Path(_)),
        "too short to be taken for base64"
    );

    assert_eq!(
        load_image(&ImageInput::parse(file_str), &ImageLimits::default()).unwrap(),
        test_image()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_file_names_the_path() {
    let err = load_image(
        &ImageInput::parse("/no/such/dir/cat.png"),
        &ImageLimits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, VisionError::NotFound { .. }), "{err}");
    assert!(
        err.to_string().contains("not found") && err.to_string().contains("/no/such/dir/cat.png"),
        "{err}"
    );
}

#[test]
fn truncated_images_are_broken() {
    let img = RgbImage::from_fn(64, 64, |x, y| {
        Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
    });
    for format in [ImageFormat::Png, ImageFormat::Jpeg] {
        let bytes = encode(&DynamicImage::ImageRgb8(img.clone()), format);
        let err = load(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(matches!(err, VisionError::Broken(_)), "{format:?}: {err}");
    }
}

#[test]
fn garbage_is_not_an_image() {
    let err = load(b"GIF? no, just some text that is long enough to sniff").unwrap_err();
    assert!(matches!(err, VisionError::NotAnImage), "{err}");
    assert!(err.to_string().contains("not an image"), "{err}");
    assert!(matches!(load(&[]).unwrap_err(), VisionError::NotAnImage));
}

#[test]
fn unsupported_formats_are_named() {
    let tiff_header = b"II*\0\x08\0\0\0\0\0\0\0";
    let err = load(tiff_header).unwrap_err();
    assert!(matches!(err, VisionError::UnsupportedFormat(_)), "{err}");
    assert!(err.to_string().contains("Tiff"), "{err}");
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(data);
    chunk.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    chunk
}

/// A PNG whose IHDR claims `width`×`height` RGB8 but whose IDAT holds nothing
/// (an empty zlib stream): a few dozen bytes posing as gigabytes.
fn png_header_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, truecolour, deflate, no filter, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

#[test]
fn huge_dimensions_are_refused_from_the_header() {
    assert_eq!(crc32(b"IEND"), 0xAE42_6082, "CRC helper");
    let err = load(&png_header_claiming(100_000, 100_000)).unwrap_err();
    assert!(
        matches!(
            err,
            VisionError::TooManyPixels {
                width: 100_000,
                height: 100_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("100000x100000"), "{err}");

    let small_limit = ImageLimits {
        max_pixels: 1000,
        ..ImageLimits::default()
    };
    let err = load_image_bytes(&png(&RgbImage::new(40, 30)), &small_limit).unwrap_err();
    assert!(
        matches!(
            err,
            VisionError::TooManyPixels {
                width: 40,
                height: 30,
                limit: 1000
            }
        ),
        "{err}"
    );
}

#[test]
fn too_many_bytes_are_refused() {
    let bytes = png(&test_image());
    let limits = ImageLimits {
        max_bytes: bytes.len() - 1,
        ..ImageLimits::default()
    };
    let err = load_image_bytes(&bytes, &limits).unwrap_err();
    assert!(matches!(err, VisionError::TooManyBytes { .. }), "{err}");

    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let err = load_image(&ImageInput::Base64(b64), &limits).unwrap_err();
    assert!(matches!(err, VisionError::TooManyBytes { .. }), "{err}");

    let path = std::env::temp_dir().join(format!("seer-vision-big-{}.png", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let err = load_image(&ImageInput::Path(path.clone()), &limits).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(err, VisionError::TooManyBytes { .. }), "{err}");
}

#[test]
fn private_addresses_are_refused_without_connecting() {
    // A listener nobody should ever connect to.
    let trap = TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_url = format!(
        "http://127.0.0.1:{}/x.png",
        trap.local_addr().unwrap().port()
    );
    let urls = [
        trap_url.as_str(),
        "http://127.0.0.1:1/x.png",
        "http://[::1]/",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/",
        "https://192.168.0.10/x.png",
        "http://[::ffff:127.0.0.1]/",
        "http://[fe80::1]/",
    ];
    for url in urls {
        let err = load_image(&ImageInput::Url(url.into()), &ImageLimits::default()).unwrap_err();
        assert!(
            matches!(err, VisionError::PrivateAddress { .. }),
            "{url}: {err}"
        );
        assert!(err.to_string().contains("allow_private_urls"), "{err}");
    }
    assert_eq!(
        trap.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "something connected"
    );
}

#[test]
fn non_http_schemes_are_refused() {
    for url in [
        "ftp://example.com/x.png",
        "file:///etc/passwd",
        "gopher://example.com/",
    ] {
        let err = load_image(&ImageInput::Url(url.into()), &ImageLimits::default()).unwrap_err();
        assert!(matches!(err, VisionError::BadScheme { .. }), "{url}: {err}");
    }
}

fn local_limits() -> ImageLimits {
    ImageLimits {
        allow_private_urls: true,
        ..ImageLimits::default()
    }
}

fn fetch(url: String, limits: &ImageLimits) -> Result<RgbImage, VisionError> {
    load_image(&ImageInput::parse(&url), limits)
}

#[test]
fn fetches_from_a_local_server_when_allowed() {
    let img = test_image();
    let addr = serve(vec![
        ("/cat.png", Reply::Body(png(&img))),
        ("/streamed.png", Reply::Streamed(png(&img))),
        ("/moved", Reply::Redirect("/cat.png".into())),
    ]);
    let limits = local_limits();
    assert_eq!(
        fetch(format!("http://{addr}/cat.png"), &limits).unwrap(),
        img
    );
    assert_eq!(
        fetch(format!("http://{addr}/streamed.png"), &limits).unwrap(),
        img
    );
    assert_eq!(fetch(format!("http://{addr}/moved"), &limits).unwrap(), img);
}

#[test]
fn fetch_failures_are_reported() {
    let addr = serve(vec![
        ("/loop", Reply::Redirect("/loop".into())),
        ("/gone", Reply::Status(410)),
        ("/text", Reply::Body(b"hello".to_vec())),
    ]);
    let limits = local_limits();
    let err = fetch(format!("http://{addr}/loop"), &limits).unwrap_err();
    assert!(
        matches!(err, VisionError::TooManyRedirects { limit: 5, .. }),
        "{err}"
    );
    let err = fetch(format!("http://{addr}/gone"), &limits).unwrap_err();
    assert!(
        matches!(err, VisionError::HttpStatus { status: 410, .. }),
        "{err}"
    );
    let err = fetch(format!("http://{addr}/missing"), &limits).unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    let err = fetch(format!("http://{addr}/text"), &limits).unwrap_err();
    assert!(matches!(err, VisionError::NotAnImage), "{err}");
}

#[test]
fn oversized_downloads_are_cut_off() {
    let big = vec![0u8; 3 << 20];
    let addr = serve(vec![
        ("/big", Reply::Body(big.clone())),
        ("/big-streamed", Reply::Streamed(big)),
    ]);
    let limits = ImageLimits {
        max_bytes: 1 << 20,
        ..local_limits()
    };
    for path in ["/big", "/big-streamed"] {
        let err = fetch(format!("http://{addr}{path}"), &limits).unwrap_err();
        assert!(
            matches!(err, VisionError::TooManyBytes { limit, .. } if limit == 1 << 20),
            "{path}: {err}"
        );
    }
}

#[test]
fn a_silent_server_times_out() {
    let addr = serve(vec![(
        "/slow",
        Reply::Stall(std::time::Duration::from_secs(3)),
    )]);
    let limits = ImageLimits {
        total_timeout: std::time::Duration::from_millis(300),
        ..local_limits()
    };
    let started = std::time::Instant::now();
    let err = fetch(format!("http://{addr}/slow"), &limits).unwrap_err();
    assert!(matches!(err, VisionError::Timeout { .. }), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}
