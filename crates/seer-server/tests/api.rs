//! Every endpoint against transformers' greedy answers for the tiny LLaVA fixture
//! (tests/fixtures/llava/cases/tiny-llava-hub), streamed and not.

mod common;

use std::sync::OnceLock;

use common::*;
use seer_engine::{GenerateRequest, Message, Part, Role, Vlm};
use seer_vision::{ImageInput, ImageLimits};
use serde_json::{json, Value};

fn server() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| start(options()))
}

fn check_usage(usage: &Value, case: &Value) {
    assert_eq!(usage["prompt_tokens"], prompt_tokens(case));
    assert_eq!(usage["completion_tokens"], 16);
    assert_eq!(usage["total_tokens"], prompt_tokens(case) + 16);
    assert_eq!(usage["prompt_tokens_details"]["image_tokens"], 16 * image_count(case));
}

#[test]
fn chat_completions_match_the_references() {
    for name in CASES {
        let case = case(name);
        let (status, v) = post(server(), "/v1/chat/completions", &openai_request(&case));
        assert_eq!(status, 200, "{name}: {v}");
        assert_eq!(v["object"], "chat.completion");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(v["model"], "tiny-llava-hub");
        let choice = &v["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], greedy_text(&case), "{name}");
        assert_eq!(choice["finish_reason"], "length");
        check_usage(&v["usage"], &case);
    }
}

#[test]
fn streamed_chat_completions_match_the_references() {
    for name in CASES {
        let case = case(name);
        let mut body = openai_request(&case);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let events = sse_events(send(server(), "/v1/chat/completions", &body, None));
        assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk"), "{name}");
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant", "{name}: the first chunk gives the role");
        let text: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, greedy_text(&case), "{name}");
        let (usage_chunk, rest) = events.split_last().unwrap();
        assert_eq!(usage_chunk["choices"], json!([]), "{name}: the usage chunk comes last, with no choices");
        check_usage(&usage_chunk["usage"], &case);
        let last_choice = rest.last().unwrap();
        assert_eq!(last_choice["choices"][0]["finish_reason"], "length");
        assert!(rest[..rest.len() - 1].iter().all(|e| e["choices"][0]["finish_reason"].is_null()));
        assert!(rest.iter().all(|e| e["usage"].is_null()));
    }
}

#[test]
fn a_stream_without_usage_has_no_usage_field() {
    let mut body = openai_request(&case("a_square"));
    body["stream"] = json!(true);
    let events = sse_events(send(server(), "/v1/chat/completions", &body, None));
    assert!(events.iter().all(|e| e.get("usage").is_none()));
    assert_eq!(events.last().unwrap()["choices"][0]["finish_reason"], "length");
}

#[test]
fn several_choices_stream_with_their_index() {
    let case = case("b_wide");
    let mut body = openai_request(&case);
    body["n"] = json!(2);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = sse_events(send(server(), "/v1/chat/completions", &body, None));
    for index in 0..2 {
        let mine: Vec<&Value> = events.iter().filter(|e| e["choices"][0]["index"] == index).collect();
        assert_eq!(mine[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = mine.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, greedy_text(&case), "choice {index}");
        assert_eq!(mine.last().unwrap()["choices"][0]["finish_reason"], "length");
    }
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"], prompt_tokens(&case));
    assert_eq!(usage["completion_tokens"], 32);
}

#[test]
fn http_urls_raw_base64_and_string_content_give_the_same_answers() {
    let mut opts = options();
    opts.limits.image.allow_private_urls = true;
    let base = start(opts);
    let square = serve_file(std::fs::read(fixtures().join("images/square-64x64.png")).unwrap(), "image/png");
    let a = case("a_square");
    let mut body = openai_request(&a);
    body["messages"] = openai_messages(&a, &|_| square.clone());
    let (status, v) = post(&base, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], greedy_text(&a));

    let e = case("e_system");
    let mut body = openai_request(&e);
    body["messages"] = openai_messages(&e, &|p| base64_file(p));
    body["messages"][0]["content"] = e["messages"][0]["content"][0]["text"].clone();
    let (status, v) = post(&base, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], greedy_text(&e));
}

#[test]
fn sampling_parameters_logprobs_and_choices() {
    let mut body = openai_request(&case("a_square"));
    body["max_tokens"] = json!(null);
    for (key, value) in [
        ("max_completion_tokens", json!(6)),
        ("temperature", json!(0.8)),
        ("top_p", json!(0.9)),
        ("top_k", json!(40)),
        ("min_p", json!(0.01)),
        ("seed", json!(7)),
        ("frequency_penalty", json!(0.1)),
        ("presence_penalty", json!(0.1)),
        ("repetition_penalty", json!(1.1)),
        ("n", json!(2)),
        ("logprobs", json!(true)),
        ("top_logprobs", json!(3)),
        ("user", json!("an unknown field is ignored")),
    ] {
        body[key] = value;
    }
    let (status, first) = post(server(), "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{first}");
    let choices = first["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let tokens = c["logprobs"]["content"].as_array().unwrap();
        assert_eq!(tokens.len(), 6);
        assert!(tokens.iter().all(|t| t["logprob"].as_f64().unwrap() <= 0.0 && t["top_logprobs"].as_array().unwrap().len() == 3));
    }
    assert_eq!(first["usage"]["completion_tokens"], 12);
    let (_, again) = post(server(), "/v1/chat/completions", &body);
    assert_eq!(again["choices"], first["choices"], "the same seed gives the same choices");
}

#[test]
fn stop_strings_end_the_answer_before_them() {
    let case = case("a_square");
    let full = greedy_text(&case);
    let cut = full.find(" Task").unwrap();
    for stop in [json!(" Task"), json!(["nothing like this", " Task"])] {
        let mut body = openai_request(&case);
        body["stop"] = stop;
        let (status, v) = post(server(), "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], full[..cut]);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
}

#[test]
fn models_lists_the_model_with_its_context_and_images() {
    let (status, text) = get(server(), "/v1/models", None);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    let model = &v["data"][0];
    assert_eq!(model["id"], "tiny-llava-hub");
    assert_eq!(model["object"], "model");
    assert_eq!(model["context_length"], 512);
    assert_eq!(model["input_modalities"], json!(["text", "image"]));
}

/// What the engine itself answers for a raw prompt (KoboldCpp's layout).
fn engine_raw_answer(prompt: &str, images: &[&str], max_tokens: usize) -> String {
    static VLM: OnceLock<Vlm> = OnceLock::new();
    let vlm = VLM.get_or_init(|| Vlm::load(&fixtures().join("tiny-llava-hub"), None).unwrap());
    let parts = images.iter().map(|i| Part::Image(ImageInput::Path(fixtures().join("images").join(i)))).collect();
    let req = GenerateRequest {
        messages: vec![Message { role: Role::User, parts }],
        raw_prompt: Some(prompt.into()),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    vlm.generate(&req, &ImageLimits::default(), &mut |_| true).unwrap().text
}

#[test]
fn kobold_generate_uses_the_prompt_as_written_with_images_first() {
    let images = ["square-64x64.png", "wide-120x72.jpg"];
    let body = json!({
        "prompt": "Describe these pictures.",
        "max_length": 12,
        "temperature": 0,
        "bypass_eos": true,
        "images": images.iter().map(|i| base64_file(&fixtures().join("images").join(i))).collect::<Vec<_>>(),
    });
    let (status, v) = post(server(), "/api/v1/generate", &body);
    assert_eq!(status, 200, "{v}");
    let result = &v["results"][0];
    assert_eq!(result["text"], engine_raw_answer("Describe these pictures.", &images, 12));
    assert_eq!(result["completion_tokens"], 12);

    // Without images, a raw prompt written like the template is the chat answer.
    let case = case("d_multi_turn");
    let prompt = case["prompt"].as_str().unwrap().replace("<image>\n", "");
    let raw = json!({"prompt": prompt, "max_length": 16, "temp": 0, "bypass_eos": true});
    let (_, kobold) = post(server(), "/api/v1/generate", &raw);
    let chat = json!({
        "messages": [
            {"role": "user", "content": "What shape is at the top?"},
            {"role": "assistant", "content": "A yellow circle."},
            {"role": "user", "content": "And what is below it?"},
        ],
        "max_tokens": 16, "temperature": 0, "ignore_eos": true,
    });
    let (_, openai) = post(server(), "/v1/chat/completions", &chat);
    assert_eq!(kobold["results"][0]["text"], openai["choices"][0]["message"]["content"]);
    assert_eq!(kobold["results"][0]["prompt_tokens"], openai["usage"]["prompt_tokens"]);
}

#[test]
fn kobold_model_and_version() {
    let (status, text) = get(server(), "/api/v1/model", None);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["result"], "tiny-llava-hub");
    let (status, text) = get(server(), "/api/extra/version", None);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["result"], "KoboldCpp");
    assert!(v["version"].is_string());
}

fn check_ollama_final(last: &Value, case: &Value) {
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "length");
    assert_eq!(last["prompt_eval_count"], prompt_tokens(case));
    assert_eq!(last["eval_count"], 16);
    assert!(last["total_duration"].as_u64().unwrap() > 0);
    assert!(last["created_at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn ollama_chat_matches_the_references() {
    for name in CASES {
        let case = case(name);
        let (status, v) = post(server(), "/api/chat", &ollama_request(&case, false));
        assert_eq!(status, 200, "{name}: {v}");
        assert_eq!(v["model"], "tiny-llava-hub");
        assert_eq!(v["message"]["role"], "assistant");
        assert_eq!(v["message"]["content"], greedy_text(&case), "{name}");
        check_ollama_final(&v, &case);

        // Streaming is the default.
        let mut body = ollama_request(&case, true);
        body.as_object_mut().unwrap().remove("stream");
        let lines = ndjson(send(server(), "/api/chat", &body, None));
        let (last, pieces) = lines.split_last().unwrap();
        assert!(pieces.iter().all(|l| l["done"] == false));
        let text: String = lines.iter().map(|l| l["message"]["content"].as_str().unwrap()).collect();
        assert_eq!(text, greedy_text(&case), "{name}");
        check_ollama_final(last, &case);
    }
}

#[test]
fn ollama_generate_templated_and_raw() {
    let case = case("a_square");
    let square = base64_file(&fixtures().join("images/square-64x64.png"));
    let body = json!({
        "model": "tiny-llava-hub", "prompt": "What is in this image?", "images": [square],
        "stream": false, "options": {"temperature": 0, "num_predict": 16, "repeat_penalty": 1.0}, "ignore_eos": true,
    });
    let (status, v) = post(server(), "/api/generate", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["response"], greedy_text(&case));
    check_ollama_final(&v, &case);

    let mut raw = body.clone();
    raw["raw"] = json!(true);
    raw["prompt"] = json!("Describe.");
    raw["stream"] = json!(true);
    let lines = ndjson(send(server(), "/api/generate", &raw, None));
    let text: String = lines.iter().map(|l| l["response"].as_str().unwrap()).collect();
    assert_eq!(text, engine_raw_answer("Describe.", &["square-64x64.png"], 16));

    // An empty request only asks for the model to be loaded.
    let (status, v) = post(server(), "/api/generate", &json!({"model": "tiny-llava-hub"}));
    assert_eq!(status, 200);
    assert_eq!(v["done_reason"], "load");
}

#[test]
fn ollama_tags_and_version() {
    let (status, text) = get(server(), "/api/tags", None);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["models"][0]["name"], "tiny-llava-hub");
    assert!(v["models"][0]["size"].as_u64().unwrap() > 1_000_000);
    let (status, text) = get(server(), "/api/version", None);
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["version"].is_string());
}

#[test]
fn health_and_metrics() {
    assert_eq!(get(server(), "/health", None).0, 200);
    still_serving(server());
    assert!(metric(server(), "seer_model_loaded", None) == 1.0);
    assert!(metric(server(), "seer_requests_total", None) >= 1.0);
    assert!(metric(server(), "seer_completion_tokens_total", None) >= 4.0);
    assert!(metric(server(), "seer_time_to_first_token_seconds_count", None) >= 1.0);
    assert_eq!(metric(server(), "seer_queue_depth", None), 0.0);
}
