//! Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower on the whole image, its
//! patches average-pooled to `mm_tokens_per_image` soft tokens, normed (`mm_soft_emb_norm`,
//! scaling by 1 + weight) and projected (`mm_input_projection_weight`); the Gemma 3
//! decoder (seer's one decoder with its Gemma settings), where an image's tokens see each
//! other whole.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::clip::{Activation, ClipVisionConfig};
use crate::gguf::GgufFile;
use crate::error::{ModelError, Result};
use crate::idefics3::{self, VisionTransformer};
use crate::kv_cache::KvCache;
use crate::layers::RmsNorm;
use crate::llama::{Llama, LlamaConfig, GEMMA3_GGUF_NAMES};
use crate::llava::find_prefix;
use crate::weights::{GgufNames, GgufSource, SafetensorsSource, LoadPlan, Vb};

#[derive(Debug, Clone)]
pub struct Gemma3Config {
    pub vision: ClipVisionConfig,
    pub text: LlamaConfig,
    /// Soft tokens per image (256 in the released models).
    pub mm_tokens_per_image: usize,
    pub image_token_id: u32,
    pub boi_token_id: u32,
    pub eoi_token_id: u32,
}

impl Gemma3Config {
    pub fn from_hf(config: &Value) -> Result<Self> {
        // SiglipVisionConfig's defaults, where the config leaves them out.
        let mut vision = json!({
            "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
            "image_size": 896, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        });
        if let (Some(out), Some(Value::Object(given))) = (vision.as_object_mut(), config.get("vision_config")) {
            out.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let id = |key: &str, default: u64| config.get(key).and_then(Value::as_u64).unwrap_or(default) as u32;
        let empty = json!({});
        Ok(Gemma3Config {
            // Feature layer -1: every layer runs.
            vision: ClipVisionConfig::from_hf(&vision, -1)?,
            text: LlamaConfig::from_hf(config.get("text_config").unwrap_or(&empty), config)?,
            mm_tokens_per_image: config.get("mm_tokens_per_image").and_then(Value::as_u64).unwrap_or(256) as usize,
            image_token_id: id("image_token_index", 262144),
            boi_token_id: id("boi_token_index", 255999),
            eoi_token_id: id("eoi_token_index", 256000),
        })
    }
}

/// llama.cpp's names for the projector.
const PROJECTOR_GGUF_NAMES: GgufNames = GgufNames {
    whole: &[("mm_soft_emb_norm.weight", "mm.soft_emb_norm.weight"), ("mm_input_projection_weight", "mm.input_projection.weight")],
    layers: "-",
    blocks: "-",
    modules: &[],
};

const TEXT_PREFIXES: [&str; 2] = ["language_model.model", "model.language_model"];
const VISION_PREFIXES: [&str; 4] = ["vision_tower.vision_model", "vision_tower", "model.vision_tower.vision_model", "model.vision_tower"];
const PROJECTOR_PREFIXES: [&str; 2] = ["multi_modal_projector", "model.multi_modal_projector"];

/// `Gemma3MultiModalProjector`.
struct Projector {
    norm: RmsNorm,
    /// `[vision hidden, text hidden]`, applied as `x · W`.
    weight: Tensor,
    /// Patches per side of the tower's grid, and per side of a pooling window.
    side: usize,
    pool: usize,
}

impl Projector {
    /// `norm_offset`: the norm's weight stored centred on 0 (Hugging Face) or with the 1
    /// added (llama.cpp).
    fn load(vb: &Vb, c: &Gemma3Config, norm_offset: bool) -> Result<Self> {
        let side = c.vision.image_size / c.vision.patch_size;
        let per_side = (c.mm_tokens_per_image as f64).sqrt() as usize;
        if per_side * per_side != c.mm_tokens_per_image || per_side == 0 || !side.is_multiple_of(per_side) {
            return Err(ModelError::Config(format!("{} tokens per image do not pool a {side}x{side} patch grid", c.mm_tokens_per_image)));
        }
        Ok(Projector {
            norm: if norm_offset {
                RmsNorm::load_offset(&vb.pp("mm_soft_emb_norm"), c.vision.hidden_size, c.vision.layer_norm_eps)?
            } else {
                RmsNorm::load(&vb.pp("mm_soft_emb_norm"), c.vision.hidden_size, c.vision.layer_norm_eps)?
            },
            weight: vb.tensor_shaped("mm_input_projection_weight", &[c.vision.hidden_size, c.text.hidden_size])?,
            side,
            pool: side / per_side,
        })
    }

    /// `[n, side², d]` → `[n, tokens, text hidden]`: average over each pool × pool window
    /// of the patch grid (row-major), norm, project.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, _, d) = x.dims3()?;
        let (s, k) = (self.side / self.pool, self.pool);
        let pooled = x.reshape((n, s, k, s, k, d))?.sum(4)?.sum(2)?.affine(1.0 / (k * k) as f64, 0.0)?.reshape((n, s * s, d))?;
        self.norm.forward(&pooled)?.broadcast_matmul(&self.weight)
    }
}

pub struct Gemma3 {
    vision_tower: VisionTransformer,
    projector: Projector,
    pub language_model: Llama,
    pub config: Gemma3Config,
}

impl Gemma3 {
    /// From a Hugging Face folder whose `config.json` has been parsed into `config`.
    pub fn load_hf(src: Arc<SafetensorsSource>, config: &Value, plan: &LoadPlan) -> Result<Self> {
        let c = Gemma3Config::from_hf(config)?;
        if c.text.gemma.is_none() {
            return Err(ModelError::Config("Gemma 3's text_config is not `gemma3_text`".into()));
        }
        let text = find_prefix(&*src, &TEXT_PREFIXES, "embed_tokens.weight")?;
        let vision = find_prefix(&*src, &VISION_PREFIXES, "embeddings.patch_embedding.weight")?;
        let projector = find_prefix(&*src, &PROJECTOR_PREFIXES, "mm_input_projection_weight")?;
        let root = Vb::new(src);
        let text_vb = root.pp(text).for_text(plan);
        Ok(Gemma3 {
            vision_tower: VisionTransformer::load(&root.pp(vision).for_vision(plan), &c.vision)?,
            projector: Projector::load(&root.pp(projector), &c, true)?,
            // The output matrix is the embedding matrix (tied).
            language_model: Llama::load(&text_vb, &text_vb, &c.text)?,
            config: c,
        })
    }

    /// From a llama.cpp `gemma3` text model and its `gemma3` projector file.
    pub fn load_gguf(text: Arc<GgufFile>, mmproj: Arc<GgufFile>, plan: &LoadPlan) -> Result<Self> {
        let mut vision = ClipVisionConfig::from_gguf(&mmproj)?;
        // The converter marks SigLIP's `gelu_pytorch_tanh` as `clip.use_gelu`.
        vision.hidden_act = Activation::GeluTanh;
        let side = vision.image_size / vision.patch_size;
        let pool = mmproj.opt_u32("clip.vision.projector.scale_factor").unwrap_or(4) as usize;
        let token = |name: &str| text.token_id(name).ok_or_else(|| ModelError::Mismatch(format!("{}: the vocabulary has no `{name}` for Gemma 3's images", text.path().display())));
        let c = Gemma3Config {
            vision,
            text: LlamaConfig::from_gguf(&text)?,
            mm_tokens_per_image: (side / pool.max(1)).pow(2),
            image_token_id: token("<image_soft_token>")?,
            boi_token_id: token("<start_of_image>")?,
            eoi_token_id: token("<end_of_image>")?,
        };
        if c.text.gemma.is_none() {
            return Err(ModelError::Mismatch(format!("{}: a `gemma3` projector needs a `gemma3` text model", mmproj.path().display())));
        }
        let vision_vb = Vb::new(Arc::new(GgufSource::new(mmproj.clone(), Arc::new(|n: &str| idefics3::GGUF_NAMES.map(n)))));
        let projector_vb = Vb::new(Arc::new(GgufSource::new(mmproj, Arc::new(|n: &str| PROJECTOR_GGUF_NAMES.map(n)))));
        let text_vb = Vb::new(Arc::new(GgufSource::new(text, Arc::new(|n: &str| GEMMA3_GGUF_NAMES.map(n))))).for_text(plan);
        Ok(Gemma3 {
            vision_tower: VisionTransformer::load(&vision_vb.pp("vision_model").for_vision(plan), &c.vision)?,
            projector: Projector::load(&projector_vb, &c, false)?,
            language_model: Llama::load(&text_vb, &text_vb, &c.text)?,
            config: c,
        })
    }

    /// `pixels` is `[n, 3, size, size]`; returns `[n, mm_tokens_per_image, hidden]`.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        let features = self.vision_tower.forward_whole(&pixels.to_dtype(DType::F32)?)?;
        Ok(self.projector.forward(&features)?)
    }

    pub fn new_cache(&self) -> KvCache {
        self.language_model.new_cache()
    }
}
