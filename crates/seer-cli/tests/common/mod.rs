//! Shared by the CLI tests: paths to the fixtures, and a slow stand-in for an
//! OpenAI-compatible server (`--server`), whose answers take long enough to interrupt.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn smolvlm() -> String {
    fixtures().join("idefics3/tiny-smolvlm").display().to_string()
}

pub fn image(name: &str) -> String {
    fixtures().join("llava/images").join(name).display().to_string()
}

pub fn seer() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_seer"))
}

/// A server that answers every chat request with `words` words, one every `pause`, as
/// server-sent events; it stops early when the client hangs up. Returns its URL and the
/// request bodies it received.
pub fn slow_server(words: usize, pause: Duration) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                seen.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                for i in 0..words {
                    let chunk = serde_json::json!({"choices": [{"index": 0, "delta": {"content": format!("word{i} ")}, "finish_reason": null}]});
                    if stream.write_all(format!("data: {chunk}\n\n").as_bytes()).and_then(|_| stream.flush()).is_err() {
                        return; // the client went away
                    }
                    std::thread::sleep(pause);
                }
                let last = serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 7, "completion_tokens": words}});
                let _ = stream.write_all(format!("data: {last}\n\ndata: [DONE]\n\n").as_bytes());
            });
        }
    });
    (url, bodies)
}
