//! SmolVLM (Idefics3) through the whole request path against transformers, on the tiny
//! fixtures of tests/fixtures/idefics3 (scripts/make_idefics3_fixtures.py): the chat template
//! and the processor's expansion of each image into tiles (prompt text and input ids), the
//! tiles' pixels, first-step logits and 16 greedy tokens, and the image-token count in usage.

mod support;

use seer_engine::generate::Timings;
use seer_engine::{GenerateRequest, Vlm};
use seer_vision::ImageLimits;
use support::{cases, fixtures, max_abs_diff, messages, read_f32};

#[test]
fn hf_folder_matches_transformers() {
    let root = fixtures("idefics3");
    let vlm = Vlm::load(&root.join("tiny-smolvlm"), None).expect("fixture model loads");
    let limits = ImageLimits::default();
    let all = cases(&root.join("cases"));
    assert!(all.len() >= 5, "expected the five fixture cases");
    for (name, case) in all {
        let file = |key: &str| read_f32(&root.join("cases").join(case[key].as_str().unwrap()));
        let msgs = messages(&case, &root);
        let prompt = vlm.build_prompt(&msgs).unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(vlm.expanded_ids(&prompt, 49190), want_ids, "{name}: input ids (the processor's expansion)");

        let images = vlm.load_pixels(&msgs, &limits).unwrap();
        let got: Vec<f32> = images.pixels.flatten_all().unwrap().to_vec1().unwrap();
        let pixel_diff = max_abs_diff(&got, &file("pixel_values_file"));
        assert!(pixel_diff == 0.0, "{name}: pixels differ by {pixel_diff}");

        let mut cache = vlm.model.new_cache();
        let logits = vlm.prefill(&prompt, Some(&images), &mut cache, &mut Timings::default()).unwrap().to_vec1::<f32>().unwrap();
        let exact_diff = max_abs_diff(&logits, &file("logits_f64_file"));
        assert!(exact_diff < 1e-4, "{name}: logits differ from the float64 reference by {exact_diff}");

        let req = GenerateRequest { messages: msgs, max_tokens: 16, ignore_eos: true, ..Default::default() };
        let gen = vlm.generate(&req, &limits, &mut |_| true).unwrap();
        let want_tokens: Vec<u32> = serde_json::from_value(case["greedy_tokens"].clone()).unwrap();
        assert_eq!(gen.token_ids, want_tokens, "{name}: greedy tokens");
        let image_tokens: usize = case["num_image_tokens_per_image"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap() as usize).sum();
        assert_eq!(gen.usage.image_tokens, image_tokens, "{name}: image tokens in usage");
        assert_eq!(gen.usage.prompt_tokens, want_ids.len(), "{name}: prompt tokens in usage");
        eprintln!("{name}: pixels equal, logits vs f64 {exact_diff:.2e}, {image_tokens} image tokens, 16 tokens equal");
    }
}

/// The GGUF text model + mmproj as llama.cpp's converter writes them, against
/// `llama-mtmd-cli` on the same files (gguf/llamacpp-<quant>-<case>.json): the prompt ids
/// mtmd lays out (its chat template, its tiles), and the greedy tokens. seer runs its f32
/// vision tower and KV cache here; llama.cpp's references were checked against transformers
/// on the same prompt ids (`hf_same_prompt_*`), which is what seer is held to.
/// `e_system` is left out: llama-mtmd-cli evaluates a `-sys` message on its own and ends it
/// with an extra "\n" token that the chat template does not write (a CLI artifact).
#[test]
fn gguf_matches_llamacpp() {
    let root = fixtures("idefics3");
    let gguf = root.join("gguf");
    let opts = seer_engine::LoadOptions {
        vision: seer_engine::VisionDtype::F32,
        kv_cache: Some(seer_engine::KvType::F32),
        ..Default::default()
    };
    let vlm = Vlm::load_with(&gguf.join("tiny-smolvlm-F16.gguf"), Some(&gguf.join("mmproj-tiny-smolvlm-F16.gguf")), &opts).expect("GGUF fixture loads");
    for case in ["a_square", "b_wide", "c_tall", "d_two_images"] {
        let path = gguf.join(format!("llamacpp-F16-{case}.json"));
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let msgs = messages(&r, &root);
        let prompt = vlm.build_prompt(&msgs).unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(r["prompt_token_ids"].clone()).unwrap();
        assert_eq!(vlm.expanded_ids(&prompt, 49190), want_ids, "{case}: prompt ids as mtmd lays them out");
        let req = GenerateRequest { messages: msgs, max_tokens: 16, ignore_eos: true, ..Default::default() };
        let gen = vlm.generate(&req, &ImageLimits::default(), &mut |_| true).unwrap();
        let want: Vec<u32> = serde_json::from_value(r["hf_same_prompt_greedy_tokens"].clone()).unwrap();
        assert_eq!(gen.token_ids, want, "{case}: greedy tokens (transformers on llama.cpp's prompt and tiles)");
        eprintln!("{case}: prompt ids equal ({} tokens), 16 greedy tokens equal; llama.cpp's own text equal: {}", want_ids.len(), r["hf_same_prompt_text_equal"]);
    }
}
