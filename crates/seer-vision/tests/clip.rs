//! CLIP preprocessing against references made by
//! `scripts/make_vision_fixtures.py` (tests/fixtures/vision/):
//! transformers 5.23 `CLIPImageProcessorPil` with Pillow 13, and a Python port
//! of llama.cpp mtmd's LLaVA-1.5 preprocessing.

use std::path::{Path, PathBuf};

use image::RgbImage;
use seer_vision::clip::{
    center_crop, hf_resize_and_crop, llamacpp_llava_letterbox, preprocess_hf,
    preprocess_llamacpp_llava, shortest_edge_size, ClipProcessorConfig, CropSize, Pixels,
    ResizeTarget, CLIP_MEAN, CLIP_STD,
};
use seer_vision::resample::{self, Filter, PassOrder};
use seer_vision::{load_image, load_image_with, AlphaMode, ImageInput, ImageLimits};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/vision")
        .join(name)
}

fn manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("manifest.json")).unwrap()).unwrap()
}

fn image(name: &str) -> RgbImage {
    load_image(&ImageInput::Path(fixture(name)), &ImageLimits::default()).unwrap()
}

fn floats(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixture(name)).unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn image_names() -> Vec<String> {
    manifest()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

fn config(size: u32) -> ClipProcessorConfig {
    ClipProcessorConfig {
        size: ResizeTarget::ShortestEdge(size),
        crop_size: CropSize {
            height: size,
            width: size,
        },
        ..ClipProcessorConfig::default()
    }
}

/// Largest absolute difference; also asserts the shapes agree.
fn max_diff(ours: &Pixels, reference: &[f32], shape: [usize; 3]) -> f32 {
    assert_eq!([ours.channels, ours.height, ours.width], shape);
    assert_eq!(ours.data.len(), reference.len());
    ours.data
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn assert_same_image(ours: &RgbImage, reference: &RgbImage, what: &str) {
    assert_eq!(ours.dimensions(), reference.dimensions(), "{what}: size");
    let off = ours
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        off,
        0,
        "{what}: {off} of {} values differ",
        ours.as_raw().len()
    );
}

#[test]
fn hf_336_resize_and_crop_is_pixel_exact() {
    let cfg =
        ClipProcessorConfig::from_json_file(fixture("clip336_preprocessor_config.json")).unwrap();
    for name in image_names() {
        let ours = hf_resize_and_crop(&image(&format!("img_{name}.png")), &cfg);
        assert_same_image(
            &ours,
            &image(&format!("hf336_{name}.png")),
            &format!("hf336 {name}"),
        );
    }
}

#[test]
fn hf_56_pixels_are_bit_exact() {
    for name in image_names() {
        let ours = preprocess_hf(&image(&format!("img_{name}.png")), &config(56));
        let diff = max_diff(&ours, &floats(&format!("hf56_{name}.f32")), [3, 56, 56]);
        assert_eq!(diff, 0.0, "hf56 {name}: max diff {diff}");
    }
}

#[test]
fn hf_crop_larger_than_image_pads_with_zeros() {
    for entry in manifest()["croppad"].as_array().unwrap() {
        let crop = CropSize {
            height: entry["height"].as_u64().unwrap() as u32,
            width: entry["width"].as_u64().unwrap() as u32,
        };
        let cfg = ClipProcessorConfig {
            do_resize: false,
            crop_size: crop,
            ..ClipProcessorConfig::default()
        };
        let ours = preprocess_hf(&image(entry["input"].as_str().unwrap()), &cfg);
        let file = entry["file"].as_str().unwrap();
        let diff = max_diff(
            &ours,
            &floats(file),
            [3, crop.height as usize, crop.width as usize],
        );
        assert_eq!(diff, 0.0, "{file}: max diff {diff}");
    }
}

#[test]
fn llamacpp_336_letterbox_is_pixel_exact() {
    for name in image_names() {
        let ours = llamacpp_llava_letterbox(&image(&format!("img_{name}.png")), 336);
        assert_same_image(
            &ours,
            &image(&format!("llama336_{name}.png")),
            &format!("llama336 {name}"),
        );
    }
}

#[test]
fn llamacpp_56_pixels_are_bit_exact() {
    let mean = CLIP_MEAN.map(|v| v as f32);
    let std = CLIP_STD.map(|v| v as f32);
    for name in image_names() {
        let ours = preprocess_llamacpp_llava(&image(&format!("img_{name}.png")), 56, mean, std);
        let diff = max_diff(&ours, &floats(&format!("llama56_{name}.f32")), [3, 56, 56]);
        assert_eq!(diff, 0.0, "llama56 {name}: max diff {diff}");
    }
}

#[test]
fn every_pillow_filter_is_pixel_exact() {
    for entry in manifest()["resample"].as_array().unwrap() {
        let filter = Filter::from_pil_code(entry["filter"].as_u64().unwrap() as u32).unwrap();
        let (w, h) = (
            entry["width"].as_u64().unwrap() as u32,
            entry["height"].as_u64().unwrap() as u32,
        );
        let ours = resample::resize(
            &image(entry["input"].as_str().unwrap()),
            w,
            h,
            filter,
            PassOrder::Pillow13,
        );
        let file = entry["file"].as_str().unwrap();
        assert_same_image(&ours, &image(file), file);
    }
}

#[test]
fn pass_order_matters_for_tall_downscales() {
    // 97x211 -> 41x53 shrinks the height by more than twice the width: Pillow
    // 13 runs the vertical pass first, and the horizontal-first result differs.
    let img = image("img_tall.png");
    let pillow13 = resample::resize(&img, 41, 53, Filter::Bicubic, PassOrder::Pillow13);
    let older = resample::resize(&img, 41, 53, Filter::Bicubic, PassOrder::HorizontalFirst);
    assert_same_image(
        &pillow13,
        &image("resample_bicubic_tall.png"),
        "Pillow 13 order",
    );
    assert_ne!(pillow13, older);
}

#[test]
fn shortest_edge_truncates_the_long_side() {
    assert_eq!(shortest_edge_size(640, 480, 336), (448, 336));
    assert_eq!(shortest_edge_size(97, 211, 336), (336, 730)); // 730.88 -> 730
    assert_eq!(shortest_edge_size(500, 60, 336), (2800, 336));
    assert_eq!(shortest_edge_size(20, 15, 336), (448, 336));
    assert_eq!(shortest_edge_size(336, 336, 336), (336, 336));
}

#[test]
fn config_from_saved_preprocessor_config() {
    let cfg =
        ClipProcessorConfig::from_json_file(fixture("clip336_preprocessor_config.json")).unwrap();
    assert_eq!(cfg, config(336));
}

#[test]
fn config_accepts_the_shapes_found_in_the_wild() {
    // openai/clip-vit-large-patch14-336 style: bare ints.
    let flat = json!({"size": 336, "crop_size": 336, "resample": 3, "image_processor_type": "CLIPImageProcessor"});
    assert_eq!(
        ClipProcessorConfig::from_json_value(&flat).unwrap(),
        config(336)
    );

    // transformers 5 processor_config.json nests the image processor.
    let nested = json!({
        "processor_class": "LlavaProcessor",
        "patch_size": 14,
        "image_processor": {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    });
    assert_eq!(
        ClipProcessorConfig::from_json_value(&nested).unwrap(),
        config(336)
    );

    let exact = json!({"size": {"height": 384, "width": 512}, "do_center_crop": false,
                       "image_mean": 0.5, "image_std": [0.5, 0.5, 0.5], "resample": 2});
    let cfg = ClipProcessorConfig::from_json_value(&exact).unwrap();
    assert_eq!(
        cfg.size,
        ResizeTarget::Exact {
            height: 384,
            width: 512
        }
    );
    assert_eq!(cfg.image_mean, [0.5; 3]);
    assert_eq!(cfg.resample, Filter::Bilinear);
    assert!(!cfg.do_center_crop);

    assert_eq!(
        ClipProcessorConfig::from_json_value(&json!({})).unwrap(),
        ClipProcessorConfig::default()
    );
}

#[test]
fn config_errors_say_what_is_wrong() {
    let cases = [
        (json!({"resample": 0}), "resample 0"),
        (json!({"size": {"longest_edge": 300}}), "size must be"),
        (json!({"crop_size": 0}), "must not be zero"),
        (json!({"image_mean": [0.5, 0.5]}), "list of three"),
        (json!([1, 2]), "not a JSON object"),
    ];
    for (value, expected) in cases {
        let err = ClipProcessorConfig::from_json_value(&value)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{value}: {err}");
    }
}

/// PIL decodes JPEG with libjpeg-turbo, and so does seer (mozjpeg-sys's copy
/// of its decoder, with Pillow's settings): the pixels must be the same. (The
/// image crate's zune-jpeg differed on about 19% of the values of this 4:2:0
/// file, by up to 5 levels.) tests/input.rs covers many more kinds of JPEG.
#[test]
fn jpeg_decoding_equals_pil() {
    assert_same_image(
        &image("img_landscape.jpg"),
        &image("pil_decoded_landscape.png"),
        "JPEG decoded by seer vs PIL",
    );
}

#[test]
fn windowed_resize_equals_resize_then_crop() {
    let img = image("img_tall.png");
    // 40 makes Pillow 13 go vertical first; the odd crops pad on one side only.
    for (size, height, width) in [(56, 56, 56), (40, 60, 31), (300, 100, 351), (336, 336, 336)] {
        let crop = CropSize { height, width };
        let cfg = ClipProcessorConfig {
            crop_size: crop,
            ..config(size)
        };
        let (w, h) = shortest_edge_size(img.width(), img.height(), size);
        let full = resample::resize(&img, w, h, Filter::Bicubic, PassOrder::Pillow13);
        assert_same_image(
            &hf_resize_and_crop(&img, &cfg),
            &center_crop(&full, crop),
            &format!("{size} {crop:?}"),
        );
    }
}

#[test]
fn extreme_aspect_ratios_only_resize_what_is_kept() {
    // Resized in full this would be 336x6720000 (6.8 GB of RGB).
    let strip = RgbImage::from_fn(1, 20_000, |_, y| image::Rgb([(y % 256) as u8, 0, 255]));
    let pixels = preprocess_hf(&strip, &config(336));
    assert_eq!(
        [pixels.channels, pixels.height, pixels.width],
        [3, 336, 336]
    );
}

#[test]
fn rgba_over_white_matches_the_hf_processor() {
    let input = ImageInput::Path(fixture("img_rgba.png"));
    let ours = load_image_with(&input, &ImageLimits::default(), AlphaMode::OverWhite).unwrap();
    assert_same_image(&ours, &image("hf_rgba_over_white.png"), "RGBA over white");
    let dropped = load_image(&input, &ImageLimits::default()).unwrap();
    assert_eq!(
        dropped.get_pixel(10, 0).0,
        [10, 245, 70],
        "AlphaMode::Drop keeps the colour"
    );
}
