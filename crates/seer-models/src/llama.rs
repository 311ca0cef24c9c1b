//! The LLaMA decoder (LLaMA 2 and the many models built on it: Vicuna in LLaVA, Mistral,
//! SmolLM): RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP.
//!
//! It takes input embeddings rather than token ids, so a vision-language model can splice
//! image features into the sequence before calling it.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::{Attend, KvCache, KvType};
use crate::layers::{Embedding, RmsNorm};
use crate::linear::Linear;
use crate::weights::{GgufNames, Vb};

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeStyle {
    /// Dimension i with i + d/2 (Hugging Face's `rotate_half`).
    Half,
    /// Dimension 2i with 2i + 1. llama.cpp's converter permutes the Q and K rows of LLaMA
    /// checkpoints so that this pairing gives the same result.
    Interleaved,
}

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope_style: RopeStyle,
    /// M-RoPE (Qwen2-VL): the rotary frequency pairs split into three runs of these
    /// lengths (summing to `head_dim / 2`), which take their positions from the temporal,
    /// height and width components of a [`Position`] respectively. `None`: plain RoPE.
    pub mrope_section: Option<[usize; 3]>,
    /// Gemma 3's departures from LLaMA; `None` for LLaMA.
    pub gemma: Option<GemmaConfig>,
    /// Llama 3's RoPE frequency scaling (`rope_type: llama3`).
    pub rope_llama3: Option<Llama3Rope>,
    /// Llama 3.2 Vision: the layers that cross-attend to the image instead of the text.
    pub cross_attention_layers: Vec<usize>,
    /// Embedding rows past the vocabulary (Llama 3.2 Vision has 8, for its image token).
    pub extra_embeddings: usize,
}

/// Llama 3's scaling of the RoPE frequencies: long wavelengths divided by `factor`,
/// short ones kept, the band between blended.
#[derive(Debug, Clone, Copy)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_context: f64,
}

/// What Gemma 3's decoder does differently: norms that scale by `1 + weight`, norms on
/// queries and keys and around the MLP, embeddings scaled by √hidden, a GELU-tanh MLP,
/// queries scaled by `query_pre_attn_scalar`, and sliding-window layers with their own
/// RoPE base beside global layers with linearly scaled RoPE.
#[derive(Debug, Clone)]
pub struct GemmaConfig {
    /// Each layer's sliding window; 0 for a global layer.
    pub windows: Vec<usize>,
    /// The RoPE base of the sliding layers (the global layers use `rope_theta`).
    pub local_rope_theta: f64,
    /// The global layers' linear RoPE scaling: positions divided by it.
    pub global_rope_factor: f64,
    pub query_pre_attn_scalar: f64,
    /// Norm weights stored centred on 0 (Hugging Face), scaling by `1 + weight`; llama.cpp's
    /// converter stores them with the 1 added.
    pub norm_offset: bool,
}

impl GemmaConfig {
    /// From a Gemma 3 `text_config`: `layer_types`, `sliding_window`, and
    /// `rope_parameters` keyed by layer type.
    pub fn from_hf(text: &Value) -> Result<Self> {
        let window = get_usize(text, "sliding_window").unwrap_or(4096);
        let types = text.get("layer_types").and_then(Value::as_array).ok_or_else(|| ModelError::Config("Gemma 3 text_config has no layer_types".into()))?;
        let windows = types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(window),
                Some("full_attention") => Ok(0),
                _ => Err(ModelError::Config(format!("layer type {t} is not supported"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let rope = |kind: &str, key: &str| text.get("rope_parameters").and_then(|r| r.get(kind)).and_then(|r| r.get(key)).and_then(Value::as_f64);
        let global_kind = text.get("rope_parameters").and_then(|r| r.get("full_attention")).and_then(|r| r.get("rope_type")).and_then(Value::as_str).unwrap_or("default");
        if global_kind != "default" && global_kind != "linear" {
            return Err(ModelError::Config(format!("rope type `{global_kind}` is not supported yet")));
        }
        Ok(GemmaConfig {
            windows,
            local_rope_theta: rope("sliding_attention", "rope_theta").or_else(|| text.get("rope_local_base_freq").and_then(Value::as_f64)).unwrap_or(10000.0),
            global_rope_factor: if global_kind == "linear" { rope("full_attention", "factor").unwrap_or(1.0) } else { 1.0 },
            query_pre_attn_scalar: text.get("query_pre_attn_scalar").and_then(Value::as_f64).unwrap_or(256.0),
            norm_offset: true,
        })
    }

    /// From a `gemma3` GGUF, as llama.cpp reads it: every sixth layer global, the rest
    /// sliding; queries scaled by 1/√head_dim (the file has no `query_pre_attn_scalar`).
    fn from_gguf(f: &GgufFile, layers: usize, head_dim: usize) -> Self {
        let window = f.opt_u32("gemma3.attention.sliding_window").unwrap_or(4096) as usize;
        let linear = f.opt_str("gemma3.rope.scaling.type") == Some("linear");
        GemmaConfig {
            windows: (0..layers).map(|i| if (i + 1) % 6 == 0 { 0 } else { window }).collect(),
            local_rope_theta: f.opt_f32("gemma3.rope.freq_base_swa").unwrap_or(10000.0) as f64,
            global_rope_factor: if linear { f.opt_f32("gemma3.rope.scaling.factor").unwrap_or(1.0) as f64 } else { 1.0 },
            query_pre_attn_scalar: head_dim as f64,
            norm_offset: false,
        }
    }
}

/// Gemma's RMSNorm, over `dim`, stored centred on 0 or not as `c` says.
fn gemma_norm(vb: &Vb, dim: usize, c: &LlamaConfig) -> Result<RmsNorm> {
    match &c.gemma {
        Some(g) if g.norm_offset => RmsNorm::load_offset(vb, dim, c.rms_norm_eps),
        _ => RmsNorm::load(vb, dim, c.rms_norm_eps),
    }
}

/// A token's position as M-RoPE sees it: (temporal, height, width). Text tokens have all
/// three equal; plain RoPE reads only the first.
pub type Position = [u32; 3];

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key)?.as_u64().map(|x| x as usize)
}


/// `mrope_section` as configs write it: three lengths covering the `head_dim / 2`
/// frequency pairs.
fn mrope_section(v: &Value, head_dim: usize) -> Result<[usize; 3]> {
    let parts: Option<Vec<usize>> = v.as_array().and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect());
    parts.and_then(|p| mrope_runs(&p, head_dim)).ok_or_else(|| bad_mrope(&format!("mrope_section {v}"), head_dim))
}

/// M-RoPE's runs from a GGUF's `{arch}.rope.dimension_sections`, where it has one.
/// llama.cpp writes four lengths; the fourth is 0 for Qwen2-VL (M-RoPE proper, the
/// three runs cover the head) and is refused otherwise.
fn gguf_mrope_section(f: &GgufFile, key: &str, head_dim: usize) -> Result<Option<[usize; 3]>> {
    let Some(mut parts) = f.opt_usizes(key) else { return Ok(None) };
    if parts.len() == 4 && parts[3] == 0 {
        parts.pop();
    }
    let what = format!("`{key}` {parts:?} in {}", f.path().display());
    mrope_runs(&parts, head_dim).map(Some).ok_or_else(|| bad_mrope(&what, head_dim))
}

/// Three run lengths that cover the `head_dim / 2` frequency pairs.
fn mrope_runs(parts: &[usize], head_dim: usize) -> Option<[usize; 3]> {
    match *parts {
        [t, h, w] if t + h + w == head_dim / 2 => Some([t, h, w]),
        _ => None,
    }
}

fn bad_mrope(what: &str, head_dim: usize) -> ModelError {
    ModelError::Config(format!("{what} must be three lengths summing to head_dim / 2 = {}", head_dim / 2))
}

/// How llama.cpp pairs rotary dimensions for a GGUF architecture. Its converter permutes
/// the Q and K rows of `llama` checkpoints so that adjacent dimensions pair up; Qwen2 and
/// Qwen2-VL keep Hugging Face's order and run NEOX-style (M-RoPE is NEOX-style too).
fn gguf_rope_style(arch: &str) -> RopeStyle {
    match arch {
        "qwen2" | "qwen2vl" | "gemma3" => RopeStyle::Half,
        _ => RopeStyle::Interleaved,
    }
}

impl LlamaConfig {
    /// From a Hugging Face `text_config` (or a plain LLaMA `config.json`). `outer` is the
    /// enclosing config, where 2024-era checkpoints keep some fields.
    pub fn from_hf(text: &Value, outer: &Value) -> Result<Self> {
        // 2024 hub configs (llava-1.5-7b-hf) list only what differs from LlamaConfig's
        // defaults, so the defaults are part of the format.
        let get = |k: &str, default: usize| get_usize(text, k).unwrap_or(default);
        let heads = get("num_attention_heads", 32);
        let hidden = get("hidden_size", 4096);
        let rope = text.get("rope_parameters").or_else(|| text.get("rope_scaling")).filter(|v| !v.is_null());
        if let Some(kind) = rope.and_then(|r| r.get("rope_type").or_else(|| r.get("type"))).and_then(Value::as_str) {
            // Qwen2-VL's hub configs say "mrope"; transformers 5 rewrites that to "default"
            // plus `mrope_section`. Both mean the unscaled frequencies.
            if kind != "default" && kind != "mrope" && kind != "llama3" {
                return Err(ModelError::Config(format!("rope type `{kind}` is not supported yet")));
            }
        }
        let rope_llama3 = rope.filter(|r| r.get("rope_type").and_then(Value::as_str) == Some("llama3")).map(|r| {
            let f = |k: &str, d: f64| r.get(k).and_then(Value::as_f64).unwrap_or(d);
            Llama3Rope {
                factor: f("factor", 8.0),
                low_freq_factor: f("low_freq_factor", 1.0),
                high_freq_factor: f("high_freq_factor", 4.0),
                original_context: f("original_max_position_embeddings", 8192.0),
            }
        });
        let is_mllama = text.get("model_type").and_then(Value::as_str) == Some("mllama_text_model");
        let cross_attention_layers: Vec<usize> = text
            .get("cross_attention_layers")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect())
            .unwrap_or_default();
        let is_gemma = text.get("model_type").and_then(Value::as_str) == Some("gemma3_text");
        let head_dim = get("head_dim", hidden / heads.max(1));
        let mrope_section = rope.and_then(|r| r.get("mrope_section")).map(|v| mrope_section(v, head_dim)).transpose()?;
        let rope_theta = rope
            .and_then(|r| r.get("full_attention").unwrap_or(r).get("rope_theta"))
            .or_else(|| text.get("rope_theta"))
            .or_else(|| outer.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        Ok(LlamaConfig {
            hidden_size: hidden,
            intermediate_size: get("intermediate_size", 11008),
            num_hidden_layers: get("num_hidden_layers", 32),
            num_attention_heads: heads,
            num_key_value_heads: get("num_key_value_heads", heads),
            head_dim,
            vocab_size: get("vocab_size", 32000),
            rms_norm_eps: text.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: get("max_position_embeddings", 2048),
            tie_word_embeddings: text
                .get("tie_word_embeddings")
                .or_else(|| outer.get("tie_word_embeddings"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            rope_style: RopeStyle::Half,
            mrope_section,
            gemma: if is_gemma { Some(GemmaConfig::from_hf(text)?) } else { None },
            rope_llama3,
            cross_attention_layers,
            extra_embeddings: if is_mllama { 8 } else { 0 },
        })
    }

    /// From the `{arch}.*` metadata of a GGUF file (`llama`, or `qwen2vl` with M-RoPE).
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch = f.architecture()?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = f.get_u32(&key("embedding_length"))? as usize;
        let heads = f.get_u32(&key("attention.head_count"))? as usize;
        let head_dim = f.opt_u32(&key("attention.key_length")).map_or(hidden / heads.max(1), |x| x as usize);
        let vocab = f.tensor_shape("token_embd.weight")?[0];
        let layers = f.get_u32(&key("block_count"))? as usize;
        Ok(LlamaConfig {
            hidden_size: hidden,
            intermediate_size: f.get_u32(&key("feed_forward_length"))? as usize,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: f.opt_u32(&key("attention.head_count_kv")).map_or(heads, |x| x as usize),
            head_dim,
            vocab_size: vocab,
            rms_norm_eps: f.opt_f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f64,
            rope_theta: f.opt_f32(&key("rope.freq_base")).unwrap_or(10000.0) as f64,
            max_position_embeddings: f.opt_u32(&key("context_length")).map_or(4096, |x| x as usize),
            tie_word_embeddings: !f.has_tensor("output.weight"),
            rope_style: gguf_rope_style(&arch),
            mrope_section: gguf_mrope_section(f, &key("rope.dimension_sections"), head_dim)?,
            gemma: (arch == "gemma3").then(|| GemmaConfig::from_gguf(f, layers, head_dim)),
            rope_llama3: None,
            cross_attention_layers: Vec::new(),
            extra_embeddings: 0,
        })
    }
}

/// llama.cpp's names for Gemma 3's decoder, whose norms sit elsewhere than LLaMA's.
pub const GEMMA3_GGUF_NAMES: GgufNames = GgufNames {
    whole: GGUF_NAMES.whole,
    layers: "layers",
    blocks: "blk",
    modules: &[
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
    ],
};

/// llama.cpp's names for the decoder's tensors.
pub const GGUF_NAMES: GgufNames = GgufNames {
    whole: &[
        ("embed_tokens.weight", "token_embd.weight"),
        ("norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ],
    layers: "layers",
    blocks: "blk",
    modules: &[
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ],
};

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Gemma: RMSNorm over each head of the queries and keys, before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    /// This layer's sliding window (0: none) and its RoPE table in [`Llama::ropes`].
    window: usize,
    rope: usize,
}

impl Attention {
    fn load(vb: &Vb, c: &LlamaConfig, layer: usize) -> Result<Self> {
        let (h, q_out, kv_out) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let norm = |name: &str| gemma_norm(&vb.pp(name), c.head_dim, c);
        let (qk_norm, scale, window) = match &c.gemma {
            Some(g) => (Some((norm("q_norm")?, norm("k_norm")?)), g.query_pre_attn_scalar.powf(-0.5) as f32, g.windows[layer]),
            None => (None, 1.0 / (c.head_dim as f32).sqrt(), 0),
        };
        Ok(Attention {
            q_proj: vb.pp("q_proj").linear_opt_bias(h, q_out)?,
            k_proj: vb.pp("k_proj").linear_opt_bias(h, kv_out)?,
            v_proj: vb.pp("v_proj").linear_opt_bias(h, kv_out)?,
            o_proj: vb.pp("o_proj").linear(q_out, h, false)?,
            qk_norm,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale,
            window,
            // Gemma: table 1 for the sliding layers, 0 for the global ones.
            rope: usize::from(window > 0),
        })
    }

    /// `x` is `[1, t, hidden]`; the cache holds the keys and values of earlier positions.
    /// Queries and keys stay in the projections' `[t, heads, head_dim]` layout throughout:
    /// rotary embedding in place, keys and values appended to the cache, attention read
    /// from it by seer-kernels. `blocks` are runs of positions that see each other whole.
    fn forward(&self, x: &Tensor, ropes: &[Rope], pos: Positions, cache: &mut KvCache, layer: usize, blocks: &[Range<usize>]) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let rows = |y: Tensor| y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let [q, k, v]: [Tensor; 3] = Linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("three projections".into()))?;
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q.reshape(((), self.head_dim))?)?, kn.forward(&k.reshape(((), self.head_dim))?)?),
            None => (q, k),
        };
        let (mut q, mut k, v) = (rows(q)?, rows(k)?, rows(v)?);
        let rope = &ropes[self.rope.min(ropes.len() - 1)];
        rope.apply(&mut q, self.heads, self.head_dim, pos);
        rope.apply(&mut k, self.kv_heads, self.head_dim, pos);
        cache.append(layer, &k, &v);
        let mut y = vec![0f32; q.len()];
        cache.attend(layer, &q, self.heads, &Attend { scale: self.scale, window: self.window, blocks }, &mut y);
        let y = Tensor::from_vec(y, (b, t, self.heads * self.head_dim), x.device())?;
        Ok(self.o_proj.forward(&y)?)
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    /// Gemma's GELU-tanh instead of SiLU.
    gelu: bool,
}

impl Mlp {
    fn load(vb: &Vb, c: &LlamaConfig) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Mlp {
            gate_proj: vb.pp("gate_proj").linear(h, i, false)?,
            up_proj: vb.pp("up_proj").linear(h, i, false)?,
            down_proj: vb.pp("down_proj").linear(i, h, false)?,
            gelu: c.gemma.is_some(),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let [gate, up]: [Tensor; 2] = Linear::forward_many(&[&self.gate_proj, &self.up_proj], x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("two projections".into()))?;
        let act = if self.gelu { crate::clip::Activation::GeluTanh.apply(&gate)? } else { candle_nn::ops::silu(&gate)? };
        self.down_proj.forward(&(act * up)?)
    }
}

struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// LLaMA: the norm before the MLP. Gemma: the norm of the attention's output.
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    /// Gemma: the norms before and after the MLP.
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
}

impl Block {
    fn load(vb: &Vb, c: &LlamaConfig, layer: usize) -> Result<Self> {
        let norm = |name: &str| gemma_norm(&vb.pp(name), c.hidden_size, c);
        let feedforward_norms = match c.gemma {
            Some(_) => Some((norm("pre_feedforward_layernorm")?, norm("post_feedforward_layernorm")?)),
            None => None,
        };
        Ok(Block {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(&vb.pp("self_attn"), c, layer)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::load(&vb.pp("mlp"), c)?,
            feedforward_norms,
        })
    }

    fn forward(&self, x: &Tensor, ropes: &[Rope], pos: Positions, cache: &mut KvCache, layer: usize, blocks: &[Range<usize>]) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, ropes, pos, cache, layer, blocks)?;
        let Some((pre, post)) = &self.feedforward_norms else {
            let x = (x + h)?;
            let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
            return Ok((x + h)?);
        };
        let x = (x + self.post_attention_layernorm.forward(&h)?)?;
        let h = post.forward(&self.mlp.forward(&pre.forward(&x)?)?)?;
        Ok((x + h)?)
    }
}

/// Llama 3.2 Vision's cross-attention layer: the text attends to the image's states
/// (keys and values computed once per request), both halves gated, the MLP's output kept
/// only for rows that see an image.
struct CrossBlock {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    /// tanh of the attention and MLP gates.
    attn_gate: f64,
    mlp_gate: f64,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl CrossBlock {
    fn load(vb: &Vb, c: &LlamaConfig) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let attn = vb.pp("cross_attn");
        let gate = |name: &str| -> Result<f64> { Ok(f64::from(vb.tensor_shaped(name, &[1])?.to_vec1::<f32>()?[0]).tanh()) };
        Ok(CrossBlock {
            input_layernorm: RmsNorm::load(&vb.pp("input_layernorm"), h, c.rms_norm_eps)?,
            q_proj: attn.pp("q_proj").linear(h, c.num_attention_heads * d, false)?,
            k_proj: attn.pp("k_proj").linear(h, c.num_key_value_heads * d, false)?,
            v_proj: attn.pp("v_proj").linear(h, c.num_key_value_heads * d, false)?,
            o_proj: attn.pp("o_proj").linear(c.num_attention_heads * d, h, false)?,
            q_norm: RmsNorm::load(&attn.pp("q_norm"), d, c.rms_norm_eps)?,
            k_norm: RmsNorm::load(&attn.pp("k_norm"), d, c.rms_norm_eps)?,
            attn_gate: gate("cross_attn_attn_gate")?,
            mlp_gate: gate("cross_attn_mlp_gate")?,
            post_attention_layernorm: RmsNorm::load(&vb.pp("post_attention_layernorm"), h, c.rms_norm_eps)?,
            mlp: Mlp::load(&vb.pp("mlp"), c)?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: d,
        })
    }

    /// Keys and values of the image states `[n, hidden]`, once per key/value head (not
    /// repeated for the query heads that share it): keys `[kv_heads, head_dim, n]`, already
    /// transposed for the score product, values `[kv_heads, n, head_dim]`.
    fn states(&self, states: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let n = states.dim(0)?;
        let (kv, d) = (self.kv_heads, self.head_dim);
        let k = self.k_norm.forward(&self.k_proj.forward(states)?.reshape((n * kv, d))?)?;
        let k = k.reshape((n, kv, d))?.permute((1, 2, 0))?.contiguous()?;
        let v = self.v_proj.forward(states)?.reshape((n, kv, d))?.transpose(0, 1)?.contiguous()?;
        Ok((k, v))
    }

    /// Each group of `heads / kv_heads` query heads attends to its key/value head in one
    /// product: the rows of the group's heads stacked, `[kv_heads, rep · t, head_dim]`.
    fn forward(&self, x: &Tensor, kv: &(Tensor, Tensor), mask: &CrossMask) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, d) = (self.heads, self.kv_heads, self.head_dim);
        let rep = heads / kv_heads;
        let q = self.q_norm.forward(&self.q_proj.forward(&self.input_layernorm.forward(x)?)?.reshape((t * heads, d))?)?;
        let q = q.reshape((t, kv_heads, rep, d))?.permute((1, 2, 0, 3))?.contiguous()?.reshape((kv_heads, rep * t, d))?;
        let n = kv.0.dim(2)?;
        let scores = (q.matmul(&kv.0)? * (1.0 / (d as f64).sqrt()))?.reshape((kv_heads, rep, t, n))?.broadcast_add(&mask.bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((kv_heads, rep * t, n))?;
        let y = probs.matmul(&kv.1)?.reshape((kv_heads, rep, t, d))?.permute((2, 0, 1, 3))?.reshape((b, t, heads * d))?;
        let x = (x + (self.o_proj.forward(&y)? * self.attn_gate)?)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        let h = h.broadcast_mul(&mask.rows.reshape((1, (), 1))?)?;
        x + (h * self.mlp_gate)?
    }
}

/// The image states' keys and values for each cross-attention layer, computed once.
pub struct CrossStates {
    kv: Vec<Option<(Tensor, Tensor)>>,
}

/// Which image states each query row sees.
pub struct CrossMask {
    /// `[t, n]`: 0 where a row sees a state, a large negative number elsewhere; a row
    /// that sees no image at all is all 0, as transformers leaves it.
    bias: Tensor,
    /// `[t]`: 1 for rows that see an image, 0 for the rest (their MLP output is dropped).
    rows: Tensor,
}

impl CrossMask {
    /// From each row's view of the `n` image states.
    pub fn new(visible: &[Vec<bool>]) -> candle_core::Result<Self> {
        let n = visible.first().map_or(0, Vec::len);
        let mut bias = Vec::with_capacity(visible.len() * n);
        let mut rows = Vec::with_capacity(visible.len());
        for row in visible {
            let any = row.iter().any(|&v| v);
            bias.extend(row.iter().map(|&v| if v || !any { 0.0f32 } else { f32::MIN }));
            rows.push(if any { 1.0f32 } else { 0.0 });
        }
        let t = visible.len();
        Ok(CrossMask { bias: Tensor::from_vec(bias, (t, n), &Device::Cpu)?, rows: Tensor::from_vec(rows, t, &Device::Cpu)? })
    }
}

/// What a request's decode steps need to keep attending to its images.
pub struct CrossContext {
    pub states: CrossStates,
    /// The last prompt row's view of the images, which every generated token shares.
    pub decode: CrossMask,
}

/// A decoder layer: attending to the text, or (Llama 3.2 Vision) to the image.
enum Layer {
    Decoder(Block),
    Cross(CrossBlock),
}

/// Where the rows of one forward pass sit.
#[derive(Clone, Copy)]
enum Positions<'a> {
    /// `start`, `start + 1`, ...: the rows follow what the cache holds.
    From(usize),
    /// One per row, from the caller (M-RoPE).
    Given(&'a [Position]),
}

impl Positions<'_> {
    fn get(&self, row: usize) -> Position {
        match self {
            Positions::From(start) => [(start + row) as u32; 3],
            Positions::Given(p) => p[row],
        }
    }
}

/// Rotary position embeddings: cos/sin tables computed once for every position.
struct Rope {
    /// `[positions, head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    style: RopeStyle,
    /// For each frequency pair, the component of a [`Position`] it rotates by: all 0 for
    /// plain RoPE, runs of 0, 1, 2 as long as `mrope_section` says for M-RoPE.
    component: Vec<usize>,
}

/// transformers' `_compute_llama3_parameters` for one frequency, in f32 as it computes.
fn llama3_frequency(f: f32, l: Llama3Rope) -> f32 {
    let (factor, low, high, context) = (l.factor as f32, l.low_freq_factor as f32, l.high_freq_factor as f32, l.original_context as f32);
    let wavelen = 2.0 * std::f32::consts::PI / f;
    let (low_wavelen, high_wavelen) = (context / low, context / high);
    if wavelen > low_wavelen {
        return f / factor;
    }
    if wavelen < high_wavelen {
        return f;
    }
    let smooth = (context / wavelen - low) / (high - low);
    (1.0 - smooth) * f / factor + smooth * f
}

impl Rope {
    /// The table for RoPE base `theta`, positions divided by `factor` (linear scaling).
    fn new(c: &LlamaConfig, theta: f64, factor: f64) -> Result<Self> {
        let half = c.head_dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf(2.0 * i as f32 / c.head_dim as f32) / factor as f32)
            .collect();
        if let Some(l) = c.rope_llama3 {
            inv_freq.iter_mut().for_each(|f| *f = llama3_frequency(*f, l));
        }
        let n = c.max_position_embeddings;
        let freqs: Vec<f32> = (0..n).flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f)).collect();
        let component = match c.mrope_section {
            Some(runs) => runs.iter().enumerate().flat_map(|(k, &n)| std::iter::repeat_n(k, n)).collect(),
            None => vec![0; half],
        };
        Ok(Rope {
            cos: freqs.iter().map(|x| x.cos()).collect(),
            sin: freqs.iter().map(|x| x.sin()).collect(),
            style: c.rope_style,
            component,
        })
    }

    /// Rotates `x` (`[t, heads, d]`, row `r` at position `pos.get(r)`) in place. Pair `i`
    /// turns by its frequency times its component of the position: one table serves
    /// plain RoPE and M-RoPE alike.
    fn apply(&self, x: &mut [f32], heads: usize, d: usize, pos: Positions) {
        let half = d / 2;
        for (r, head) in x.chunks_exact_mut(d).enumerate() {
            let p = pos.get(r / heads);
            for (i, &k) in self.component.iter().enumerate() {
                let at = p[k] as usize * half + i;
                let (a, b) = match self.style {
                    RopeStyle::Half => (i, i + half),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * self.cos[at] - x1 * self.sin[at];
                head[b] = x0 * self.sin[at] + x1 * self.cos[at];
            }
        }
    }
}

pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// RoPE tables: the model's; for Gemma, the global layers' then the sliding layers'.
    ropes: Vec<Rope>,
    /// Gemma multiplies token embeddings by √hidden.
    embed_scale: Option<f64>,
    pub config: LlamaConfig,
    /// What the KV cache holds: f16 when the weights are quantized (llama.cpp's default,
    /// and half the memory read per token), f32 when they are floats; callers may override.
    pub kv_dtype: KvType,
}

impl Llama {
    /// `vb` holds `embed_tokens`, `layers.*` and `norm`; `vb_head` holds `lm_head` (the two
    /// sit under different prefixes in every checkpoint layout).
    pub fn load(vb: &Vb, vb_head: &Vb, config: &LlamaConfig) -> Result<Self> {
        let c = config;
        let embed_tokens = Embedding::load(&vb.pp("embed_tokens"), c.vocab_size + c.extra_embeddings, c.hidden_size)?;
        if let Some(g) = &c.gemma {
            if g.windows.len() != c.num_hidden_layers {
                return Err(ModelError::Config(format!("{} layer types for {} layers", g.windows.len(), c.num_hidden_layers)));
            }
        }
        let layers = (0..c.num_hidden_layers)
            .map(|i| match c.cross_attention_layers.contains(&i) {
                true => CrossBlock::load(&vb.pp("layers").pp(i), c).map(Layer::Cross),
                false => Block::load(&vb.pp("layers").pp(i), c, i).map(Layer::Decoder),
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if vb_head.contains("lm_head.weight") && !c.tie_word_embeddings {
            vb_head.pp("lm_head").linear(c.hidden_size, c.vocab_size, false)?
        } else {
            embed_tokens.as_linear(vb.products_on())?
        };
        let quantized = layers.iter().any(|l| matches!(l, Layer::Decoder(b) if b.self_attn.q_proj.is_quantized()));
        Ok(Llama {
            kv_dtype: if quantized { KvType::F16 } else { KvType::F32 },
            embed_tokens,
            layers,
            norm: gemma_norm(&vb.pp("norm"), c.hidden_size, c)?,
            lm_head,
            ropes: match &c.gemma {
                Some(g) => vec![Rope::new(c, c.rope_theta, g.global_rope_factor)?, Rope::new(c, g.local_rope_theta, 1.0)?],
                None => vec![Rope::new(c, c.rope_theta, 1.0)?],
            },
            embed_scale: c.gemma.as_ref().map(|_| (c.hidden_size as f64).sqrt()),
            config: c.clone(),
        })
    }

    pub fn new_cache(&self) -> KvCache {
        let c = &self.config;
        KvCache::new(self.layers.len(), c.num_key_value_heads, c.head_dim, self.kv_dtype)
    }

    /// `ids` → `[n, hidden]` embeddings.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, &Device::Cpu)?;
        let x = self.embed_tokens.forward(&ids)?;
        Ok(match self.embed_scale {
            // In the embeddings' dtype, as transformers rounds it.
            Some(scale) => (x * f64::from(scale as f32))?,
            None => x,
        })
    }

    /// Runs `embeds` (`[t, hidden]`) after what the cache holds and returns the logits of
    /// the last position, `[vocab]`.
    pub fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        // A request with images (Llama 3.2 Vision) keeps attending to them.
        let Some(cross) = cache.cross.take() else {
            return self.run(embeds, cache, Positions::From(cache.next_position()), &[]);
        };
        // The one decode row broadcasts over however many rows come.
        let out = self.run_with(embeds, cache, Positions::From(cache.next_position()), &[], Some((&cross.states, &cross.decode)));
        cache.cross = Some(cross);
        out
    }

    /// [`Llama::forward`] where `blocks` (absolute positions) are runs whose rows see
    /// each other whole: Gemma 3's images attend bidirectionally within themselves.
    pub fn forward_with_blocks(&self, embeds: &Tensor, cache: &mut KvCache, blocks: &[Range<usize>]) -> Result<Tensor> {
        self.run(embeds, cache, Positions::From(cache.next_position()), blocks)
    }

    /// [`Llama::forward`] with each row's position given (`positions[r]` for row `r`), as
    /// M-RoPE needs: image tokens sit at (t, row, column) positions, and the text after an
    /// image continues from where the image's positions end, not from the cache length.
    pub fn forward_at(&self, embeds: &Tensor, cache: &mut KvCache, positions: &[Position]) -> Result<Tensor> {
        let t = embeds.dim(0)?;
        if positions.len() != t {
            return Err(ModelError::Mismatch(format!("{} positions for {t} embeddings", positions.len())));
        }
        let limit = self.config.max_position_embeddings;
        if let Some(p) = positions.iter().flatten().find(|&&p| p as usize >= limit) {
            return Err(ModelError::Config(format!("position {p} exceeds the model's context of {limit}")));
        }
        self.run(embeds, cache, Positions::Given(positions), &[])
    }

    /// The image states' keys and values for every cross-attention layer (Llama 3.2
    /// Vision); `states` is `[n, hidden]`.
    pub fn cross_states(&self, states: &Tensor) -> Result<CrossStates> {
        let kv = self
            .layers
            .iter()
            .map(|l| match l {
                Layer::Cross(c) => c.states(states).map(Some),
                Layer::Decoder(_) => Ok(None),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(CrossStates { kv })
    }

    /// [`Llama::forward`] with the cross-attention layers attending to `cross` as `mask`
    /// says (one mask row per embedding).
    pub fn forward_cross(&self, embeds: &Tensor, cache: &mut KvCache, cross: &CrossStates, mask: &CrossMask) -> Result<Tensor> {
        self.run_with(embeds, cache, Positions::From(cache.next_position()), &[], Some((cross, mask)))
    }

    fn run(&self, embeds: &Tensor, cache: &mut KvCache, pos: Positions, blocks: &[Range<usize>]) -> Result<Tensor> {
        self.run_with(embeds, cache, pos, blocks, None)
    }

    fn run_with(&self, embeds: &Tensor, cache: &mut KvCache, pos: Positions, blocks: &[Range<usize>], cross: Option<(&CrossStates, &CrossMask)>) -> Result<Tensor> {
        let t = embeds.dim(0)?;
        if cache.len() + t > self.config.max_position_embeddings {
            return Err(ModelError::Config(format!(
                "sequence of {} positions exceeds the model's context of {}",
                cache.len() + t,
                self.config.max_position_embeddings
            )));
        }
        let mut x = embeds.unsqueeze(0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = match (layer, cross) {
                (Layer::Decoder(b), _) => b.forward(&x, &self.ropes, pos, cache, i, blocks)?,
                (Layer::Cross(c), Some((states, mask))) => match &states.kv[i] {
                    Some(kv) => c.forward(&x, kv, mask)?,
                    None => return Err(ModelError::Mismatch(format!("no image states for cross-attention layer {i}"))),
                },
                // Without an image the cross-attention layers are skipped, as in transformers.
                (Layer::Cross(_), None) => x,
            };
        }
        cache.advance(t);
        let last = x.narrow(1, t - 1, 1)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?)
    }

    pub fn hidden_size(&self) -> usize {
        self.embed_tokens.dim()
    }

    pub fn context_length(&self) -> usize {
        self.config.max_position_embeddings
    }
}
