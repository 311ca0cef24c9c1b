//! Constrained decoding on the tiny random-weight fixture models: sampled at temperature 1
//! over many seeds, every finished answer must be valid under its constraint, checked by
//! an independent JSON-schema validator and regex engine; and a constraint that the
//! unconstrained greedy answer already meets must not change a single token.

mod support;

use std::path::PathBuf;

use seer_engine::{Constraint, FinishReason, GenerateRequest, Message, Part, Role, SamplingParams, Vlm};
use seer_vision::{ImageInput, ImageLimits};
use serde_json::{json, Value};

const SEEDS: u64 = 12;

/// A byte-level BPE vocabulary (SmolVLM) and a SentencePiece one (LLaVA, Llama 2's).
fn models() -> Vec<(&'static str, Vlm)> {
    vec![
        ("smolvlm", Vlm::load(&support::fixtures("idefics3").join("tiny-smolvlm"), None).expect("SmolVLM fixture loads")),
        ("llava", Vlm::load(&support::fixtures("llava").join("tiny-llava-new"), None).expect("LLaVA fixture loads")),
    ]
}

fn image() -> PathBuf {
    support::fixtures("llava").join("images/square-64x64.png")
}

fn request(constraint: Option<Constraint>, seed: u64, temperature: f32, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        messages: vec![Message {
            role: Role::User,
            parts: vec![Part::Image(ImageInput::Path(image())), Part::Text("Describe this image as JSON.".into())],
        }],
        max_tokens,
        sampling: SamplingParams { temperature, seed, ..Default::default() },
        constraint,
        ..Default::default()
    }
}

fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "nested object",
            json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "address": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                        "additionalProperties": false
                    }
                },
                "required": ["name", "address"],
                "additionalProperties": false
            }),
        ),
        ("bounded array", json!({"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 300}, "minItems": 1, "maxItems": 4})),
        (
            "enum and number",
            json!({
                "type": "object",
                "properties": {"animal": {"enum": ["cat", "dog", "neither"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
                "required": ["animal", "confidence"],
                "additionalProperties": false
            }),
        ),
        ("pattern", json!({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"})),
        (
            "anyOf with $ref",
            json!({
                "$defs": {"point": {
                    "type": "object",
                    "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}, "y": {"type": "integer", "minimum": 0, "maximum": 99}},
                    "required": ["x", "y"],
                    "additionalProperties": false
                }},
                "anyOf": [{"$ref": "#/$defs/point"}, {"type": "null"}, {"type": "boolean"}]
            }),
        ),
        (
            "optional properties",
            json!({
                "type": "object",
                "properties": {
                    "title": {"type": "string", "minLength": 3, "maxLength": 8},
                    "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                    "draft": {"type": "boolean"},
                    "labels": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}
                },
                "required": ["title"],
                "additionalProperties": false
            }),
        ),
    ]
}

/// Samples `SEEDS` answers; returns the finished ones and how many ran out of tokens.
fn sample(vlm: &Vlm, constraint: &Constraint) -> (Vec<String>, usize) {
    let mut done = Vec::new();
    let mut cut = 0;
    for seed in 0..SEEDS {
        let g = vlm.generate(&request(Some(constraint.clone()), seed, 1.0, 160), &ImageLimits::default(), &mut |_| true).expect("generation runs");
        match g.finish_reason {
            FinishReason::Stop => done.push(g.text),
            _ => cut += 1,
        }
    }
    (done, cut)
}

#[test]
fn sampled_json_is_valid_under_every_schema() {
    for (model, vlm) in models() {
        for (name, schema) in schemas() {
            let validator = jsonschema::validator_for(&schema).expect("the test's schema is valid");
            let (done, cut) = sample(&vlm, &Constraint::JsonSchema(schema.clone()));
            assert!(done.len() * 2 >= SEEDS as usize, "{model} / {name}: only {} of {SEEDS} answers finished", done.len());
            for text in &done {
                let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{model} / {name}: not JSON ({e}): {text:?}"));
                let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "{model} / {name}: {text:?} breaks the schema: {errors:?}");
            }
            eprintln!("{model} / {name}: {} valid, {cut} cut at max_tokens; e.g. {:?}", done.len(), done[0]);
        }
    }
}

#[test]
fn sampled_text_matches_regex_and_choice() {
    let pattern = "[a-z]{1,8}( [a-z]{1,8}){0,3}\\.";
    let full = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
    let choices: Vec<String> = ["red", "green", "blue", "light blue", "Ünïcode ✓"].map(String::from).to_vec();
    for (model, vlm) in models() {
        let (done, _) = sample(&vlm, &Constraint::Regex(pattern.into()));
        assert!(done.len() * 2 >= SEEDS as usize, "{model}: only {} regex answers finished", done.len());
        for text in &done {
            assert!(full.is_match(text), "{model}: {text:?} does not match {pattern}");
        }
        let (done, cut) = sample(&vlm, &Constraint::Choice(choices.clone()));
        assert_eq!(cut, 0, "{model}: a choice always finishes");
        for text in &done {
            assert!(choices.contains(text), "{model}: {text:?} is not one of the choices");
        }
    }
}

#[test]
fn a_constraint_the_greedy_answer_meets_changes_nothing() {
    for (model, vlm) in models() {
        let free = vlm.generate(&request(None, 0, 0.0, 24), &ImageLimits::default(), &mut |_| true).unwrap();
        // Any text at all: every ordinary token stays allowed at every step.
        let any = vlm.generate(&request(Some(Constraint::Regex("(?s:.*)".into())), 0, 0.0, 24), &ImageLimits::default(), &mut |_| true).unwrap();
        assert_eq!(any.token_ids, free.token_ids, "{model}: an all-accepting constraint changed the greedy tokens");
        if model != "smolvlm" {
            continue; // the byte-level vocabulary decodes to exactly its tokens' bytes
        }
        // A choice between the greedy text and another: the same tokens, then done.
        let choice = Constraint::Choice(vec!["not this one".into(), free.text.clone()]);
        let chosen = vlm.generate(&request(Some(choice), 0, 0.0, 24), &ImageLimits::default(), &mut |_| true).unwrap();
        assert_eq!(chosen.token_ids, free.token_ids, "{model}: {:?} against {:?}", chosen.text, free.text);
        assert_eq!(chosen.finish_reason, FinishReason::Stop, "{model}: the choice is complete");
    }
}

#[test]
fn invalid_constraints_are_refused_before_decoding() {
    let vlm = Vlm::load(&support::fixtures("idefics3").join("tiny-smolvlm"), None).unwrap();
    let bad = [
        Constraint::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "strin"}}})),
        Constraint::JsonSchema(json!({"$ref": "#/$defs/missing"})),
        Constraint::Regex("(unclosed".into()),
        Constraint::Choice(Vec::new()),
        Constraint::Lark("start: undefined_rule".into()),
    ];
    for c in bad {
        let req = request(Some(c.clone()), 0, 0.0, 8);
        let err = vlm.check_prompt(&req).expect_err(&format!("{c:?} is refused"));
        assert!(err.is_client_error(), "{c:?}: {err}");
        let err = vlm.generate(&req, &ImageLimits::default(), &mut |_| panic!("no text before the refusal")).expect_err("refused");
        assert!(matches!(err, seer_engine::EngineError::Constraint(_)), "{c:?}: {err}");
        eprintln!("{c:?}: {err}");
    }
}

#[test]
fn a_schema_cut_short_by_max_tokens_says_length() {
    let vlm = Vlm::load(&support::fixtures("idefics3").join("tiny-smolvlm"), None).unwrap();
    let schema = json!({"type": "object", "properties": {"text": {"type": "string", "minLength": 50}}, "required": ["text"]});
    let g = vlm.generate(&request(Some(Constraint::JsonSchema(schema)), 0, 1.0, 5), &ImageLimits::default(), &mut |_| true).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert!(serde_json::from_str::<Value>(&g.text).is_err(), "five tokens cannot hold 50 characters: {:?}", g.text);
}

#[test]
fn a_gguf_vocabulary_works_the_same() {
    // The tokenizer seer builds from GGUF metadata (LLaVA's SentencePiece vocabulary).
    let gguf = support::fixtures("llava").join("gguf");
    let vlm = Vlm::load(&gguf.join("tiny-llava-Q8_0.gguf"), Some(&gguf.join("mmproj-tiny-llava-F16.gguf"))).expect("GGUF fixture loads");
    let free = vlm.generate(&request(None, 0, 0.0, 24), &ImageLimits::default(), &mut |_| true).unwrap();
    let any = vlm.generate(&request(Some(Constraint::Regex("(?s:.*)".into())), 0, 0.0, 24), &ImageLimits::default(), &mut |_| true).unwrap();
    assert_eq!(any.token_ids, free.token_ids);
    let (name, schema) = schemas().swap_remove(0);
    let validator = jsonschema::validator_for(&schema).unwrap();
    let (done, _) = sample(&vlm, &Constraint::JsonSchema(schema));
    assert!(done.len() * 2 >= SEEDS as usize, "{name}: only {} finished", done.len());
    for text in &done {
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {text:?}"));
        assert!(validator.is_valid(&value), "{name}: {text:?}");
    }
}
