//! seer on the tiny LLaVA-NeXT converted by llama.cpp's own tools: the text model GGUF plus
//! the LLaVA-1.6 mmproj of the legacy converter (tests/fixtures/llava_next/gguf).
//!
//! llama.cpp 0c1e57098 reads that mmproj as tiles then the base image, with no unpadding and
//! no `image_newline` (and its LLaVA graph puts the class token last and runs one layer too
//! few): its tokens differ from transformers' from the first one (`llamacpp-F16-*.json`).
//! seer runs the model as it was trained, so the references are
//! - transformers on the prompt ids llama.cpp builds (its chat template output, each text
//!   segment tokenized on its own) with the image positions transformers' packing makes, and
//!   the pixels of llama.cpp's resampler (`llamacpp-next-F16-*.json`, `hf_same_prompt_*`);
//! - llama-mtmd-cli built with ../llava/gguf/llamacpp-fixes.patch and
//!   gguf/llamacpp-llava-next.patch (transformers' packing through the anyres code mtmd
//!   already has for Granite 4 Vision): its printed text.

mod support;

use std::path::PathBuf;

use seer_engine::generate::Timings;
use seer_engine::{GenerateRequest, KvType, LoadOptions, Message, VisionDtype, Vlm};
use seer_vision::{ImageInput, ImageLimits};
use serde_json::Value;
use support::{max_abs_diff, read_f32};

const CASES: [&str; 4] = ["a_square", "b_very_wide", "c_very_tall", "d_two_images"];

fn root() -> PathBuf {
    support::fixtures("llava_next")
}

fn load() -> Vlm {
    let dir = root().join("gguf");
    let opts = LoadOptions { vision: VisionDtype::F32, kv_cache: Some(KvType::F32), ..Default::default() };
    Vlm::load_with(&dir.join("tiny-llava-next-F16.gguf"), Some(&dir.join("mmproj-tiny-llava-next-F16.gguf")), &opts).expect("GGUF fixture loads")
}

fn reference(case: &str) -> Value {
    let path = root().join("gguf").join(format!("llamacpp-next-F16-{case}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn request(r: &Value) -> GenerateRequest {
    let images = r["images"].as_array().unwrap().iter().map(|p| ImageInput::Path(root().join(p.as_str().unwrap()))).collect();
    GenerateRequest {
        messages: vec![Message::user_with_images(r["prompt_given"].as_str().unwrap(), images)],
        max_tokens: 16,
        ignore_eos: true,
        ..Default::default()
    }
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn llava_next_gguf_matches_transformers_on_llamacpp_prompts() {
    let vlm = load();
    for case in CASES {
        let r = reference(case);
        let req = request(&r);
        let prompt = vlm.build_prompt(&req.messages).unwrap();
        assert_eq!(prompt.text, r["formatted_prompt"].as_str().unwrap(), "{case}: prompt text as llama.cpp formats it");
        assert_eq!(vlm.expanded_ids(&prompt, 32000), ids(&r["prompt_token_ids"]), "{case}: prompt ids");
        let counts: Vec<usize> = serde_json::from_value(r["num_image_tokens_per_image"].clone()).unwrap();
        assert_eq!(prompt.block_tokens, counts, "{case}: image tokens per image");

        // The reference pads each image to the most blocks of the case; seer keeps each
        // image's own, one after another.
        let batch = vlm.load_pixels(&req.messages, &ImageLimits::default()).unwrap();
        let got: Vec<f32> = batch.pixels.flatten_all().unwrap().to_vec1().unwrap();
        let shape: Vec<usize> = serde_json::from_value(r["pixels_shape"].clone()).unwrap();
        let block = shape[2] * shape[3] * shape[4];
        let want = read_f32(&root().join("gguf").join(r["pixels_file"].as_str().unwrap()));
        let per_image: Vec<usize> = batch.layouts.iter().map(|l| 1 + l.tiles.0 * l.tiles.1).collect();
        let want: Vec<f32> = per_image.iter().enumerate().flat_map(|(i, &n)| want[i * shape[1] * block..][..n * block].to_vec()).collect();
        let pixel_diff = max_abs_diff(&got, &want);
        assert!(pixel_diff < 1e-5, "{case}: pixels differ by {pixel_diff}");

        let mut cache = vlm.model.new_cache();
        let logits = vlm.prefill(&prompt, Some(&batch), &mut cache, &mut Timings::default()).unwrap().to_vec1::<f32>().unwrap();
        let logit_diff = max_abs_diff(&logits, &read_f32(&root().join("gguf").join(r["hf_same_prompt_logits_f64_file"].as_str().unwrap())));
        assert!(logit_diff < 1e-4, "{case}: logits differ from float64 by {logit_diff}");

        let gen = vlm.generate(&req, &ImageLimits::default(), &mut |_| true).unwrap();
        assert_eq!(gen.token_ids, ids(&r["hf_same_prompt_greedy_tokens"]), "{case}: greedy tokens");
        assert_eq!(gen.usage.image_tokens, counts.iter().sum::<usize>(), "{case}: usage.image_tokens");
        eprintln!("{case}: pixels {pixel_diff:.1e}, logits vs f64 {logit_diff:.1e}, 16 tokens equal");
    }
}

/// llama.cpp prints the first piece with its leading space; seer's text drops it.
fn printed(r: &Value) -> String {
    r["generated_text"].as_str().unwrap().trim_start_matches(' ').to_string()
}

#[test]
fn llava_next_gguf_matches_patched_llamacpp() {
    let vlm = load();
    for case in CASES {
        let r = reference(case);
        let gen = vlm.generate(&request(&r), &ImageLimits::default(), &mut |_| true).unwrap();
        assert_eq!(gen.text, printed(&r), "{case}: text");
        assert_eq!(Some(gen.usage.prompt_tokens as u64), r["n_prompt_tokens_logged"].as_u64(), "{case}: prompt tokens as llama.cpp counts them");
    }
}
