//! seer on the tiny LLaVA converted by llama.cpp's own tools (GGUF text model + mmproj).
//!
//! References (tests/fixtures/llava/gguf, see its README):
//! - `llamacpp-F16-<case>.json`: llama-mtmd-cli's formatted prompt and prompt ids, and what
//!   transformers computes on the same prompt ids and llama.cpp's preprocessing of the image
//!   (`hf_same_prompt_greedy_tokens`). The F16 GGUF holds the same f16 values as the hub
//!   folder, so seer must produce exactly those tokens. (llama.cpp's own LLaVA vision graph
//!   at 0c1e57098 puts the class token last and runs one layer too few, upstream #25814 and
//!   #25817, so its raw image output is not the reference.)
//! - `llamacpp-fixed-<quant>-<case>.json`: llama-mtmd-cli built with those two defects
//!   fixed (`llamacpp-fixes.patch`), and `llamacpp-text-<quant>-<case>.json`: unmodified
//!   llama.cpp on text-only chats. Their printed text is compared with seer's.
//!
//! Quantized (Q8_0) runs are compared where llama.cpp's output is stable: both engines
//! quantize activations to 8 bits, but llama.cpp also keeps its KV cache in f16, so where
//! the top two logits are close the two can part ways. Of the five Q8_0 references, seer
//! reproduces `text-user` and `fixed-a_square` exactly; `text-system` parts at token 8
//! (llama.cpp picks an unused padding row), `fixed-b_wide` at token 5 and
//! `fixed-c_two_images` at token 5.

use std::path::{Path, PathBuf};

use seer_engine::{GenerateRequest, Message, SamplingParams, Vlm};
use seer_vision::{ImageInput, ImageLimits};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava")
}

fn load(quant: &str) -> Vlm {
    let dir = fixtures().join("gguf");
    Vlm::load(&dir.join(format!("tiny-llava-{quant}.gguf")), Some(&dir.join("mmproj-tiny-llava-F16.gguf"))).expect("GGUF fixture loads")
}

fn reference(name: &str) -> Value {
    let path = fixtures().join("gguf").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn request(case: &Value) -> GenerateRequest {
    let images = case["images"].as_array().unwrap().iter().map(|p| ImageInput::Path(fixtures().join(p.as_str().unwrap()))).collect();
    GenerateRequest {
        messages: vec![Message::user_with_images(case["prompt_given"].as_str().unwrap(), images)],
        max_tokens: 16,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        ..Default::default()
    }
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn f16_gguf_matches_transformers_on_llamacpp_prompts() {
    let vlm = load("F16");
    for case in ["a_square", "b_wide", "c_two_images"] {
        let r = reference(&format!("llamacpp-F16-{case}.json"));
        let run = &r["runs"]["jinja"];
        let req = request(&r);
        let prompt = vlm.build_prompt(&req.messages).unwrap();
        assert_eq!(prompt.text, run["formatted_prompt"].as_str().unwrap(), "{case}: prompt text as llama.cpp formats it");
        assert_eq!(vlm.expanded_ids(&prompt, 32000), ids(&run["prompt_token_ids"]), "{case}: prompt ids as llama.cpp tokenizes them");
        let gen = vlm.generate(&req, &ImageLimits::default(), &mut |_| true).unwrap();
        assert_eq!(gen.token_ids, ids(&run["hf_same_prompt_greedy_tokens"]), "{case}: greedy tokens");
        assert_eq!(gen.usage.image_tokens, 16 * req.messages[0].images().count());
    }
}

/// llama.cpp prints the first generated piece with its leading space; Hugging Face's
/// decode (and seer's) drops it.
fn printed(run: &Value) -> String {
    run["generated_text"].as_str().unwrap().trim_start_matches(' ').to_string()
}

fn run_of(r: &Value) -> &Value {
    if r.get("runs").is_some() { &r["runs"]["jinja"] } else { r }
}

/// A text-only chat as the llama.cpp reference ran it.
fn text_request(r: &Value) -> GenerateRequest {
    let messages = r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = seer_engine::Role::parse(m["role"].as_str().unwrap()).unwrap();
            let text = match &m["content"] {
                Value::String(s) => s.clone(),
                other => other[0]["text"].as_str().unwrap().to_string(),
            };
            Message::text(role, text)
        })
        .collect();
    GenerateRequest { messages, max_tokens: 16, ignore_eos: true, ..Default::default() }
}

fn generate(vlm: &Vlm, req: &GenerateRequest) -> seer_engine::Generation {
    vlm.generate(req, &ImageLimits::default(), &mut |_| true).unwrap()
}

#[test]
fn text_only_chats_match_llamacpp() {
    for (quant, cases) in [("F16", &["user", "system"][..]), ("Q8_0", &["user"][..])] {
        let vlm = load(quant);
        for case in cases {
            let r = reference(&format!("llamacpp-text-{quant}-{case}.json"));
            let run = run_of(&r);
            let req = text_request(&r);
            let prompt = vlm.build_prompt(&req.messages).unwrap();
            assert_eq!(prompt.text, run["formatted_prompt"].as_str().unwrap(), "{quant}/{case}: prompt");
            assert_eq!(vlm.expanded_ids(&prompt, 32000), ids(&run["prompt_token_ids"]), "{quant}/{case}: prompt ids");
            let gen = generate(&vlm, &req);
            assert_eq!(gen.text, printed(run), "{quant}/{case}: text");
            assert_eq!(gen.token_ids, ids(&run["sampled_ids_inferred"]), "{quant}/{case}: tokens");
        }
    }
}

#[test]
fn image_chats_match_llamacpp_with_its_llava_fixes() {
    for (quant, cases) in [("F16", &["a_square", "b_wide", "c_two_images"][..]), ("Q8_0", &["a_square"][..])] {
        let vlm = load(quant);
        for case in cases {
            let r = reference(&format!("llamacpp-fixed-{quant}-{case}.json"));
            let run = run_of(&r);
            let gen = generate(&vlm, &request(&r));
            assert_eq!(gen.text, printed(run), "{quant}/{case}: text");
        }
    }
}
