//! seer against transformers on the tiny LLaVA fixtures (tests/fixtures/llava, made by
//! scripts/make_llava_fixtures.py): prompt text, input ids, pixels, first-step logits and
//! 16 greedy tokens, for both checkpoint layouts.
//!
//! Logits: seer's f32 must be within 1e-4 of the float64 reference, the exact answer. The
//! fixture's logits are near 26, where f32 rounding alone moves transformers' own f32 run
//! up to 8e-5 from float64, so seer and transformers' f32 may differ by the sum of two such
//! errors (checked at 2e-4).

mod support;

use std::path::PathBuf;

use seer_engine::chat::Message;
use seer_engine::generate::Timings;
use seer_engine::{GenerateRequest, SamplingParams, Vlm};
use seer_vision::ImageLimits;
use serde_json::Value;
use support::{max_abs_diff, read_f32};

fn fixtures() -> PathBuf {
    support::fixtures("llava")
}

fn messages(case: &Value) -> Vec<Message> {
    support::messages(case, &fixtures())
}

fn cases(folder: &str) -> Vec<(String, Value)> {
    let dir = fixtures().join("cases").join(folder);
    let cases = support::cases(&dir);
    assert!(cases.len() >= 5, "expected the five fixture cases in {}", dir.display());
    cases
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
