//! Qwen2-VL and Qwen2.5-VL through the whole request path against transformers, on the
//! tiny fixtures of tests/fixtures/qwen2vl (scripts/make_qwen2vl_fixtures.py): prompt text
//! and input ids (one image pad token per embedding), the flattened patches, first-step
//! logits (M-RoPE positions over the image grids) and 16 greedy tokens (decode positions
//! continuing from the prompt's M-RoPE delta), and the image-token count in usage.

mod support;

use seer_engine::generate::Timings;
use seer_engine::{GenerateRequest, Vlm};
use seer_vision::ImageLimits;
use support::{cases, fixtures, max_abs_diff, messages, read_f32};

fn check_folder(folder: &str) {
    let root = fixtures("qwen2vl");
    let vlm = Vlm::load(&root.join(folder), None).expect("fixture model loads");
    let limits = ImageLimits::default();
    let all = cases(&root.join("cases").join(folder));
    assert!(all.len() >= 5, "expected the five fixture cases");
    for (name, case) in all {
        let file = |key: &str| read_f32(&root.join("cases").join(folder).join(case[key].as_str().unwrap()));
        let msgs = messages(&case, &root);
        let prompt = vlm.build_prompt(&msgs).unwrap();
        assert_eq!(prompt.text, case["prompt"].as_str().unwrap(), "{folder}/{name}: prompt text");
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let image_token = case["image_token_id"].as_u64().unwrap() as u32;
        assert_eq!(vlm.expanded_ids(&prompt, image_token), want_ids, "{folder}/{name}: input ids");

        let images = vlm.load_pixels(&msgs, &limits).unwrap();
        let got: Vec<f32> = images.pixels.flatten_all().unwrap().to_vec1().unwrap();
        let pixel_diff = max_abs_diff(&got, &file("pixel_values_file"));
        assert!(pixel_diff == 0.0, "{folder}/{name}: patches differ by {pixel_diff}");

        let mut cache = vlm.model.new_cache();
        let logits = vlm.prefill(&prompt, Some(&images), &mut cache, &mut Timings::default()).unwrap().to_vec1::<f32>().unwrap();
        let exact_diff = max_abs_diff(&logits, &file("logits_f64_file"));
        assert!(exact_diff < 1e-4, "{folder}/{name}: logits differ from the float64 reference by {exact_diff}");

        let req = GenerateRequest { messages: msgs, max_tokens: 16, ignore_eos: true, ..Default::default() };
        let gen = vlm.generate(&req, &limits, &mut |_| true).unwrap();
        let want_tokens: Vec<u32> = serde_json::from_value(case["greedy_tokens"].clone()).unwrap();
        assert_eq!(gen.token_ids, want_tokens, "{folder}/{name}: greedy tokens");
        let image_tokens: usize = case["num_image_tokens_per_image"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap() as usize).sum();
        assert_eq!(gen.usage.image_tokens, image_tokens, "{folder}/{name}: image tokens in usage");
        assert_eq!(gen.usage.prompt_tokens, want_ids.len(), "{folder}/{name}: prompt tokens in usage");
        eprintln!("{folder}/{name}: patches equal, logits vs f64 {exact_diff:.2e}, {image_tokens} image tokens, 16 tokens equal");
    }
}

#[test]
fn qwen2_vl_matches_transformers() {
    check_folder("tiny-qwen2-vl");
}

#[test]
fn qwen2_5_vl_matches_transformers() {
    check_folder("tiny-qwen2.5-vl");
}
