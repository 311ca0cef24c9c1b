//! `seer chat` driven through a pseudo-terminal (typing, `\image`, Ctrl-C in the middle
//! of an answer, `\save`) and through piped stdin, against the tiny SmolVLM fixture and a
//! slow stand-in server.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use rexpect::session::spawn_command;
use serde_json::Value;

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("seer-chat-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn piped_stdin_one_message_per_line_matches_seer_run() {
    let dir = temp("pipe");
    let saved = dir.join("conversation.json");
    let script = format!("\\image {}\nWhat is in this image?\n\\save {}\nAnd the colours?\n", image("square-64x64.png"), saved.display());
    let mut child = seer()
        .args(["chat", "--model", &smolvlm(), "--max-tokens", "12"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();

    // The first answer is what `seer run` says to the same message.
    let run = seer().args(["run", "--model", &smolvlm(), "--max-tokens", "12", "--image", &image("square-64x64.png"), "--prompt", "What is in this image?"]).output().unwrap();
    let first = String::from_utf8(run.stdout).unwrap();
    assert!(stdout.starts_with(&first), "chat said {stdout:?}, run said {first:?}");
    assert!(stdout.len() > first.len(), "a second answer follows");

    let messages: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0]["role"], "user");
    assert!(messages[0]["content"][0]["image_url"]["url"].as_str().unwrap().starts_with("data:image/png;base64,"));
    assert_eq!(messages[0]["content"][1]["text"], "What is in this image?");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(format!("{}\n", messages[1]["content"][0]["text"].as_str().unwrap()), first);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn terminal_session_with_image_ctrl_c_and_save() {
    let (url, bodies) = slow_server(400, Duration::from_millis(25));
    let dir = temp("pty");
    let saved = dir.join("chat.json");
    let mut cmd = seer();
    cmd.args(["chat", "--server", &url]).env("XDG_STATE_HOME", &dir);
    let mut p = spawn_command(cmd, Some(20_000)).unwrap();
    p.exp_string("Ctrl-D to leave").unwrap();
    p.send_line(&format!("\\image {}", image("wide-120x72.jpg"))).unwrap();
    p.exp_string("[image 1 attached").unwrap();
    p.send_line("Describe this picture").unwrap();
    p.exp_string("word3 ").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("[stopped]").unwrap();
    // Still running: the next message gets an answer, and the conversation is saved.
    p.send_line(&format!("\\save {}", saved.display())).unwrap();
    p.exp_string("[saved").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();

    let messages: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(messages.len(), 2);
    let partial = messages[1]["content"][0]["text"].as_str().unwrap();
    assert!(partial.starts_with("word0 word1 word2 word3 ") && !partial.contains("word399"), "{partial:?}");
    let sent = bodies.lock().unwrap();
    assert_eq!(sent.len(), 1);
    assert!(sent[0]["messages"][0]["content"][0]["image_url"]["url"].as_str().unwrap().starts_with("data:image/jpeg;base64,"));
    assert_eq!(sent[0]["stream"], true);
    assert!(std::fs::read_to_string(dir.join("seer/chat_history")).unwrap().contains("Describe this picture"), "history is kept");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_bad_image_is_reported_and_the_chat_goes_on() {
    let script = "\\image /nonexistent/cat.png\nWhat is it?\nHello\n";
    let mut child = seer().args(["chat", "--model", &smolvlm(), "--max-tokens", "4"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/cat.png"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty(), "the next message is answered");
}

#[test]
fn terminal_session_with_the_local_model() {
    let dir = temp("pty-local");
    let saved = dir.join("chat.json");
    let mut cmd = seer();
    cmd.args(["chat", "--model", &smolvlm(), "--max-tokens", "6", "--system", "Be brief."]).env("XDG_STATE_HOME", &dir);
    let mut p = spawn_command(cmd, Some(20_000)).unwrap();
    p.exp_string("Ctrl-D to leave").unwrap();
    p.send_line("\\help").unwrap();
    p.exp_string("\\save FILE").unwrap();
    p.send_line(&format!("\\image {}", image("square-64x64.png"))).unwrap();
    p.exp_string("[image 1 attached").unwrap();
    p.send_line("What is in this image?").unwrap();
    // Typed-ahead lines are not kept while an answer streams: wait for it (milliseconds here).
    std::thread::sleep(Duration::from_millis(500));
    p.send_line("\\clear").unwrap();
    p.exp_string("[conversation cleared]").unwrap();
    p.send_line("Hello").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    p.send_line(&format!("\\save {}", saved.display())).unwrap();
    p.exp_string("[saved").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    // After \clear: the system message, then one exchange without images.
    let messages: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    let roles: Vec<&str> = messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant"], "{messages:?}");
    assert_eq!(messages[1]["content"][0]["text"], "Hello");
    std::fs::remove_dir_all(&dir).ok();
}
