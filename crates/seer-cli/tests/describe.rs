//! `seer describe` killed halfway through a folder and rerun: the final JSON Lines file
//! has every image exactly once, unreadable files on lines of their own.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect()
}

#[test]
fn killed_and_rerun_every_image_exactly_once() {
    let dir = std::env::temp_dir().join(format!("seer-describe-{}", std::process::id()));
    let photos = dir.join("photos");
    std::fs::create_dir_all(photos.join("more")).unwrap();
    for i in 0..8 {
        let name = ["square-64x64.png", "wide-120x72.jpg", "tall-40x90.png"][i % 3];
        let ext = name.rsplit('.').next().unwrap();
        let sub = if i % 2 == 0 { photos.clone() } else { photos.join("more") };
        std::fs::copy(image(name), sub.join(format!("img{i}.{ext}"))).unwrap();
    }
    std::fs::write(photos.join("broken.png"), b"not a png at all").unwrap();
    std::fs::write(photos.join("notes.txt"), b"not an image, not described").unwrap();
    let out = dir.join("results.jsonl");

    // First run: a slow server, killed once a few results are written.
    let (url, _) = slow_server(5, Duration::from_millis(60));
    let mut child = seer()
        .args(["describe", photos.to_str().unwrap(), "--out", out.to_str().unwrap(), "--server", &url])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lines(&out).len() < 3 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let first = lines(&out).len();
    assert!(first < 9, "killed halfway, not at the end ({first} lines)");

    // A line cut off by a crash is dropped on resume.
    let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
    std::io::Write::write_all(&mut f, br#"{"path": "half a li"#).unwrap();

    // Rerun with the local model: it finishes the rest.
    let rerun = seer().args(["describe", photos.to_str().unwrap(), "--out", out.to_str().unwrap(), "--model", &smolvlm(), "--max-tokens", "8"]).output().unwrap();
    assert!(rerun.status.success(), "{}", String::from_utf8_lossy(&rerun.stderr));
    assert!(String::from_utf8_lossy(&rerun.stderr).contains("resuming"));

    let results = lines(&out);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &results {
        *seen.entry(r["path"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(seen.len(), 9, "8 images and the broken one: {seen:?}");
    assert!(seen.values().all(|&n| n == 1), "each exactly once: {seen:?}");
    let broken = results.iter().find(|r| r["path"].as_str().unwrap().ends_with("broken.png")).unwrap();
    assert!(broken["error"].as_str().is_some_and(|e| !e.is_empty()), "{broken}");
    assert!(results.iter().filter(|r| r.get("error").is_none()).all(|r| r["answer"].is_string() && r["completion_tokens"].as_u64().is_some()));

    // A third run has nothing left to do.
    let again = seer().args(["describe", photos.to_str().unwrap(), "--out", out.to_str().unwrap(), "--model", &smolvlm()]).output().unwrap();
    assert!(again.status.success());
    assert_eq!(lines(&out).len(), 9);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn describe_with_a_schema_writes_json_answers() {
    let dir = std::env::temp_dir().join(format!("seer-describe-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(image("square-64x64.png"), dir.join("a.png")).unwrap();
    let schema = dir.join("schema.json");
    std::fs::write(&schema, r#"{"type": "object", "properties": {"kind": {"enum": ["photo", "drawing"]}, "people": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["kind", "people"]}"#).unwrap();
    let out = dir.join("out.jsonl");
    let run = seer().args(["describe", dir.to_str().unwrap(), "--out", out.to_str().unwrap(), "--schema", schema.to_str().unwrap(), "--model", &smolvlm()]).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let results = lines(&out);
    assert_eq!(results.len(), 1);
    let answer = &results[0]["answer"];
    assert!(answer["kind"] == "photo" || answer["kind"] == "drawing", "{answer}");
    assert!(answer["people"].as_u64().is_some_and(|n| n <= 9), "{answer}");
    std::fs::remove_dir_all(&dir).ok();
}
