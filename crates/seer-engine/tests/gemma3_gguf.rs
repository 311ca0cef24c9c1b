//! Gemma 3 from llama.cpp's files (a `gemma3` text GGUF and a `gemma3` mmproj, F16),
//! against `llama-mtmd-cli` on the same files (tests/fixtures/gemma3/gguf, see its README):
//! the prompt ids mtmd lays out (each image as `<start_of_image>`, its 16 embeddings,
//! `<end_of_image>`, without transformers' blank lines), and 16 greedy tokens. llama.cpp
//! letterboxes images and scales queries by 1/√head_dim (the GGUF has no
//! `query_pre_attn_scalar`), so the reference is transformers run on llama.cpp's prompt
//! ids, pixels and scale (`hf_same_prompt_greedy_tokens`); it equals llama.cpp's own text
//! in all four cases.

mod support;

use seer_engine::{GenerateRequest, KvType, LoadOptions, VisionDtype, Vlm};
use seer_vision::ImageLimits;
use serde_json::Value;

#[test]
fn gemma3_gguf_matches_llama_cpp() {
    let root = support::fixtures("gemma3");
    let gguf = root.join("gguf");
    let opts = LoadOptions { vision: VisionDtype::F32, kv_cache: Some(KvType::F32), ..Default::default() };
    let vlm = Vlm::load_with(&gguf.join("tiny-gemma3-F16.gguf"), Some(&gguf.join("mmproj-tiny-gemma3-F16.gguf")), &opts).expect("GGUF fixture loads");
    for case in ["a_square", "b_wide", "c_tall", "d_two_images"] {
        let path = gguf.join(format!("llamacpp-F16-{case}.json"));
        let reference: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let messages = support::messages(&reference, &root);
        let prompt = vlm.build_prompt(&messages).unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(reference["prompt_token_ids"].clone()).unwrap();
        assert_eq!(vlm.expanded_ids(&prompt, 9), want_ids, "{case}: prompt ids");
        let req = GenerateRequest { messages, max_tokens: 16, ignore_eos: true, ..Default::default() };
        let gen = vlm.generate(&req, &ImageLimits::default(), &mut |_| true).unwrap();
        let want: Vec<u32> = serde_json::from_value(reference["hf_same_prompt_greedy_tokens"].clone()).unwrap();
        assert_eq!(gen.token_ids, want, "{case}: greedy tokens");
        eprintln!("{case}: prompt ids equal, 16 tokens equal ({:?})", gen.text);
    }
}
