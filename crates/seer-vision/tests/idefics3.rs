//! SmolVLM / Idefics3 preprocessing against `tests/fixtures/idefics3/`
//! (`scripts/make_idefics3_fixtures.py`): transformers 5.23
//! `Idefics3ImageProcessorPil` with Pillow 13, and `Idefics3Processor`'s ids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use seer_vision::idefics3::{
    expand_prompt, preprocess, preprocess_with_order, prompt_for_image, resize_output_size,
    grid, tiles_u8, vision_encoder_size, Idefics3ProcessorConfig, Idefics3Size, FAKE_IMAGE_TOKEN,
    GLOBAL_IMAGE_TAG, IMAGE_TOKEN,
};
use seer_vision::resample::{Filter, PassOrder};
use seer_vision::{load_image, ImageInput, ImageLimits, VisionError};
use serde_json::{json, Value};

const CASES: [&str; 5] = ["a_square", "b_wide", "c_tall", "d_two_images", "e_system"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/idefics3")
        .join(name)
}

fn case(name: &str) -> Value {
    let path = fixture(&format!("cases/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn config() -> Idefics3ProcessorConfig {
    Idefics3ProcessorConfig::from_json_file(fixture("tiny-smolvlm/processor_config.json")).unwrap()
}

fn image(rel: &str) -> RgbImage {
    load_image(&ImageInput::Path(fixture(rel)), &ImageLimits::default()).unwrap()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// The images of a case, in prompt order.
fn case_images(c: &Value) -> Vec<String> {
    c["tiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["image"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn config_reads_nested_and_flat() {
    let cfg = config();
    assert_eq!(cfg.size, Idefics3Size::LongestEdge(96));
    assert_eq!(cfg.max_image_size, 32);
    assert_eq!(cfg.resample, Filter::Lanczos);
    assert_eq!(cfg.image_seq_len, 16);
    assert!(cfg.do_image_splitting && cfg.do_pad);
    assert_eq!(cfg.image_mean, [0.5; 3]);

    let flat = json!({
        "size": {"longest_edge": 1536},
        "max_image_size": {"longest_edge": 384},
        "image_mean": 0.5,
        "resample": 1
    });
    let cfg = Idefics3ProcessorConfig::from_json_value(&flat).unwrap();
    assert_eq!(cfg.size, Idefics3Size::LongestEdge(1536));
    assert_eq!(cfg.max_image_size, 384);
    assert_eq!(cfg.image_seq_len, 169);

    for bad in [
        json!({"size": {"shortest_edge": 3}}),
        json!({"max_image_size": {"longest_edge": 0}}),
        json!({"resample": 0}),
        json!({"image_processor": {}, "image_seq_len": -1}),
        json!([1, 2]),
    ] {
        let err = Idefics3ProcessorConfig::from_json_value(&bad).unwrap_err();
        assert!(matches!(err, VisionError::BadConfig(_)), "{bad}: {err}");
    }
}

#[test]
fn sizes_match_the_fixture_table() {
    let cfg = config();
    for name in CASES {
        for t in case(name)["tiles"].as_array().unwrap() {
            let size = usizes(&t["size"]);
            let (w, h) = (size[0] as u32, size[1] as u32);
            let resized = resize_output_size(w, h, 96);
            assert_eq!(
                [resized.0 as usize, resized.1 as usize],
                usizes(&t["resized"])[..]
            );
            let refined = vision_encoder_size(resized.0, resized.1, 32);
            assert_eq!(
                [refined.0 as usize, refined.1 as usize],
                usizes(&t["refined"])[..]
            );
            let (tiles, rows, cols) = tiles_u8(
                &image(t["image"].as_str().unwrap()),
                &cfg,
                PassOrder::Pillow13,
            );
            assert_eq!(rows, t["rows"].as_u64().unwrap() as usize);
            assert_eq!(cols, t["cols"].as_u64().unwrap() as usize);
            assert_eq!(tiles.len(), t["n_tiles"].as_u64().unwrap() as usize);
            assert_eq!(grid(w, h, &cfg), (rows, cols), "grid from the size alone");
        }
    }
}

/// The grid from sizes alone agrees with the tiles actually cut, over many shapes
/// (single-tile images included: those give (0, 0)).
#[test]
fn grid_from_size_agrees_with_tiling() {
    let cfg = config();
    for (w, h) in [(1, 1), (20, 20), (32, 32), (33, 32), (64, 20), (20, 64), (100, 30), (300, 7), (97, 96), (500, 500)] {
        let (tiles, rows, cols) = tiles_u8(&RgbImage::new(w, h), &cfg, PassOrder::Pillow13);
        assert_eq!(grid(w, h, &cfg), (rows, cols), "{w}x{h}");
        assert_eq!(tiles.len(), rows * cols + 1, "{w}x{h}");
    }
}

#[test]
fn size_rules_follow_transformers() {
    // Odd shorter side goes up by one; the aspect ratio is truncated.
    assert_eq!(resize_output_size(160, 40, 96), (96, 24));
    assert_eq!(resize_output_size(40, 150, 96), (26, 96));
    assert_eq!(resize_output_size(100, 30, 96), (96, 28)); // int(28.8) = 28
    assert_eq!(resize_output_size(100, 33, 96), (96, 32)); // int(31.68) = 31 -> 32
    assert_eq!(resize_output_size(10000, 1, 96), (96, 1)); // never below 1
                                                           // Capped at 4096 after step 1.
    assert_eq!(resize_output_size(2000, 1000, 8192), (4096, 2048));
    // Step 2 recomputes the short side from the rounded long side.
    assert_eq!(vision_encoder_size(100, 30, 32), (128, 64)); // int(128 / (10/3)) = 38 -> 64
    assert_eq!(vision_encoder_size(32, 32, 32), (32, 32));
    assert_eq!(vision_encoder_size(30, 100, 32), (64, 128));
}

#[test]
fn pixels_equal_transformers_exactly() {
    let cfg = config();
    for name in CASES {
        let c = case(name);
        let shape = usizes(&c["pixel_values_shape"]);
        let bytes = std::fs::read(fixture(&format!("cases/{name}.pixels.f32"))).unwrap();
        let reference: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(reference.len(), shape.iter().product::<usize>());
        let mut ours = Vec::new();
        for (img, t) in case_images(&c).iter().zip(c["tiles"].as_array().unwrap()) {
            let out = preprocess(&image(img), &cfg);
            assert_eq!(
                out.rows,
                t["rows"].as_u64().unwrap() as usize,
                "{name} {img}"
            );
            assert_eq!(
                out.cols,
                t["cols"].as_u64().unwrap() as usize,
                "{name} {img}"
            );
            for tile in &out.tiles {
                assert_eq!([tile.channels, tile.height, tile.width], shape[2..]);
                ours.extend_from_slice(&tile.data);
            }
        }
        assert_eq!(ours.len(), reference.len(), "{name}: tile count");
        let diff = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert_eq!(diff, 0.0, "{name}: max abs diff {diff}");

        // Every tile is a full tile: the mask is all ones, no padding.
        let mask = std::fs::read(fixture(&format!("cases/{name}.pixel_mask.u8"))).unwrap();
        assert_eq!(mask.len(), shape[1] * shape[3] * shape[4]);
        assert!(mask.iter().all(|&m| m == 1), "{name}: mask");
    }
}

#[test]
fn pass_order_matters_for_the_tall_image_only() {
    let cfg = config();
    for (img, differs) in [
        ("images/square-64x64.png", false),
        ("images/wide-160x40.png", false),
        ("images/tall-40x150.png", true),
    ] {
        let new = preprocess(&image(img), &cfg);
        let old = preprocess_with_order(&image(img), &cfg, PassOrder::HorizontalFirst);
        assert_eq!(new != old, differs, "{img}");
    }
}

/// The fixture tokenizer's ids for the pieces of an expansion.
fn expansion_ids(text: &str) -> Vec<u64> {
    let mut vocab: HashMap<String, u64> = HashMap::new();
    vocab.insert(GLOBAL_IMAGE_TAG.into(), 49152);
    for r in 1..=6u64 {
        for c in 1..=6u64 {
            vocab.insert(format!("<row_{r}_col_{c}>"), 49153 + (r - 1) * 6 + (c - 1));
        }
    }
    vocab.insert(FAKE_IMAGE_TOKEN.into(), 49189);
    vocab.insert(IMAGE_TOKEN.into(), 49190);
    let mut ids = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("\n\n") {
            ids.push(499);
            rest = r;
        } else if let Some(r) = rest.strip_prefix('\n') {
            ids.push(222);
            rest = r;
        } else {
            let end = rest.find('>').expect("a special token") + 1;
            ids.push(vocab[&rest[..end]]);
            rest = &rest[end..];
        }
    }
    ids
}

#[test]
fn prompt_expansion_matches_the_processor_ids() {
    let cfg = config();
    for name in CASES {
        let c = case(name);
        let text_ids = usizes(&c["text_input_ids"]);
        let mut expected: Vec<u64> = Vec::new();
        let mut grids = Vec::new();
        let tiles = c["tiles"].as_array().unwrap();
        let mut images = case_images(&c).into_iter().zip(tiles);
        let per_image_tokens = usizes(&c["num_image_tokens_per_image"]);
        let per_image_prompt = usizes(&c["num_prompt_tokens_per_image"]);
        let mut k = 0;
        for id in text_ids {
            if id != 49190 {
                expected.push(id as u64);
                continue;
            }
            let (img, t) = images.next().expect("an image per <image>");
            let out = preprocess(&image(&img), &cfg);
            assert_eq!(out.rows, t["rows"].as_u64().unwrap() as usize);
            let text = out.prompt(cfg.image_seq_len);
            assert_eq!(text, prompt_for_image(out.rows, out.cols, 16));
            let ids = expansion_ids(&text);
            assert_eq!(
                ids.iter().filter(|&&i| i == 49190).count(),
                per_image_tokens[k]
            );
            assert_eq!(ids.len(), per_image_prompt[k], "{name} image {k}");
            expected.extend(ids);
            grids.push((out.rows, out.cols));
            k += 1;
        }
        assert_eq!(
            expected.iter().map(|&i| i as usize).collect::<Vec<_>>(),
            usizes(&c["input_ids"]),
            "{name}"
        );

        // The expanded text has one placeholder per image token and keeps the
        // text around the images.
        let prompt = c["prompt"].as_str().unwrap();
        let expanded = expand_prompt(prompt, &grids, cfg.image_seq_len).unwrap();
        assert_eq!(
            expanded.matches(IMAGE_TOKEN).count(),
            per_image_tokens.iter().sum::<usize>()
        );
        assert!(expanded.starts_with("<|im_start|>"));
        assert!(expanded.ends_with("<end_of_utterance>\nAssistant:"));
    }
}

#[test]
fn prompt_forms() {
    let single = prompt_for_image(0, 0, 2);
    assert_eq!(
        single,
        "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
    );
    assert_eq!(
        prompt_for_image(2, 1, 1),
        "<fake_token_around_image><row_1_col_1><image>\n\
         <fake_token_around_image><row_2_col_1><image>\n\
         \n<fake_token_around_image><global-img><image><fake_token_around_image>"
    );
    let err = expand_prompt("<image> and <image>", &[(0, 0)], 2).unwrap_err();
    assert!(matches!(
        err,
        VisionError::ImageCountMismatch {
            placeholders: 2,
            images: 1
        }
    ));
    assert_eq!(expand_prompt("no images", &[], 2).unwrap(), "no images");
}

#[test]
fn single_tile_and_no_split_send_only_the_global_image() {
    let img = image("images/square-64x64.png");
    // Longest edge 32 = one tile: no grid.
    let cfg = Idefics3ProcessorConfig {
        size: Idefics3Size::LongestEdge(32),
        ..config()
    };
    let out = preprocess(&img, &cfg);
    assert_eq!((out.rows, out.cols, out.tiles.len()), (0, 0, 1));
    assert_eq!((out.tiles[0].height, out.tiles[0].width), (32, 32));
    // Without splitting: squashed to one tile.
    let cfg = Idefics3ProcessorConfig {
        do_image_splitting: false,
        ..config()
    };
    let out = preprocess(&image("images/wide-160x40.png"), &cfg);
    assert_eq!((out.rows, out.cols, out.tiles.len()), (0, 0, 1));
    assert_eq!((out.tiles[0].height, out.tiles[0].width), (32, 32));
    // The global image of a split image is the step-2 image resized to a tile.
    let (tiles, rows, cols) = tiles_u8(&img, &config(), PassOrder::Pillow13);
    assert_eq!((rows, cols), (3, 3));
    assert!(tiles.iter().all(|t| t.dimensions() == (32, 32)));
}
