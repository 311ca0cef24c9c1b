//! LLaVA 1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower, a two-layer MLP
//! projector, and a LLaMA decoder that reads the projected patches as if they were tokens.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use serde_json::Value;

use crate::clip::{self, Activation, ClipVisionConfig, ClipVisionTransformer};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::llama::{self, Llama, LlamaConfig};
use crate::weights::{GgufNames, GgufSource, NameMap, SafetensorsSource, TensorSource, LoadPlan, Vb};

#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub vision: ClipVisionConfig,
    pub text: LlamaConfig,
    /// Keep the class token ("full") or drop it ("default").
    pub keep_class_token: bool,
    pub projector_act: Activation,
    pub projector_bias: bool,
    pub image_token_id: Option<u32>,
}

impl LlavaConfig {
    pub fn from_hf(config: &Value) -> Result<Self> {
        let empty = Value::Object(Default::default());
        let feature_layer = config.get("vision_feature_layer").and_then(Value::as_i64).unwrap_or(-2);
        let strategy = config.get("vision_feature_select_strategy").and_then(Value::as_str).unwrap_or("default");
        let keep_class_token = match strategy {
            "default" => false,
            "full" => true,
            other => return Err(ModelError::Config(format!("vision_feature_select_strategy `{other}` is unknown"))),
        };
        let act = config.get("projector_hidden_act").and_then(Value::as_str).unwrap_or("gelu");
        Ok(LlavaConfig {
            vision: ClipVisionConfig::from_hf(config.get("vision_config").unwrap_or(&empty), feature_layer)?,
            text: LlamaConfig::from_hf(config.get("text_config").unwrap_or(&empty), config)?,
            keep_class_token,
            projector_act: Activation::from_name(act)?,
            projector_bias: config.get("multimodal_projector_bias").and_then(Value::as_bool).unwrap_or(true),
            image_token_id: config
                .get("image_token_index")
                .or_else(|| config.get("image_token_id"))
                .and_then(Value::as_u64)
                .map(|x| x as u32),
        })
    }

    /// Embeddings one image becomes in the decoder's sequence.
    pub fn image_tokens(&self) -> usize {
        self.vision.num_patches() + usize::from(self.keep_class_token)
    }
}

/// Where each part's weights live. Checkpoints disagree: the hub's 2024 files use
/// `language_model.model.*` and `vision_tower.vision_model.*`, transformers 5 writes
/// `vision_tower.*` or `model.language_model.*` depending on the version. Each part is
/// found by probing for one tensor it must have.
const TEXT_PREFIXES: [&str; 2] = ["language_model.model", "model.language_model"];
const LM_HEAD_PREFIXES: [&str; 2] = ["language_model", ""];
const VISION_PREFIXES: [&str; 4] =
    ["vision_tower.vision_model", "vision_tower", "model.vision_tower.vision_model", "model.vision_tower"];
const PROJECTOR_PREFIXES: [&str; 2] = ["multi_modal_projector", "model.multi_modal_projector"];

pub(crate) fn find_prefix(src: &dyn TensorSource, prefixes: &[&'static str], probe: &str) -> Result<&'static str> {
    let join = |p: &str| if p.is_empty() { probe.to_string() } else { format!("{p}.{probe}") };
    prefixes.iter().copied().find(|p| src.contains(&join(p))).ok_or_else(|| ModelError::MissingTensor {
        name: prefixes.iter().map(|p| join(p)).collect::<Vec<_>>().join(" or "),
        source_desc: src.describe(),
    })
}

struct Projector {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl Projector {
    fn load(vb: &Vb, c: &LlavaConfig) -> Result<Self> {
        let (v, t) = (c.vision.hidden_size, c.text.hidden_size);
        let linear_2_out = vb.shape("linear_2.weight")?[0];
        if linear_2_out != t {
            return Err(ModelError::Mismatch(format!(
                "the projector in {} produces embeddings of size {linear_2_out}, but the text model's hidden size is {t}",
                vb.describe()
            )));
        }
        Ok(Projector {
            linear_1: vb.pp("linear_1").linear(v, t, c.projector_bias)?,
            linear_2: vb.pp("linear_2").linear(t, t, c.projector_bias)?,
            act: c.projector_act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&self.act.apply(&self.linear_1.forward(x)?)?)
    }
}

pub struct Llava {
    vision_tower: ClipVisionTransformer,
    projector: Projector,
    pub language_model: Llama,
    pub config: LlavaConfig,
}

impl Llava {
    /// From a Hugging Face folder whose `config.json` has been parsed into `config`.
    /// `plan.isq` quantizes the language model's matrices as they load; the vision tower
    /// and projector stay dense (a small part of the weights, run once per image), in f32,
    /// or in bf16 with `plan.vision_bf16`.
    pub fn load_hf(src: Arc<SafetensorsSource>, config: &Value, plan: &LoadPlan) -> Result<Self> {
        let c = LlavaConfig::from_hf(config)?;
        let text = find_prefix(&*src, &TEXT_PREFIXES, "embed_tokens.weight")?;
        let vision = find_prefix(&*src, &VISION_PREFIXES, "embeddings.patch_embedding.weight")?;
        let projector = find_prefix(&*src, &PROJECTOR_PREFIXES, "linear_1.weight")?;
        // No lm_head at all means tied embeddings: any prefix will do.
        let lm_head = find_prefix(&*src, &LM_HEAD_PREFIXES, "lm_head.weight").unwrap_or("");
        let root = Vb::new(src);
        let at = |prefix: &str| if prefix.is_empty() { root.clone() } else { root.pp(prefix) };
        Ok(Llava {
            vision_tower: ClipVisionTransformer::load(&at(vision).for_vision(plan), &c.vision)?,
            projector: Projector::load(&at(projector).for_vision(plan), &c)?,
            language_model: Llama::load(&at(text).for_text(plan), &at(lm_head).for_text(plan), &c.text)?,
            config: c,
        })
    }

    /// From a llama.cpp text model and its LLaVA projector file; `plan.vision_bf16` runs
    /// the projector file's matrices in bf16.
    pub fn load_gguf(text: Arc<GgufFile>, mmproj: Arc<GgufFile>, plan: &LoadPlan) -> Result<Self> {
        check_projector_type(&mmproj)?;
        let text_cfg = LlamaConfig::from_gguf(&text)?;
        let vision = ClipVisionConfig::from_gguf(&mmproj)?;
        require_projected_size(&mmproj, &text, mmproj.tensor_shape("mm.2.weight")?[0], text_cfg.hidden_size)?;
        let c = LlavaConfig {
            vision,
            text: text_cfg,
            keep_class_token: false,
            projector_act: Activation::Gelu,
            projector_bias: true,
            image_token_id: None,
        };
        let vision_vb = Vb::new(Arc::new(GgufSource::new(mmproj.clone(), clip_name_map(&mmproj, &c.vision))));
        let projector_vb = Vb::new(Arc::new(GgufSource::new(mmproj.clone(), Arc::new(|n: &str| PROJECTOR_GGUF_NAMES.map(n)))));
        let text_vb = Vb::new(Arc::new(GgufSource::new(text, Arc::new(|n: &str| llama::GGUF_NAMES.map(n))))).for_text(plan);
        Ok(Llava {
            vision_tower: ClipVisionTransformer::load(&vision_vb.for_vision(plan), &c.vision)?,
            projector: Projector::load(&projector_vb.for_vision(plan), &c)?,
            language_model: Llama::load(&text_vb, &text_vb, &c.text)?,
            config: c,
        })
    }

    /// `pixels` is `[n_images, 3, size, size]`; returns `[n_images, image_tokens, hidden]`.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        let features = self.vision_tower.forward(pixels)?;
        let features = if self.config.keep_class_token {
            features
        } else {
            let n = features.dim(1)?;
            features.narrow(1, 1, n - 1)?
        };
        Ok(self.projector.forward(&features)?)
    }

    pub fn new_cache(&self) -> KvCache {
        self.language_model.new_cache()
    }
}

/// Refuses an mmproj whose `clip.projector_type` (`clip.vision.projector_type` in older
/// files; `default` when neither is there) is not `wanted`.
pub(crate) fn require_projector_type(mmproj: &GgufFile, default: &str, wanted: &str, supported: &str) -> Result<()> {
    let kind = mmproj
        .opt_str("clip.projector_type")
        .or_else(|| mmproj.opt_str("clip.vision.projector_type"))
        .unwrap_or(default);
    if kind != wanted {
        return Err(ModelError::UnsupportedArchitecture {
            found: format!("projector type `{kind}` in {}", mmproj.path().display()),
            supported: supported.into(),
        });
    }
    Ok(())
}

/// Refuses a projector whose embeddings (`projected` wide) do not fit the text model.
pub(crate) fn require_projected_size(mmproj: &GgufFile, text: &GgufFile, projected: usize, hidden: usize) -> Result<()> {
    if projected != hidden {
        return Err(ModelError::Mismatch(format!(
            "projector {} produces embeddings of size {projected}, but text model {} has hidden size {hidden}: \
             this mmproj belongs to another model",
            mmproj.path().display(),
            text.path().display(),
        )));
    }
    Ok(())
}

fn check_projector_type(mmproj: &GgufFile) -> Result<()> {
    require_projector_type(mmproj, "mlp", "mlp", "mlp (LLaVA 1.5)")?;
    if !mmproj.has_tensor("mm.0.weight") || !mmproj.has_tensor("mm.2.weight") {
        return Err(ModelError::Mismatch(format!(
            "{} is not a LLaVA projector file (no mm.0/mm.2 tensors)",
            mmproj.path().display()
        )));
    }
    Ok(())
}

/// The legacy LLaVA converter wrote fc1 as `ffn_down`; llama.cpp detects it by shape, and
/// so do we.
fn clip_name_map(mmproj: &GgufFile, c: &ClipVisionConfig) -> NameMap {
    let swapped = mmproj
        .tensor_shape("v.blk.0.ffn_down.weight")
        .map(|s| s == [c.intermediate_size, c.hidden_size])
        .unwrap_or(false);
    Arc::new(move |name: &str| if swapped { clip::GGUF_NAMES.map(&clip::swap_fc(name)) } else { clip::GGUF_NAMES.map(name) })
}

/// llama.cpp numbers the projector's layers as in the original LLaVA code's
/// `nn.Sequential`: linear, GELU, linear.
const PROJECTOR_GGUF_NAMES: GgufNames = GgufNames {
    whole: &[
        ("linear_1.weight", "mm.0.weight"),
        ("linear_1.bias", "mm.0.bias"),
        ("linear_2.weight", "mm.2.weight"),
        ("linear_2.bias", "mm.2.bias"),
    ],
    layers: "",
    blocks: "",
    modules: &[],
};

/// Finds the weight files of a Hugging Face folder: the shards named by
/// `model.safetensors.index.json`, or every `*.safetensors` file.
pub fn safetensors_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<_> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: index.clone(),
            format: "JSON",
            detail: e.to_string(),
        })?;
        let map = json.get("weight_map").and_then(Value::as_object).ok_or_else(|| ModelError::Format {
            path: index.clone(),
            format: "safetensors index",
            detail: "no weight_map".into(),
        })?;
        let mut names: Vec<_> = map.values().filter_map(Value::as_str).map(|s| dir.join(s)).collect();
        names.sort();
        names.dedup();
        names
    } else {
        let entries = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect()
    };
    files.sort();
    if files.is_empty() {
        return Err(ModelError::io(
            dir.join("model.safetensors"),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no .safetensors files in the folder"),
        ));
    }
    for f in &files {
        if !f.exists() {
            return Err(ModelError::io(f, std::io::Error::new(std::io::ErrorKind::NotFound, "listed in the index but missing")));
        }
    }
    Ok(files)
}
