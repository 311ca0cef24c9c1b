//! Hub downloads against a small local server that answers the hub's endpoints as
//! huggingface.co does (repository info, `resolve` with ranges, the etag and commit
//! headers), serving the tiny SmolVLM fixtures: a Hugging Face folder and a GGUF
//! repository. Transfers cut off halfway must be resumed, or fail without leaving a file
//! in the cache; a cached model must load with the server gone.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use seer_engine::hub::{fetch, HubOptions};
use seer_engine::{EngineError, Vlm};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// How the server treats downloads of one file.
#[derive(Clone, Copy, PartialEq)]
enum Cut {
    /// The first full download stops after half the body.
    Once,
    /// Every download stops after half the body.
    Always,
}

struct FakeHub {
    repos: HashMap<String, Vec<(String, Vec<u8>)>>,
    cut_file: String,
    cut: Cut,
    /// `file start` of every ranged GET (the 0-0 probes included).
    log: Mutex<Vec<String>>,
    cuts_done: Mutex<usize>,
}

impl FakeHub {
    fn serve(self) -> (String, Arc<FakeHub>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let hub = Arc::new(self);
        let h = hub.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let h = h.clone();
                std::thread::spawn(move || h.answer(stream));
            }
        });
        (addr, hub)
    }

    fn answer(&self, mut stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                let (a, b) = v.trim().split_once('-').unwrap();
                range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
            }
        }
        if let Some(repo) = path.strip_prefix("/api/models/").and_then(|p| p.strip_suffix("/revision/main")) {
            return self.info(&mut stream, repo);
        }
        let Some((repo, file)) = path.trim_start_matches('/').split_once("/resolve/main/") else {
            return reply(&mut stream, "404 Not Found", &[], b"");
        };
        self.file(&mut stream, repo, file, range);
    }

    fn info(&self, stream: &mut TcpStream, repo: &str) {
        let Some(files) = self.repos.get(repo) else { return reply(stream, "404 Not Found", &[], b"") };
        let siblings: Vec<_> = files.iter().map(|(n, _)| serde_json::json!({"rfilename": n})).collect();
        let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
        reply(stream, "200 OK", &[("Content-Type", "application/json".into())], body.as_bytes());
    }

    fn file(&self, stream: &mut TcpStream, repo: &str, name: &str, range: Option<(usize, Option<usize>)>) {
        let Some((_, data)) = self.repos.get(repo).and_then(|fs| fs.iter().find(|(n, _)| n == name)) else {
            return reply(stream, "404 Not Found", &[], b"");
        };
        let (start, end) = match range {
            Some((a, Some(b))) => (a, b.min(data.len() - 1)),
            Some((a, None)) => (a, data.len() - 1),
            None => (0, data.len() - 1),
        };
        self.log.lock().unwrap().push(format!("{name} {start}"));
        let body = &data[start..=end];
        let headers = [
            ("Content-Range", format!("bytes {start}-{end}/{}", data.len())),
            ("ETag", format!("\"{:016x}{:024x}\"", data.len(), fnv(data))),
            ("X-Repo-Commit", COMMIT.to_string()),
        ];
        let probe = range.is_some_and(|(_, b)| b == Some(0));
        if name == self.cut_file && !probe && self.should_cut() {
            // Announce the whole body, send half, hang up.
            let _ = write_head(stream, "206 Partial Content", &headers, body.len());
            let _ = stream.write_all(&body[..body.len() / 2]);
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        reply(stream, "206 Partial Content", &headers, body);
    }

    fn should_cut(&self) -> bool {
        let mut done = self.cuts_done.lock().unwrap();
        let cut = match self.cut {
            Cut::Once => *done == 0,
            Cut::Always => true,
        };
        *done += usize::from(cut);
        cut
    }
}

fn fnv(data: &[u8]) -> u128 {
    data.iter().fold(0xcbf29ce484222325u128, |h, &b| (h ^ b as u128).wrapping_mul(0x100000001b3))
}

fn write_head(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], len: usize) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())
}

fn reply(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let _ = write_head(stream, status, headers, body.len()).and_then(|_| stream.write_all(body));
}

fn read_files(dir: &Path, names: &[&str]) -> Vec<(String, Vec<u8>)> {
    names.iter().map(|n| (n.to_string(), std::fs::read(dir.join(n)).unwrap())).collect()
}

/// The tiny SmolVLM as a hub folder repository (plus files seer must not fetch), and as
/// a GGUF repository.
fn repos() -> HashMap<String, Vec<(String, Vec<u8>)>> {
    let root = support::fixtures("idefics3");
    let folder = root.join("tiny-smolvlm");
    let mut smol = read_files(
        &folder,
        &["config.json", "generation_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "model.safetensors"],
    );
    smol.push(("README.md".into(), b"# not a model file".to_vec()));
    smol.push(("onnx/model.onnx".into(), vec![0; 100]));
    let gguf = read_files(&root.join("gguf"), &["tiny-smolvlm-F16.gguf", "tiny-smolvlm-Q8_0.gguf", "mmproj-tiny-smolvlm-F16.gguf"]);
    HashMap::from([("test-org/tiny-smolvlm".to_string(), smol), ("test-org/tiny-smolvlm-gguf".to_string(), gguf)])
}

fn options(endpoint: &str, cache: &Path) -> HubOptions {
    HubOptions { endpoint: endpoint.into(), cache_dir: cache.into(), token: None, progress: false, retries: 3 }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seer-hub-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn folder_download_resumes_after_a_cut_and_loads() {
    let hub = FakeHub { repos: repos(), cut_file: "model.safetensors".into(), cut: Cut::Once, log: Mutex::default(), cuts_done: Mutex::default() };
    let (endpoint, hub) = hub.serve();
    let cache = scratch("folder");
    let files = fetch("test-org/tiny-smolvlm", None, &options(&endpoint, &cache)).expect("download");
    assert_eq!(files.mmproj, None);
    for (name, data) in &hub.repos["test-org/tiny-smolvlm"] {
        let local = files.model.join(name);
        if name.ends_with(".md") || name.contains('/') {
            assert!(!local.exists(), "{name} should not be fetched");
            continue;
        }
        assert_eq!(&std::fs::read(&local).unwrap(), data, "{name} differs from the served file");
    }
    let log = hub.log.lock().unwrap().clone();
    let half = hub.repos["test-org/tiny-smolvlm"].iter().find(|(n, _)| n == "model.safetensors").unwrap().1.len() / 2;
    assert!(log.contains(&format!("model.safetensors {half}")), "the cut download was not resumed where it stopped: {log:?}");
    Vlm::load(&files.model, None).expect("the downloaded folder loads");
}

#[test]
fn a_download_that_keeps_failing_leaves_no_file() {
    let hub = FakeHub { repos: repos(), cut_file: "model.safetensors".into(), cut: Cut::Always, log: Mutex::default(), cuts_done: Mutex::default() };
    let (endpoint, _hub) = hub.serve();
    let cache = scratch("failing");
    let mut opts = options(&endpoint, &cache);
    opts.retries = 1;
    let err = fetch("test-org/tiny-smolvlm", None, &opts).unwrap_err();
    assert!(matches!(err, EngineError::Download(_)), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    let whole: Vec<_> = walk(&cache).into_iter().filter(|p| p.file_name().is_some_and(|n| n == "model.safetensors")).collect();
    assert!(whole.is_empty(), "a model.safetensors was left in the cache: {whole:?}");
}

#[test]
fn gguf_repository_by_quant_or_file_with_its_mmproj_and_offline_from_cache() {
    let hub = FakeHub { repos: repos(), cut_file: "mmproj-tiny-smolvlm-F16.gguf".into(), cut: Cut::Once, log: Mutex::default(), cuts_done: Mutex::default() };
    let (endpoint, _hub) = hub.serve();
    let cache = scratch("gguf");
    let opts = options(&endpoint, &cache);
    let q8 = fetch("test-org/tiny-smolvlm-gguf", Some("q8_0"), &opts).expect("download by quant");
    assert!(q8.model.ends_with("tiny-smolvlm-Q8_0.gguf"), "{:?}", q8.model);
    assert!(q8.mmproj.as_ref().unwrap().ends_with("mmproj-tiny-smolvlm-F16.gguf"));
    let f16 = fetch("test-org/tiny-smolvlm-gguf:tiny-smolvlm-F16.gguf", None, &opts).expect("download by file name");
    assert!(f16.model.ends_with("tiny-smolvlm-F16.gguf"));
    Vlm::load(&q8.model, q8.mmproj.as_deref()).expect("the downloaded GGUF files load");
    let err = fetch("test-org/tiny-smolvlm-gguf", None, &opts).unwrap_err().to_string();
    assert!(err.contains("--quant") && err.contains("tiny-smolvlm-F16.gguf"), "two text models and no choice: {err}");
    // The server is gone for this one: the cache answers.
    let offline = fetch("test-org/tiny-smolvlm-gguf", Some("q8_0"), &options("http://127.0.0.1:9", &cache)).expect("offline from the cache");
    assert_eq!(offline, q8);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
