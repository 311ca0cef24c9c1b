//! The CLIP vision transformer (ViT) that LLaVA uses as its vision tower: patch
//! embedding, a class token, learned position embeddings, pre-norm encoder layers.
//! It returns the hidden states of the layer the VLM config selects, not the pooled output.

use candle_core::Tensor;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::layers::LayerNorm;
use crate::linear::{Linear, LinearWeight};
use crate::weights::{GgufNames, Vb};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    GeluTanh,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
            other => Err(ModelError::Config(format!("activation `{other}` is not supported"))),
        }
    }

    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::QuickGelu => x.to_dtype(candle_core::DType::F32)?.contiguous()?.apply_op1_no_bwd(&Pointwise(seer_kernels::quick_gelu)),
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.to_dtype(candle_core::DType::F32)?.contiguous()?.apply_op1_no_bwd(&Pointwise(seer_kernels::gelu_tanh)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
    /// How many encoder layers to run: the selected feature layer's depth.
    pub layers_to_run: usize,
}

impl ClipVisionConfig {
    /// From a Hugging Face `vision_config` and the VLM's `vision_feature_layer`
    /// (negative counts from the end, as in `hidden_states[layer]`).
    pub fn from_hf(v: &Value, feature_layer: i64) -> Result<Self> {
        let get = |k: &str, default: Option<usize>| {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .or(default)
                .ok_or_else(|| ModelError::Config(format!("vision config has no integer `{k}`")))
        };
        let n_layers = get("num_hidden_layers", Some(12))?;
        // hidden_states has n_layers + 1 entries: the embeddings, then each layer's output.
        let depth = if feature_layer < 0 { n_layers as i64 + 1 + feature_layer } else { feature_layer };
        if depth < 0 || depth > n_layers as i64 {
            return Err(ModelError::Config(format!(
                "vision_feature_layer {feature_layer} is out of range for {n_layers} layers"
            )));
        }
        let act = v.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu");
        Ok(ClipVisionConfig {
            hidden_size: get("hidden_size", Some(768))?,
            intermediate_size: get("intermediate_size", Some(3072))?,
            num_attention_heads: get("num_attention_heads", Some(12))?,
            image_size: get("image_size", Some(224))?,
            patch_size: get("patch_size", Some(32))?,
            layer_norm_eps: v.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-5),
            hidden_act: Activation::from_name(act)?,
            layers_to_run: depth as usize,
        })
    }

    /// From an mmproj file's `clip.vision.*` metadata. llama.cpp's converters store only
    /// the layers up to the selected feature layer, so all of them run.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let k = |s: &str| format!("clip.vision.{s}");
        let gelu = f.opt_bool("clip.use_gelu").unwrap_or(false);
        let blocks = f.get_u32(&k("block_count"))? as usize;
        let layers_to_run = match f.get(&k("feature_layer")) {
            Some(v) => max_feature_layer(v).unwrap_or(blocks).min(blocks),
            None => blocks,
        };
        Ok(ClipVisionConfig {
            hidden_size: f.get_u32(&k("embedding_length"))? as usize,
            intermediate_size: f.get_u32(&k("feed_forward_length"))? as usize,
            num_attention_heads: f.get_u32(&k("attention.head_count"))? as usize,
            image_size: f.get_u32(&k("image_size"))? as usize,
            patch_size: f.get_u32(&k("patch_size"))? as usize,
            layer_norm_eps: f.opt_f32(&k("attention.layer_norm_epsilon")).unwrap_or(1e-5) as f64,
            hidden_act: if gelu { Activation::Gelu } else { Activation::QuickGelu },
            layers_to_run,
        })
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

fn max_feature_layer(v: &crate::gguf::GgufValue) -> Option<usize> {
    let items = v.to_vec().ok()?;
    items.iter().filter_map(|x| x.to_i32().ok().or_else(|| x.to_u32().ok().map(|u| u as i32))).max().map(|m| m as usize)
}

/// llama.cpp's mmproj names for the CLIP tensors under `vision_model`.
pub const GGUF_NAMES: GgufNames = GgufNames {
    whole: &[
        ("embeddings.patch_embedding.weight", "v.patch_embd.weight"),
        ("embeddings.patch_embedding.bias", "v.patch_embd.bias"),
        ("embeddings.class_embedding", "v.class_embd"),
        ("embeddings.position_embedding.weight", "v.position_embd.weight"),
        ("pre_layrnorm.weight", "v.pre_ln.weight"),
        ("pre_layrnorm.bias", "v.pre_ln.bias"),
    ],
    layers: "encoder.layers",
    blocks: "v.blk",
    modules: &[
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.out_proj", "attn_out"),
        ("layer_norm1", "ln1"),
        ("layer_norm2", "ln2"),
        ("mlp.fc1", "ffn_up"),
        ("mlp.fc2", "ffn_down"),
    ],
};

/// llama.cpp's legacy LLaVA converter wrote fc1 as `ffn_down` and fc2 as `ffn_up`;
/// llama.cpp detects such files by shape, and so does seer. For them, the two names swap
/// before mapping.
pub fn swap_fc(hf: &str) -> String {
    swap_parts(hf, ".mlp.fc1.", ".mlp.fc2.")
}

/// `name` with `a` written as `b`, or else `b` as `a`.
pub(crate) fn swap_parts(name: &str, a: &str, b: &str) -> String {
    if name.contains(a) {
        name.replace(a, b)
    } else {
        name.replace(b, a)
    }
}

/// One pre-norm encoder layer; SigLIP (Idefics3's vision tower) has the same layers and names.
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

impl EncoderLayer {
    pub(crate) fn load(vb: &Vb, c: &ClipVisionConfig) -> Result<Self> {
        let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        let attn = vb.pp("self_attn");
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), h, eps)?,
            q_proj: attn.pp("q_proj").linear(h, h, true)?,
            k_proj: attn.pp("k_proj").linear(h, h, true)?,
            v_proj: attn.pp("v_proj").linear(h, h, true)?,
            out_proj: attn.pp("out_proj").linear(h, h, true)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), h, eps)?,
            fc1: vb.pp("mlp").pp("fc1").linear(h, i, true)?,
            fc2: vb.pp("mlp").pp("fc2").linear(i, h, true)?,
            heads: c.num_attention_heads,
            act: c.hidden_act,
        })
    }

    /// `x` is `[b, n, hidden]`; `mask` (`[b, 1, 1, n]`) is added to the attention scores,
    /// so that a very negative entry keeps every query off that patch (padding).
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = self.attention(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?)?)?;
        x + h
    }

    fn attention(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        // The bf16 kernel takes no mask: tiles with padding take this path.
        if self.q_proj.is_bf16() && mask.is_none() {
            return self.attention_bf16(x);
        }
        let (b, n, hidden) = x.dims3()?;
        let d = hidden / self.heads;
        let split = |y: Tensor| y.reshape((b, n, self.heads, d))?.transpose(1, 2)?.contiguous();
        let q = (split(self.q_proj.forward(x)?)? * (1.0 / (d as f64).sqrt()))?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, hidden))?;
        self.out_proj.forward(&y)
    }
}

impl EncoderLayer {
    /// The same attention with both products in bf16 (seer-kernels), for towers whose
    /// matrices run in bf16 too; queries, keys and values stay in the projections' layout.
    fn attention_bf16(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, hidden) = x.dims3()?;
        let d = hidden / self.heads;
        let rows = |y: Tensor| y.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (q, k, v) = (rows(self.q_proj.forward(x)?)?, rows(self.k_proj.forward(x)?)?, rows(self.v_proj.forward(x)?)?);
        let mut y = vec![0f32; q.len()];
        let per_image = n * hidden;
        for i in 0..b {
            let r = i * per_image..(i + 1) * per_image;
            seer_kernels::attention_bf16(&q[r.clone()], &k[r.clone()], &v[r.clone()], [n, self.heads, d], 1.0 / (d as f32).sqrt(), &mut y[r]);
        }
        self.out_proj.forward(&Tensor::from_vec(y, (b, n, hidden), x.device())?)
    }
}

/// An activation in one vectorized pass (seer-kernels' quick GELU or tanh GELU) instead
/// of candle's several.
struct Pointwise(fn(&[f32], &mut [f32]));

impl candle_core::CustomOp1 for Pointwise {
    fn name(&self) -> &'static str {
        "seer-pointwise"
    }

    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("seer-pointwise: f32 input expected");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("seer-pointwise: input is not contiguous");
        };
        let mut out = vec![0f32; end - start];
        (self.0)(&data[start..end], &mut out);
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `embeddings.patch_embedding` (`[hidden, 3, p, p]`, bias optional) as a [`Linear`]: a
/// stride-p convolution over p×p patches is a matrix product over flattened patches.
pub(crate) fn patch_embedding(emb: &Vb, hidden: usize, p: usize) -> Result<Linear> {
    let conv = emb.tensor_shaped("patch_embedding.weight", &[hidden, 3, p, p])?;
    let bias = if emb.contains("patch_embedding.bias") { Some(emb.tensor("patch_embedding.bias")?) } else { None };
    Ok(Linear::new(LinearWeight::Dense(conv.reshape((hidden, 3 * p * p))?), bias))
}

/// `[b, c, H, W]` → `[b, (H/p)·(W/p), c·p·p]`: the patches row-major, each flattened in
/// the convolution weight's (channel, row, column) order.
pub(crate) fn patchify(pixels: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    let (b, c, hgt, wid) = pixels.dims4()?;
    let (gh, gw) = (hgt / p, wid / p);
    pixels
        .reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b, gh * gw, c * p * p))
}

pub struct ClipVisionTransformer {
    patch_embedding: Linear,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    pub config: ClipVisionConfig,
}

impl ClipVisionTransformer {
    /// `vb` points at `vision_model` (HF) or is the mapped mmproj file.
    pub fn load(vb: &Vb, c: &ClipVisionConfig) -> Result<Self> {
        let (h, p) = (c.hidden_size, c.patch_size);
        let emb = vb.pp("embeddings");
        let patch_embedding = patch_embedding(&emb, h, p)?;
        let layers = (0..c.layers_to_run)
            .map(|i| EncoderLayer::load(&vb.pp("encoder.layers").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVisionTransformer {
            patch_embedding,
            class_embedding: emb.tensor_shaped("class_embedding", &[h])?,
            position_embedding: emb.tensor_shaped("position_embedding.weight", &[c.num_patches() + 1, h])?,
            pre_layrnorm: LayerNorm::load(&vb.pp("pre_layrnorm"), h, c.layer_norm_eps)?,
            layers,
            config: c.clone(),
        })
    }

    /// `pixels` is `[b, 3, size, size]`; returns the selected layer's hidden states,
    /// `[b, 1 + patches, hidden]` (class token first).
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixels.dim(0)?;
        let x = self.patch_embedding.forward(&patchify(pixels, self.config.patch_size)?)?;
        let hidden = x.dim(2)?;
        let cls = self.class_embedding.reshape((1, 1, hidden))?.repeat((b, 1, 1))?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmproj_names_follow_llama_cpp() {
        assert_eq!(GGUF_NAMES.map("encoder.layers.3.mlp.fc1.weight").unwrap(), "v.blk.3.ffn_up.weight");
        assert_eq!(GGUF_NAMES.map(&swap_fc("encoder.layers.3.mlp.fc1.weight")).unwrap(), "v.blk.3.ffn_down.weight");
        assert_eq!(GGUF_NAMES.map(&swap_fc("encoder.layers.0.mlp.fc2.bias")).unwrap(), "v.blk.0.ffn_up.bias");
        assert_eq!(GGUF_NAMES.map("encoder.layers.10.self_attn.out_proj.bias").unwrap(), "v.blk.10.attn_out.bias");
        assert_eq!(GGUF_NAMES.map("embeddings.class_embedding").unwrap(), "v.class_embd");
        assert_eq!(GGUF_NAMES.map("post_layernorm.weight"), None);
        assert_eq!(crate::llama::GGUF_NAMES.map("layers.7.post_attention_layernorm.weight").unwrap(), "blk.7.ffn_norm.weight");
    }
}
