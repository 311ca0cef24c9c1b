//! seer against transformers on the tiny Gemma 3 fixture (tests/fixtures/gemma3, made by
//! scripts/make_gemma3_fixtures.py), end to end from the Hugging Face folder: prompt text
//! and input ids (each image as `\n\n<start_of_image>`, its soft tokens, `<end_of_image>\n\n`),
//! pixels, image features (SigLIP, pooling, soft-embedding norm, projection), first-step
//! logits (sliding and global layers, images bidirectional) and 16 greedy tokens.

mod support;

use std::path::Path;

use seer_engine::Vlm;
use seer_vision::ImageLimits;
use serde_json::Value;
use support::{max_abs_diff, read_f32};

/// Whether the case passed the processor options at call time (pan-and-scan).
fn with_kwargs(case: &Value) -> bool {
    case["processor_kwargs"].as_object().is_some_and(|k| !k.is_empty())
}

#[test]
fn gemma3_matches_transformers() {
    let root = support::fixtures("gemma3");
    let vlm = Vlm::load(&root.join("tiny-gemma3"), None).expect("fixture model loads");
    let cases: Vec<_> = support::cases(&root.join("cases")).into_iter().filter(|(_, c)| !with_kwargs(c)).collect();
    assert!(cases.len() >= 5);
    for (name, case) in cases {
        check(&vlm, &root, &name, &case);
    }
}

/// The pan-and-scan case, from a copy of the folder whose processor config asks for the
/// options the case passed at call time.
#[test]
fn gemma3_pan_and_scan_matches_transformers() {
    let root = support::fixtures("gemma3");
    let dir = std::env::temp_dir().join(format!("seer-gemma3-pas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(root.join("tiny-gemma3")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let (name, case) = support::cases(&root.join("cases")).into_iter().find(|(_, c)| with_kwargs(c)).expect("a pan-and-scan case");
    let mut processor: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("processor_config.json")).unwrap()).unwrap();
    for (k, v) in case["processor_kwargs"].as_object().unwrap() {
        processor["image_processor"][k] = v.clone();
    }
    std::fs::write(dir.join("processor_config.json"), processor.to_string()).unwrap();
    let vlm = Vlm::load(&dir, None).expect("the copy loads");
    check(&vlm, &root, &name, &case);
    std::fs::remove_dir_all(&dir).ok();
}

fn check(vlm: &Vlm, root: &Path, name: &str, case: &Value) {
    let limits = ImageLimits::default();
    {
        let file = |key: &str| read_f32(&root.join("cases").join(case[key].as_str().unwrap()));
        let msgs = support::messages(case, root);
        let prompt = vlm.build_prompt(&msgs).unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(vlm.expanded_ids(&prompt, case["image_token_id"].as_u64().unwrap() as u32), want_ids, "{name}: input ids");

        let batch = vlm.load_pixels(&msgs, &limits).unwrap();
        let pixels: Vec<f32> = batch.pixels.flatten_all().unwrap().to_vec1().unwrap();
        let pixel_diff = max_abs_diff(&pixels, &file("pixel_values_file"));
        assert!(pixel_diff < 1e-5, "{name}: pixels differ by {pixel_diff}");
        let features = vlm.model.encode_images(&batch).unwrap();
        let got: Vec<f32> = features.iter().flat_map(|f| f.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        let feature_diff = max_abs_diff(&got, &file("image_features_f64_file"));
        assert!(feature_diff < 1e-4, "{name}: image features differ from float64 by {feature_diff}");

        let exact_diff = support::check_logits_and_greedy(vlm, name, case, &root.join("cases"), &prompt, &batch, msgs);
        eprintln!("{name}: pixels {pixel_diff:.1e}, features {feature_diff:.1e}, logits vs f64 {exact_diff:.1e}, 16 tokens equal");
    }
}
