//! Reading the reference fixtures that scripts/make_*_fixtures.py write: case files with
//! a conversation, and little-endian f32 arrays beside them.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

use seer_engine::chat::{Message, Part, Role};
use seer_engine::generate::{Prompt, Timings};
use seer_engine::{GenerateRequest, ImageBatch, Vlm};
use seer_vision::ImageInput;
use serde_json::Value;

/// `tests/fixtures/<family>`.
pub fn fixtures(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(family)
}

pub fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length differs");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The case's conversation, with image paths (relative to `root`) made absolute.
pub fn messages(case: &Value, root: &Path) -> Vec<Message> {
    case["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            let role = Role::parse(m["role"].as_str().unwrap()).unwrap();
            let parts = match &m["content"] {
                Value::String(s) => vec![Part::Text(s.clone())],
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| match p["type"].as_str().unwrap() {
                        "text" => Part::Text(p["text"].as_str().unwrap().to_string()),
                        _ => Part::Image(ImageInput::Path(root.join(p["path"].as_str().unwrap()))),
                    })
                    .collect(),
                other => panic!("unexpected content {other}"),
            };
            Message { role, parts }
        })
        .collect()
}

/// The `*.json` case files of `dir`, sorted by name, parsed (`summary.json` left out).
pub fn cases(dir: &Path) -> Vec<(String, Value)> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.file_stem().is_some_and(|s| s != "summary"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|p| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p.file_stem().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect()
}

/// The end of every reference check: the first-step logits against the case's float64
/// reference (`logits_f64_file` in `dir`, within 1e-4), then 16 greedy tokens and the
/// prompt's token count (`input_ids`) against transformers'. Returns the logits' distance.
pub fn check_logits_and_greedy(vlm: &Vlm, name: &str, case: &Value, dir: &Path, prompt: &Prompt, batch: &ImageBatch, messages: Vec<Message>) -> f32 {
    let mut cache = vlm.model.new_cache();
    let logits = vlm.prefill(prompt, Some(batch), &mut cache, &mut Timings::default()).unwrap().to_vec1::<f32>().unwrap();
    let exact_diff = max_abs_diff(&logits, &read_f32(&dir.join(case["logits_f64_file"].as_str().unwrap())));
    assert!(exact_diff < 1e-4, "{name}: logits differ from float64 by {exact_diff}");
    let req = GenerateRequest { messages, max_tokens: 16, ignore_eos: true, ..Default::default() };
    let gen = vlm.generate(&req, &seer_vision::ImageLimits::default(), &mut |_| true).unwrap();
    let want: Vec<u32> = serde_json::from_value(case["greedy_tokens"].clone()).unwrap();
    assert_eq!(gen.token_ids, want, "{name}: greedy tokens");
    assert_eq!(Some(gen.usage.prompt_tokens), case["input_ids"].as_array().map(Vec::len), "{name}: prompt tokens");
    exact_diff
}
