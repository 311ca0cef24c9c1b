//! Qwen2-VL / Qwen2.5-VL preprocessing against `tests/fixtures/qwen2vl/`
//! (`scripts/make_qwen2vl_fixtures.py`): transformers 5.23
//! `Qwen2VLImageProcessorPil` with Pillow 13.

use std::path::{Path, PathBuf};

use image::RgbImage;
use seer_vision::qwen2vl::{
    grid, image_tokens, preprocess, resized_size, smart_resize, Qwen2VlProcessorConfig,
};
use seer_vision::resample::Filter;
use seer_vision::{load_image, ImageInput, ImageLimits, VisionError};
use serde_json::{json, Value};

const MODELS: [&str; 2] = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"];
const CASES: [&str; 5] = ["a_square", "b_wide", "c_tall", "d_two_images", "e_system"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/qwen2vl")
        .join(name)
}

fn case(model: &str, name: &str) -> Value {
    let path = fixture(&format!("cases/{model}/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn config(model: &str) -> Qwen2VlProcessorConfig {
    Qwen2VlProcessorConfig::from_json_file(fixture(&format!("{model}/processor_config.json")))
        .unwrap()
}

/// A fixture image, decoded as transformers' processor receives it.
fn image(rel: &str) -> RgbImage {
    load_image(&ImageInput::Path(fixture(rel)), &ImageLimits::default()).unwrap()
}

fn usizes(v: &Value) -> Vec<usize> {
    serde_json::from_value(v.clone()).unwrap()
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn config_reads_size_and_legacy_pixel_bounds() {
    for model in MODELS {
        let cfg = config(model);
        assert_eq!((cfg.min_pixels, cfg.max_pixels), (4704, 11760));
        assert_eq!(
            (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size),
            (14, 2, 2)
        );
        assert_eq!(cfg.resample, Filter::Bicubic);
        assert_eq!(cfg.factor(), 28);
    }
    // The hub's Qwen2-VL-2B-Instruct preprocessor_config.json: flat, no `size`.
    let hub = json!({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                     "temporal_patch_size": 2, "merge_size": 2});
    let cfg = Qwen2VlProcessorConfig::from_json_value(&hub).unwrap();
    assert_eq!((cfg.min_pixels, cfg.max_pixels), (3136, 12845056));
    // min_pixels / max_pixels override `size`, as transformers' constructor does.
    let both = json!({"size": {"shortest_edge": 10, "longest_edge": 20000}, "max_pixels": 9000});
    let cfg = Qwen2VlProcessorConfig::from_json_value(&both).unwrap();
    assert_eq!((cfg.min_pixels, cfg.max_pixels), (10, 9000));
    assert_eq!(
        Qwen2VlProcessorConfig::from_json_value(&json!({})).unwrap(),
        Qwen2VlProcessorConfig::default()
    );

    for bad in [
        json!({"size": {"shortest_edge": 3}}),
        json!({"patch_size": 0}),
        json!({"min_pixels": 100, "max_pixels": 10}),
        json!({"resample": 0}),
        json!([1]),
    ] {
        let err = Qwen2VlProcessorConfig::from_json_value(&bad).unwrap_err();
        assert!(matches!(err, VisionError::BadConfig(_)), "{bad}: {err}");
    }
}

#[test]
fn sizes_and_grids_match_the_fixture() {
    let cfg = config(MODELS[0]);
    for name in CASES {
        let c = case(MODELS[0], name);
        for (img, g) in c["images"]
            .as_array()
            .unwrap()
            .iter()
            .zip(c["image_grid_thw"].as_array().unwrap())
        {
            let size = usizes(&img["size"]);
            let (w, h) = (size[0] as u32, size[1] as u32);
            let (rw, rh) = resized_size(w, h, &cfg).unwrap();
            assert_eq!(
                [rw as usize, rh as usize],
                usizes(&img["resized"])[..],
                "{name}"
            );
            let ours = grid(w, h, &cfg).unwrap();
            assert_eq!(ours[..], usizes(g)[..], "{name}");
            assert_eq!(
                image_tokens(ours, 2),
                img["tokens"].as_u64().unwrap() as usize
            );
        }
    }
}

#[test]
fn smart_resize_follows_transformers() {
    let (min, max) = (4704, 11760);
    // Python's round: 42 / 28 = 1.5 goes to 2 (even), 70 / 28 = 2.5 to 2.
    assert_eq!(smart_resize(42, 70, 28, 0, 1 << 40).unwrap(), (56, 56));
    assert_eq!(smart_resize(42, 70, 28, min, max).unwrap(), (56, 112));
    // Plain rounding inside the bounds.
    assert_eq!(smart_resize(200, 50, 28, min, max).unwrap(), (196, 56));
    // Above max_pixels: floored after scaling down, never below one factor.
    assert_eq!(smart_resize(128, 128, 28, min, max).unwrap(), (84, 84));
    assert_eq!(smart_resize(5000, 30, 28, min, max).unwrap(), (1400, 28));
    // Below min_pixels: ceiled after scaling up.
    assert_eq!(smart_resize(40, 150, 28, min, max).unwrap(), (56, 140));
    assert_eq!(smart_resize(1, 1, 28, min, max).unwrap(), (84, 84));
    // transformers refuses aspect ratios above 200.
    assert_eq!(
        smart_resize(201, 1, 28, 0, 1 << 40).map_err(|_| ()),
        Err(())
    );
    assert!(smart_resize(200, 1, 28, 1, 1 << 40).is_ok());
    // Without a lower bound a thin side can round to nothing: refused, not a 0-row image.
    assert!(matches!(
        smart_resize(200, 1, 28, 0, 1 << 40),
        Err(VisionError::BadConfig(_))
    ));
    assert!(matches!(
        smart_resize(0, 5, 28, min, max),
        Err(VisionError::AspectRatio { .. })
    ));
}

#[test]
fn pixels_equal_transformers_exactly() {
    for model in MODELS {
        let cfg = config(model);
        for name in CASES {
            let c = case(model, name);
            let shape = usizes(&c["pixel_values_shape"]);
            let reference = read_f32(&fixture(&format!("cases/{model}/{name}.pixels.f32")));
            assert_eq!(reference.len(), shape.iter().product::<usize>());
            let mut ours = Vec::new();
            for (img, g) in c["images"]
                .as_array()
                .unwrap()
                .iter()
                .zip(c["image_grid_thw"].as_array().unwrap())
            {
                let out = preprocess(&image(img["image"].as_str().unwrap()), &cfg).unwrap();
                assert_eq!(out.grid_thw[..], usizes(g)[..], "{model}/{name}: grid");
                assert_eq!(out.patch_dim, shape[1]);
                assert_eq!(
                    out.patches.len(),
                    out.grid_thw.iter().product::<usize>() * out.patch_dim
                );
                ours.extend_from_slice(&out.patches);
            }
            assert_eq!(ours.len(), reference.len(), "{model}/{name}: patch count");
            let diff = ours
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert_eq!(diff, 0.0, "{model}/{name}: max abs diff {diff}");
            eprintln!("{model}/{name}: {} patches, pixels equal", shape[0]);
        }
    }
}
