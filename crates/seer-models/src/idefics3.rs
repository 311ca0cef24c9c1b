//! Idefics3 (`Idefics3ForConditionalGeneration`, the architecture of SmolVLM): a SigLIP
//! vision tower that reads each image tile with NaViT position ids, a connector that folds
//! s×s neighbouring patches into one token (pixel shuffle) and projects it, and a LLaMA
//! decoder that reads the projected tokens in place of the prompt's `<image>` tokens.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::clip::{self, Activation, ClipVisionConfig, EncoderLayer};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::layers::LayerNorm;
use crate::linear::Linear;
use crate::llama::{self, Llama, LlamaConfig};
use crate::llava;
use crate::weights::{GgufNames, GgufSource, SafetensorsSource, LoadPlan, Vb};

#[derive(Debug, Clone)]
pub struct Idefics3Config {
    /// The SigLIP tower: every layer runs, then `post_layernorm`.
    pub vision: ClipVisionConfig,
    pub text: LlamaConfig,
    /// The pixel shuffle's factor: s×s neighbouring patches become one token.
    pub scale_factor: usize,
    pub image_token_id: Option<u32>,
}

impl Idefics3Config {
    /// From a Hugging Face `config.json`. Hub configs (SmolVLM's) leave out what equals the
    /// defaults of `Idefics3VisionConfig` and of Idefics3's `text_config`, so those
    /// defaults are part of the format.
    pub fn from_hf(config: &Value) -> Result<Self> {
        let vision_defaults = json!({
            "hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
            "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        });
        let vision = with_defaults(vision_defaults, config.get("vision_config"));
        let text = with_defaults(json!({ "rms_norm_eps": 1e-5 }), config.get("text_config"));
        Ok(Idefics3Config {
            // Feature layer -1: the last layer's output, i.e. all layers run.
            vision: ClipVisionConfig::from_hf(&vision, -1)?,
            text: LlamaConfig::from_hf(&text, config)?,
            scale_factor: config.get("scale_factor").and_then(Value::as_u64).unwrap_or(2) as usize,
            image_token_id: Some(config.get("image_token_id").and_then(Value::as_u64).unwrap_or(128257) as u32),
        })
    }

    /// From a llama.cpp text model and its `idefics3` mmproj file.
    pub fn from_gguf(text: &GgufFile, mmproj: &GgufFile) -> Result<Self> {
        let mut vision = ClipVisionConfig::from_gguf(mmproj)?;
        // The converter marks SigLIP's `gelu_pytorch_tanh` as `clip.use_gelu`, which
        // llama.cpp runs as the tanh form too.
        vision.hidden_act = Activation::GeluTanh;
        let scale_factor = match mmproj.opt_u32("clip.vision.projector.scale_factor") {
            Some(s) => s as usize,
            // Without the key, s² is how many patches the connector's input holds.
            None => ((mmproj.tensor_shape("mm.model.fc.weight")?[1] / vision.hidden_size) as f64).sqrt() as usize,
        };
        Ok(Idefics3Config {
            vision,
            text: LlamaConfig::from_gguf(text)?,
            scale_factor,
            image_token_id: text.token_id("<image>"),
        })
    }

    /// Embeddings one tile becomes in the decoder's sequence (the processor's `image_seq_len`).
    pub fn image_seq_len(&self) -> usize {
        self.vision.num_patches() / (self.scale_factor * self.scale_factor)
    }
}

/// `defaults` overridden by every key of `given`.
fn with_defaults(mut defaults: Value, given: Option<&Value>) -> Value {
    if let (Value::Object(out), Some(Value::Object(given))) = (&mut defaults, given) {
        out.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    defaults
}

/// llama.cpp's mmproj names, seen from `model` (`vision_model.*`, `connector.*`).
pub(crate) const GGUF_NAMES: GgufNames = GgufNames {
    whole: &[
        ("vision_model.embeddings.patch_embedding.weight", "v.patch_embd.weight"),
        ("vision_model.embeddings.patch_embedding.bias", "v.patch_embd.bias"),
        ("vision_model.embeddings.position_embedding.weight", "v.position_embd.weight"),
        ("vision_model.post_layernorm.weight", "v.post_ln.weight"),
        ("vision_model.post_layernorm.bias", "v.post_ln.bias"),
        ("connector.modality_projection.proj.weight", "mm.model.fc.weight"),
    ],
    layers: "vision_model.encoder.layers",
    blocks: "v.blk",
    modules: clip::GGUF_NAMES.modules,
};

/// torch's CPU `arange(1/n, 1.0, 1/n)` in float32, the bucket boundaries of transformers'
/// NaViT position ids, rounded as torch rounds them: its kernel fills 16 values at a
/// time as two 8-lane vectors, each counted on from its first value rounded to f32, and
/// the rest one at a time. Plain `k/n` differs in the last bit often enough to move
/// position ids (with n = 19, a full tile's column 12 takes position 11 in transformers).
fn bucket_boundaries(n: usize) -> Vec<f32> {
    const LANES: usize = 8;
    let step = 1.0 / n as f64;
    let len = ((1.0 - step) / step).ceil() as usize;
    let vectorized = len / (2 * LANES) * (2 * LANES);
    (0..len)
        .map(|k| {
            if k < vectorized {
                let base = (step + step * (k - k % LANES) as f64) as f32;
                (base as f64 + (k % LANES) as f64 * step) as f32
            } else {
                (step + step * k as f64) as f32
            }
        })
        .collect()
}

/// `Idefics3VisionEmbeddings`' position ids for one tile of `rows`×`cols` patches (`mask`,
/// row-major, true = real patch; padding sits at the bottom and right): each real patch's
/// fractional coordinates (row / real rows, column / real columns) are bucketed onto the
/// `side`×`side` grid of learned positions; padded patches get position 0.
fn position_ids(mask: &[bool], rows: usize, cols: usize, side: usize, boundaries: &[f32]) -> Vec<u32> {
    let buckets = |len: usize, real: usize| -> Vec<usize> {
        let step = 1.0f32 / real as f32;
        let max = (1.0f64 - 1e-6) as f32;
        // bucketize(right=True): how many boundaries are at or below the coordinate.
        (0..len).map(|i| boundaries.partition_point(|&b| b <= (i as f32 * step).min(max))).collect()
    };
    let h = buckets(rows, (0..rows).filter(|&i| mask[i * cols]).count());
    let w = buckets(cols, mask[..cols].iter().filter(|&&m| m).count());
    (0..rows * cols).map(|k| if mask[k] { (h[k / cols] * side + w[k % cols]) as u32 } else { 0 }).collect()
}

/// `patch_attention_mask`: a patch is real when any of its pixels is. `pixel_mask` is
/// `[tiles, height, width]`, row-major.
fn patch_mask(pixel_mask: &[u8], tiles: usize, height: usize, width: usize, p: usize) -> Vec<bool> {
    let (rows, cols) = (height / p, width / p);
    let real = |t: usize, i: usize, j: usize| {
        (i * p..(i + 1) * p).any(|y| pixel_mask[(t * height + y) * width + j * p..][..p].iter().any(|&m| m != 0))
    };
    (0..tiles * rows * cols).map(|k| real(k / (rows * cols), k / cols % rows, k % cols)).collect()
}

/// The bidirectional mask over padded patches, `[tiles, 1, 1, patches]`: `f32::MIN` (what
/// eager attention adds) on padded keys, for every query. `None` when nothing is padded.
fn attention_mask(mask: &[bool], tiles: usize) -> candle_core::Result<Option<Tensor>> {
    if mask.iter().all(|&m| m) {
        return Ok(None);
    }
    let values: Vec<f32> = mask.iter().map(|&m| if m { 0.0 } else { f32::MIN }).collect();
    Ok(Some(Tensor::from_vec(values, (tiles, 1, 1, mask.len() / tiles), &Device::Cpu)?))
}

/// `Idefics3VisionTransformer`: embeddings, encoder, `post_layernorm`. Gemma 3's SigLIP
/// is the same tower on whole images ([`VisionTransformer::forward_whole`]).
pub(crate) struct VisionTransformer {
    patch_embedding: Linear,
    /// `[side², hidden]`.
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    boundaries: Vec<f32>,
    config: ClipVisionConfig,
}

impl VisionTransformer {
    /// `vb` points at `vision_model`.
    pub(crate) fn load(vb: &Vb, c: &ClipVisionConfig) -> Result<Self> {
        let (h, side) = (c.hidden_size, c.image_size / c.patch_size);
        let emb = vb.pp("embeddings");
        let layers = (0..c.layers_to_run)
            .map(|i| EncoderLayer::load(&vb.pp("encoder.layers").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTransformer {
            patch_embedding: clip::patch_embedding(&emb, h, c.patch_size)?,
            position_embedding: emb.tensor_shaped("position_embedding.weight", &[side * side, h])?,
            layers,
            post_layernorm: LayerNorm::load(&vb.pp("post_layernorm"), h, c.layer_norm_eps)?,
            boundaries: bucket_boundaries(side),
            config: c.clone(),
        })
    }

    /// `pixels` is `[tiles, 3, H, W]`, `mask` its `[tiles, H/p, W/p]` patch mask; returns
    /// `[tiles, patches, hidden]`.
    fn forward(&self, pixels: &Tensor, mask: &[bool]) -> candle_core::Result<Tensor> {
        let (tiles, _, height, width) = pixels.dims4()?;
        let p = self.config.patch_size;
        let (rows, cols) = (height / p, width / p);
        let side = self.config.image_size / p;
        let ids: Vec<u32> = mask
            .chunks_exact(rows * cols)
            .flat_map(|m| position_ids(m, rows, cols, side, &self.boundaries))
            .collect();
        let positions = self.position_embedding.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?;
        let x = self.patch_embedding.forward(&clip::patchify(pixels, p)?)?;
        let mut x = (x + positions.reshape((tiles, rows * cols, ()))?)?;
        let attention_mask = attention_mask(mask, tiles)?;
        for layer in &self.layers {
            x = layer.forward(&x, attention_mask.as_ref())?;
        }
        self.post_layernorm.forward(&x)
    }
}

impl VisionTransformer {
    /// `pixels` is `[n, 3, size, size]`, every patch real, each at its own learned
    /// position (SigLIP's plain position ids); returns `[n, patches, hidden]`.
    pub(crate) fn forward_whole(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.patch_embedding.forward(&clip::patchify(pixels, self.config.patch_size)?)?;
        let mut x = x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        self.post_layernorm.forward(&x)
    }
}

/// `Idefics3Connector`: pixel shuffle, then `modality_projection.proj` (no bias).
struct Connector {
    proj: Linear,
    scale_factor: usize,
}

impl Connector {
    fn load(vb: &Vb, c: &Idefics3Config) -> Result<Self> {
        let s = c.scale_factor;
        let input = c.vision.hidden_size * s * s;
        Ok(Connector {
            proj: vb.pp("modality_projection").pp("proj").linear(input, c.text.hidden_size, false)?,
            scale_factor: s,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.proj.forward(&pixel_shuffle(x, self.scale_factor)?)
    }
}

/// `[b, side², d]` → `[b, (side/s)², d·s²]`, transformers' reshapes and permutes exactly:
/// token (i, j) concatenates the patches (s·i + a, s·j + b), a (row) outer, b inner.
fn pixel_shuffle(x: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    let (b, seq, d) = x.dims3()?;
    let side = (seq as f64).sqrt() as usize;
    x.reshape((b, side, side / s, d * s))?
        .permute((0, 2, 1, 3))?
        .contiguous()?
        .reshape((b, side / s, side / s, d * s * s))?
        .permute((0, 2, 1, 3))?
        .contiguous()?
        .reshape((b, seq / (s * s), d * s * s))
}

pub struct Idefics3 {
    vision_model: VisionTransformer,
    connector: Connector,
    pub language_model: Llama,
    pub config: Idefics3Config,
}

impl Idefics3 {
    /// From a Hugging Face folder whose `config.json` has been parsed into `config`.
    /// `plan.isq` quantizes the language model's matrices as they load; the vision tower
    /// and connector stay dense, in f32, or in bf16 with `plan.vision_bf16`.
    pub fn load_hf(src: Arc<SafetensorsSource>, config: &Value, plan: &LoadPlan) -> Result<Self> {
        let c = Idefics3Config::from_hf(config)?;
        let root = Vb::new(src);
        let model = root.pp("model");
        Self::load(&model, &model.pp("text_model").for_text(plan), &root.for_text(plan), c, plan)
    }

    /// From a llama.cpp text model and its Idefics3 projector file; `plan.vision_bf16`
    /// runs the projector file's matrices in bf16.
    pub fn load_gguf(text: Arc<GgufFile>, mmproj: Arc<GgufFile>, plan: &LoadPlan) -> Result<Self> {
        llava::require_projector_type(&mmproj, "none", "idefics3", "idefics3 (SmolVLM) for an Idefics3 text model")?;
        let c = Idefics3Config::from_gguf(&text, &mmproj)?;
        llava::require_projected_size(&mmproj, &text, mmproj.tensor_shape("mm.model.fc.weight")?[0], c.text.hidden_size)?;
        let model = Vb::new(Arc::new(GgufSource::new(mmproj, Arc::new(|n: &str| GGUF_NAMES.map(n)))));
        let text = Vb::new(Arc::new(GgufSource::new(text, Arc::new(|n: &str| llama::GGUF_NAMES.map(n))))).for_text(plan);
        Self::load(&model, &text, &text, c, plan)
    }

    /// `model` holds `vision_model` and `connector`, `text` the decoder, `head` `lm_head`.
    fn load(model: &Vb, text: &Vb, head: &Vb, c: Idefics3Config, plan: &LoadPlan) -> Result<Self> {
        if c.scale_factor == 0 {
            return Err(ModelError::Config("scale_factor 0: the pixel shuffle needs a factor of at least 1".into()));
        }
        Ok(Idefics3 {
            vision_model: VisionTransformer::load(&model.pp("vision_model").for_vision(plan), &c.vision)?,
            connector: Connector::load(&model.pp("connector").for_vision(plan), &c)?,
            language_model: Llama::load(text, head, &c.text)?,
            config: c,
        })
    }

    /// `pixels` is `[tiles, 3, H, W]` and `pixel_mask` `[tiles, H, W]` (u8, 1 = real
    /// pixel; `None`: all real). Returns `[tiles, image_seq_len, text hidden]`. Unlike
    /// transformers, all-zero tiles are not dropped: they are batch padding there, and
    /// callers here pass only real tiles.
    pub fn encode_images(&self, pixels: &Tensor, pixel_mask: Option<&Tensor>) -> Result<Tensor> {
        let (tiles, _, height, width) = pixels.dims4()?;
        self.check_tile_size(height, width)?;
        let p = self.config.vision.patch_size;
        let mask = match pixel_mask {
            Some(m) => {
                if m.dims() != [tiles, height, width] {
                    return Err(ModelError::Mismatch(format!(
                        "pixel mask {:?} does not fit pixels {:?}",
                        m.dims(),
                        pixels.dims()
                    )));
                }
                let m = m.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
                patch_mask(&m, tiles, height, width, p)
            }
            None => vec![true; tiles * (height / p) * (width / p)],
        };
        let features = self.vision_model.forward(&pixels.to_dtype(DType::F32)?, &mask)?;
        Ok(self.connector.forward(&features)?)
    }

    /// The connector reads a tile's patches as a square grid that the pixel shuffle divides.
    fn check_tile_size(&self, height: usize, width: usize) -> Result<()> {
        let (p, s) = (self.config.vision.patch_size, self.config.scale_factor);
        if height != width || !height.is_multiple_of(p * s) {
            return Err(ModelError::Mismatch(format!(
                "tiles of {height}x{width} pixels do not fit this vision tower: they must be square, \
                 with sides a multiple of {} (patch {p} x scale factor {s})",
                p * s
            )));
        }
        Ok(())
    }

    pub fn new_cache(&self) -> KvCache {
        self.language_model.new_cache()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Position ids as transformers 5.23's `Idefics3VisionEmbeddings` computes them on
    /// CPU (read off its output with position embedding k = k), for partly padded tiles
    /// and for a full tile whose ids are not 0..n-1.
    #[test]
    fn navit_position_ids_follow_transformers() {
        let tile = |rows: usize, cols: usize, real_rows: usize, real_cols: usize| -> Vec<bool> {
            (0..rows * cols).map(|k| k / cols < real_rows && k % cols < real_cols).collect()
        };
        let ids = position_ids(&tile(8, 8, 5, 6), 8, 8, 8, &bucket_boundaries(8));
        #[rustfmt::skip]
        let want = [0, 1, 2, 4, 5, 6, 0, 0, 8, 9, 10, 12, 13, 14, 0, 0, 24, 25, 26, 28, 29, 30, 0, 0,
            32, 33, 34, 36, 37, 38, 0, 0, 48, 49, 50, 52, 53, 54, 0, 0];
        assert_eq!(ids[..40], want);
        assert!(ids[40..].iter().all(|&i| i == 0));

        let ids = position_ids(&tile(19, 19, 19, 19), 19, 19, 19, &bucket_boundaries(19));
        assert_eq!(ids[..19], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 13, 14, 15, 16, 17, 18]);
        assert_eq!(ids[12 * 19], 11 * 19, "row 12 takes row 11's positions");

        let ids = position_ids(&tile(27, 27, 13, 20), 27, 27, 27, &bucket_boundaries(27));
        assert_eq!(ids[..20], [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 20, 21, 22, 24, 25]);
        let col0: Vec<u32> = (0..13).map(|i| ids[i * 27] / 27).collect();
        assert_eq!(col0, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]);
    }

    /// The order the fixture README states: token (i, j) = patches (2i+a, 2j+b), a outer.
    #[test]
    fn pixel_shuffle_concatenates_row_pairs_outer() {
        // 4x4 patches, one feature each: patch (r, c) holds 10r + c.
        let x = Tensor::from_vec((0..16).map(|k| (10 * (k / 4) + k % 4) as f32).collect::<Vec<_>>(), (1, 16, 1), &Device::Cpu).unwrap();
        let y = pixel_shuffle(&x, 2).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(y[0], [[0., 1., 10., 11.], [2., 3., 12., 13.], [20., 21., 30., 31.], [22., 23., 32., 33.]]);
    }

    #[test]
    fn patch_mask_marks_patches_with_any_real_pixel() {
        // One 4x4 tile, patches of 2: real pixels in rows 0..3, columns 0..1.
        let pixels: Vec<u8> = (0..16).map(|k| u8::from(k / 4 < 3 && k % 4 < 1)).collect();
        assert_eq!(patch_mask(&pixels, 1, 4, 4, 2), [true, false, true, false]);
    }

    #[test]
    fn mmproj_names_follow_llama_cpp() {
        assert_eq!(GGUF_NAMES.map("vision_model.encoder.layers.1.mlp.fc1.weight").unwrap(), "v.blk.1.ffn_up.weight");
        assert_eq!(GGUF_NAMES.map("vision_model.encoder.layers.0.self_attn.out_proj.bias").unwrap(), "v.blk.0.attn_out.bias");
        assert_eq!(GGUF_NAMES.map("vision_model.post_layernorm.weight").unwrap(), "v.post_ln.weight");
        assert_eq!(GGUF_NAMES.map("connector.modality_projection.proj.weight").unwrap(), "mm.model.fc.weight");
    }
}
