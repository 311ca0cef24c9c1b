//! A `tokenizers::Tokenizer` built from the vocabulary a GGUF file carries, tokenizing as
//! llama.cpp does for the same file (special tokens in the text parsed; BOS left to the caller).
//!
//! Two vocabulary kinds (`tokenizer.ggml.model`):
//! - `llama`: SentencePiece BPE. llama.cpp merges adjacent pieces greedily, best score
//!   first, ties to the leftmost pair. We express that as a BPE model whose merges are every
//!   way of splitting a vocabulary piece into two pieces, ranked by the piece's score.
//! - `gpt2`: byte-level BPE with explicit merges, after splitting the text with the regexes
//!   llama.cpp picks for `tokenizer.ggml.pre`.
//!
//! Tokens typed CONTROL, UNKNOWN and USER_DEFINED are matched in the text as whole units
//! before anything else, as llama.cpp does with `parse_special = true`.

use anyhow::{anyhow, bail, Context, Result};
use seer_models::gguf::{GgufFile, GgufValue};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Whether prompts should start with BOS (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

impl GgufTokenizer {
    /// Token ids for `text`, special tokens in it included, without BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| anyhow!("decoding: {e}"))
    }
}

/// The SentencePiece word-boundary mark that stands for a space.
const SPACE_MARK: &str = "\u{2581}";

/// ggml token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
}

/// The vocabulary as the GGUF file stores it; index = token id.
struct GgufVocab {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
}

impl GgufVocab {
    fn read(file: &GgufFile) -> Result<Self> {
        let tokens = file.get_array("tokenizer.ggml.tokens")?;
        let tokens = tokens.iter().enumerate().map(|(i, v)| token_text(i, v)).collect::<Result<Vec<_>>>()?;
        let n = tokens.len();
        let scores = match file.opt_array("tokenizer.ggml.scores") {
            Some(values) => numbers(values, n, "tokenizer.ggml.scores", value_f32)?,
            None => vec![0.0; n],
        };
        let types = match file.opt_array("tokenizer.ggml.token_type") {
            Some(values) => numbers(values, n, "tokenizer.ggml.token_type", value_i32)?,
            None => vec![token_type::NORMAL; n],
        };
        Ok(GgufVocab { tokens, scores, types })
    }

    /// Text → id. When a text appears twice the last id wins, as in llama.cpp.
    fn ids(&self) -> Vocab {
        self.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect()
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }
}

fn token_text(i: usize, value: &GgufValue) -> Result<String> {
    match value {
        // llama.cpp renames empty tokens so that every token has a distinct text.
        GgufValue::String(s) if s.is_empty() => Ok(format!("[EMPTY_{i}]")),
        GgufValue::String(s) => Ok(s.clone()),
        _ => bail!("tokenizer.ggml.tokens[{i}] is not a string"),
    }
}

fn numbers<T>(values: &[GgufValue], n: usize, key: &str, convert: fn(&GgufValue) -> Option<T>) -> Result<Vec<T>> {
    if values.len() < n {
        bail!("{key} has {} entries for {n} tokens", values.len());
    }
    values[..n].iter().map(|v| convert(v).ok_or_else(|| anyhow!("{key} holds a non-numeric value {v:?}"))).collect()
}

fn value_f32(value: &GgufValue) -> Option<f32> {
    match *value {
        GgufValue::F32(v) => Some(v),
        GgufValue::I32(v) => Some(v as f32),
        _ => None,
    }
}

fn value_i32(value: &GgufValue) -> Option<i32> {
    match *value {
        GgufValue::I32(v) => Some(v),
        GgufValue::U32(v) => i32::try_from(v).ok(),
        _ => None,
    }
}

pub fn from_gguf(file: &GgufFile) -> Result<GgufTokenizer> {
    let path = file.path().display();
    let model = file.get_str("tokenizer.ggml.model")?;
    let vocab = GgufVocab::read(file).with_context(|| format!("reading the vocabulary of {path}"))?;
    let (mut tokenizer, add_bos_default) = match model {
        "llama" => (spm_tokenizer(file, &vocab)?, true),
        "gpt2" => bpe_tokenizer(file, &vocab)?,
        other => bail!("{path}: tokenizer model `{other}` is not supported (supported: llama, gpt2)"),
    };
    add_special_tokens(&mut tokenizer, file, &vocab);
    let default_ids = if model == "llama" { (Some(1), Some(2)) } else { (None, None) };
    Ok(GgufTokenizer {
        tokenizer,
        bos_id: special_id(file, "tokenizer.ggml.bos_token_id", default_ids.0, vocab.len()),
        eos_id: special_id(file, "tokenizer.ggml.eos_token_id", default_ids.1, vocab.len()),
        add_bos: file.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default),
        chat_template: file.opt_str("tokenizer.chat_template").map(String::from),
    })
}

/// An id from the metadata, or llama.cpp's default for the vocabulary kind; ids outside
/// the vocabulary are dropped, as llama.cpp does.
fn special_id(file: &GgufFile, key: &str, default: Option<u32>, n_tokens: usize) -> Option<u32> {
    let id = file.opt_u32(key).or(default)?;
    ((id as usize) < n_tokens).then_some(id)
}

fn tok_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("building the tokenizer: {e}")
}

fn spm_tokenizer(file: &GgufFile, vocab: &GgufVocab) -> Result<Tokenizer> {
    let ids = vocab.ids();
    let merges = spm_merges(vocab, &ids);
    let mut builder = BPE::builder().vocab_and_merges(ids, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = vocab.types.iter().position(|&t| t == token_type::UNKNOWN) {
        builder = builder.unk_token(vocab.tokens[unk].clone());
    }
    let mut tokenizer = Tokenizer::new(builder.build().map_err(tok_err)?);
    let add_space_prefix = file.opt_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
    tokenizer.with_normalizer(Some(spm_normalizer(add_space_prefix)?));
    tokenizer.with_decoder(Some(spm_decoder(add_space_prefix)?));
    Ok(tokenizer)
}

/// Every split of a piece into two pieces of the vocabulary, best merged score first.
/// Equal scores: longer pieces first, so a run of spaces grows from its left end as in
/// llama.cpp (whose ties go to the leftmost pair), then lower ids.
fn spm_merges(vocab: &GgufVocab, ids: &Vocab) -> Vec<(String, String)> {
    let mut merges = Vec::new();
    for (piece, &id) in ids {
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if ids.contains_key(left) && ids.contains_key(right) {
                let score = vocab.scores[id as usize];
                merges.push((score, piece.chars().count(), id, left.to_string(), right.to_string()));
            }
        }
    }
    // Score and length descending, id ascending; the left part breaks the last ties.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)).then(b.3.len().cmp(&a.3.len())));
    merges.into_iter().map(|(.., left, right)| (left, right)).collect()
}

/// Spaces become U+2581, with one more in front when the vocabulary asks for it.
/// Added tokens are cut out before this runs, so each run of text gets its own prefix,
/// as after a special token in llama.cpp.
fn spm_normalizer(add_space_prefix: bool) -> Result<NormalizerWrapper> {
    let mut steps: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        steps.push(Prepend::new(SPACE_MARK.to_string()).into());
    }
    steps.push(Replace::new(" ", SPACE_MARK).map_err(tok_err)?.into());
    Ok(NormalizerSequence::new(steps).into())
}

fn spm_decoder(add_space_prefix: bool) -> Result<DecoderWrapper> {
    let replace = tokenizers::normalizers::Replace::new(SPACE_MARK, " ").map_err(tok_err)?;
    let mut steps: Vec<DecoderWrapper> = vec![replace.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        // The encoder's added space: drop it again, once, from the start of the text.
        steps.push(Strip::new(' ', 1, 0).into());
    }
    Ok(DecoderSequence::new(steps).into())
}

/// How llama.cpp pre-tokenizes one `tokenizer.ggml.pre` family.
struct PreTokenization {
    /// Applied in turn; each splits every piece further, keeping matches and gaps alike.
    regexes: &'static [&'static str],
    /// A piece that is itself in the vocabulary is taken whole (llama-3 style).
    ignore_merges: bool,
    /// The default for `tokenizer.ggml.add_bos_token`.
    add_bos: bool,
}

// The split patterns of the models' own tokenizer.json files, in the form llama.cpp uses.
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEFAULT_PATTERNS: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]"];
const FALCON_PATTERNS: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_PATTERN, r"[0-9][0-9][0-9]"];
const STARCODER_PATTERNS: &[&str] = &[r"\p{N}", GPT2_PATTERN];
const DEEPSEEK_CODER_PATTERNS: &[&str] = &[r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"];
// DeepSeek LLM lists the letters of cased scripts explicitly rather than using \p{L}.
const DEEPSEEK_LLM_PATTERNS: &[&str] =
    &[r"[\r\n]", DEEPSEEK_LLM_LETTERS, r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}+"];
const DEEPSEEK_LLM_LETTERS: &str = r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+";

fn pre_tokenization(pre: &str) -> Option<PreTokenization> {
    let (regexes, ignore_merges, add_bos): (&'static [&'static str], bool, bool) = match pre {
        "default" | "" => (DEFAULT_PATTERNS, false, false),
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de"
        | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" | "gigachat" | "exaone4" | "trillion" | "granite-docling"
        | "mellum" | "modern-bert" | "a.x-4.0" => (&[GPT2_PATTERN], false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" => (&[LLAMA3_PATTERN], true, true),
        "dbrx" | "smaug-bpe" | "chatglm-bpe" => (&[LLAMA3_PATTERN], false, false),
        "glm4" | "glm5" => (&[LLAMA3_PATTERN], true, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "stablelm2" | "hunyuan" | "solar-open" | "megrez"
        | "grok-2" => (&[QWEN2_PATTERN], false, false),
        "qwen35" => (&[QWEN35_PATTERN], false, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            (STARCODER_PATTERNS, false, false)
        }
        "falcon" => (FALCON_PATTERNS, false, false),
        "deepseek-coder" => (DEEPSEEK_CODER_PATTERNS, false, false),
        "deepseek-llm" => (DEEPSEEK_LLM_PATTERNS, false, false),
        _ => return None,
    };
    Some(PreTokenization { regexes, ignore_merges, add_bos })
}

/// Returns the tokenizer and the default for `add_bos`.
fn bpe_tokenizer(file: &GgufFile, vocab: &GgufVocab) -> Result<(Tokenizer, bool)> {
    let pre = file.opt_str("tokenizer.ggml.pre").unwrap_or("default");
    let Some(spec) = pre_tokenization(pre) else {
        bail!("{}: pre-tokenizer `{pre}` is not supported", file.path().display());
    };
    let ids = vocab.ids();
    let merges = bpe_merges(file, &ids)?;
    let model = BPE::builder().vocab_and_merges(ids, merges).ignore_merges(spec.ignore_merges).build();
    let mut tokenizer = Tokenizer::new(model.map_err(tok_err)?);
    tokenizer.with_pre_tokenizer(Some(byte_level_pre_tokenizer(spec.regexes)?));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
    Ok((tokenizer, spec.add_bos))
}

/// `tokenizer.ggml.merges`: "left right" strings, best first. Merges naming pieces the
/// vocabulary lacks could never produce a token; they are left out.
fn bpe_merges(file: &GgufFile, ids: &Vocab) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for value in file.get_array("tokenizer.ggml.merges")? {
        let GgufValue::String(line) = value else { bail!("tokenizer.ggml.merges holds a non-string") };
        // Split at the first space after the first byte: a piece may be a lone space.
        let Some(at) = line.bytes().skip(1).position(|b| b == b' ').map(|i| i + 1) else { continue };
        let (left, right) = (&line[..at], &line[at + 1..]);
        let merged = format!("{left}{right}");
        if ids.contains_key(left) && ids.contains_key(right) && ids.contains_key(&merged) {
            merges.push((left.to_string(), right.to_string()));
        }
    }
    Ok(merges)
}

/// The regex splits in turn, then bytes mapped to GPT-2's printable characters.
fn byte_level_pre_tokenizer(regexes: &[&str]) -> Result<PreTokenizerWrapper> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for regex in regexes {
        let pattern = SplitPattern::Regex(regex.to_string());
        let split = Split::new(pattern, SplitDelimiterBehavior::Isolated, false).map_err(tok_err)?;
        steps.push(split.into());
    }
    steps.push(tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, false, false).into());
    Ok(PreSequence::new(steps).into())
}

/// CONTROL and UNKNOWN tokens become special added tokens (skipped by
/// `decode(.., skip_special_tokens = true)`), USER_DEFINED ones plain added tokens. Both are
/// matched on the raw text, before normalization, like llama.cpp's special-token pass.
fn add_special_tokens(tokenizer: &mut Tokenizer, file: &GgufFile, vocab: &GgufVocab) {
    let rstrip = rstrip_tokens(file);
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (text, &kind) in vocab.tokens.iter().zip(&vocab.types) {
        let is_special = matches!(kind, token_type::CONTROL | token_type::UNKNOWN);
        if !is_special && kind != token_type::USER_DEFINED {
            continue;
        }
        let token = AddedToken::from(text.clone(), is_special).normalized(false).rstrip(rstrip(text));
        if is_special {
            special.push(token);
        } else {
            user.push(token);
        }
    }
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&user);
}

/// llama.cpp strips the whitespace after most added tokens of Phi-3 models (recognised by
/// `general.name`), as their Hugging Face tokenizer does.
fn rstrip_tokens(file: &GgufFile) -> impl Fn(&str) -> bool {
    let name = file.opt_str("general.name").unwrap_or("").to_lowercase();
    let phi3 = name.contains("phi-3") || name.contains("phi3");
    move |text| phi3 && !matches!(text, "<unk>" | "<s>" | "<|endoftext|>")
}
