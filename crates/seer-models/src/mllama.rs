//! Llama 3.2 Vision (`MllamaForConditionalGeneration`), its vision side: the tiled
//! vision encoder (aspect-ratio and tile position embeddings, gated; a local encoder whose
//! chosen layers' outputs are kept, a gated global encoder) and the projector that makes
//! the decoder's cross-attention states. The decoder and its cross-attention layers are
//! the one Llama decoder's (`llama.rs`).

use candle_core::{Tensor, D};
use candle_nn::ops::softmax_last_dim;
use serde_json::Value;

use crate::clip;
use crate::error::{ModelError, Result};
use crate::layers::LayerNorm;
use crate::linear::Linear;
use crate::weights::Vb;

#[derive(Debug, Clone)]
pub struct MllamaVisionConfig {
    pub hidden_size: usize,
    pub heads: usize,
    pub layers: usize,
    pub global_layers: usize,
    pub intermediate_size: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub max_tiles: usize,
    pub norm_eps: f64,
    /// Local layers whose outputs join the final features.
    pub intermediate_layers: Vec<usize>,
    /// Aspect-ratio ids run from 1 to this (0 is padding).
    pub max_aspect_ratio_id: usize,
}

impl MllamaVisionConfig {
    pub fn from_hf(v: &Value) -> Result<Self> {
        let get = |k: &str, d: usize| v.get(k).and_then(Value::as_u64).map_or(d, |x| x as usize);
        let intermediate_layers: Vec<usize> = v
            .get("intermediate_layers_indices")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect())
            .unwrap_or_else(|| vec![3, 7, 15, 23, 30]);
        let c = MllamaVisionConfig {
            hidden_size: get("hidden_size", 1280),
            heads: get("attention_heads", 16),
            layers: get("num_hidden_layers", 32),
            global_layers: get("num_global_layers", 8),
            intermediate_size: get("intermediate_size", 5120),
            image_size: get("image_size", 448),
            patch_size: get("patch_size", 14),
            max_tiles: get("max_num_tiles", 4),
            norm_eps: v.get("norm_eps").and_then(Value::as_f64).unwrap_or(1e-5),
            max_aspect_ratio_id: v.get("supported_aspect_ratios").and_then(Value::as_array).map_or(8, Vec::len),
            intermediate_layers,
        };
        if let Some(bad) = c.intermediate_layers.iter().find(|&&i| i >= c.layers) {
            return Err(ModelError::Config(format!("intermediate layer {bad} of a {}-layer vision encoder", c.layers)));
        }
        Ok(c)
    }

    /// Patches of one tile, the class token included.
    pub fn tile_tokens(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    /// The width of the encoder's output: the final features and every kept layer's.
    pub fn output_dim(&self) -> usize {
        self.hidden_size * (1 + self.intermediate_layers.len())
    }
}

/// `MllamaVisionEncoderLayer`; gated in the global encoder.
struct EncoderLayer {
    input_layernorm: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    /// tanh of the attention and MLP gates.
    gates: Option<(f64, f64)>,
}

fn gate(vb: &Vb, name: &str) -> Result<f64> {
    Ok(f64::from(vb.tensor_shaped(name, &[1])?.to_vec1::<f32>()?[0]).tanh())
}

impl EncoderLayer {
    fn load(vb: &Vb, c: &MllamaVisionConfig, gated: bool) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let attn = vb.pp("self_attn");
        Ok(EncoderLayer {
            input_layernorm: LayerNorm::load(&vb.pp("input_layernorm"), h, c.norm_eps)?,
            q_proj: attn.pp("q_proj").linear(h, h, false)?,
            k_proj: attn.pp("k_proj").linear(h, h, false)?,
            v_proj: attn.pp("v_proj").linear(h, h, false)?,
            o_proj: attn.pp("o_proj").linear(h, h, false)?,
            post_attention_layernorm: LayerNorm::load(&vb.pp("post_attention_layernorm"), h, c.norm_eps)?,
            fc1: vb.pp("mlp.fc1").linear(h, i, true)?,
            fc2: vb.pp("mlp.fc2").linear(i, h, true)?,
            heads: c.heads,
            gates: if gated { Some((gate(vb, "gate_attn")?, gate(vb, "gate_ffn")?)) } else { None },
        })
    }

    /// `x` is `[seq, hidden]` with the `real` positions first and the padding after them:
    /// real positions attend to every position, padding only to the real ones (transformers
    /// masks padding-to-padding).
    fn forward(&self, x: &Tensor, real: usize) -> candle_core::Result<Tensor> {
        let seq = x.dim(0)?;
        let h = self.input_layernorm.forward(x)?;
        let (q, k, v) = (self.q_proj.forward(&h)?, self.k_proj.forward(&h)?, self.v_proj.forward(&h)?);
        let bf16 = self.q_proj.is_bf16();
        let mut y = attend(&q.narrow(0, 0, real)?, &k, &v, self.heads, bf16)?;
        if seq > real {
            let pad = attend(&q.narrow(0, real, seq - real)?, &k.narrow(0, 0, real)?, &v.narrow(0, 0, real)?, self.heads, bf16)?;
            y = Tensor::cat(&[&y, &pad], 0)?;
        }
        let mut attn = self.o_proj.forward(&y)?;
        if let Some((g, _)) = self.gates {
            attn = (attn * g)?;
        }
        let x = (x + attn)?;
        let mut mlp = self.fc2.forward(&self.fc1.forward(&self.post_attention_layernorm.forward(&x)?)?.gelu_erf()?)?;
        if let Some((_, g)) = self.gates {
            mlp = (mlp * g)?;
        }
        x + mlp
    }
}

/// `softmax(q·kᵀ/√d)·v` per head, `q` `[tq, hidden]` over `k`, `v` `[tk, hidden]`, with no
/// mask: bf16 products in one fused kernel (no `tq × tk` matrix for all heads at once:
/// 4 tiles of 1608 positions would make it 2.6 GB), or candle's f32 products.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, bf16: bool) -> candle_core::Result<Tensor> {
    let ((tq, hidden), tk) = (q.dims2()?, k.dim(0)?);
    let d = hidden / heads;
    let scale = 1.0 / (d as f64).sqrt();
    if bf16 {
        let rows = |x: &Tensor| x.flatten_all()?.to_vec1::<f32>();
        let mut y = vec![0f32; tq * hidden];
        seer_kernels::cross_attention_bf16(&rows(q)?, &rows(k)?, &rows(v)?, [tq, tk, heads, d], scale as f32, &mut y);
        return Tensor::from_vec(y, (tq, hidden), q.device());
    }
    let split = |y: &Tensor, n: usize| y.reshape((n, heads, d))?.transpose(0, 1)?.contiguous();
    let scores = (split(q, tq)?.matmul(&split(k, tk)?.t()?)? * scale)?;
    softmax_last_dim(&scores)?.matmul(&split(v, tk)?)?.transpose(0, 1)?.reshape((tq, hidden))
}

/// An embedding per aspect-ratio id, one vector per tile (`pre_`/`post_tile_positional_embedding`), gated.
struct TileEmbedding {
    table: Tensor,
    gate: f64,
}

impl TileEmbedding {
    fn load(vb: &Vb, c: &MllamaVisionConfig) -> Result<Self> {
        Ok(TileEmbedding {
            table: vb.tensor_shaped("embedding.weight", &[c.max_aspect_ratio_id + 1, c.max_tiles * c.hidden_size])?,
            gate: gate(vb, "gate")?,
        })
    }

    /// Adds each tile's vector to `x`, `[tiles, patches, hidden]`.
    fn add(&self, x: &Tensor, aspect_ratio_id: usize) -> candle_core::Result<Tensor> {
        let (tiles, _, hidden) = x.dims3()?;
        let e = (self.table.get(aspect_ratio_id)?.reshape((tiles, 1, hidden))? * self.gate)?;
        x.broadcast_add(&e)
    }
}

pub struct MllamaVision {
    patch_embedding: Linear,
    class_embedding: Tensor,
    pre_tile: TileEmbedding,
    post_tile: TileEmbedding,
    /// `gated_positional_embedding`: per-patch positions, and per-tile positions by
    /// aspect ratio, mixed by the gate.
    position: Tensor,
    tile_position: Tensor,
    position_gate: f64,
    layernorm_pre: LayerNorm,
    layernorm_post: LayerNorm,
    layers: Vec<EncoderLayer>,
    global_layers: Vec<EncoderLayer>,
    pub config: MllamaVisionConfig,
}

impl MllamaVision {
    /// `vb` points at `vision_model`.
    pub fn load(vb: &Vb, c: &MllamaVisionConfig) -> Result<Self> {
        let (h, n) = (c.hidden_size, c.tile_tokens());
        let pos = vb.pp("gated_positional_embedding");
        let layers = |name: &str, count: usize, gated: bool| (0..count).map(|i| EncoderLayer::load(&vb.pp(name).pp("layers").pp(i), c, gated)).collect::<Result<Vec<_>>>();
        Ok(MllamaVision {
            patch_embedding: clip::patch_embedding(vb, h, c.patch_size)?,
            class_embedding: vb.tensor_shaped("class_embedding", &[h])?,
            pre_tile: TileEmbedding::load(&vb.pp("pre_tile_positional_embedding"), c)?,
            post_tile: TileEmbedding::load(&vb.pp("post_tile_positional_embedding"), c)?,
            position: pos.tensor_shaped("embedding", &[n, h])?,
            tile_position: pos.tensor_shaped("tile_embedding.weight", &[c.max_aspect_ratio_id + 1, c.max_tiles * n * h])?,
            position_gate: gate(&pos, "gate")?,
            layernorm_pre: LayerNorm::load(&vb.pp("layernorm_pre"), h, c.norm_eps)?,
            layernorm_post: LayerNorm::load(&vb.pp("layernorm_post"), h, c.norm_eps)?,
            layers: layers("transformer", c.layers, false)?,
            global_layers: layers("global_transformer", c.global_layers, true)?,
            config: c.clone(),
        })
    }

    /// One image: `tiles` (`[real tiles, 3, size, size]`) of its `max_tiles`, the rest
    /// zeros; returns `[max_tiles, tile_tokens, output_dim]`. As in transformers, the
    /// padding tiles and the padding that rounds a tile up to 8 positions are attended
    /// to by real positions (only padding-to-padding is masked), so they are computed.
    pub fn encode(&self, tiles: &Tensor, aspect_ratio_id: usize) -> Result<Tensor> {
        let c = &self.config;
        let (real, _, size, _) = tiles.dims4()?;
        if real == 0 || real > c.max_tiles || size != c.image_size || aspect_ratio_id == 0 || aspect_ratio_id > c.max_aspect_ratio_id {
            return Err(ModelError::Mismatch(format!("an image of {real} tiles of {size} px (aspect ratio {aspect_ratio_id}) for a tower of up to {} tiles of {} px", c.max_tiles, c.image_size)));
        }
        let (t, h, n) = (c.max_tiles, c.hidden_size, c.tile_tokens());
        let pad_tiles = Tensor::zeros((t - real, 3, size, size), tiles.dtype(), tiles.device())?;
        let pixels = Tensor::cat(&[tiles, &pad_tiles], 0)?;
        let x = self.patch_embedding.forward(&clip::patchify(&pixels, c.patch_size)?)?;
        let x = self.pre_tile.add(&x, aspect_ratio_id)?;
        let cls = self.class_embedding.reshape((1, 1, h))?.broadcast_as((t, 1, h))?;
        let x = Tensor::cat(&[&cls.contiguous()?, &x], 1)?;
        let x = x.broadcast_add(&(&self.position * (1.0 - self.position_gate))?.unsqueeze(0)?)?;
        let tile_pos = (self.tile_position.get(aspect_ratio_id)?.reshape((t, n, h))? * self.position_gate)?;
        let x = self.layernorm_pre.forward(&(x + tile_pos)?)?;
        // Each tile padded to a multiple of 8 positions; the encoder sees the real positions
        // first and the padding after them (`order`), and gives them back in tile order.
        let padded = n.next_multiple_of(8);
        let x = Tensor::cat(&[&x, &Tensor::zeros((t, padded - n, h), x.dtype(), x.device())?], 1)?.reshape((t * padded, h))?;
        let (order, real_rows) = real_first(t, real, n, padded);
        let inverse = inverse_permutation(&order);
        let (order, inverse) = (Tensor::new(order.as_slice(), x.device())?, Tensor::new(inverse.as_slice(), x.device())?);
        let mut x = x.index_select(&order, 0)?;
        let mut kept = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, real_rows)?;
            if c.intermediate_layers.contains(&i) {
                kept.push((i, x.clone()));
            }
        }
        let x = self.layernorm_post.forward(&x.index_select(&inverse, 0)?)?.reshape((t, padded, h))?;
        let mut x = self.post_tile.add(&x, aspect_ratio_id)?.reshape((t * padded, h))?.index_select(&order, 0)?;
        for layer in &self.global_layers {
            x = layer.forward(&x, real_rows)?;
        }
        // Kept layers in the config's order, interleaved channel by channel.
        let kept: Vec<Tensor> = c.intermediate_layers.iter().map(|i| kept.iter().find(|(j, _)| j == i).map(|(_, t)| t.clone())).collect::<Option<_>>().ok_or_else(|| ModelError::Config("an intermediate layer was not run".into()))?;
        let inter = Tensor::stack(&kept, D::Minus1)?.index_select(&inverse, 0)?.reshape((t, padded, h * kept.len()))?;
        let out = Tensor::cat(&[&x.index_select(&inverse, 0)?.reshape((t, padded, h))?, &inter], D::Minus1)?;
        Ok(out.narrow(1, 0, n)?)
    }
}

/// Positions of `tiles × padded` with the real ones (the first `tokens` of each of the
/// first `real` tiles) first, then the padding; and how many are real.
fn real_first(tiles: usize, real: usize, tokens: usize, padded: usize) -> (Vec<u32>, usize) {
    let is_real = |p: usize| p / padded < real && p % padded < tokens;
    let all = 0..(tiles * padded) as u32;
    let mut order: Vec<u32> = all.clone().filter(|&p| is_real(p as usize)).collect();
    let n_real = order.len();
    order.extend(all.filter(|&p| !is_real(p as usize)));
    (order, n_real)
}

fn inverse_permutation(order: &[u32]) -> Vec<u32> {
    let mut inverse = vec![0u32; order.len()];
    for (i, &p) in order.iter().enumerate() {
        inverse[p as usize] = i as u32;
    }
    inverse
}

/// The whole model: the vision encoder, the projector to the decoder's width, and the
/// decoder whose cross-attention layers read the projected image states.
pub struct Mllama {
    pub vision: MllamaVision,
    projector: Linear,
    pub language_model: crate::llama::Llama,
    pub image_token_id: u32,
}

const TEXT_PREFIXES: [&str; 2] = ["language_model.model", "model.language_model"];
const LM_HEAD_PREFIXES: [&str; 3] = ["language_model", "", "model"];
const VISION_PREFIXES: [&str; 2] = ["vision_model", "model.vision_model"];
const PROJECTOR_PREFIXES: [&str; 2] = ["multi_modal_projector", "model.multi_modal_projector"];

impl Mllama {
    pub fn load_hf(src: std::sync::Arc<crate::weights::SafetensorsSource>, config: &Value, plan: &crate::weights::LoadPlan) -> Result<Self> {
        use crate::llava::find_prefix;
        let empty = serde_json::json!({});
        let vision_cfg = MllamaVisionConfig::from_hf(config.get("vision_config").unwrap_or(&empty))?;
        let text_cfg = crate::llama::LlamaConfig::from_hf(config.get("text_config").unwrap_or(&empty), config)?;
        if text_cfg.cross_attention_layers.is_empty() {
            return Err(ModelError::Config("Llama 3.2 Vision's text_config names no cross_attention_layers".into()));
        }
        let text = find_prefix(&*src, &TEXT_PREFIXES, "embed_tokens.weight")?;
        let lm_head = find_prefix(&*src, &LM_HEAD_PREFIXES, "lm_head.weight")?;
        let vision = find_prefix(&*src, &VISION_PREFIXES, "class_embedding")?;
        let projector = find_prefix(&*src, &PROJECTOR_PREFIXES, "weight")?;
        let root = Vb::new(src);
        let at = |p: &str| if p.is_empty() { root.clone() } else { root.pp(p) };
        Ok(Mllama {
            vision: MllamaVision::load(&at(vision).for_vision(plan), &vision_cfg)?,
            projector: at(projector).for_vision(plan).linear(vision_cfg.output_dim(), text_cfg.hidden_size, true)?,
            language_model: crate::llama::Llama::load(&at(text).for_text(plan), &at(lm_head).for_text(plan), &text_cfg)?,
            image_token_id: config.get("image_token_index").and_then(Value::as_u64).unwrap_or(128256) as u32,
        })
    }

    /// One image's cross-attention states, `[max_tiles · tile_tokens, hidden]`.
    pub fn encode_image(&self, tiles: &Tensor, aspect_ratio_id: usize) -> Result<Tensor> {
        let out = self.vision.encode(tiles, aspect_ratio_id)?;
        let (t, n, d) = out.dims3()?;
        Ok(self.projector.forward(&out.reshape((t * n, d))?)?)
    }
}
