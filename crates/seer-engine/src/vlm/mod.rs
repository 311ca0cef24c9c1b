//! A loaded vision-language model with everything a request needs around it: tokenizer,
//! chat template, image preprocessing, and how images are marked in the prompt.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use seer_models::gguf::GgufFile;
use candle_core::{Device, Tensor};
use seer_models::llama::Llama;
use seer_models::llava::{self, Llava};
use seer_models::weights::SafetensorsSource;
use seer_models::{KvCache, KvType, LoadPlan, ModelError};
use seer_models::idefics3::Idefics3;
use seer_models::gemma3::Gemma3;
use seer_models::mllama::Mllama;
use seer_models::llava_next::LlavaNext;
use seer_models::qwen2vl::{self, Qwen2Vl, RopeIndex};
use seer_vision::llava_next::{Layout, LlavaNextProcessorConfig};
use seer_vision::qwen2vl::{Qwen2VlProcessorConfig, Qwen2VlStyle};
use seer_vision::clip::{ClipProcessorConfig, Pixels};
use seer_vision::idefics3::{Idefics3ProcessorConfig, Idefics3Size};
use seer_vision::resample::{Filter, PassOrder};
use serde_json::Value;

use crate::chat::{ChatTemplate, ImageParts, Message};
use crate::error::{EngineError, Result};
use crate::files::{hf_chat_template, read_json, read_json_opt};
use crate::tokenizer::Tokenizer;

mod gguf;
mod hf;
mod preprocess;

pub use gguf::LLAMACPP_QWEN2VL_IMAGE_TOKENS;
pub use preprocess::{ImageSlot, Preprocess};

/// The architectures seer can load, for error messages.
pub const SUPPORTED: &str = "LlavaForConditionalGeneration (LLaVA 1.5), LlavaNextForConditionalGeneration (LLaVA 1.6), Gemma3ForConditionalGeneration, MllamaForConditionalGeneration (Llama 3.2 Vision), Idefics3ForConditionalGeneration \
                             (SmolVLM), Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration from a \
                             Hugging Face folder; a GGUF `gemma3` text model with a `gemma3` projector; a GGUF `llama` text model with an LLaVA `mlp` or SmolVLM `idefics3` \
                             projector (mmproj), or a `qwen2vl` text model with a `qwen2vl_merger` or \
                             `qwen2.5vl_merger` projector";


/// In-situ quantization of a Hugging Face checkpoint's language model at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isq {
    Q4_0,
    Q4K,
    Q5K,
    Q6K,
    Q8_0,
}

impl Isq {
    pub const NAMES: &'static str = "q4_0, q4k, q5k, q6k, q8_0";

    pub fn parse(s: &str) -> Option<Isq> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "q40" => Some(Isq::Q4_0),
            "q4k" => Some(Isq::Q4K),
            "q5k" => Some(Isq::Q5K),
            "q6k" => Some(Isq::Q6K),
            "q80" => Some(Isq::Q8_0),
            _ => None,
        }
    }

    pub fn ggml_type(self) -> GgmlDType {
        match self {
            Isq::Q4_0 => GgmlDType::Q4_0,
            Isq::Q4K => GgmlDType::Q4K,
            Isq::Q5K => GgmlDType::Q5K,
            Isq::Q6K => GgmlDType::Q6K,
            Isq::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// Bytes per weight, for the memory estimate.
    fn bytes_per_weight(self) -> f64 {
        let t = self.ggml_type();
        t.type_size() as f64 / t.block_size() as f64
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub isq: Option<Isq>,
    pub vision: VisionDtype,
    /// The KV cache's element type; by default f16 for quantized models, f32 otherwise.
    pub kv_cache: Option<KvType>,
    /// Qwen2-VL from GGUF: the fewest and the most merged tokens (28×28 pixels each) an
    /// image becomes, as llama.cpp's `--image-min-tokens` / `--image-max-tokens`; by
    /// default llama.cpp's [`LLAMACPP_QWEN2VL_IMAGE_TOKENS`]. Hugging Face folders keep
    /// their processor's pixel bounds.
    pub image_min_tokens: Option<usize>,
    pub image_max_tokens: Option<usize>,
    /// Where the matrix products run: `None` for seer's CPU kernels, or a device (a GPU,
    /// see [`parse_device`]) that holds the matrices and multiplies them with candle's
    /// kernels while the rest of the model stays on the CPU.
    pub products_on: Option<Device>,
}

impl LoadOptions {
    /// The model crate's plan: `vision_bf16_auto` says whether the files already gave up
    /// f32 precision (a 16-bit mmproj, or `--isq`).
    fn plan(&self, vision_bf16_auto: bool) -> LoadPlan {
        LoadPlan { isq: self.isq.map(Isq::ggml_type), vision_bf16: self.vision.bf16(vision_bf16_auto), products_on: self.products_on.clone() }
    }
}

/// `cpu` (seer's own kernels; `None`), `cuda` or `cuda:N` (the N-th GPU, with the `cuda`
/// feature).
pub fn parse_device(s: &str) -> Result<Option<Device>> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(None);
    }
    let unknown = || EngineError::BadRequest(format!("unknown device `{s}`: expected cpu, cuda or cuda:N"));
    let rest = s.strip_prefix("cuda").ok_or_else(unknown)?;
    let ordinal = match rest.strip_prefix(':') {
        Some(n) => n.parse::<usize>().map_err(|_| EngineError::BadRequest(format!("device `{s}`: `{n}` is not a GPU number")))?,
        None if rest.is_empty() => 0,
        None => return Err(unknown()),
    };
    if !cfg!(feature = "cuda") {
        return Err(EngineError::BadRequest(format!(
            "device `{s}`: this seer was built without the `cuda` feature (rebuild with `cargo build --release -p seer-cli --features cuda`)"
        )));
    }
    Device::new_cuda(ordinal).map(Some).map_err(|e| {
        // The driver's own words, without the backtrace candle attaches.
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        EngineError::BadRequest(format!("device `{s}` cannot be opened: {e}"))
    })
}

/// The precision of the vision tower's and projector's matrix products.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VisionDtype {
    /// bf16 where the CPU has AVX512-BF16 and precision was already given up for speed:
    /// an mmproj stored in 16 bits, or a checkpoint loaded with `--isq`. Otherwise f32.
    #[default]
    Auto,
    F32,
    Bf16,
}

impl VisionDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(VisionDtype::Auto),
            "f32" => Some(VisionDtype::F32),
            "bf16" => Some(VisionDtype::Bf16),
            _ => None,
        }
    }

    fn bf16(self, auto: bool) -> bool {
        match self {
            VisionDtype::Auto => auto,
            VisionDtype::F32 => false,
            VisionDtype::Bf16 => true,
        }
    }
}

/// The architectures behind one interface: what the request path needs of a model.
pub enum Model {
    Llava(Llava),
    Mllama(Mllama),
    Gemma3(Gemma3),
    LlavaNext(LlavaNext),
    Idefics3(Idefics3),
    Qwen2Vl(Qwen2Vl),
}

impl Model {
    pub fn language_model(&self) -> &Llama {
        match self {
            Model::Llava(m) => &m.language_model,
            Model::LlavaNext(m) => &m.llava.language_model,
            Model::Gemma3(m) => &m.language_model,
            Model::Mllama(m) => &m.language_model,
            Model::Idefics3(m) => &m.language_model,
            Model::Qwen2Vl(m) => &m.language_model,
        }
    }

    fn language_model_mut(&mut self) -> &mut Llama {
        match self {
            Model::Llava(m) => &mut m.language_model,
            Model::LlavaNext(m) => &mut m.llava.language_model,
            Model::Gemma3(m) => &mut m.language_model,
            Model::Mllama(m) => &mut m.language_model,
            Model::Idefics3(m) => &mut m.language_model,
            Model::Qwen2Vl(m) => &mut m.language_model,
        }
    }

    pub fn new_cache(&self) -> KvCache {
        self.language_model().new_cache()
    }

    /// Embeddings per block of image features (an image, or one tile of it), where the
    /// architecture fixes it; `None` where it follows the image's size (Qwen2-VL).
    pub fn block_tokens(&self) -> Option<usize> {
        match self {
            Model::Llava(m) => Some(m.config.image_tokens()),
            Model::Idefics3(m) => Some(m.config.image_seq_len()),
            Model::Gemma3(m) => Some(m.config.mm_tokens_per_image),
            Model::Qwen2Vl(_) | Model::LlavaNext(_) | Model::Mllama(_) => None,
        }
    }

    /// Each block's embeddings (`[tokens, hidden]`), in order.
    pub fn encode_images(&self, images: &ImageBatch) -> seer_models::Result<Vec<Tensor>> {
        let stacked = match self {
            Model::Llava(m) => m.encode_images(&images.pixels)?,
            Model::Gemma3(m) => m.encode_images(&images.pixels)?,
            // Each image's cross-attention states.
            Model::Mllama(m) => {
                let mut at = 0;
                return images
                    .tiles
                    .iter()
                    .map(|&(n, id)| {
                        at += n;
                        m.encode_image(&images.pixels.narrow(0, at - n, n)?, id)
                    })
                    .collect();
            }
            // Each image is its base tile and grid tiles, packed into one block.
            Model::LlavaNext(m) => {
                let mut start = 0;
                return images
                    .layouts
                    .iter()
                    .map(|layout| {
                        let n = 1 + layout.tiles.0 * layout.tiles.1;
                        start += n;
                        m.encode_image(&images.pixels.narrow(0, start - n, n)?, layout)
                    })
                    .collect();
            }
            // Every tile is a full square, so no patch is padding. One tile at a time: a
            // dozen tiles' attention scores at once would take hundreds of MiB.
            Model::Idefics3(m) => {
                let tiles = (0..images.pixels.dim(0)?).map(|i| m.encode_images(&images.pixels.narrow(0, i, 1)?, None));
                Tensor::cat(&tiles.collect::<seer_models::Result<Vec<_>>>()?, 0)?
            }
            Model::Qwen2Vl(m) => {
                let all = m.encode_images(&images.pixels, &images.grids)?;
                let merge = m.config.vision.merge_size;
                let mut start = 0;
                return images
                    .grids
                    .iter()
                    .map(|g| {
                        let n = g.iter().product::<usize>() / (merge * merge);
                        start += n;
                        Ok(all.narrow(0, start - n, n)?)
                    })
                    .collect();
            }
        };
        (0..stacked.dim(0)?).map(|i| Ok(stacked.get(i)?)).collect()
    }

    /// Whether an image's tokens attend to each other both ways (Gemma 3).
    pub fn bidirectional_images(&self) -> bool {
        matches!(self, Model::Gemma3(_))
    }

    /// The M-RoPE positions of a prompt, for the architectures that place image tokens on
    /// a grid: `ids` holds [`IMAGE_SLOT`] once per image embedding.
    pub fn rope_index(&self, ids: &[u32], images: &ImageBatch) -> seer_models::Result<Option<RopeIndex>> {
        match self {
            Model::Qwen2Vl(m) => Ok(Some(qwen2vl::mrope_positions(ids, IMAGE_SLOT, &images.grids, m.config.vision.merge_size)?)),
            _ => Ok(None),
        }
    }
}

/// Stands for an image embedding in a prompt's ids where only its place matters; no
/// vocabulary is this large.
pub const IMAGE_SLOT: u32 = u32::MAX;

/// Every image of a request, preprocessed: the pixels of each block (an image, or a tile
/// of one) stacked in prompt order.
pub struct ImageBatch {
    /// `[blocks, 3, height, width]`; for Qwen2-VL the flattened patches of every image,
    /// `[patches, patch_dim]`.
    pub pixels: Tensor,
    /// Qwen2-VL: each image's (frames, rows, columns) of patches.
    pub grids: Vec<[usize; 3]>,
    /// LLaVA-NeXT: each image's tiles and the window of features kept.
    pub layouts: Vec<Layout>,
    /// Llama 3.2 Vision: each image's real tiles and aspect-ratio id.
    pub tiles: Vec<(usize, usize)>,
}

pub struct Vlm {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub image_parts: ImageParts,
    pub image_slot: ImageSlot,
    pub preprocess: Preprocess,
    /// What was loaded, for logs and `/v1/models`.
    pub name: String,
    /// Compiles JSON schemas and grammars against this tokenizer.
    pub grammars: crate::constraint::Grammars,
}

impl Vlm {
    /// `model` is a Hugging Face folder, or a GGUF text model with `mmproj` beside it.
    pub fn load(model: &Path, mmproj: Option<&Path>) -> Result<Vlm> {
        Self::load_with(model, mmproj, &LoadOptions::default())
    }

    pub fn load_with(model: &Path, mmproj: Option<&Path>, opts: &LoadOptions) -> Result<Vlm> {
        if !model.exists() {
            return Err(ModelError::io(model, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")).into());
        }
        if model.is_dir() {
            if mmproj.is_some() {
                return Err(EngineError::BadRequest(format!(
                    "--mmproj is for GGUF models; {} is a Hugging Face folder with its own vision tower",
                    model.display()
                )));
            }
            return hf::load_hf(model, opts).map(|v| v.with_kv_cache(opts.kv_cache));
        }
        if opts.isq.is_some() {
            return Err(EngineError::BadRequest(format!(
                "--isq quantizes Hugging Face checkpoints as they load; {} is a GGUF file, already in its own type",
                model.display()
            )));
        }
        let mmproj = mmproj.ok_or_else(|| {
            EngineError::BadRequest(format!(
                "{} is a single file: a GGUF text model needs its projector, given with --mmproj",
                model.display()
            ))
        })?;
        gguf::load_gguf(model, mmproj, opts).map(|v| v.with_kv_cache(opts.kv_cache))
    }

    fn with_kv_cache(mut self, dtype: Option<KvType>) -> Self {
        if let Some(d) = dtype {
            self.model.language_model_mut().kv_dtype = d;
        }
        self
    }

    /// Embeddings per block of image features where the architecture fixes it.
    pub fn image_tokens(&self) -> Option<usize> {
        self.model.block_tokens()
    }

    pub fn context_length(&self) -> usize {
        self.model.language_model().context_length()
    }

    pub fn render(&self, messages: &[Message]) -> Result<String> {
        self.template.render(messages, &self.image_parts, true)
    }
}
