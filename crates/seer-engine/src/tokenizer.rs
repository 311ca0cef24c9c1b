//! Text ↔ token ids, and turning generated ids back into text as they stream.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{EngineError, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Ids that end generation.
    pub stop_ids: HashSet<u32>,
    /// Whether a prompt starts with BOS when the chat template did not write it.
    pub add_bos: bool,
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// A special token in `tokenizer_config.json`: a plain string or `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        other => other.get("content")?.as_str().map(String::from),
    }
}

impl Tokenizer {
    /// From a Hugging Face folder: `tokenizer.json`, with `tokenizer_config.json` and
    /// `generation_config.json` for the special tokens when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::Tokenizer(format!("{} not found", path.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        let config = crate::files::read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let bos_token = token_string(config.get("bos_token"));
        let eos_token = token_string(config.get("eos_token"));
        let mut stop_ids: HashSet<u32> = eos_token.iter().filter_map(|t| inner.token_to_id(t)).collect();
        if let Some(gen) = crate::files::read_json_opt(&dir.join("generation_config.json"))? {
            match gen.get("eos_token_id") {
                Some(Value::Number(n)) => stop_ids.extend(n.as_u64().map(|x| x as u32)),
                Some(Value::Array(a)) => stop_ids.extend(a.iter().filter_map(Value::as_u64).map(|x| x as u32)),
                _ => {}
            }
        }
        // The post-processor in tokenizer.json decides whether BOS is added; we only
        // need to know whether to suppress it when the template already wrote one.
        Ok(Tokenizer { inner, bos_token, eos_token, stop_ids, add_bos: true })
    }

    pub fn from_gguf(file: &seer_models::gguf::GgufFile) -> Result<(Self, Option<String>)> {
        let g = crate::gguf_tokenizer::from_gguf(file).map_err(tok_err)?;
        let name = |id: Option<u32>| id.and_then(|i| g.tokenizer.id_to_token(i));
        let tok = Tokenizer {
            bos_token: name(g.bos_id),
            eos_token: name(g.eos_id),
            stop_ids: g.eos_id.into_iter().collect(),
            add_bos: g.add_bos,
            inner: g.tokenizer,
        };
        Ok((tok, g.chat_template))
    }

    /// Tokenizes with the tokenizer's own special-token handling (HF processors' way).
    pub fn encode_with_specials(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenizes a piece of prompt without any added tokens; special tokens written in
    /// the text still become their ids.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with_specials(text, false)
    }

    /// The underlying Hugging Face tokenizer (GGUF vocabularies are converted to one).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.inner.token_to_id(t))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// A token's text as it would print on its own, for logprobs ("▁" shown as a space).
    pub fn token_to_string(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }
}

/// Emits the text of generated tokens as soon as it is final: a token that ends inside
/// a multi-byte character waits for the next one. Decoding restarts a few tokens back
/// each time, so the cost per token stays constant.
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream {
    pub fn new() -> Self {
        TextStream { ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }
}

impl TextStream {
    /// Whatever has not been emitted yet (an unfinished character at the very end).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.strip_prefix(&prefix).unwrap_or("").to_string())
    }
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}
