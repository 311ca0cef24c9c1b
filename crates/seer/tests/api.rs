//! The Rust API end to end on the tiny random-weight SmolVLM fixture: a random model
//! writes nonsense, but under `extract` and `classify` its nonsense always parses.

use std::path::PathBuf;

use base64::Engine as _;
use schemars::JsonSchema;
use seer::{Error, FinishReason, Image, Model, Options, SamplingParams};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model() -> Model {
    let dir = fixtures().join("idefics3/tiny-smolvlm");
    Model::builder(dir.to_str().unwrap()).max_tokens(200).build().expect("the fixture loads")
}

fn photo() -> PathBuf {
    fixtures().join("llava/images/square-64x64.png")
}

fn sampled(seed: u64) -> Options {
    Options { max_tokens: 200, sampling: SamplingParams { temperature: 1.0, seed, ..Default::default() }, ..Default::default() }
}

#[derive(Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Category {
    Food,
    Travel,
    Other,
}

// Deserializing every field is the check; not all are read after that.
#[allow(dead_code)]
#[derive(Debug, Deserialize, JsonSchema)]
struct Item {
    #[schemars(length(max = 12))]
    name: String,
    quantity: u8,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize, JsonSchema)]
struct Receipt {
    #[schemars(length(max = 16))]
    shop: String,
    category: Category,
    #[schemars(length(max = 3))]
    items: Vec<Item>,
    paid_by_card: bool,
    tip: Option<u8>,
}

#[test]
fn extract_returns_a_typed_value_for_every_seed() {
    let mut m = model();
    let mut finished = 0;
    for seed in 0..8 {
        m.set_options(sampled(seed));
        match m.extract::<Receipt>("Read this receipt.", [Image::from(photo())]) {
            Ok(r) => {
                finished += 1;
                assert!(r.shop.chars().count() <= 16 && r.items.len() <= 3, "{r:?}");
                assert!(r.items.iter().all(|i| i.name.chars().count() <= 12), "{r:?}");
            }
            Err(Error::Incomplete { text, .. }) => eprintln!("seed {seed} cut: {text:?}"),
            Err(e) => panic!("seed {seed}: {e}"),
        }
    }
    assert!(finished >= 4, "only {finished} of 8 receipts finished within 200 tokens");
}

#[test]
fn extract_a_list_with_images_given_every_way() {
    let m = model();
    let bytes = std::fs::read(photo()).unwrap();
    let data_url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&bytes));
    let decoded = image::open(photo()).unwrap();
    let ways = [Image::from(photo()), Image::from(bytes.clone()), Image::from(data_url.as_str()), Image::from(decoded)];
    let mut answers = Vec::new();
    for image in ways {
        #[derive(Deserialize, JsonSchema)]
        struct Elements(#[schemars(length(max = 5), inner(length(max = 10)))] Vec<String>);
        let (Elements(list), response) = m
            .extract_with_response::<Elements>("Up to five of the most important elements in this photo.", [image])
            .expect("a bounded list always finishes");
        assert!(list.len() <= 5 && list.iter().all(|s| s.chars().count() <= 10), "{list:?}");
        assert!(response.usage.image_tokens > 0, "the image was seen");
        assert_eq!(response.finish_reason, FinishReason::Stop);
        assert!(response.timings.prompt_tokens_per_s > 0.0 && response.timings.time_to_first_token_ms > 0.0);
        answers.push(list);
    }
    // The same pixels every way: the same greedy answer.
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
}

#[test]
fn classify_always_answers_with_a_label() {
    let mut m = model();
    let labels = ["cat", "dog", "neither"];
    for seed in 0..6 {
        m.set_options(sampled(seed));
        let label = m.classify(&labels, "Which animal is this?", [Image::from(photo())]).unwrap();
        assert!(labels.contains(&label.as_str()), "{label:?}");
    }
}

#[test]
fn chat_reports_usage_and_timings() {
    let m = model();
    let messages = [seer::user("What is in this image?", [Image::from(photo())])];
    let r = m.chat(&messages).unwrap();
    assert!(r.usage.image_tokens > 0 && r.usage.completion_tokens > 0);
    assert!(r.timings.completion_tokens_per_s > 0.0 || r.usage.completion_tokens == 1);
    let mut streamed = String::new();
    let again = m.chat_stream(&messages, &Options::default(), &mut |piece| {
        streamed.push_str(piece);
        true
    });
    assert_eq!(streamed, again.unwrap().text);
}

#[test]
fn extract_out_of_tokens_is_an_error_not_bad_json() {
    let m = Model::builder(fixtures().join("idefics3/tiny-smolvlm").to_str().unwrap()).max_tokens(3).build().unwrap();
    #[allow(dead_code)]
    #[derive(Debug, Deserialize, JsonSchema)]
    struct Long {
        #[schemars(length(min = 40))]
        text: String,
    }
    match m.extract::<Long>("Describe it.", [Image::from(photo())]) {
        Err(Error::Incomplete { max_tokens: 3, text }) => assert!(serde_json::from_str::<serde_json::Value>(&text).is_err()),
        other => panic!("expected Incomplete, got {other:?}"),
    }
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let err = Model::builder("/nonexistent/model-folder").build().err().expect("fails");
    assert!(err.to_string().contains("/nonexistent/model-folder"), "{err}");
}
