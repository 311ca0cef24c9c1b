//! `seer run` as a user calls it: streamed text, `--json`, and one-line errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava")
}

fn seer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_seer")).args(args).current_dir(fixtures()).output().expect("seer runs")
}

fn reference(case: &str) -> Value {
    let path = fixtures().join("cases/tiny-llava-hub").join(format!("{case}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const SQUARE: [&str; 8] = ["run", "--model", "tiny-llava-hub", "--image", "images/square-64x64.png", "--prompt", "What is in this image?", "--ignore-eos"];

#[test]
fn streams_the_greedy_answer() {
    let mut args = SQUARE.to_vec();
    args.extend(["--max-tokens", "16"]);
    let out = seer(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = reference("a_square")["greedy_text"].as_str().unwrap().to_string();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), want + "\n");
}

#[test]
fn json_reports_ids_usage_and_timings() {
    let mut args = SQUARE.to_vec();
    args.extend(["--max-tokens", "16", "--json"]);
    let out = seer(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    let case = reference("a_square");
    assert_eq!(v["token_ids"], case["greedy_tokens"]);
    assert_eq!(v["text"], case["greedy_text"]);
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["usage"]["image_tokens"], 16);
    assert_eq!(v["usage"]["prompt_tokens"], case["input_ids"].as_array().unwrap().len());
    assert_eq!(v["usage"]["completion_tokens"], 16);
    for key in ["load_ms", "image_encode_ms", "prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(v["timings"][key].as_f64().is_some_and(|x| x > 0.0), "timings.{key} = {}", v["timings"][key]);
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let mut args = SQUARE.to_vec();
    args.extend(["--max-tokens", "8", "--json", "--temperature", "0.9", "--top-p", "0.95", "--top-k", "40", "--seed", "11"]);
    let a: Value = serde_json::from_slice(&seer(&args).stdout).unwrap();
    let b: Value = serde_json::from_slice(&seer(&args).stdout).unwrap();
    assert_eq!(a["token_ids"], b["token_ids"]);
    assert_eq!(a["token_ids"].as_array().unwrap().len(), 8);
}

#[test]
fn errors_are_one_line_and_exit_nonzero() {
    // Without the `cuda` feature, `--device cuda` says how to get it; with it and no GPU,
    // it names the device it could not open.
    let no_gpu = if cfg!(feature = "cuda") { "device `cuda:1`" } else { "--features cuda" };
    let cases: [(&[&str], &str); 5] = [
        (&["run", "--model", "no-such-model", "--prompt", "hi"], "no-such-model"),
        (&["run", "--model", "tiny-llava-hub", "--device", "tpu", "--prompt", "hi"], "unknown device `tpu`"),
        (&["run", "--model", "tiny-llava-hub", "--device", "cuda:1", "--prompt", "hi"], no_gpu),
        (&["run", "--model", "tiny-llava-hub", "--image", "README.md", "--prompt", "hi"], "README.md"),
        (&["run", "--model", "gguf/tiny-llava-Q8_0.gguf", "--prompt", "hi"], "--mmproj"),
    ];
    for (args, names) in cases {
        let out = seer(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(names), "{args:?}: {err}");
    }
}

/// Without `--model`, `seer run` fetches the default SmolVLM from the hub (`HF_ENDPOINT`,
/// into `HF_HOME`); with the hub unreachable and nothing cached that is a one-line error
/// naming the repository. (Downloads themselves are tested in seer-engine's tests/hub.rs
/// against a local hub.)
#[test]
fn without_a_model_the_default_comes_from_the_hub() {
    let home = std::env::temp_dir().join(format!("seer-cli-hub-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_seer"))
        .args(["run", "--image", "images/square-64x64.png", "--prompt", "hi"])
        .current_dir(fixtures())
        .env("HF_HOME", &home)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: ") && err.contains("HuggingFaceTB/SmolVLM-256M-Instruct") && err.lines().count() == 1, "{err}");
    let _ = std::fs::remove_dir_all(home);
}

/// Kills the child when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A GET over a plain connection: the status line and the body.
fn http_get(addr: &str, path: &str, key: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn serve_says_where_it_listens_and_when_it_is_ready() {
    use std::io::BufRead;
    let child = Command::new(env!("CARGO_BIN_EXE_seer"))
        .args(["serve", "--model", "tiny-llava-hub", "--port", "0", "--max-queue", "4", "--max-images", "2"])
        .env("SEER_API_KEY", "k3y")
        .current_dir(fixtures())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let mut lines = std::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
    let listening = lines.next().unwrap().unwrap();
    let addr = listening.strip_prefix("seer: listening on http://").unwrap_or_else(|| panic!("{listening}")).to_string();
    let ready = lines.next().unwrap().unwrap();
    assert!(ready.starts_with("seer: model tiny-llava-hub ready"), "{ready}");
    assert!(http_get(&addr, "/health", "").starts_with("HTTP/1.1 200"));
    assert!(http_get(&addr, "/v1/models", "wrong").starts_with("HTTP/1.1 401"));
    let models = http_get(&addr, "/v1/models", "k3y");
    assert!(models.starts_with("HTTP/1.1 200") && models.contains("\"context_length\":512"), "{models}");
}

#[test]
fn serve_refuses_an_empty_api_key() {
    let out = seer(&["serve", "--model", "tiny-llava-hub", "--port", "0", "--api-key", ""]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--api-key is empty"), "{err}");
}

#[test]
fn bench_prints_the_fields_the_harness_reads() {
    let out = seer(&[
        "bench", "--model", "gguf/tiny-llava-Q8_0.gguf", "--mmproj", "gguf/mmproj-tiny-llava-F16.gguf",
        "--image-size", "64x48", "--gen-tokens", "4", "--prompt-tokens", "16", "--repeat", "2", "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in ["load_ms", "image_encode_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "peak_rss_mib", "pp512_tokens_per_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} = {}", v[key]);
    }
    assert_eq!(v["image_tokens"], 16);
    assert_eq!(v["runs"].as_array().unwrap().len(), 2);
    assert!(v["median"]["ttft_ms"].as_f64().unwrap() >= v["ttft_ms"].as_f64().unwrap(), "best ≤ median for times");
}

fn smolvlm() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics3/tiny-smolvlm").display().to_string()
}

#[test]
fn extract_prints_json_that_follows_the_schema() {
    let dir = std::env::temp_dir().join(format!("seer-extract-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = dir.join("schema.json");
    let spec = r#"{"type": "object", "properties": {"total": {"type": "integer", "minimum": 0, "maximum": 999}, "currency": {"enum": ["EUR", "USD"]}}, "required": ["total", "currency"]}"#;
    std::fs::write(&schema, spec).unwrap();
    let out = seer(&["extract", "--model", &smolvlm(), "--schema", schema.to_str().unwrap(), "--image", "images/square-64x64.png", "--prompt", "Read the receipt."]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let obj = v.as_object().expect("an object");
    assert!(v["total"].as_u64().is_some_and(|t| t <= 999), "{v}");
    assert!(v["currency"] == "EUR" || v["currency"] == "USD", "{v}");
    assert_eq!(obj.len(), 2, "no properties beyond the schema's: {v}");

    std::fs::write(&schema, r#"{"type": "objekt"}"#).unwrap();
    let out = seer(&["extract", "--model", &smolvlm(), "--schema", schema.to_str().unwrap(), "--prompt", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("JSON schema") && err.contains("objekt"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn classify_prints_one_label() {
    let out = seer(&["classify", "--model", &smolvlm(), "--label", "cat", "--label", "dog", "--label", "neither", "--image", "images/square-64x64.png"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let label = String::from_utf8(out.stdout).unwrap();
    assert!(["cat\n", "dog\n", "neither\n"].contains(&label.as_str()), "{label:?}");
    let out = seer(&["classify", "--model", &smolvlm(), "--label", "only"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("at least two"));
}
