//! Constraints through each API: OpenAI `response_format` (and vLLM's `guided_*`), Ollama
//! `format`, KoboldCpp `grammar`, streamed and not, against the tiny LLaVA fixture (a
//! SentencePiece vocabulary) sampled at temperature 1, every answer checked by an
//! independent JSON-schema validator or regex engine.

mod common;

use std::sync::OnceLock;

use common::*;
use serde_json::{json, Value};

fn server() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| start(options()))
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "label": {"enum": ["cat", "dog", "neither"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 20},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}
        },
        "required": ["label", "count"]
    })
}

fn messages() -> Value {
    let image = data_url(&fixtures().join("images/square-64x64.png"));
    json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": "Describe the image as JSON."}
    ]}])
}

/// Parses and validates an answer against `schema()` (closed, as strict mode asks).
fn check(text: &str) -> Value {
    let mut closed = schema();
    closed["additionalProperties"] = json!(false);
    let validator = jsonschema::validator_for(&closed).unwrap();
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{text:?}: {errors:?}");
    v
}

fn openai(extra: Value) -> Value {
    let mut body = json!({"messages": messages(), "max_tokens": 120, "temperature": 1.0});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

#[test]
fn openai_json_schema_answers_always_validate() {
    let format = json!({"type": "json_schema", "json_schema": {"name": "photo", "schema": schema(), "strict": true}});
    for seed in 0..6 {
        let (status, v) = post(server(), "/v1/chat/completions", &openai(json!({"response_format": format, "seed": seed})));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        check(v["choices"][0]["message"]["content"].as_str().unwrap());
    }
}

#[test]
fn openai_streams_a_constrained_answer() {
    let format = json!({"type": "json_schema", "json_schema": {"name": "photo", "schema": schema(), "strict": true}});
    let events = sse_events(send(server(), "/v1/chat/completions", &openai(json!({"response_format": format, "seed": 7, "stream": true})), None));
    let text: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    check(&text);
    let last = events.iter().rev().find(|e| !e["choices"][0]["finish_reason"].is_null()).expect("a finish");
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
}

#[test]
fn openai_json_object_and_vllm_guided_fields() {
    let (_, v) = post(server(), "/v1/chat/completions", &openai(json!({"response_format": {"type": "json_object"}, "seed": 1, "max_tokens": 200})));
    if v["choices"][0]["finish_reason"] == "stop" {
        let parsed: Value = serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).expect("JSON");
        assert!(parsed.is_object(), "{parsed}");
    }
    let (_, v) = post(server(), "/v1/chat/completions", &openai(json!({"guided_choice": ["yes", "no"], "seed": 2})));
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer == "yes" || answer == "no", "{answer:?}");
    let (_, v) = post(server(), "/v1/chat/completions", &openai(json!({"guided_regex": "[0-9]{3}-[a-z]{2}", "seed": 3})));
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(regex::Regex::new("^[0-9]{3}-[a-z]{2}$").unwrap().is_match(answer), "{answer:?}");
}

#[test]
fn bad_constraints_are_400_and_the_server_keeps_serving() {
    let bad = [
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}}),
        json!({"response_format": {"type": "xml"}}),
        json!({"guided_regex": "(unclosed"}),
        json!({"guided_choice": ["a"], "guided_regex": "b"}),
    ];
    for extra in bad {
        let (status, v) = post(server(), "/v1/chat/completions", &openai(extra.clone()));
        assert_eq!(status, 400, "{extra}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    let (status, v) = post(server(), "/api/chat", &json!({"messages": [{"role": "user", "content": "hi"}], "format": 42, "stream": false}));
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "format");
    let (status, v) = post(server(), "/api/v1/generate", &json!({"prompt": "hi", "grammar": "root ::= \"a\" | missing"}));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("missing"), "{v}");
    still_serving(server());
}

#[test]
fn a_schema_out_of_tokens_finishes_with_length() {
    let format = json!({"type": "json_schema", "json_schema": {"name": "photo", "schema": schema()}});
    let (_, v) = post(server(), "/v1/chat/completions", &openai(json!({"response_format": format, "max_tokens": 2})));
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
}

#[test]
fn ollama_format_json_and_schema() {
    let images = vec![base64_file(&fixtures().join("images/square-64x64.png"))];
    for seed in 0..3 {
        let body = json!({
            "messages": [{"role": "user", "content": "Describe the image as JSON.", "images": images}],
            "format": schema(), "stream": false, "options": {"seed": seed, "temperature": 1.0, "num_predict": 120}
        });
        let (status, v) = post(server(), "/api/chat", &body);
        assert_eq!(status, 200, "{v}");
        let text = v["message"]["content"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(["cat", "dog", "neither"].contains(&parsed["label"].as_str().unwrap()), "{parsed}");
    }
    let body = json!({"prompt": "Give JSON.", "images": images, "format": "json", "stream": true, "options": {"seed": 4, "num_predict": 200}});
    let lines = ndjson(send(server(), "/api/generate", &body, None));
    let text: String = lines.iter().filter_map(|l| l["response"].as_str()).collect();
    if lines.last().unwrap()["done_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(&text).expect("JSON").is_object(), "{text:?}");
    }
}

#[test]
fn kobold_gbnf_grammar() {
    let grammar = "root ::= answer \" \" digits\nanswer ::= \"yes\" | \"no\"\ndigits ::= [0-9]{1,3}\n";
    let pattern = regex::Regex::new("^(yes|no) [0-9]{1,3}$").unwrap();
    for seed in 0..4 {
        let body = json!({"prompt": "Is there a cat?", "grammar": grammar, "sampler_seed": seed, "temperature": 1.0, "max_length": 40});
        let (status, v) = post(server(), "/api/v1/generate", &body);
        assert_eq!(status, 200, "{v}");
        let text = v["results"][0]["text"].as_str().unwrap();
        assert!(pattern.is_match(text), "{text:?}");
    }
}
