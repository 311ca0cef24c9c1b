//! The GGUF tokenizer against llama.cpp's test vectors: real vocabularies, with the ids
//! their reference tokenizers produce (see tests/fixtures/vocab/README.md).

use std::path::{Path, PathBuf};

use seer_engine::gguf_tokenizer::{from_gguf, GgufTokenizer};
use seer_models::gguf::GgufFile;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vocab").join(name)
}

fn load(path: &Path) -> GgufTokenizer {
    let file = GgufFile::open(path).unwrap();
    from_gguf(&file).unwrap()
}

/// `<vocab>.inp` holds inputs separated by a marker line; `<vocab>.out` one line of ids per input.
fn read_cases(vocab: &Path) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(format!("{}.inp", vocab.display())).unwrap();
    let out = std::fs::read_to_string(format!("{}.out", vocab.display())).unwrap();
    let mut inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    // The file ends with a marker line, which starts no further input.
    if inputs.last() == Some(&"") {
        inputs.pop();
    }
    let outputs: Vec<Vec<u32>> =
        out.lines().map(|l| l.split_whitespace().map(|id| id.parse().unwrap()).collect()).collect();
    assert_eq!(inputs.len(), outputs.len(), "{}: inputs and outputs differ in number", vocab.display());
    inputs.iter().map(|s| s.to_string()).zip(outputs).collect()
}

/// One line per input whose ids differ from the expected ones.
fn mismatches(vocab: &Path) -> Vec<String> {
    let tok = load(vocab);
    let mut failures = Vec::new();
    for (text, expected) in read_cases(vocab) {
        let got = tok.encode(&text).unwrap();
        if got != expected {
            failures.push(format!("{text:?}\n  expected {expected:?}\n  got      {got:?}"));
        }
    }
    failures
}

fn assert_matches_llama_cpp(vocab: &Path) {
    let failures = mismatches(vocab);
    assert!(failures.is_empty(), "{}:\n{}", vocab.display(), failures.join("\n"));
}

#[test]
fn llama_spm_matches_llama_cpp() {
    assert_matches_llama_cpp(&fixture("ggml-vocab-llama-spm.gguf"));
}

#[test]
fn gpt2_matches_llama_cpp() {
    assert_matches_llama_cpp(&fixture("ggml-vocab-gpt-2.gguf"));
}

#[test]
fn llama_spm_round_trips() {
    let vocab = fixture("ggml-vocab-llama-spm.gguf");
    let tok = load(&vocab);
    for (text, _) in read_cases(&vocab) {
        let ids = tok.encode(&text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }
}

#[test]
fn gpt2_round_trips() {
    let vocab = fixture("ggml-vocab-gpt-2.gguf");
    let tok = load(&vocab);
    for (text, _) in read_cases(&vocab) {
        let ids = tok.encode(&text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }
}

#[test]
fn llama_spm_metadata() {
    let tok = load(&fixture("ggml-vocab-llama-spm.gguf"));
    assert_eq!((tok.bos_id, tok.eos_id, tok.add_bos), (Some(1), Some(2), true));
    assert_eq!(tok.chat_template, None);
    assert_eq!(tok.tokenizer.get_vocab_size(true), 32000);
}

#[test]
fn gpt2_metadata() {
    let tok = load(&fixture("ggml-vocab-gpt-2.gguf"));
    assert_eq!((tok.bos_id, tok.eos_id, tok.add_bos), (Some(50256), Some(50256), false));
    assert_eq!(tok.tokenizer.get_vocab_size(true), 50257);
}

/// Special tokens written in the text become their ids, and text after one gets the
/// SentencePiece space prefix again, as in llama.cpp.
#[test]
fn llama_spm_parses_special_tokens() {
    let tok = load(&fixture("ggml-vocab-llama-spm.gguf"));
    let hello = tok.encode("Hello").unwrap();
    assert_eq!(hello, [15043]);
    assert_eq!(tok.encode("<s>Hello</s>").unwrap(), [1, 15043, 2]);
    assert_eq!(tok.encode("Hello<s>Hello").unwrap(), [15043, 1, 15043]);
    assert_eq!(tok.encode("<unk>").unwrap(), [0]);
    let ids = tok.encode("<s>Hello world</s>").unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello world");
}

#[test]
fn gpt2_parses_special_tokens() {
    let tok = load(&fixture("ggml-vocab-gpt-2.gguf"));
    let ids = tok.encode("Hello<|endoftext|> world").unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == 50256).count(), 1, "{ids:?}");
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello world");
    assert_eq!(tok.decode(&ids, false).unwrap(), "Hello<|endoftext|> world");
}

/// Every vocabulary of llama.cpp's test set that seer supports, when a llama.cpp checkout is
/// at hand (`SEER_LLAMA_CPP_MODELS` or the benchmark cache); skipped otherwise.
#[test]
fn other_llama_cpp_vocabs_match() {
    let default = "/root/.cache/seer-bench/src/llama_cpp_python-0.3.36/vendor/llama.cpp/models";
    let dir = PathBuf::from(std::env::var("SEER_LLAMA_CPP_MODELS").unwrap_or(default.into()));
    if !dir.is_dir() {
        eprintln!("skipped: no llama.cpp models folder at {}", dir.display());
        return;
    }
    let names = [
        "llama-bpe",
        "qwen2",
        "qwen35",
        "phi-3",
        "starcoder",
        "refact",
        "command-r",
        "falcon",
        "mpt",
        "deepseek-coder",
        "deepseek-llm",
    ];
    let mut report = Vec::new();
    for name in names {
        let vocab = dir.join(format!("ggml-vocab-{name}.gguf"));
        let failures = mismatches(&vocab);
        if !failures.is_empty() {
            report.push(format!("{name}: {} mismatches\n{}", failures.len(), failures.join("\n")));
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}

/// llama.cpp's SentencePiece merge loop, written plainly: repeatedly merge the adjacent
/// pair whose concatenation is the best-scored piece, the leftmost on ties; pieces left
/// outside the vocabulary become byte tokens. For texts without special tokens.
fn spm_reference(file: &GgufFile, text: &str) -> Vec<u32> {
    let strings =
        |key| -> Vec<String> { file.get_array(key).unwrap().iter().map(|v| v.to_string().unwrap().clone()).collect() };
    let tokens = strings("tokenizer.ggml.tokens");
    let scores: Vec<f32> =
        file.get_array("tokenizer.ggml.scores").unwrap().iter().map(|v| v.to_f32().unwrap()).collect();
    let ids: std::collections::HashMap<&str, u32> =
        tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
    if text.is_empty() {
        return Vec::new();
    }
    let text = format!(" {text}").replace(' ', "\u{2581}");
    let mut pieces: Vec<String> = text.chars().map(String::from).collect();
    loop {
        let mut best: Option<(f32, usize)> = None;
        for i in 0..pieces.len().saturating_sub(1) {
            let joined = format!("{}{}", pieces[i], pieces[i + 1]);
            if let Some(&id) = ids.get(joined.as_str()) {
                let score = scores[id as usize];
                if best.is_none_or(|(s, _)| score > s) {
                    best = Some((score, i));
                }
            }
        }
        let Some((_, i)) = best else { break };
        let right = pieces.remove(i + 1);
        pieces[i].push_str(&right);
    }
    let byte_id = |b: u8| ids[format!("<0x{b:02X}>").as_str()];
    pieces
        .iter()
        .flat_map(|p| match ids.get(p.as_str()) {
            Some(&id) => vec![id],
            None => p.bytes().map(byte_id).collect(),
        })
        .collect()
}

/// The merges derived from scores must reproduce llama.cpp's loop, ties included (runs of
/// spaces, whose pieces all share one score, are the case that needs care).
#[test]
fn llama_spm_matches_reference_merge_loop() {
    let path = fixture("ggml-vocab-llama-spm.gguf");
    let file = GgufFile::open(&path).unwrap();
    let tok = from_gguf(&file).unwrap();
    let parts = [
        " ", "  ", "    ", "\n", "\t", "a", "b", "er", "Hello", "the", "é", "ß", "中文", "🦙", "3", "33", "'", "(",
        "ing", "▁", "Ö", "ю", "\u{301}", "x", ".",
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..400 {
        let n = (next() % 24) as usize;
        let text: String = (0..n).map(|_| parts[(next() % parts.len() as u64) as usize]).collect();
        assert_eq!(tok.encode(&text).unwrap(), spm_reference(&file, &text), "{text:?}");
    }
    let long_run = format!("{}x{}", " ".repeat(40), " ".repeat(17));
    assert_eq!(tok.encode(&long_run).unwrap(), spm_reference(&file, &long_run));
}

fn write_gguf(name: &str, metadata: &[(&str, candle_core::quantized::gguf_file::Value)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seer-gguf-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let refs: Vec<(&str, &candle_core::quantized::gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(&path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &refs, &[]).unwrap();
    path
}

#[test]
fn unsupported_vocabularies_are_named() {
    use candle_core::quantized::gguf_file::Value;
    let tokens = Value::Array(vec![Value::String("a".into())]);
    let bert = write_gguf(
        "bert.gguf",
        &[("tokenizer.ggml.model", Value::String("bert".into())), ("tokenizer.ggml.tokens", tokens.clone())],
    );
    let err = from_gguf(&GgufFile::open(&bert).unwrap()).err().unwrap().to_string();
    assert!(err.contains("bert") && err.contains("bert.gguf"), "{err}");

    let pre = write_gguf(
        "pre.gguf",
        &[
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("martian".into())),
            ("tokenizer.ggml.tokens", tokens),
            ("tokenizer.ggml.merges", Value::Array(vec![])),
        ],
    );
    let err = from_gguf(&GgufFile::open(&pre).unwrap()).err().unwrap().to_string();
    assert!(err.contains("martian") && err.contains("pre.gguf"), "{err}");

    let none = write_gguf("none.gguf", &[("general.architecture", Value::String("llama".into()))]);
    let err = from_gguf(&GgufFile::open(&none).unwrap()).err().unwrap().to_string();
    assert!(err.contains("tokenizer.ggml.model") && err.contains("none.gguf"), "{err}");
}
