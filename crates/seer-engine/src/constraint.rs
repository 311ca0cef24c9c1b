//! Constrained decoding: before each token is sampled, every token that cannot continue
//! a valid output is masked out, so the answer always matches its JSON schema, regular
//! expression, grammar or list of choices. The grammar work is llguidance's (the library
//! llama.cpp and vLLM use); this module turns seer's tokenizer into its vocabulary and a
//! request's constraint into its grammar.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use tokenizers::decoders::DecoderWrapper;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::{EngineError, Result};
use crate::tokenizer::Tokenizer;

pub mod gbnf;

/// What the answer must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON value valid under this JSON schema (`{}` accepts any JSON).
    JsonSchema(Value),
    /// Text that the whole of this regular expression matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
    /// A grammar in llama.cpp's GBNF (KoboldCpp's `grammar`).
    Gbnf(String),
}

impl Constraint {
    /// Any JSON object: OpenAI's `{"type": "json_object"}`, Ollama's `"format": "json"`.
    pub fn json_object() -> Self {
        Constraint::JsonSchema(serde_json::json!({"type": "object"}))
    }

    fn grammar(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Constraint::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_bounded_whitespace(schema)),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Choice(choices) => {
                if choices.is_empty() {
                    return Err(EngineError::Constraint("a choice needs at least one option".into()));
                }
                // JSON string syntax is Lark's string syntax: any option, quoted, is a literal.
                let options: Vec<String> = choices.iter().map(|c| Value::from(c.as_str()).to_string()).collect();
                TopLevelGrammar::from_lark(format!("start: {}", options.join(" | ")))
            }
            Constraint::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
            Constraint::Gbnf(text) => {
                let lark = gbnf::gbnf_to_lark(text).map_err(|e| EngineError::Constraint(e.to_string()))?;
                TopLevelGrammar::from_lark(lark)
            }
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::Regex(_) => "regular expression",
            Constraint::Choice(_) => "choice",
            Constraint::Lark(_) => "Lark grammar",
            Constraint::Gbnf(_) => "GBNF grammar",
        }
    }
}

/// Whitespace allowed between JSON tokens: a space, or one or two newlines and an indent
/// of up to 20 (llama.cpp's JSON grammars allow the same). Unbounded whitespace lets a
/// model, above all a weak one, pad forever instead of writing the value.
const JSON_WHITESPACE: &str = r"(?: |\n{1,2}[ \t]{0,20})";

/// The schema with seer's whitespace bound, unless it sets llguidance's options itself.
fn with_bounded_whitespace(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Some(map) = schema.as_object_mut() {
        map.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// Closes every object schema that lists its properties and says nothing of others to
/// those properties (`"additionalProperties": false`), as OpenAI's strict mode reads a
/// schema. Left open, an object lets the model add keys of its own choosing, with values
/// of any length; a Rust type or a strict schema never wants them.
pub fn close_objects(schema: &mut Value) {
    let Some(map) = schema.as_object_mut() else { return };
    if map.contains_key("properties") && !map.contains_key("additionalProperties") && !map.contains_key("patternProperties") {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (key, child) in map.iter_mut() {
        match key.as_str() {
            // Maps from names to schemas.
            "properties" | "patternProperties" | "$defs" | "definitions" => {
                child.as_object_mut().into_iter().flat_map(|m| m.values_mut()).for_each(close_objects);
            }
            // A schema, or a list of them.
            "items" | "prefixItems" | "additionalProperties" | "anyOf" | "oneOf" | "allOf" | "not" | "if" | "then" | "else" | "contains" => match child {
                Value::Array(list) => list.iter_mut().for_each(close_objects),
                other => close_objects(other),
            },
            _ => {}
        }
    }
}

/// The compiler of constraints for one tokenizer, built on first use (its token trie
/// takes a moment for a large vocabulary, and most requests never need it).
#[derive(Default)]
pub struct Grammars {
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl Grammars {
    fn factory(&self, tokenizer: &Tokenizer) -> Result<&ParserFactory> {
        let built = self.factory.get_or_init(|| {
            let env = token_env(tokenizer)?;
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            factory.quiet();
            Ok(factory)
        });
        built.as_ref().map_err(|e| EngineError::Constraint(format!("constrained decoding is not available for this tokenizer: {e}")))
    }

    /// Compiles a constraint for one answer. An invalid or unsupported constraint is an
    /// error here, before any decoding starts.
    pub fn start(&self, tokenizer: &Tokenizer, constraint: &Constraint) -> Result<Guide> {
        let factory = self.factory(tokenizer)?;
        let parser = factory
            .create_parser(constraint.grammar()?)
            .map_err(|e| EngineError::Constraint(format!("{}: {e}", constraint.kind())))?;
        Ok(Guide { matcher: Matcher::new(Ok(parser)) })
    }
}

/// One answer's constraint as it is being decoded.
pub struct Guide {
    matcher: Matcher,
}

impl Guide {
    /// Sets every token the constraint does not allow next to −∞.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(internal)?;
        let known = allowed.len().min(logits.len());
        for (id, l) in logits[..known].iter_mut().enumerate() {
            if !allowed.is_allowed(id as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        // Ids past the tokenizer's vocabulary (padding rows of the output matrix).
        logits[known..].fill(f32::NEG_INFINITY);
        Ok(())
    }

    /// Records the token that was sampled.
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(internal)
    }

    /// Whether the output is complete: nothing but end-of-sequence may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

fn internal(e: impl std::fmt::Display) -> EngineError {
    EngineError::Constraint(format!("constrained decoding failed: {e}"))
}

/// seer's tokenizer as llguidance sees it: every token's bytes, special tokens marked.
struct SeerTokEnv {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for SeerTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Not claimed canonical, so llguidance never forces a tokenization of its own
    /// choosing: every token that spells a valid continuation stays allowed, and the
    /// model picks among them as it would unconstrained.
    fn tokenize_is_canonical(&self) -> bool {
        false
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode_fast(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
        })
    }
}

fn token_env(tokenizer: &Tokenizer) -> std::result::Result<TokEnv, String> {
    let inner = tokenizer.inner();
    let words = token_bytes(inner)?;
    let mut stops: Vec<u32> = tokenizer.stop_ids.iter().copied().filter(|&id| (id as usize) < words.len()).collect();
    stops.sort_unstable();
    let Some(&eos) = stops.first() else {
        return Err("the tokenizer names no end-of-sequence token".into());
    };
    let info = TokRxInfo::new(words.len() as u32, eos);
    let trie = TokTrie::from(&info, &words).with_eos_tokens(&stops);
    Ok(Arc::new(SeerTokEnv { trie, tokenizer: inner.clone() }))
}

/// How a tokenizer's vocabulary strings stand for bytes.
#[derive(Clone, Copy)]
enum Spelling {
    /// GPT-2's byte-to-character map (Qwen, Llama 3, SmolVLM).
    ByteLevel,
    /// SentencePiece: "▁" for a space, `<0xAB>` pieces for raw bytes (Llama 2, Mistral).
    Metaspace,
}

fn spelling(decoder: Option<&DecoderWrapper>) -> Option<Spelling> {
    match decoder? {
        DecoderWrapper::ByteLevel(_) => Some(Spelling::ByteLevel),
        DecoderWrapper::ByteFallback(_) | DecoderWrapper::Metaspace(_) => Some(Spelling::Metaspace),
        DecoderWrapper::Sequence(seq) => seq.get_decoders().iter().find_map(|d| spelling(Some(d))),
        _ => None,
    }
}

/// Every token's bytes, by id. Added tokens that are special, or look like `<...>`,
/// start with toktrie's marker byte so that no grammar ever matches them.
fn token_bytes(tok: &tokenizers::Tokenizer) -> std::result::Result<Vec<Vec<u8>>, String> {
    let spelling = spelling(tok.get_decoder()).ok_or("its decoder is neither byte-level nor SentencePiece")?;
    let n = tok.get_vocab_size(true);
    let mut words = vec![Vec::new(); n];
    let mut added = HashSet::new();
    for (id, token) in tok.get_added_tokens_decoder() {
        let Some(word) = words.get_mut(id as usize) else { continue };
        added.insert(id);
        let content = token.content.as_bytes();
        if token.special || (token.content.starts_with('<') && token.content.ends_with('>')) {
            word.push(TokTrie::SPECIAL_TOKEN_MARKER);
        }
        word.extend_from_slice(content);
    }
    let byte_of = gpt2_unicode_to_byte();
    for (id, word) in words.iter_mut().enumerate() {
        if added.contains(&(id as u32)) {
            continue;
        }
        let Some(piece) = tok.id_to_token(id as u32) else { continue };
        *word = match spelling {
            Spelling::ByteLevel => piece.chars().map(|c| byte_of.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_default(),
            Spelling::Metaspace => match byte_piece(&piece) {
                Some(b) => vec![b],
                None => piece.replace('▁', " ").into_bytes(),
            },
        };
    }
    Ok(words)
}

/// SentencePiece's byte-fallback pieces, `<0x0A>`.
fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// GPT-2's map from the printable characters of byte-level vocabularies to bytes:
/// printable Latin-1 bytes stand for themselves, the rest are shifted to U+0100 onward.
fn gpt2_unicode_to_byte() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('\0')
            };
            (c, b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_objects_reaches_nested_schemas_only() {
        let mut schema = serde_json::json!({
            "type": "object",
            "properties": {
                "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
                "open": {"type": "object", "properties": {}, "additionalProperties": true}
            },
            "$defs": {"x": {"anyOf": [{"properties": {"b": {}}}, {"type": "null"}]}},
            "items": [{"properties": {"c": {}}}]
        });
        close_objects(&mut schema);
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["properties"]["properties"]["additionalProperties"], false);
        assert!(schema["properties"].get("additionalProperties").is_none(), "a map of names is not a schema");
        assert_eq!(schema["properties"]["open"]["additionalProperties"], true);
        assert_eq!(schema["$defs"]["x"]["anyOf"][0]["additionalProperties"], false);
        assert_eq!(schema["items"][0]["additionalProperties"], false);
    }

    #[test]
    fn gpt2_map_covers_every_byte_once() {
        let map = gpt2_unicode_to_byte();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'a'], b'a');
    }

    #[test]
    fn byte_pieces_parse() {
        assert_eq!(byte_piece("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_piece("<0xZZ>"), None);
        assert_eq!(byte_piece("<0x0>"), None);
        assert_eq!(byte_piece("hello"), None);
    }
}
