//! Hostile and unlucky clients: bad images, private URLs, paths out of the allowed
//! folder, huge bodies, wrong keys and types, long prompts, a full queue, a client that
//! leaves mid-stream, many clients at once. Each refusal is a 4xx in OpenAI's error
//! shape, and the server keeps answering afterwards.
#![cfg(unix)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn server() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| start(options()))
}

/// A request with one image part pointing at `url`.
fn image_request(url: &str) -> Value {
    json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is in this image?"},
        ]}],
        "max_tokens": 16, "temperature": 0, "ignore_eos": true,
    })
}

/// Checks an OpenAI-style error and that a good request still succeeds.
fn refused(base: &str, status: u16, v: &Value, want_status: u16, needle: &str, what: &str) {
    assert_eq!(status, want_status, "{what}: {v}");
    let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{what}: no error.message in {v}"));
    assert!(message.to_lowercase().contains(&needle.to_lowercase()), "{what}: `{message}` does not mention `{needle}`");
    assert!(v["error"]["type"].is_string(), "{what}: {v}");
    assert!(v["error"].get("param").is_some() && v["error"].get("code").is_some(), "{what}: {v}");
    still_serving(base);
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seer-server-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bad_images_are_refused() {
    let base = server();
    let jpeg = std::fs::read(fixtures().join("images/wide-120x72.jpg")).unwrap();
    let b64 = |bytes: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let cases = [
        ("bad base64 in a data URL", "data:image/png;base64,@@@@ not base64 @@@@".to_string(), "base64"),
        ("base64 that is not an image", b64(&[7u8; 300]), "not an image"),
        ("a PNG claiming 100000x100000", format!("data:image/png;base64,{}", b64(&png_claiming(100_000, 100_000))), "100000x100000"),
        ("a truncated JPEG", format!("data:image/jpeg;base64,{}", b64(&jpeg[..jpeg.len() / 2])), "truncated"),
        ("a URL on loopback", "http://127.0.0.1:9/cat.png".into(), "non-public"),
        ("a URL on the metadata address", "http://169.254.169.254/latest/meta-data".into(), "non-public"),
        ("a URL on IPv6 loopback", "http://[::1]:9/cat.png".into(), "non-public"),
        ("a URL on a private network", "https://10.1.2.3/cat.png".into(), "non-public"),
        ("an ftp URL", "ftp://example.org/cat.png".into(), "scheme"),
        ("a file URL", "file:///etc/passwd".into(), "--allow-local-images"),
        ("a local path", "/etc/passwd".into(), "--allow-local-images"),
    ];
    for (what, url, needle) in cases {
        let (status, v) = post(base, "/v1/chat/completions", &image_request(&url));
        refused(base, status, &v, 400, needle, what);
    }
    // The same through KoboldCpp and Ollama, which take base64 only.
    let bomb = b64(&png_claiming(100_000, 100_000));
    let (status, v) = post(base, "/api/v1/generate", &json!({"prompt": "x", "images": [bomb]}));
    refused(base, status, &v, 400, "100000x100000", "kobold bomb");
    let (status, v) = post(base, "/api/chat", &json!({"messages": [{"role": "user", "content": "x", "images": ["!!!!"]}], "stream": true}));
    refused(base, status, &v, 400, "image 1", "ollama bad base64");
}

#[test]
fn local_images_stay_inside_their_folder() {
    let dir = temp_dir("local");
    std::fs::copy(fixtures().join("images/square-64x64.png"), dir.join("square.png")).unwrap();
    let outside = fixtures().join("images/tall-40x90.png").canonicalize().unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("escape.png")).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::os::unix::fs::symlink("../square.png", dir.join("sub/inner.png")).unwrap();
    let mut opts = options();
    opts.limits.local_images = Some(dir.clone());
    let base = start(opts);
    let want = greedy_text(&case("a_square"));
    let real = dir.canonicalize().unwrap();
    for ok in ["square.png".to_string(), "sub/inner.png".into(), real.join("square.png").display().to_string(), format!("file://{}", real.join("square.png").display())] {
        let (status, v) = post(&base, "/v1/chat/completions", &image_request(&ok));
        assert_eq!(status, 200, "{ok}: {v}");
        assert_eq!(v["choices"][0]["message"]["content"], want, "{ok}");
    }
    let refusals = [
        ("../images/tall-40x90.png".to_string(), "`..`"),
        ("sub/../../square.png".into(), "`..`"),
        ("escape.png".into(), "outside"),
        (outside.display().to_string(), "outside"),
        ("/etc/passwd".into(), "outside"),
        ("missing.png".into(), "no such file"),
    ];
    for (path, needle) in refusals {
        let (status, v) = post(&base, "/v1/chat/completions", &image_request(&path));
        refused(&base, status, &v, 400, needle, &path);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends a body of `size` bytes over a raw connection and returns the response text:
/// the server answers before reading it all, so the response is read while sending.
fn post_raw(base: &str, path: &str, size: usize) -> String {
    let addr = base.trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&addr).unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let chunk = vec![b' '; 1 << 20];
        let mut sent = 0;
        while sent < size && writer.write_all(&chunk[..chunk.len().min(size - sent)]).is_ok() {
            sent += chunk.len();
        }
    });
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&response).contains("}}") {
            break;
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn a_body_over_the_limit_is_413() {
    let base = server();
    let response = post_raw(base, "/v1/chat/completions", 50_000_000);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("request_too_large"), "{response}");
    still_serving(base);

    let mut opts = options();
    opts.limits.max_body_bytes = 1000;
    let small = start(opts);
    let body = json!({"messages": [{"role": "user", "content": "x".repeat(2000)}]});
    let (status, v) = post(&small, "/v1/chat/completions", &body);
    refused(&small, status, &v, 413, "1000 bytes", "over --max-body-bytes");
}

#[test]
fn an_api_key_guards_every_endpoint_but_health() {
    let mut opts = options();
    opts.api_key = Some("s3cret-key".into());
    let base = start(opts);
    assert_eq!(get(&base, "/health", None).0, 200);
    for path in ["/v1/models", "/metrics", "/api/tags", "/api/version", "/api/v1/model", "/api/extra/version"] {
        assert_eq!(get(&base, path, None).0, 401, "{path} without a key");
        assert_eq!(get(&base, path, Some("s3cret-kez")).0, 401, "{path} with a wrong key");
        assert_eq!(get(&base, path, Some("s3cret-key-and-more")).0, 401, "{path} with a longer key");
        assert_eq!(get(&base, path, Some("s3cret-key")).0, 200, "{path} with the key");
    }
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0});
    for key in [None, Some("wrong")] {
        let (status, v) = read_json(send(&base, "/v1/chat/completions", &chat, key));
        assert_eq!(status, 401);
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let kobold = json!({"prompt": "hi", "max_length": 2});
    assert_eq!(read_json(send(&base, "/api/v1/generate", &kobold, None)).0, 401);
    assert_eq!(read_json(send(&base, "/api/v1/generate", &kobold, Some("s3cret-key"))).0, 200);
    let (status, v) = read_json(send(&base, "/v1/chat/completions", &chat, Some("s3cret-key")));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn wrong_types_and_values_are_400_naming_the_field() {
    let base = server();
    let good = || json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0});
    let openai: Vec<(&str, Value, &str)> = vec![
        ("messages", json!("hi"), "messages"),
        ("messages", json!([]), "messages"),
        ("messages", json!([{"content": "no role"}]), "messages[0]"),
        ("messages", json!([{"role": "tool", "content": "x"}]), "messages[0].role"),
        ("messages", json!([{"role": 5, "content": "x"}]), "messages[0].role"),
        ("messages", json!([{"role": "user", "content": 5}]), "messages[0].content"),
        ("messages", json!([{"role": "user", "content": [{"type": "audio"}]}]), "messages[0].content[0].type"),
        ("messages", json!([{"role": "user", "content": [{"type": "text", "text": 5}]}]), "messages[0].content[0]"),
        ("messages", json!([{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]), "messages[0].content[0]"),
        ("max_tokens", json!("16"), "max_tokens"),
        ("max_tokens", json!(-1), "max_tokens"),
        ("max_tokens", json!(0), "max_tokens"),
        ("max_completion_tokens", json!(1.5), "max_completion_tokens"),
        ("temperature", json!("hot"), "temperature"),
        ("temperature", json!(5), "temperature"),
        ("top_p", json!([1]), "top_p"),
        ("top_p", json!(1.5), "top_p"),
        ("top_k", json!("all"), "top_k"),
        ("min_p", json!({}), "min_p"),
        ("seed", json!("lucky"), "seed"),
        ("stop", json!(5), "stop"),
        ("stop", json!([5]), "stop[0]"),
        ("frequency_penalty", json!("x"), "frequency_penalty"),
        ("presence_penalty", json!(3), "presence_penalty"),
        ("repetition_penalty", json!(true), "repetition_penalty"),
        ("n", json!("two"), "n"),
        ("n", json!(0), "n"),
        ("n", json!(100), "n"),
        ("logprobs", json!("yes"), "logprobs"),
        ("top_logprobs", json!(-1), "top_logprobs"),
        ("top_logprobs", json!(30), "top_logprobs"),
        ("stream", json!("yes"), "stream"),
        ("stream_options", json!("usage"), "stream_options"),
        ("stream_options", json!({"include_usage": "yes"}), "stream_options.include_usage"),
        ("ignore_eos", json!(1), "ignore_eos"),
    ];
    for (field, value, param) in openai {
        let mut body = good();
        body[field] = value.clone();
        let (status, v) = post(base, "/v1/chat/completions", &body);
        assert_eq!(status, 400, "{field} = {value}: {v}");
        let got = v["error"]["param"].as_str().unwrap_or_default();
        assert!(got.starts_with(param), "{field} = {value}: param {got:?}, want {param}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        still_serving(base);
    }
    let kobold: Vec<(&str, Value)> =
        vec![("prompt", json!(5)), ("max_length", json!("x")), ("temperature", json!("x")), ("images", json!("x")), ("images", json!([5])), ("stop_sequence", json!("x")), ("rep_pen", json!(-1))];
    for (field, value) in kobold {
        let mut body = json!({"prompt": "hi", "max_length": 2});
        body[field] = value.clone();
        let (status, v) = post(base, "/api/v1/generate", &body);
        assert_eq!(status, 400, "kobold {field} = {value}: {v}");
        assert!(v["error"]["param"].as_str().unwrap_or_default().starts_with(field), "kobold {field}: {v}");
        still_serving(base);
    }
    let ollama: Vec<(&str, Value, &str)> = vec![
        ("messages", json!("x"), "messages"),
        ("messages", json!([{"role": "user", "content": "x", "images": "x"}]), "messages[0].images"),
        ("options", json!("x"), "options"),
        ("options", json!({"temperature": "x"}), "options.temperature"),
        ("options", json!({"num_predict": "x"}), "options.num_predict"),
        ("stream", json!("x"), "stream"),
    ];
    for (field, value, param) in ollama {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": false, "options": {"num_predict": 2}});
        body[field] = value.clone();
        let (status, v) = post(base, "/api/chat", &body);
        assert_eq!(status, 400, "ollama {field} = {value}: {v}");
        assert!(v["error"]["param"].as_str().unwrap_or_default().starts_with(param), "ollama {field}: {v}");
        still_serving(base);
    }
    for body in ["", "not json", "{\"messages\": [", "[1, 2]", "{} trailing"] {
        let response = client().post(format!("{base}/v1/chat/completions")).body(body).send().unwrap();
        let (status, v) = read_json(response);
        refused(base, status, &v, 400, "", body);
    }
    let (status, text) = get(base, "/v1/chat/completions", None);
    assert_eq!(status, 405, "{text}");
    let (status, text) = get(base, "/v2/nothing", None);
    assert_eq!(status, 404, "{text}");
    still_serving(base);
}

#[test]
fn too_long_prompts_and_too_many_images_are_400() {
    let base = server();
    let long = "word ".repeat(600);
    let (status, v) = post(base, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": long}]}));
    refused(base, status, &v, 400, "context of 512", "openai");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (status, v) = post(base, "/api/v1/generate", &json!({"prompt": long}));
    refused(base, status, &v, 400, "context of 512", "kobold");
    let (status, v) = post(base, "/api/generate", &json!({"prompt": long, "stream": true}));
    refused(base, status, &v, 400, "context of 512", "ollama");

    let square = data_url(&fixtures().join("images/square-64x64.png"));
    let parts: Vec<Value> = (0..9).map(|_| json!({"type": "image_url", "image_url": {"url": square}})).collect();
    let (status, v) = post(base, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": parts}]}));
    refused(base, status, &v, 400, "at most 8", "nine images");
    let five = vec![base64_file(&fixtures().join("images/square-64x64.png")); 5];
    let (status, v) = post(base, "/api/v1/generate", &json!({"prompt": "x", "images": five}));
    refused(base, status, &v, 400, "at most 4", "five kobold images");
    let (status, v) = post(base, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "an <image> in text"}]}));
    refused(base, status, &v, 400, "image marker", "a marker in the text");
}

/// A request that keeps the model busy for a while: 480 tokens past end-of-sequence.
fn long_request(stream: bool) -> Value {
    json!({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 480, "temperature": 0, "ignore_eos": true, "stream": stream})
}

#[test]
fn a_full_queue_answers_503_and_the_rest_are_served() {
    let mut opts = options();
    opts.max_queue = 1;
    let base = Arc::new(start(opts));
    let clients = 8;
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (base, barrier) = (base.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                post(&base, "/v1/chat/completions", &long_request(false))
            })
        })
        .collect();
    let results: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let served: Vec<&Value> = results.iter().filter(|(s, _)| *s == 200).map(|(_, v)| v).collect();
    let busy = results.iter().filter(|(s, v)| *s == 503 && v["error"]["code"] == "queue_full").count();
    assert!(busy >= 1, "expected some 503s: {results:?}");
    assert_eq!(served.len() + busy, clients, "{results:?}");
    assert!(!served.is_empty(), "{results:?}");
    for v in &served {
        assert_eq!(v["choices"][0]["message"]["content"], served[0]["choices"][0]["message"]["content"]);
        assert_eq!(v["usage"]["completion_tokens"], 480);
    }
    still_serving(&base);
}

#[test]
fn a_client_that_leaves_mid_stream_stops_its_generation() {
    let base = start(options());
    let cancelled = "seer_generations_total{reason=\"cancelled\"}";
    let response = send(&base, "/v1/chat/completions", &long_request(true), None);
    assert_eq!(response.status(), 200);
    let mut reader = std::io::BufReader::new(response);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&base, cancelled, None) < 1.0 {
        assert!(Instant::now() < deadline, "the generation was not cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }
    let generated = metric(&base, "seer_completion_tokens_total", None);
    assert!(generated < 480.0, "the generation stopped early ({generated} tokens)");
    still_serving(&base);
}

#[test]
fn sixteen_clients_at_once_each_get_their_own_answer() {
    let base = Arc::new(start(options()));
    let clients = 16;
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let (base, barrier) = (base.clone(), barrier.clone());
            std::thread::spawn(move || {
                let case = case(CASES[i % CASES.len()]);
                barrier.wait();
                let text = match i % 3 {
                    0 => post(&base, "/v1/chat/completions", &openai_request(&case)).1["choices"][0]["message"]["content"].as_str().unwrap().to_string(),
                    1 => {
                        let mut body = openai_request(&case);
                        body["stream"] = json!(true);
                        let events = sse_events(send(&base, "/v1/chat/completions", &body, None));
                        events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect()
                    }
                    _ => {
                        let lines = ndjson(send(&base, "/api/chat", &ollama_request(&case, true), None));
                        lines.iter().map(|l| l["message"]["content"].as_str().unwrap()).collect()
                    }
                };
                (i, text, greedy_text(&case))
            })
        })
        .collect();
    for h in handles {
        let (i, got, want) = h.join().unwrap();
        assert_eq!(got, want, "client {i}");
    }
    assert_eq!(metric(&base, "seer_request_errors_total", None), 0.0);
}

/// The model folder with `config.json` as a named pipe: loading blocks reading it until
/// the test writes it, so the server is deterministically "still loading" until then.
#[test]
fn health_is_503_until_the_model_has_loaded() {
    let dir = temp_dir("loading");
    let model = fixtures().join("tiny-llava-hub");
    for entry in std::fs::read_dir(&model).unwrap() {
        let name = entry.unwrap().file_name();
        if name != "config.json" {
            std::os::unix::fs::symlink(model.join(&name), dir.join(&name)).unwrap();
        }
    }
    let fifo = dir.join("config.json");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let base = start_loading(seer_server::ServeOptions::new(&dir));
    let (status, text) = get(&base, "/health", None);
    assert_eq!(status, 503, "{text}");
    let (status, v) = post(&base, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}]}));
    refused_while_loading(status, &v);
    assert_eq!(get(&base, "/v1/models", None).0, 503);
    std::fs::write(&fifo, std::fs::read(model.join("config.json")).unwrap()).unwrap();
    wait_healthy(&base);
    still_serving(&base);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn refused_while_loading(status: u16, v: &Value) {
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "model_loading");
}
