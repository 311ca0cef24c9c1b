//! seer against transformers on the tiny LLaVA fixtures (tests/fixtures/llava, made by
//! scripts/make_llava_fixtures.py): prompt text, input ids, pixels, first-step logits and
//! 16 greedy tokens, for both checkpoint layouts.
//!
//! Logits: seer's f32 must be within 1e-4 of the float64 reference, the exact answer. The
//! fixture's logits are near 26, where f32 rounding alone moves transformers' own f32 run
//! up to 8e-5 from float64, so seer and transformers' f32 may differ by the sum of two such
//! errors (checked at 2e-4).

use std::path::{Path, PathBuf};

use seer_engine::chat::{Message, Part, Role};
use seer_engine::generate::Timings;
use seer_engine::{GenerateRequest, SamplingParams, Vlm};
use seer_vision::{ImageInput, ImageLimits};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava")
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length differs");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The case's conversation, with image paths made absolute.
fn messages(case: &Value) -> Vec<Message> {
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
                        _ => Part::Image(ImageInput::Path(fixtures().join(p["path"].as_str().unwrap()))),
                    })
                    .collect(),
                other => panic!("unexpected content {other}"),
            };
            Message { role, parts }
        })
        .collect()
}

fn cases(folder: &str) -> Vec<(String, Value)> {
    let dir = fixtures().join("cases").join(folder);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "expected the five fixture cases in {}", dir.display());
    names
        .into_iter()
        .map(|p| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p.file_stem().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect()
}

fn check_folder(folder: &str) {
    let vlm = Vlm::load(&fixtures().join(folder), None).expect("fixture model loads");
    let limits = ImageLimits::default();
    for (name, case) in cases(folder) {
        let msgs = messages(&case);
        let prompt = vlm.build_prompt(&msgs).unwrap();
        assert_eq!(prompt.text, case["prompt"].as_str().unwrap(), "{folder}/{name}: prompt text");
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(vlm.expanded_ids(&prompt, 32000), want_ids, "{folder}/{name}: input ids");

        let pixels = vlm.load_pixels(&msgs, &limits).unwrap();
        let want_pixels = read_f32(&fixtures().join("cases").join(folder).join(case["pixel_values_file"].as_str().unwrap()));
        let got_pixels: Vec<f32> = pixels.pixels.flatten_all().unwrap().to_vec1().unwrap();
        let pixel_diff = max_abs_diff(&got_pixels, &want_pixels);
        assert!(pixel_diff < 1e-5, "{folder}/{name}: pixels differ by {pixel_diff}");

        let mut cache = vlm.model.new_cache();
        let logits = vlm.prefill(&prompt, Some(&pixels), &mut cache, &mut Timings::default()).unwrap();
        let want_logits = read_f32(&fixtures().join("cases").join(folder).join(case["logits_file"].as_str().unwrap()));
        let got_logits = logits.to_vec1::<f32>().unwrap();
        let logit_diff = max_abs_diff(&got_logits, &want_logits);
        assert!(logit_diff < 2e-4, "{folder}/{name}: logits differ from transformers' f32 by {logit_diff}");
        let exact = read_f32(&fixtures().join("cases").join(folder).join(case["logits_f64_file"].as_str().unwrap()));
        let exact_diff = max_abs_diff(&got_logits, &exact);
        assert!(exact_diff < 1e-4, "{folder}/{name}: logits differ from the float64 reference by {exact_diff}");

        let req = GenerateRequest {
            messages: msgs,
            max_tokens: 16,
            sampling: SamplingParams::default(),
            ignore_eos: true,
            ..Default::default()
        };
        let gen = vlm.generate(&req, &limits, &mut |_| true).unwrap();
        let want_tokens: Vec<u32> = serde_json::from_value(case["greedy_tokens"].clone()).unwrap();
        assert_eq!(gen.token_ids, want_tokens, "{folder}/{name}: greedy tokens");
        assert_eq!(gen.text, case["greedy_text"].as_str().unwrap(), "{folder}/{name}: greedy text");
        let n_images = case["image_sizes"].as_array().unwrap().len();
        assert_eq!(gen.usage.image_tokens, 16 * n_images, "{folder}/{name}: image tokens");
        assert_eq!(gen.usage.prompt_tokens, want_ids.len(), "{folder}/{name}: prompt tokens");
        eprintln!("{folder}/{name}: pixels {pixel_diff:.2e}, logits vs f64 {exact_diff:.2e} (vs transformers f32 {logit_diff:.2e}), tokens equal");
    }
}

#[test]
fn hub_layout_matches_transformers() {
    check_folder("tiny-llava-hub");
}

#[test]
fn transformers5_layout_matches_transformers() {
    check_folder("tiny-llava-new");
}

/// Stop strings cut the reference answer where they first occur, and logprobs are the
/// reference logits' log-softmax.
#[test]
fn stop_strings_and_logprobs_follow_the_reference() {
    let vlm = Vlm::load(&fixtures().join("tiny-llava-hub"), None).unwrap();
    let (_, case) = cases("tiny-llava-hub").into_iter().find(|(n, _)| n == "a_square").unwrap();
    let full = case["greedy_text"].as_str().unwrap();
    // A stop string from the middle of the answer (on a character boundary).
    let cut = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop: String = full[cut..].chars().take(3).collect();
    let req = GenerateRequest {
        messages: messages(&case),
        max_tokens: 16,
        ignore_eos: true,
        stop: vec![stop.clone()],
        logprobs: Some(3),
        ..Default::default()
    };
    let mut shown = String::new();
    let gen = vlm.generate(&req, &ImageLimits::default(), &mut |t| {
        shown.push_str(t);
        true
    }).unwrap();
    let expected = &full[..full.find(&stop).unwrap()];
    assert_eq!(gen.text, expected);
    assert_eq!(shown, expected, "the stream never shows the stop string");
    assert_eq!(gen.finish_reason, seer_engine::FinishReason::Stop);

    let exact = read_f32(&fixtures().join("cases/tiny-llava-hub").join(case["logits_f64_file"].as_str().unwrap()));
    let max = exact.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = exact.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    let first = &gen.logprobs.as_ref().unwrap()[0];
    let want: u32 = case["greedy_tokens"][0].as_u64().unwrap() as u32;
    assert_eq!(first.id, want);
    assert!((first.logprob as f64 - (exact[want as usize] as f64 - log_sum)).abs() < 1e-4, "{}", first.logprob);
    assert_eq!(first.top.len(), 3);
    assert_eq!(first.top[0].0, want, "greedy picks the most likely token");
    assert!(first.top[0].2 >= first.top[1].2 && first.top[1].2 >= first.top[2].2);
}
