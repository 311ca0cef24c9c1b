//! Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL
//! (`Qwen2_5_VLForConditionalGeneration`): a ViT over 14×14×2 patches at the image's own
//! resolution, with 2-D rotary embeddings instead of learned positions; a merger that
//! folds each 2×2 block of patches into one token; and a Qwen2 decoder (the [`Llama`]
//! blocks with q/k/v biases) whose rotary embedding is M-RoPE: three position components
//! (temporal, height, width), so an image's tokens sit on a grid ([`mrope_positions`]).
//!
//! The two families differ only in the tower: Qwen2-VL has LayerNorm and a QuickGELU
//! fc1/fc2 MLP; Qwen2.5-VL has RMSNorm, a gated SiLU MLP with biases, and attends within
//! windows of `window_size` pixels except in `fullatt_block_indexes`. Either way, patches
//! attend only to patches of the same image (and frame).
//!
//! Both load from Hugging Face folders and from llama.cpp's GGUF files (a `qwen2vl` text
//! model plus a `qwen2vl_merger` / `qwen2.5vl_merger` mmproj, [`Qwen2Vl::load_gguf`]).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use seer_kernels::AttnShape;
use serde_json::Value;

use crate::clip::Activation;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::layers::{LayerNorm, RmsNorm};
use crate::linear::{Linear, LinearWeight};
use crate::llama::{self, Llama, LlamaConfig, Position};
use crate::llava::{self, find_prefix};
use crate::weights::{GgufNames, GgufSource, NameMap, SafetensorsSource, LoadPlan, Vb};

/// Which family: decides the tower's norms, MLP and attention pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Qwen2Vl,
    Qwen25Vl,
}

impl Variant {
    /// The family an mmproj's `clip.projector_type` names, if it is one of these.
    pub fn from_projector_type(mmproj: &GgufFile) -> Option<Self> {
        match mmproj.opt_str("clip.projector_type")? {
            "qwen2vl_merger" => Some(Variant::Qwen2Vl),
            "qwen2.5vl_merger" => Some(Variant::Qwen25Vl),
            _ => None,
        }
    }
}

/// The tower MLP's activation: CLIP's set, plus SiLU (Qwen2.5-VL).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VisionAct {
    Silu,
    Clip(Activation),
}

impl VisionAct {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "silu" => Ok(VisionAct::Silu),
            other => Activation::from_name(other).map(VisionAct::Clip),
        }
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            VisionAct::Silu => candle_nn::ops::silu(x),
            VisionAct::Clip(a) => a.apply(x),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Qwen2VlVisionConfig {
    pub variant: Variant,
    /// The tower's width (`embed_dim` in Qwen2-VL, `hidden_size` in Qwen2.5-VL).
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    /// Each block's MLP width (`embed_dim * mlp_ratio`, or `intermediate_size`).
    pub mlp_width: usize,
    /// The merger's output: the decoder's hidden size (`hidden_size`, or `out_hidden_size`).
    pub out_width: usize,
    pub act: VisionAct,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub rope_theta: f64,
    /// Qwen2.5-VL: the side of an attention window in merged tokens
    /// (`window_size / merge_size / patch_size`); 0 for Qwen2-VL.
    pub window_tokens: usize,
    /// Qwen2.5-VL: the blocks that attend over whole images rather than windows.
    pub fullatt_block_indexes: Vec<usize>,
}

fn usize_or(v: &Value, key: &str, default: usize) -> Result<usize> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| ModelError::Config(format!("vision_config.{key} must be a non-negative integer, got {x}"))),
    }
}

/// The MLP's activation as llama.cpp picks it: `clip.use_silu` (Qwen2.5-VL),
/// `clip.use_gelu` (tanh GELU in ggml), else quick GELU (Qwen2-VL).
fn gguf_vision_act(f: &GgufFile) -> VisionAct {
    if f.opt_bool("clip.use_silu") == Some(true) {
        VisionAct::Silu
    } else if f.opt_bool("clip.use_gelu") == Some(true) {
        VisionAct::Clip(Activation::GeluTanh)
    } else {
        VisionAct::Clip(Activation::QuickGelu)
    }
}

/// Whether the mmproj has its MLP's up and down matrices under each other's names (the
/// legacy Qwen2-VL surgery script wrote them so; llama.cpp tells by `ffn_down` taking
/// the tower's width as input, and so does seer), and the MLP's width.
fn gguf_ffn_layout(f: &GgufFile, width: usize) -> Result<(bool, usize)> {
    let name = "v.blk.0.ffn_down.weight";
    match f.tensor_shape(name)?[..] {
        [out, input] => Ok(if input == width { (true, out) } else { (false, input) }),
        ref other => Err(ModelError::Mismatch(format!("tensor `{name}` in {} has shape {other:?}, not a matrix", f.path().display()))),
    }
}

/// Qwen2.5-VL's full-attention blocks from `clip.vision.n_wa_pattern` n (the converter
/// requires `fullatt_block_indexes` to be n-1, 2n-1, ...): blocks i with (i + 1) % n == 0,
/// every block when n is 0 (no windows).
fn gguf_full_attention(f: &GgufFile, variant: Variant, depth: usize) -> Result<Vec<usize>> {
    if variant == Variant::Qwen2Vl {
        return Ok(vec![]);
    }
    let n = f.get_u32("clip.vision.n_wa_pattern")? as usize;
    Ok((0..depth).filter(|i| n == 0 || (i + 1) % n == 0).collect())
}

impl Qwen2VlVisionConfig {
    /// From `vision_config`; missing fields take transformers' defaults for `variant`.
    pub fn from_hf(v: &Value, variant: Variant) -> Result<Self> {
        let get = |k: &str, default: usize| usize_or(v, k, default);
        let (width, mlp_width, out_width, act, window_size) = match variant {
            Variant::Qwen2Vl => {
                let width = get("embed_dim", 1280)?;
                let ratio = v.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0);
                (width, (width as f64 * ratio) as usize, get("hidden_size", 3584)?, "quick_gelu", 0)
            }
            Variant::Qwen25Vl => {
                let out = get("out_hidden_size", 3584)?;
                (get("hidden_size", 3584)?, get("intermediate_size", 3420)?, out, "silu", get("window_size", 112)?)
            }
        };
        let (patch_size, merge_size) = (get("patch_size", 14)?, get("spatial_merge_size", 2)?);
        let fullatt = match (variant, v.get("fullatt_block_indexes")) {
            (Variant::Qwen2Vl, _) => vec![],
            (Variant::Qwen25Vl, None) => vec![7, 15, 23, 31],
            (Variant::Qwen25Vl, Some(list)) => serde_json::from_value(list.clone())
                .map_err(|e| ModelError::Config(format!("vision_config.fullatt_block_indexes: {e}")))?,
        };
        let c = Qwen2VlVisionConfig {
            variant,
            width,
            depth: get("depth", 32)?,
            heads: get("num_heads", 16)?,
            mlp_width,
            out_width,
            act: VisionAct::from_name(v.get("hidden_act").and_then(Value::as_str).unwrap_or(act))?,
            // The hub's 2024 configs call it `in_chans`.
            in_channels: get("in_channels", get("in_chans", 3)?)?,
            patch_size,
            temporal_patch_size: get("temporal_patch_size", 2)?,
            merge_size,
            rope_theta: v.pointer("/rope_parameters/rope_theta").and_then(Value::as_f64).unwrap_or(10000.0),
            window_tokens: window_size / merge_size.max(1) / patch_size.max(1),
            fullatt_block_indexes: fullatt,
        };
        c.check()?;
        Ok(c)
    }

    /// From a `qwen2vl_merger` / `qwen2.5vl_merger` mmproj. `feed_forward_length` is not
    /// read: the converter writes Qwen2-VL's output width there; the tensors' shapes say
    /// the MLP's width, as llama.cpp reads it.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let variant = Variant::from_projector_type(f).ok_or_else(|| ModelError::UnsupportedArchitecture {
            found: format!("projector type {:?} in {}", f.opt_str("clip.projector_type"), f.path().display()),
            supported: "qwen2vl_merger, qwen2.5vl_merger".into(),
        })?;
        let get = |k: &str| f.get_u32(&format!("clip.vision.{k}")).map(|x| x as usize);
        let (width, depth) = (get("embedding_length")?, get("block_count")?);
        let (patch_size, merge_size) = (get("patch_size")?, f.opt_u32("clip.vision.spatial_merge_size").unwrap_or(2) as usize);
        let c = Qwen2VlVisionConfig {
            variant,
            width,
            depth,
            heads: get("attention.head_count")?,
            mlp_width: gguf_ffn_layout(f, width)?.1,
            out_width: f.tensor_shape("mm.2.weight")?[0],
            act: gguf_vision_act(f),
            in_channels: 3,
            patch_size,
            // The converter splits the Conv3d into its two frames (see `Qwen2Vl::load_gguf`).
            temporal_patch_size: 2,
            merge_size,
            // llama.cpp's vision rope has this base, as transformers' default.
            rope_theta: 10000.0,
            // llama.cpp 0c1e57098 runs Qwen2.5-VL with 112-pixel windows whatever the
            // file says (the converter writes none), as the released models have.
            window_tokens: if variant == Variant::Qwen25Vl { 112 / merge_size.max(1) / patch_size.max(1) } else { 0 },
            fullatt_block_indexes: gguf_full_attention(f, variant, depth)?,
        };
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(ModelError::Config(format!("vision_config: {what}")));
        if [self.heads, self.patch_size, self.temporal_patch_size, self.merge_size].contains(&0) {
            return bad("num_heads, patch_size, temporal_patch_size and spatial_merge_size must not be zero");
        }
        // The 2-D rotary embedding gives a quarter of each head's dimensions to rows and
        // a quarter to columns, each rotated with its partner in the other half.
        if !self.width.is_multiple_of(self.heads) || !(self.width / self.heads).is_multiple_of(4) {
            return bad("the head size (width / num_heads) must be a multiple of 4");
        }
        if self.variant == Variant::Qwen25Vl && self.window_tokens == 0 {
            return bad("window_size must cover at least one merged patch");
        }
        Ok(())
    }

    /// Values in one flattened patch: `in_channels * temporal_patch_size * patch_size²`.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    fn head_dim(&self) -> usize {
        self.width / self.heads
    }
}

/// LayerNorm in Qwen2-VL's tower, RMSNorm in Qwen2.5-VL's; both hard-code eps 1e-6.
enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    fn load(vb: &Vb, dim: usize, variant: Variant) -> Result<Self> {
        Ok(match variant {
            Variant::Qwen2Vl => Norm::Layer(LayerNorm::load(vb, dim, 1e-6)?),
            Variant::Qwen25Vl => Norm::Rms(RmsNorm::load(vb, dim, 1e-6)?),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
}

enum VisionMlp {
    /// Qwen2-VL: `fc2(act(fc1(x)))`.
    Plain { fc1: Linear, fc2: Linear, act: VisionAct },
    /// Qwen2.5-VL: `down(act(gate(x)) * up(x))`, every projection with a bias.
    Gated { gate: Linear, up: Linear, down: Linear, act: VisionAct },
}

impl VisionMlp {
    fn load(vb: &Vb, c: &Qwen2VlVisionConfig) -> Result<Self> {
        let (w, m, act) = (c.width, c.mlp_width, c.act);
        Ok(match c.variant {
            Variant::Qwen2Vl => VisionMlp::Plain { fc1: vb.pp("fc1").linear(w, m, true)?, fc2: vb.pp("fc2").linear(m, w, true)?, act },
            Variant::Qwen25Vl => VisionMlp::Gated {
                gate: vb.pp("gate_proj").linear(w, m, true)?,
                up: vb.pp("up_proj").linear(w, m, true)?,
                down: vb.pp("down_proj").linear(m, w, true)?,
                act,
            },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            VisionMlp::Plain { fc1, fc2, act } => fc2.forward(&act.apply(&fc1.forward(x)?)?),
            VisionMlp::Gated { gate, up, down, act } => down.forward(&(act.apply(&gate.forward(x)?)? * up.forward(x)?)?),
        }
    }
}

/// The 2-D rotary embedding of every patch of a batch of images: `[patches, head_dim / 2]`
/// angles, the first half of them the patch's row times the frequencies, the second half
/// its column times the same frequencies (transformers' `Qwen2VLVisionRotaryEmbedding`).
struct VisionRope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl VisionRope {
    fn new(c: &Qwen2VlVisionConfig, grids: &[[usize; 3]]) -> Self {
        let half = c.head_dim() / 2;
        let quarter = half / 2;
        // f32 throughout, as transformers computes the frequencies and angles.
        let inv: Vec<f32> =
            (0..quarter).map(|k| 1.0 / (c.rope_theta as f32).powf((2 * k) as f32 / half as f32)).collect();
        let angles: Vec<f32> = patch_coords(grids, c.merge_size)
            .flat_map(|(row, col)| {
                let inv = &inv;
                (0..half).map(move |i| if i < quarter { row as f32 * inv[i] } else { col as f32 * inv[i - quarter] })
            })
            .collect();
        VisionRope { cos: angles.iter().map(|a| a.cos()).collect(), sin: angles.iter().map(|a| a.sin()).collect(), half }
    }

    /// Rotates `x` (`[patches, heads, d]`) in place, pairing dimension i with i + d/2.
    fn apply(&self, x: &mut [f32], heads: usize) {
        let half = self.half;
        for (r, head) in x.chunks_exact_mut(2 * half).enumerate() {
            let at = (r / heads) * half;
            let (cos, sin) = (&self.cos[at..at + half], &self.sin[at..at + half]);
            for i in 0..half {
                let (x0, x1) = (head[i], head[i + half]);
                head[i] = x0 * cos[i] - x1 * sin[i];
                head[i + half] = x1 * cos[i] + x0 * sin[i];
            }
        }
    }
}

/// (row, column) of every patch, in the processor's order: per image and frame, the
/// `merge`×`merge` blocks row-major, each block's patches row-major.
fn patch_coords(grids: &[[usize; 3]], merge: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    grids.iter().flat_map(move |&[t, h, w]| {
        (0..t).flat_map(move |_| {
            (0..h / merge * (w / merge)).flat_map(move |b| {
                let (bh, bw) = (b / (w / merge), b % (w / merge));
                (0..merge * merge).map(move |j| (bh * merge + j / merge, bw * merge + j % merge))
            })
        })
    })
}

/// The patches that attend to each other over whole images: one group per frame
/// (transformers' `cu_seqlens`).
fn frame_groups(grids: &[[usize; 3]]) -> Vec<Vec<usize>> {
    let mut start = 0;
    let mut groups = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            groups.push((start..start + h * w).collect());
            start += h * w;
        }
    }
    groups
}

/// Qwen2.5-VL's windows (transformers' `get_vision_window_index`): each frame's grid of
/// merged tokens cut into `side`×`side` squares from the top left (smaller at the right
/// and bottom edges); a window holds all patches of its merged tokens. transformers also
/// reorders the patches so each window is contiguous; attention does not depend on the
/// order of its rows, so here the patches stay where they are and only the groups change.
fn window_groups(grids: &[[usize; 3]], merge: usize, side: usize) -> Vec<Vec<usize>> {
    let unit = merge * merge;
    let mut groups = Vec::new();
    let mut token = 0;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / merge, w / merge);
        for _ in 0..t {
            for (r0, c0) in (0..lh).step_by(side).flat_map(|r| (0..lw).step_by(side).map(move |c| (r, c))) {
                let rows = r0..(r0 + side).min(lh);
                let tokens = rows.flat_map(|r| (c0..(c0 + side).min(lw)).map(move |c| token + r * lw + c));
                groups.push(tokens.flat_map(|m| m * unit..(m + 1) * unit).collect());
            }
            token += lh * lw;
        }
    }
    groups
}

/// Non-causal attention among the patches `rows`: `q`, `k`, `v` and `out` are
/// `[patches, heads, d]`. In f32 the group's keys and values are gathered head-major, the
/// layout seer-kernels' cache attention reads; in bf16 all three stay row-major, as the
/// bf16 kernel takes them.
fn attend_group(q: &[f32], k: &[f32], v: &[f32], rows: &[usize], [heads, d]: [usize; 2], bf16: bool, out: &mut [f32]) {
    let (n, width) = (rows.len(), heads * d);
    let gather = |src: &[f32]| -> Vec<f32> { rows.iter().flat_map(|&r| &src[r * width..(r + 1) * width]).copied().collect() };
    let q_rows = gather(q);
    let mut y = vec![0f32; n * width];
    if bf16 {
        seer_kernels::attention_bf16(&q_rows, &gather(k), &gather(v), [n, heads, d], 1.0 / (d as f32).sqrt(), &mut y);
        for (i, &r) in rows.iter().enumerate() {
            out[r * width..(r + 1) * width].copy_from_slice(&y[i * width..(i + 1) * width]);
        }
        return;
    }
    // Keys in seer-kernels' blocks of positions, values head-major.
    let stride = n.next_multiple_of(seer_kernels::KEY_BLOCK);
    let mut k_heads = vec![0f32; heads * stride * d];
    let mut v_heads = vec![0f32; heads * stride * d];
    for (i, &r) in rows.iter().enumerate() {
        for h in 0..heads {
            for c in 0..d {
                k_heads[seer_kernels::key_index(h, i, c, stride, d)] = k[r * width + h * d + c];
            }
            v_heads[(h * stride + i) * d..][..d].copy_from_slice(&v[r * width + h * d..][..d]);
        }
    }
    let shape = AttnShape {
        t: n,
        heads,
        kv_heads: heads,
        head_dim: d,
        kv_len: n,
        kv_stride: stride,
        causal: false,
        scale: 1.0 / (d as f32).sqrt(),
        window: 0,
        blocks: &[],
    };
    seer_kernels::attention(&shape, &q_rows, &k_heads, &v_heads, &mut y);
    for (i, &r) in rows.iter().enumerate() {
        out[r * width..(r + 1) * width].copy_from_slice(&y[i * width..(i + 1) * width]);
    }
}

/// The attention's input projection: fused in Hugging Face checkpoints (`attn.qkv`),
/// split into q, k and v by llama.cpp's converter.
enum Qkv {
    Fused(Linear),
    Split([Linear; 3]),
}

impl Qkv {
    /// `vb` points at `attn`.
    fn load(vb: &Vb, w: usize) -> Result<Self> {
        if !vb.contains("q.weight") {
            return Ok(Qkv::Fused(vb.pp("qkv").linear(w, 3 * w, true)?));
        }
        let one = |name: &str| vb.pp(name).linear(w, w, true);
        Ok(Qkv::Split([one("q")?, one("k")?, one("v")?]))
    }

    /// q, k and v of `x` (`[patches, width]`), each `[patches, width]` row-major.
    fn forward(&self, x: &Tensor) -> Result<[Vec<f32>; 3]> {
        let rows = |y: Tensor| -> Result<Vec<f32>> { Ok(y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
        match self {
            Qkv::Split([q, k, v]) => Ok([rows(q.forward(x)?)?, rows(k.forward(x)?)?, rows(v.forward(x)?)?]),
            Qkv::Fused(qkv) => {
                let (all, width) = (rows(qkv.forward(x)?)?, x.dim(1)?);
                // Each row is [q | k | v].
                let part = |i: usize| all.chunks_exact(3 * width).flat_map(|r| &r[i * width..(i + 1) * width]).copied().collect();
                Ok([part(0), part(1), part(2)])
            }
        }
    }
}

struct VisionBlock {
    norm1: Norm,
    qkv: Qkv,
    proj: Linear,
    norm2: Norm,
    mlp: VisionMlp,
    heads: usize,
}

impl VisionBlock {
    fn load(vb: &Vb, c: &Qwen2VlVisionConfig) -> Result<Self> {
        let w = c.width;
        Ok(VisionBlock {
            norm1: Norm::load(&vb.pp("norm1"), w, c.variant)?,
            qkv: Qkv::load(&vb.pp("attn"), w)?,
            proj: vb.pp("attn.proj").linear(w, w, true)?,
            norm2: Norm::load(&vb.pp("norm2"), w, c.variant)?,
            mlp: VisionMlp::load(&vb.pp("mlp"), c)?,
            heads: c.heads,
        })
    }

    /// `x` is `[patches, width]`; each patch attends to the patches of its group.
    fn forward(&self, x: &Tensor, rope: &VisionRope, groups: &[Vec<usize>]) -> Result<Tensor> {
        let h = self.attention(&self.norm1.forward(x)?, rope, groups)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.norm2.forward(&x)?)?;
        Ok((x + h)?)
    }

    fn attention(&self, x: &Tensor, rope: &VisionRope, groups: &[Vec<usize>]) -> Result<Tensor> {
        let (n, width) = x.dims2()?;
        let d = width / self.heads;
        // Each row of each is `[heads, d]`.
        let [mut q, mut k, v] = self.qkv.forward(x)?;
        rope.apply(&mut q, self.heads);
        rope.apply(&mut k, self.heads);
        let mut y = vec![0f32; n * width];
        // In bf16 towers the two products of each group run in bf16 too.
        let bf16 = self.proj.is_bf16();
        for rows in groups {
            attend_group(&q, &k, &v, rows, [self.heads, d], bf16, &mut y);
        }
        Ok(self.proj.forward(&Tensor::from_vec(y, (n, width), x.device())?)?)
    }
}

/// `ln_q`, then each `merge`² consecutive patches (one merge block) concatenated and
/// through `Linear → GELU (erf) → Linear`.
struct PatchMerger {
    ln_q: Norm,
    fc1: Linear,
    fc2: Linear,
    unit: usize,
}

impl PatchMerger {
    fn load(vb: &Vb, c: &Qwen2VlVisionConfig) -> Result<Self> {
        let unit = c.merge_size * c.merge_size;
        let wide = c.width * unit;
        Ok(PatchMerger {
            ln_q: Norm::load(&vb.pp("ln_q"), c.width, c.variant)?,
            fc1: vb.pp("mlp.0").linear(wide, wide, true)?,
            fc2: vb.pp("mlp.2").linear(wide, c.out_width, true)?,
            unit,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, width) = x.dims2()?;
        let x = self.ln_q.forward(x)?.reshape((n / self.unit, width * self.unit))?;
        self.fc2.forward(&self.fc1.forward(&x)?.gelu_erf()?)
    }
}

/// The vision tower and merger (transformers' `Qwen2VisionTransformerPretrainedModel` /
/// `Qwen2_5_VisionTransformerPretrainedModel`), under `visual`.
pub struct Qwen2VisionTransformer {
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    pub config: Qwen2VlVisionConfig,
}

impl Qwen2VisionTransformer {
    pub fn load(vb: &Vb, c: &Qwen2VlVisionConfig) -> Result<Self> {
        let (w, p) = (c.width, c.patch_size);
        let conv = vb.tensor_shaped("patch_embed.proj.weight", &[w, c.in_channels, c.temporal_patch_size, p, p])?;
        Self::with_patch_embed(vb, c, conv)
    }

    /// The tower under `vb` with the Conv3d kernel `conv` (`[width, channels, frames, p, p]`).
    fn with_patch_embed(vb: &Vb, c: &Qwen2VlVisionConfig, conv: Tensor) -> Result<Self> {
        // The Conv3d's stride equals its kernel, so over the processor's flattened
        // patches (rows in the weight's [channel, time, row, column] order) it is a
        // matrix product. It runs in f64: on the fixtures its 1176-long sums were the
        // tower's largest f32 rounding error (7e-6 of the features' 1e-5, which the decoder
        // magnifies tenfold into the logits), and it is under 1% of the tower's work.
        let patch_embed = Linear::new(LinearWeight::Dense(conv.reshape((c.width, c.patch_dim()))?.to_dtype(DType::F64)?), None);
        let blocks = (0..c.depth).map(|i| VisionBlock::load(&vb.pp("blocks").pp(i), c)).collect::<Result<Vec<_>>>()?;
        Ok(Qwen2VisionTransformer { patch_embed, blocks, merger: PatchMerger::load(&vb.pp("merger"), c)?, config: c.clone() })
    }

    /// `pixels` is `[patches, patch_dim]`, the processor's rows of every image in turn, and
    /// `grids` their `[t, h, w]` in patches; returns `[patches / merge², out_width]`, one
    /// row per image token, in the prompt's order.
    pub fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        self.check_input(pixels, grids)?;
        let c = &self.config;
        let rope = VisionRope::new(c, grids);
        let whole = frame_groups(grids);
        let windows = (c.variant == Variant::Qwen25Vl).then(|| window_groups(grids, c.merge_size, c.window_tokens));
        let mut x = self.patch_embed.forward(&pixels.to_dtype(DType::F64)?)?.to_dtype(DType::F32)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let groups = match &windows {
                Some(w) if !c.fullatt_block_indexes.contains(&i) => w,
                _ => &whole,
            };
            x = block.forward(&x, &rope, groups)?;
        }
        Ok(self.merger.forward(&x)?)
    }

    fn check_input(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<()> {
        let c = &self.config;
        let m = c.merge_size;
        if let Some(g) = grids.iter().find(|g| g[1] % m != 0 || g[2] % m != 0 || g.contains(&0)) {
            return Err(ModelError::Mismatch(format!("image grid {g:?}: rows and columns must be non-zero multiples of {m}")));
        }
        let patches: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
        if pixels.dims() != [patches, c.patch_dim()] {
            return Err(ModelError::Mismatch(format!(
                "pixel values of shape {:?} for grids {grids:?}: expected [{patches}, {}]",
                pixels.dims(),
                c.patch_dim()
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Qwen2VlConfig {
    pub vision: Qwen2VlVisionConfig,
    pub text: LlamaConfig,
    /// `<|image_pad|>`: one per image token in the prompt.
    pub image_token_id: u32,
    /// `<|vision_start|>`, which opens every image in the prompt.
    pub vision_start_token_id: Option<u32>,
}

impl Qwen2VlConfig {
    /// From `config.json`: `model_type` picks the family; the text fields are under
    /// `text_config` (transformers 5) or at the top level (the hub's 2024 configs).
    pub fn from_hf(config: &Value) -> Result<Self> {
        let variant = match config.get("model_type").and_then(Value::as_str) {
            Some("qwen2_vl") => Variant::Qwen2Vl,
            Some("qwen2_5_vl") => Variant::Qwen25Vl,
            other => {
                return Err(ModelError::UnsupportedArchitecture {
                    found: format!("model_type {other:?}"),
                    supported: "qwen2_vl, qwen2_5_vl".into(),
                })
            }
        };
        let empty = Value::Object(Default::default());
        let text_json = config.get("text_config").unwrap_or(config);
        let text = qwen2_text_config(text_json, config)?;
        let id = |k: &str| config.get(k).or_else(|| text_json.get(k)).and_then(Value::as_u64).map(|x| x as u32);
        Ok(Qwen2VlConfig {
            vision: Qwen2VlVisionConfig::from_hf(config.get("vision_config").unwrap_or(&empty), variant)?,
            text,
            image_token_id: id("image_token_id").ok_or_else(|| ModelError::Config("config.json has no image_token_id".into()))?,
            vision_start_token_id: id("vision_start_token_id"),
        })
    }

    /// From a llama.cpp text model and its merger mmproj, refusing a pair that does not
    /// fit: a projector as wide as the text model, a text model with M-RoPE.
    pub fn from_gguf(text: &GgufFile, mmproj: &GgufFile) -> Result<Self> {
        let vision = Qwen2VlVisionConfig::from_gguf(mmproj)?;
        let text_config = LlamaConfig::from_gguf(text)?;
        llava::require_projected_size(mmproj, text, vision.out_width, text_config.hidden_size)?;
        let (mmproj_name, text_name) = (mmproj.path().display(), text.path().display());
        if text_config.mrope_section.is_none() {
            return Err(ModelError::Mismatch(format!(
                "projector {mmproj_name} is Qwen2-VL's, whose image tokens need M-RoPE, but text model {text_name} \
                 (architecture `{}`) has none (no `rope.dimension_sections`): this mmproj belongs to another model",
                text.architecture()?
            )));
        }
        let image_token_id = text.token_id("<|image_pad|>").ok_or_else(|| {
            ModelError::Mismatch(format!("text model {text_name} has no `<|image_pad|>` token: not a Qwen2-VL vocabulary"))
        })?;
        Ok(Qwen2VlConfig { vision, text: text_config, image_token_id, vision_start_token_id: text.token_id("<|vision_start|>") })
    }
}

/// The Qwen2 decoder as a [`LlamaConfig`]. transformers always runs Qwen2-VL's text model
/// with M-RoPE, taking `mrope_section` [16, 24, 24] when the config names none.
fn qwen2_text_config(text: &Value, outer: &Value) -> Result<LlamaConfig> {
    let mut c = LlamaConfig::from_hf(text, outer)?;
    let sliding = text.get("layer_types").and_then(Value::as_array).is_some_and(|t| t.iter().any(|l| l == "sliding_attention"));
    if sliding {
        return Err(ModelError::Config("sliding-window attention layers are not supported".into()));
    }
    if c.mrope_section.is_none() {
        if c.head_dim != 128 {
            return Err(ModelError::Config(format!("no mrope_section for head_dim {}", c.head_dim)));
        }
        c.mrope_section = Some([16, 24, 24]);
    }
    Ok(c)
}

/// Where the weights sit: the hub's names (`model.*`, `visual.*`, what `save_pretrained`
/// writes) or transformers 5's module names (`model.language_model.*`, `model.visual.*`).
const TEXT_PREFIXES: [&str; 2] = ["model", "model.language_model"];
const VISION_PREFIXES: [&str; 2] = ["visual", "model.visual"];

/// llama.cpp's mmproj names for the tower, seen from `visual`. The converter splits
/// `attn.qkv` into q, k and v (`attn.q`, `attn.k`, `attn.v` to [`Qkv`]) and the Conv3d
/// into one tensor per frame (read in [`Qwen2Vl::load_gguf`]).
const GGUF_NAMES: GgufNames = GgufNames {
    whole: &[
        ("merger.ln_q.weight", "v.post_ln.weight"),
        ("merger.ln_q.bias", "v.post_ln.bias"),
        ("merger.mlp.0.weight", "mm.0.weight"),
        ("merger.mlp.0.bias", "mm.0.bias"),
        ("merger.mlp.2.weight", "mm.2.weight"),
        ("merger.mlp.2.bias", "mm.2.bias"),
    ],
    layers: "blocks",
    blocks: "v.blk",
    modules: &[
        ("norm1", "ln1"),
        ("norm2", "ln2"),
        ("attn.q", "attn_q"),
        ("attn.k", "attn_k"),
        ("attn.v", "attn_v"),
        ("attn.proj", "attn_out"),
        ("mlp.fc1", "ffn_up"),
        ("mlp.fc2", "ffn_down"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ],
};

/// [`GGUF_NAMES`], with `ffn_up` and `ffn_down` trading places in a `swapped` file
/// (see [`gguf_ffn_layout`]).
fn gguf_name_map(swapped: bool) -> NameMap {
    Arc::new(move |hf: &str| {
        let name = GGUF_NAMES.map(hf)?;
        Some(if swapped { crate::clip::swap_parts(&name, ".ffn_up.", ".ffn_down.") } else { name })
    })
}

pub struct Qwen2Vl {
    visual: Qwen2VisionTransformer,
    pub language_model: Llama,
    pub config: Qwen2VlConfig,
}

impl Qwen2Vl {
    /// From a Hugging Face folder whose `config.json` has been parsed into `config`. 
    /// `plan.isq` quantizes the decoder's matrices as they load; the tower stays dense, in
    /// f32 or, with `plan.vision_bf16`, bf16.
    pub fn load_hf(src: Arc<SafetensorsSource>, config: &Value, plan: &LoadPlan) -> Result<Self> {
        let c = Qwen2VlConfig::from_hf(config)?;
        let text = find_prefix(&*src, &TEXT_PREFIXES, "embed_tokens.weight")?;
        let vision = find_prefix(&*src, &VISION_PREFIXES, "patch_embed.proj.weight")?;
        let root = Vb::new(src);
        if c.vision.out_width != c.text.hidden_size {
            return Err(ModelError::Mismatch(format!(
                "the vision merger produces embeddings of size {}, but the text model's hidden size is {}",
                c.vision.out_width, c.text.hidden_size
            )));
        }
        Ok(Qwen2Vl {
            visual: Qwen2VisionTransformer::load(&root.pp(vision).for_vision(plan), &c.vision)?,
            // `lm_head` sits at the top level; without one the embeddings are tied.
            language_model: Llama::load(&root.pp(text).for_text(plan), &root.for_text(plan), &c.text)?,
            config: c,
        })
    }

    /// From a llama.cpp text model (`qwen2vl`) and its `qwen2vl_merger` /
    /// `qwen2.5vl_merger` mmproj; `plan.vision_bf16` runs the mmproj's matrices in bf16. The
    /// tower follows transformers where llama.cpp parts from it (the merger's GELU is
    /// exact here, ggml's is the tanh form).
    pub fn load_gguf(text: Arc<GgufFile>, mmproj: Arc<GgufFile>, plan: &LoadPlan) -> Result<Self> {
        let c = Qwen2VlConfig::from_gguf(&text, &mmproj)?;
        let v = &c.vision;
        // The converter writes frame 0 of the Conv3d kernel as `v.patch_embd.weight` and
        // frame 1 as `v.patch_embd.weight.1`.
        let raw = Vb::new(Arc::new(GgufSource::new(mmproj.clone(), Arc::new(|n: &str| Some(n.to_string())))));
        let frame = [v.width, v.in_channels, v.patch_size, v.patch_size];
        let frames = [raw.tensor_shaped("v.patch_embd.weight", &frame)?, raw.tensor_shaped("v.patch_embd.weight.1", &frame)?];
        let swapped = gguf_ffn_layout(&mmproj, v.width)?.0;
        let tower = Vb::new(Arc::new(GgufSource::new(mmproj, gguf_name_map(swapped)))).for_vision(plan);
        let text = Vb::new(Arc::new(GgufSource::new(text, Arc::new(|n: &str| llama::GGUF_NAMES.map(n))))).for_text(plan);
        Ok(Qwen2Vl {
            visual: Qwen2VisionTransformer::with_patch_embed(&tower, v, Tensor::stack(&frames, 2)?)?,
            // No `output.weight`: the embeddings are tied.
            language_model: Llama::load(&text, &text, &c.text)?,
            config: c,
        })
    }

    /// The image tokens of all images: `[Σ t·h·w / merge², hidden]` (see
    /// [`Qwen2VisionTransformer::forward`]).
    pub fn encode_images(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        self.visual.forward(pixels, grids)
    }

    /// The embeddings of `ids`, with the rows of `image_features` in place of the image
    /// tokens, in order (transformers' `masked_scatter`).
    pub fn embed_prompt(&self, ids: &[u32], image_features: &Tensor) -> Result<Tensor> {
        let image = self.config.image_token_id;
        let n_image = ids.iter().filter(|&&i| i == image).count();
        if n_image != image_features.dim(0)? {
            return Err(ModelError::Mismatch(format!(
                "{n_image} image tokens in the prompt but {} image embeddings",
                image_features.dim(0)?
            )));
        }
        let text = self.language_model.embed(ids)?;
        // Row i of `text`, or row `ids.len() + k` (the k-th image embedding) of `all`.
        let mut next_image = ids.len() as u32..;
        let rows: Vec<u32> = (0..ids.len() as u32)
            .map(|i| if ids[i as usize] == image { next_image.next().unwrap_or(0) } else { i })
            .collect();
        let all = Tensor::cat(&[&text, &image_features.to_dtype(text.dtype())?], 0)?;
        Ok(all.index_select(&Tensor::new(rows, &Device::Cpu)?, 0)?)
    }

    pub fn new_cache(&self) -> KvCache {
        self.language_model.new_cache()
    }
}

/// A prompt's M-RoPE positions (transformers' `get_rope_index`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopeIndex {
    /// One per prompt token.
    pub positions: Vec<Position>,
    /// Largest position + 1 − prompt length: the token at sequence index `i` after the
    /// prompt sits at `i + delta` on all three components ([`decode_position`]).
    pub delta: i64,
}

/// M-RoPE positions of `ids`, whose images (runs of `image_token_id`, `t·h·w / merge²`
/// tokens each, for the `grids` in order) are laid out on their merged grids: text counts
/// up on all three components; an image starting at position `p` puts its token (frame f,
/// row r, column c) at (p + f, p + r, p + c), and the text after it continues at
/// p + max(rows, columns).
pub fn mrope_positions(ids: &[u32], image_token_id: u32, grids: &[[usize; 3]], merge: usize) -> Result<RopeIndex> {
    let mut positions = Vec::with_capacity(ids.len());
    let (mut next, mut i) = (0u32, 0usize);
    let mut grids_left = grids.iter();
    while i < ids.len() {
        if ids[i] != image_token_id {
            positions.push([next; 3]);
            (next, i) = (next + 1, i + 1);
            continue;
        }
        let &[t, h, w] = grids_left.next().ok_or_else(|| mismatch(ids, image_token_id, grids, merge))?;
        let (h, w) = (h / merge, w / merge);
        let run = ids[i..].iter().take_while(|&&id| id == image_token_id).count();
        if run < t * h * w {
            return Err(mismatch(ids, image_token_id, grids, merge));
        }
        for (f, r, c) in (0..t).flat_map(|f| (0..h).flat_map(move |r| (0..w).map(move |c| (f, r, c)))) {
            positions.push([next + f as u32, next + r as u32, next + c as u32]);
        }
        (next, i) = (next + h.max(w) as u32, i + t * h * w);
    }
    if grids_left.next().is_some() {
        return Err(mismatch(ids, image_token_id, grids, merge));
    }
    let max = positions.iter().flatten().copied().max().map_or(-1, i64::from);
    Ok(RopeIndex { delta: max + 1 - ids.len() as i64, positions })
}

fn mismatch(ids: &[u32], image_token_id: u32, grids: &[[usize; 3]], merge: usize) -> ModelError {
    let tokens: usize = grids.iter().map(|g| g.iter().product::<usize>() / (merge * merge)).sum();
    let found = ids.iter().filter(|&&i| i == image_token_id).count();
    ModelError::Mismatch(format!("{found} image tokens in the prompt, but the image grids {grids:?} make {tokens}"))
}

/// The position of the token at sequence index `index` after a prompt whose
/// [`RopeIndex::delta`] is `delta` (generated tokens are text).
pub fn decode_position(index: usize, delta: i64) -> Position {
    [(index as i64 + delta) as u32; 3]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The windows against transformers' `get_vision_window_index` as the Qwen2.5-VL
    /// fixture cases record it: merged tokens in window order, and window boundaries in
    /// patches.
    #[test]
    fn windows_follow_transformers() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2vl/cases/tiny-qwen2.5-vl");
        for case in ["a_square", "b_wide", "c_tall", "d_two_images", "e_system"] {
            let text = std::fs::read_to_string(dir.join(format!("{case}.json"))).unwrap();
            let c: Value = serde_json::from_str(&text).unwrap();
            let grids: Vec<[usize; 3]> = serde_json::from_value(c["image_grid_thw"].clone()).unwrap();
            let groups = window_groups(&grids, 2, 112 / 2 / 14);
            let order: Vec<usize> = groups.iter().flat_map(|g| g.iter().step_by(4).map(|p| p / 4)).collect();
            let mut bounds = vec![0];
            bounds.extend(groups.iter().scan(0, |end, g| {
                *end += g.len();
                Some(*end)
            }));
            let want: Vec<usize> = serde_json::from_value(c["vision_window_index"].clone()).unwrap();
            let want_bounds: Vec<usize> = serde_json::from_value(c["vision_cu_window_seqlens"].clone()).unwrap();
            assert_eq!((order, bounds), (want, want_bounds), "{case}");
            assert!(groups.iter().all(|g| g.chunks(4).all(|m| m[3] == m[0] + 3)), "whole merge blocks");
        }
    }

    #[test]
    fn mmproj_names_follow_llama_cpp() {
        let plain = gguf_name_map(false);
        assert_eq!(plain("blocks.2.attn.k.bias").unwrap(), "v.blk.2.attn_k.bias");
        assert_eq!(plain("blocks.0.mlp.fc1.weight").unwrap(), "v.blk.0.ffn_up.weight");
        assert_eq!(plain("blocks.3.mlp.gate_proj.bias").unwrap(), "v.blk.3.ffn_gate.bias");
        assert_eq!(plain("merger.ln_q.weight").unwrap(), "v.post_ln.weight");
        assert_eq!(plain("merger.mlp.2.bias").unwrap(), "mm.2.bias");
        assert_eq!(plain("blocks.0.attn.qkv.weight"), None);
        let swapped = gguf_name_map(true);
        assert_eq!(swapped("blocks.1.mlp.fc1.weight").unwrap(), "v.blk.1.ffn_down.weight");
        assert_eq!(swapped("blocks.1.mlp.down_proj.bias").unwrap(), "v.blk.1.ffn_up.bias");
        assert_eq!(swapped("blocks.1.mlp.gate_proj.weight").unwrap(), "v.blk.1.ffn_gate.weight");
    }

    #[test]
    fn patch_coords_are_block_major() {
        let coords: Vec<_> = patch_coords(&[[1, 2, 4]], 2).collect();
        assert_eq!(coords, [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
        assert_eq!(frame_groups(&[[2, 2, 2], [1, 2, 4]]), [vec![0, 1, 2, 3], vec![4, 5, 6, 7], (8..16).collect()]);
    }

    #[test]
    fn positions_of_adjacent_images_and_mismatches() {
        let (img, merge) = (9, 2);
        // Two images with nothing between them: each takes its own grid's tokens.
        let ids = [1, img, img, img, img, img, img, 2];
        let index = mrope_positions(&ids, img, &[[1, 4, 4], [1, 4, 2]], merge).unwrap();
        let want = [[0; 3], [1, 1, 1], [1, 1, 2], [1, 2, 1], [1, 2, 2], [3, 3, 3], [3, 4, 3], [5; 3]];
        assert_eq!(index.positions, want);
        assert_eq!(index.delta, 6 - 8);
        assert_eq!(decode_position(8, index.delta), [6; 3]);
        // Text only: plain positions, no delta.
        let index = mrope_positions(&[5, 6, 7], img, &[], merge).unwrap();
        assert_eq!((index.positions, index.delta), (vec![[0; 3], [1; 3], [2; 3]], 0));
        for (ids, grids) in [(&[1, img][..], &[[1, 2, 4]][..]), (&[1, img, img], &[]), (&[img, img], &[[1, 2, 4], [1, 2, 2]])] {
            assert!(matches!(mrope_positions(ids, img, grids, merge), Err(ModelError::Mismatch(_))), "{ids:?} {grids:?}");
        }
    }

    /// Qwen2-VL-2B-Instruct's config.json as the hub has it: text fields at the top level,
    /// `rope_scaling` of type "mrope", `in_chans`, no `hidden_act`.
    #[test]
    fn hub_config_reads() {
        let config = json!({
            "model_type": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
            "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768, "vocab_size": 151936, "tie_word_embeddings": true,
            "image_token_id": 151655, "vision_start_token_id": 151652,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                              "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        });
        let c = Qwen2VlConfig::from_hf(&config).unwrap();
        assert_eq!((c.text.hidden_size, c.text.head_dim, c.text.rope_theta), (1536, 128, 1e6));
        assert_eq!(c.text.mrope_section, Some([16, 24, 24]));
        assert_eq!((c.vision.width, c.vision.mlp_width, c.vision.out_width, c.vision.act), (1280, 5120, 1536, VisionAct::Clip(Activation::QuickGelu)));
        assert_eq!((c.image_token_id, c.vision_start_token_id), (151655, Some(151652)));

        let mut bad = config.clone();
        bad["rope_scaling"]["mrope_section"] = json!([16, 24, 23]);
        assert!(matches!(Qwen2VlConfig::from_hf(&bad), Err(ModelError::Config(_))));
        bad["model_type"] = json!("llava");
        assert!(matches!(Qwen2VlConfig::from_hf(&bad), Err(ModelError::UnsupportedArchitecture { .. })));
    }
}
