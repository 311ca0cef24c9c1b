//! Shared by the server tests: a real server in-process on 127.0.0.1 (port 0) with the
//! tiny LLaVA fixture, the fixture cases in each API's wire format, and HTTP helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::blocking::{Client, Response};
use seer_server::ServeOptions;
use serde_json::{json, Value};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava")
}

pub fn options() -> ServeOptions {
    ServeOptions::new(fixtures().join("tiny-llava-hub"))
}

/// Starts a server on its own runtime thread and returns its base URL once `/health`
/// answers 200 (the model has loaded).
pub fn start(opts: ServeOptions) -> String {
    let base = start_loading(opts);
    wait_healthy(&base);
    base
}

/// Starts a server and returns at once, while the model may still be loading.
pub fn start_loading(opts: ServeOptions) -> String {
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            seer_server::serve_on(listener, opts, std::future::pending()).await.expect("server runs");
        });
    });
    format!("http://{}", rx.recv().expect("server bound its port"))
}

pub fn wait_healthy(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if client().get(format!("{base}/health")).send().is_ok_and(|r| r.status() == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{base} never became healthy");
}

pub fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

pub fn send(base: &str, path: &str, body: &Value, key: Option<&str>) -> Response {
    let mut req = client().post(format!("{base}{path}")).header("content-type", "application/json").body(body.to_string());
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().expect("request sent")
}

/// POSTs JSON; the status and the JSON answer.
pub fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    read_json(send(base, path, body, None))
}

pub fn read_json(response: Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

pub fn get(base: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let mut req = client().get(format!("{base}{path}"));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let response = req.send().unwrap();
    (response.status().as_u16(), response.text().unwrap())
}

/// The JSON of each `data:` event of a server-sent event stream, up to `[DONE]`.
pub fn sse_events(response: Response) -> Vec<Value> {
    assert_eq!(response.status(), 200);
    let mut events = Vec::new();
    for line in BufReader::new(response).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            return events;
        }
        events.push(serde_json::from_str(data).unwrap());
    }
    panic!("the stream ended without [DONE]");
}

/// Each line of a newline-delimited JSON stream.
pub fn ndjson(response: Response) -> Vec<Value> {
    assert_eq!(response.status(), 200);
    BufReader::new(response).lines().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect()
}

/// The reference case `name` (transformers' greedy answer for the tiny model).
pub fn case(name: &str) -> Value {
    let path = fixtures().join("cases/tiny-llava-hub").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub const CASES: [&str; 5] = ["a_square", "b_wide", "c_two_images", "d_multi_turn", "e_system"];

pub fn greedy_text(case: &Value) -> String {
    case["greedy_text"].as_str().unwrap().to_string()
}

pub fn prompt_tokens(case: &Value) -> usize {
    case["input_ids"].as_array().unwrap().len()
}

pub fn image_count(case: &Value) -> usize {
    case["image_sizes"].as_array().unwrap().len()
}

pub fn base64_file(path: &Path) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

pub fn data_url(path: &Path) -> String {
    let mime = if path.extension().is_some_and(|e| e == "jpg") { "image/jpeg" } else { "image/png" };
    format!("data:{mime};base64,{}", base64_file(path))
}

/// A case's conversation as OpenAI messages; `image` turns a fixture path into a URL.
pub fn openai_messages(case: &Value, image: &dyn Fn(&Path) -> String) -> Value {
    let messages = case["messages"].as_array().unwrap().iter().map(|m| {
        let parts: Vec<Value> = m["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| match p["type"].as_str().unwrap() {
                "text" => json!({"type": "text", "text": p["text"]}),
                _ => json!({"type": "image_url", "image_url": {"url": image(&fixtures().join(p["path"].as_str().unwrap())), "detail": "auto"}}),
            })
            .collect();
        json!({"role": m["role"], "content": parts})
    });
    Value::Array(messages.collect())
}

/// The greedy request OpenAI clients would send for a case.
pub fn openai_request(case: &Value) -> Value {
    json!({
        "model": "tiny-llava-hub",
        "messages": openai_messages(case, &|p| data_url(p)),
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// A case's conversation as Ollama messages (text as a string, images as base64).
pub fn ollama_messages(case: &Value) -> Value {
    let messages = case["messages"].as_array().unwrap().iter().map(|m| {
        let parts = m["content"].as_array().unwrap();
        let text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
        let images: Vec<String> = parts.iter().filter_map(|p| p["path"].as_str()).map(|p| base64_file(&fixtures().join(p))).collect();
        json!({"role": m["role"], "content": text, "images": images})
    });
    Value::Array(messages.collect())
}

pub fn ollama_request(case: &Value, stream: bool) -> Value {
    json!({
        "model": "tiny-llava-hub",
        "messages": ollama_messages(case),
        "stream": stream,
        "options": {"temperature": 0, "num_predict": 16, "repeat_penalty": 1.0},
        "ignore_eos": true,
    })
}

/// A small greedy text request and its answer, to check the server still works.
pub fn still_serving(base: &str) {
    let body = json!({"messages": [{"role": "user", "content": "Still there?"}], "max_tokens": 4, "temperature": 0, "ignore_eos": true});
    let (status, v) = post(base, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

/// A value from `/metrics` (the line that starts with `name`, labels included).
pub fn metric(base: &str, name: &str, key: Option<&str>) -> f64 {
    let (status, text) = get(base, "/metrics", key);
    assert_eq!(status, 200);
    let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' ')).unwrap_or_else(|| panic!("no {name} in\n{text}"));
    line[name.len()..].trim().parse().unwrap()
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    let mut covered = kind.to_vec();
    covered.extend_from_slice(data);
    chunk.extend_from_slice(&crc32(&covered).to_be_bytes());
    chunk
}

/// A valid little PNG whose header claims `width`×`height` RGB pixels (a decompression
/// bomb as far as the header goes).
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    assert_eq!(crc32(b"IEND"), 0xAE42_6082, "CRC helper");
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

/// Serves `body` to every request on 127.0.0.1 (for image URLs); returns the URL.
pub fn serve_file(body: Vec<u8>, content_type: &'static str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/image", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            use std::io::Write;
            let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&body));
        }
    });
    url
}
