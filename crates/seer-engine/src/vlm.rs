//! A loaded vision-language model with everything a request needs around it: tokenizer,
//! chat template, image preprocessing, and how images are marked in the prompt.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use seer_models::gguf::GgufFile;
use candle_core::Tensor;
use seer_models::llama::Llama;
use seer_models::llava::{self, Llava};
use seer_models::weights::SafetensorsSource;
use seer_models::{KvCache, KvType, ModelError};
use seer_models::idefics3::Idefics3;
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

/// The architectures seer can load, for error messages.
pub const SUPPORTED: &str = "LlavaForConditionalGeneration (LLaVA 1.5), LlavaNextForConditionalGeneration (LLaVA 1.6), Idefics3ForConditionalGeneration \
                             (SmolVLM), Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration from a \
                             Hugging Face folder; a GGUF `llama` text model with an LLaVA `mlp` or SmolVLM `idefics3` \
                             projector (mmproj), or a `qwen2vl` text model with a `qwen2vl_merger` or \
                             `qwen2.5vl_merger` projector";

/// llama.cpp's default media marker; any string works since it never reaches the tokenizer.
const MEDIA_MARKER: &str = "<__media__>";

/// What mtmd writes around each image's embeddings for Qwen2-VL's projectors.
const VISION_START: &str = "<|vision_start|>";
const VISION_END: &str = "<|vision_end|>";

/// llama.cpp's bounds on a Qwen2-VL image in merged tokens (clip.cpp), where
/// [`LoadOptions`] gives none: 8 .. 4096 tokens of 28×28 pixels.
pub const LLAMACPP_QWEN2VL_IMAGE_TOKENS: (usize, usize) = (8, 4096);

pub enum Preprocess {
    /// The model's Hugging Face image processor.
    Hf(ClipProcessorConfig),
    /// What llama.cpp does for an LLaVA projector: pad to square, resize, normalize.
    LlamaCppLlava { size: usize, mean: [f32; 3], std: [f32; 3] },
    /// SmolVLM's tiles plus a global image (`Idefics3ImageProcessorPil`); llama.cpp
    /// resizes with the horizontal pass first always, Pillow 13 not always.
    Idefics3 { cfg: Idefics3ProcessorConfig, order: PassOrder },
    /// Qwen2-VL's native resolution: resized to multiples of 28 within the pixel bounds,
    /// then cut into flattened patches; stretched to that size as transformers does, or
    /// letterboxed as llama.cpp does (the config's `style`).
    Qwen2Vl(Qwen2VlProcessorConfig),
    /// LLaVA-NeXT's base tile plus grid tiles (`LlavaNextImageProcessorPil`); `cells` is
    /// the model's feature cells per tile side, `base_tokens` the base tile's embeddings.
    LlavaNext { cfg: LlavaNextProcessorConfig, cells: usize, base_tokens: usize },
}

impl Preprocess {
    /// What happens to transparency: HF processors composite onto white, llama.cpp drops it.
    pub fn alpha_mode(&self) -> seer_vision::AlphaMode {
        match self {
            Preprocess::Qwen2Vl(cfg) if cfg.style == Qwen2VlStyle::LlamaCpp => seer_vision::AlphaMode::Drop,
            Preprocess::Hf(_) | Preprocess::Idefics3 { order: PassOrder::Pillow13, .. } | Preprocess::Qwen2Vl(_) | Preprocess::LlavaNext { .. } => {
                seer_vision::AlphaMode::OverWhite
            }
            Preprocess::Idefics3 { .. } => seer_vision::AlphaMode::Drop,
            Preprocess::LlamaCppLlava { .. } => seer_vision::AlphaMode::Drop,
        }
    }

    /// The blocks of pixels one image becomes (one, or one per tile). Qwen2-VL's patches
    /// are not a picture: see [`Preprocess::patches`].
    pub fn apply(&self, img: &image::RgbImage) -> Vec<Pixels> {
        match self {
            Preprocess::Qwen2Vl(_) => unreachable!("Qwen2-VL images are cut into patches, not pixel blocks"),
            Preprocess::Hf(cfg) => vec![seer_vision::clip::preprocess_hf(img, cfg)],
            Preprocess::LlamaCppLlava { size, mean, std } => vec![seer_vision::clip::preprocess_llamacpp_llava(img, *size, *mean, *std)],
            Preprocess::Idefics3 { cfg, order } => seer_vision::idefics3::preprocess_with_order(img, cfg, *order).tiles,
            Preprocess::LlavaNext { cfg, .. } => seer_vision::llava_next::preprocess(img, cfg),
        }
    }

    /// Whether the prompt text of an image depends on its size ([`Preprocess::expansion`]).
    pub fn expands(&self) -> bool {
        matches!(self, Preprocess::Idefics3 { .. })
    }

    /// Whether the prompt needs each image's size (its text or its embedding count).
    pub fn needs_sizes(&self) -> bool {
        matches!(self, Preprocess::Idefics3 { .. } | Preprocess::Qwen2Vl(_) | Preprocess::LlavaNext { .. })
    }

    /// The embeddings a `width × height` image becomes where that depends on its size
    /// (Qwen2-VL); `None` where every block has the model's fixed count.
    pub fn image_embeddings(&self, width: u32, height: u32) -> std::result::Result<Option<usize>, seer_vision::VisionError> {
        match self {
            Preprocess::Qwen2Vl(cfg) => Ok(Some(seer_vision::qwen2vl::image_tokens(seer_vision::qwen2vl::grid(width, height, cfg)?, cfg.merge_size))),
            Preprocess::LlavaNext { cfg, cells, base_tokens } => Ok(Some(cfg.layout(width, height, *cells).tokens(*base_tokens))),
            _ => Ok(None),
        }
    }

    /// The prompt text a `width × height` image stands for and the blocks of features it
    /// becomes, when the processor expands it by size (SmolVLM: a tile grid plus the global
    /// image); `None` when the image token stays as written (one block).
    pub fn expansion(&self, width: u32, height: u32) -> Option<(String, usize)> {
        match self {
            Preprocess::Idefics3 { cfg, .. } => {
                let (rows, cols) = seer_vision::idefics3::grid(width, height, cfg);
                Some((seer_vision::idefics3::prompt_for_image(rows, cols, cfg.image_seq_len), rows * cols + 1))
            }
            _ => None,
        }
    }
}

/// How the rendered prompt says "an image goes here".
pub enum ImageSlot {
    /// The (expanded) text holds `per_block` of this token for each block of image
    /// features: once per image for LLaVA, one run per tile for Idefics3.
    Token { id: u32, per_block: usize },
    /// The text carries a marker that is cut out; text around it is tokenized piecewise
    /// (llama.cpp's mtmd).
    Marker(String),
}

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
    LlavaNext(LlavaNext),
    Idefics3(Idefics3),
    Qwen2Vl(Qwen2Vl),
}

impl Model {
    pub fn language_model(&self) -> &Llama {
        match self {
            Model::Llava(m) => &m.language_model,
            Model::LlavaNext(m) => &m.llava.language_model,
            Model::Idefics3(m) => &m.language_model,
            Model::Qwen2Vl(m) => &m.language_model,
        }
    }

    fn language_model_mut(&mut self) -> &mut Llama {
        match self {
            Model::Llava(m) => &mut m.language_model,
            Model::LlavaNext(m) => &mut m.llava.language_model,
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
            Model::Qwen2Vl(_) | Model::LlavaNext(_) => None,
        }
    }

    /// Each block's embeddings (`[tokens, hidden]`), in order.
    pub fn encode_images(&self, images: &ImageBatch) -> seer_models::Result<Vec<Tensor>> {
        let stacked = match self {
            Model::Llava(m) => m.encode_images(&images.pixels)?,
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
            return load_hf(model, opts.isq, opts.vision).map(|v| v.with_kv_cache(opts.kv_cache));
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
        load_gguf(model, mmproj, opts).map(|v| v.with_kv_cache(opts.kv_cache))
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

fn load_hf(dir: &Path, isq: Option<Isq>, vision: VisionDtype) -> Result<Vlm> {
    let config = read_json(&dir.join("config.json"))?;
    let family = hf_family(&config)?;
    let files = llava::safetensors_files(dir)?;
    let src = Arc::new(SafetensorsSource::open(&files)?);
    // With ISQ most of the weights end up quantized; f32 for the rest is a safe estimate.
    let need = match isq {
        Some(q) => (src.f32_bytes() as f64 / 4.0 * q.bytes_per_weight()) as u64 + (src.f32_bytes() / 8),
        None => src.f32_bytes(),
    };
    check_memory(dir, need)?;
    let (isq_type, bf16) = (isq.map(Isq::ggml_type), vision.bf16(isq.is_some()));
    let model = match family {
        HfFamily::Llava => Model::Llava(Llava::load_hf(src, &config, isq_type, bf16)?),
        HfFamily::LlavaNext => Model::LlavaNext(LlavaNext::load_hf(src, &config, isq_type, bf16)?),
        HfFamily::Idefics3 => Model::Idefics3(Idefics3::load_hf(src, &config, isq_type, bf16)?),
        HfFamily::Qwen2Vl => Model::Qwen2Vl(Qwen2Vl::load_hf(src, &config, isq_type, bf16)?),
    };
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let source = hf_chat_template(dir)?.ok_or_else(|| {
        EngineError::Template(format!("{} has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)", dir.display()))
    })?;
    let template = ChatTemplate::new(&source, tokenizer.bos_token.as_deref().unwrap_or(""), tokenizer.eos_token.as_deref().unwrap_or(""))?;
    let configured = match &model {
        Model::Llava(m) => m.config.image_token_id,
        Model::LlavaNext(m) => m.llava.config.image_token_id,
        Model::Idefics3(m) => m.config.image_token_id,
        Model::Qwen2Vl(m) => Some(m.config.image_token_id),
    };
    let image_token = configured
        .or_else(|| tokenizer.token_to_id("<image>"))
        .ok_or_else(|| EngineError::Model(ModelError::Config("config.json names no image token".into())))?;
    let (preprocess, per_block) = match family {
        HfFamily::Llava => (Preprocess::Hf(hf_image_processor(dir)?), 1),
        // As Qwen2-VL: one image token per image in the template, the count from its size.
        HfFamily::LlavaNext => {
            let Model::LlavaNext(m) = &model else { unreachable!("the family decides the model") };
            let cfg = read_image_processor(dir, |v| LlavaNextProcessorConfig::from_json_value(v, config.get("image_grid_pinpoints")))?;
            let vision = &m.llava.config.vision;
            if cfg.tile().height as usize != vision.image_size {
                return Err(ModelError::Mismatch(format!("{}: the processor's tiles are {} px, the vision tower takes {} px", dir.display(), cfg.tile().height, vision.image_size)).into());
            }
            (Preprocess::LlavaNext { cfg, cells: m.cells_per_tile(), base_tokens: m.llava.config.image_tokens() }, 1)
        }
        HfFamily::Idefics3 => {
            let cfg = idefics3_processor(dir, model.block_tokens().unwrap_or(0))?;
            let per_block = cfg.image_seq_len;
            (Preprocess::Idefics3 { cfg, order: PassOrder::Pillow13 }, per_block)
        }
        // The template writes one image pad token per image; the processor's copies, one
        // per embedding, are counted from the image's size.
        HfFamily::Qwen2Vl => (Preprocess::Qwen2Vl(qwen2vl_processor(dir)?), 1),
    };
    // Where the processor writes one image token per embedding, the two counts must agree.
    if per_block > 1 && Some(per_block) != model.block_tokens() {
        return Err(ModelError::Mismatch(format!(
            "{}: the processor expands each image tile to {per_block} tokens, the model makes {:?} embeddings per tile",
            dir.display(),
            model.block_tokens()
        ))
        .into());
    }
    Ok(Vlm {
        model,
        tokenizer,
        template,
        image_parts: ImageParts::Structured,
        image_slot: ImageSlot::Token { id: image_token, per_block },
        preprocess,
        name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        grammars: Default::default(),
    })
}

/// Refuses a load that cannot fit, instead of letting the system kill the process halfway.
fn check_memory(dir: &Path, need: u64) -> Result<()> {
    let Some(available) = available_memory() else { return Ok(()) };
    if need > available {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(EngineError::BadRequest(format!(
            "{} needs {:.1} GiB in f32 but only {:.1} GiB of memory is available; \
             use a quantized GGUF of this model (with its mmproj) instead",
            dir.display(),
            gib(need),
            gib(available)
        )));
    }
    Ok(())
}

/// `MemAvailable` from /proc/meminfo, where there is one.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The Hugging Face architectures seer loads.
#[derive(Clone, Copy)]
enum HfFamily {
    Llava,
    LlavaNext,
    Idefics3,
    Qwen2Vl,
}

/// From `architectures` (or `model_type` where that is missing).
fn hf_family(config: &Value) -> Result<HfFamily> {
    let arch = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .or_else(|| config.get("model_type").and_then(Value::as_str))
        .unwrap_or("(none given)");
    match arch {
        "LlavaForConditionalGeneration" | "llava" => Ok(HfFamily::Llava),
        "LlavaNextForConditionalGeneration" | "llava_next" => Ok(HfFamily::LlavaNext),
        "Idefics3ForConditionalGeneration" | "idefics3" => Ok(HfFamily::Idefics3),
        "Qwen2VLForConditionalGeneration" | "Qwen2_5_VLForConditionalGeneration" | "qwen2_vl" | "qwen2_5_vl" => Ok(HfFamily::Qwen2Vl),
        other => Err(ModelError::UnsupportedArchitecture { found: other.into(), supported: SUPPORTED.into() }.into()),
    }
}

/// Qwen2-VL's image processor: `preprocessor_config.json` (the hub's) or nested in
/// `processor_config.json` (transformers 5).
fn qwen2vl_processor(dir: &Path) -> Result<Qwen2VlProcessorConfig> {
    read_image_processor(dir, Qwen2VlProcessorConfig::from_json_value)
}

/// SmolVLM's processor. transformers 5 writes one `processor_config.json` with the image
/// processor nested and `image_seq_len` beside it; the hub's folders keep the image
/// processor in `preprocessor_config.json` and only `image_seq_len` in `processor_config.json`.
/// `image_seq_len`, when no file gives it, is the model's own count (`model_seq_len`).
fn idefics3_processor(dir: &Path, model_seq_len: usize) -> Result<Idefics3ProcessorConfig> {
    let processor_path = dir.join("processor_config.json");
    let processor = read_json_opt(&processor_path)?;
    let mut value = match (&processor, read_json_opt(&dir.join("preprocessor_config.json"))?) {
        (Some(p), _) if p.get("image_processor").is_some() => p.clone(),
        (_, Some(pre)) => pre,
        (Some(p), None) => p.clone(),
        (None, None) => {
            return Err(ModelError::io(processor_path, std::io::Error::new(std::io::ErrorKind::NotFound, "no image processor config")).into())
        }
    };
    let given = processor.as_ref().and_then(|p| p.get("image_seq_len")).or_else(|| value.get("image_seq_len")).cloned();
    if let Value::Object(map) = &mut value {
        map.insert("image_seq_len".into(), given.unwrap_or_else(|| model_seq_len.into()));
    }
    Idefics3ProcessorConfig::from_json_value(&value)
        .map_err(|e| EngineError::Model(ModelError::Format { path: processor_path, format: "image processor config", detail: e.to_string() }))
}

/// `preprocessor_config.json` (2024 hub) or the `image_processor` inside
/// `processor_config.json` (transformers 5).
fn hf_image_processor(dir: &Path) -> Result<ClipProcessorConfig> {
    read_image_processor(dir, ClipProcessorConfig::from_json_value)
}

/// The first of `preprocessor_config.json` and `processor_config.json` there is, parsed.
fn read_image_processor<T>(dir: &Path, parse: impl Fn(&Value) -> std::result::Result<T, seer_vision::VisionError>) -> Result<T> {
    for name in ["preprocessor_config.json", "processor_config.json"] {
        let path = dir.join(name);
        if let Some(json) = read_json_opt(&path)? {
            return parse(&json).map_err(|e| EngineError::Model(ModelError::Format { path, format: "image processor config", detail: e.to_string() }));
        }
    }
    Err(ModelError::io(dir.join("preprocessor_config.json"), std::io::Error::new(std::io::ErrorKind::NotFound, "no image processor config")).into())
}

fn load_gguf(model: &Path, mmproj: &Path, opts: &LoadOptions) -> Result<Vlm> {
    let text = Arc::new(GgufFile::open(model)?);
    let proj = Arc::new(GgufFile::open(mmproj)?);
    let arch = text.architecture()?.to_string();
    if arch == "clip" {
        return Err(EngineError::BadRequest(format!(
            "{} is a projector (mmproj) file: pass the text model with --model and this file with --mmproj",
            model.display()
        )));
    }
    if proj.architecture()? != "clip" {
        return Err(ModelError::Mismatch(format!(
            "{} is not a projector file (general.architecture is `{}`, expected `clip`)",
            mmproj.display(),
            proj.architecture()?
        ))
        .into());
    }
    // A Qwen2-VL projector goes on to check its text model itself (M-RoPE, width).
    let qwen = qwen2vl::Variant::from_projector_type(&proj).is_some();
    if arch != "llama" && !qwen {
        return Err(ModelError::UnsupportedArchitecture { found: format!("{arch} (in {})", model.display()), supported: SUPPORTED.into() }.into());
    }
    let (tokenizer, chat_template) = Tokenizer::from_gguf(&text)?;
    let source = chat_template.ok_or_else(|| EngineError::Template(format!("{} carries no tokenizer.chat_template", model.display())))?;
    let template = ChatTemplate::new(&source, tokenizer.bos_token.as_deref().unwrap_or(""), tokenizer.eos_token.as_deref().unwrap_or(""))?;
    let model_name = model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // An mmproj whose encoder matrices are stored in 16 bits has already given up f32
    // precision (embedding tables are often kept in f32 beside them).
    let sixteen_bit = proj
        .tensor_infos()
        .filter(|t| t.shape.len() == 2 && t.name.contains(".blk."))
        .all(|t| matches!(t.dtype, Some(GgmlDType::F16 | GgmlDType::BF16)));
    let vision = opts.vision;
    if qwen {
        let (qwen, preprocess) = qwen2vl_gguf(text, &proj, vision.bf16(sixteen_bit), opts, &tokenizer)?;
        return Ok(Vlm {
            model: Model::Qwen2Vl(qwen),
            tokenizer,
            template,
            // mtmd writes `<|vision_start|>`, the image's embeddings and `<|vision_end|>`
            // where the marker was. Both are special tokens, which cut the text around
            // them, so writing them around the marker gives mtmd's ids.
            image_parts: ImageParts::MarkerFirst(format!("{VISION_START}{MEDIA_MARKER}{VISION_END}")),
            image_slot: ImageSlot::Marker(MEDIA_MARKER.into()),
            preprocess,
            name: model_name,
            grammars: Default::default(),
        });
    }
    if proj.opt_str("clip.projector_type") == Some("idefics3") {
        let smol = Idefics3::load_gguf(text, proj.clone(), vision.bf16(sixteen_bit))?;
        let image_token = smol.config.image_token_id.ok_or_else(|| {
            EngineError::Model(ModelError::Mismatch(format!("{}: the vocabulary has no `<image>` token for SmolVLM's tiles", model.display())))
        })?;
        let cfg = Idefics3ProcessorConfig {
            size: Idefics3Size::LongestEdge(proj.get_u32("clip.vision.preproc_image_size")?),
            max_image_size: proj.get_u32("clip.vision.image_size")?,
            resample: Filter::Lanczos,
            image_mean: f32x3(&proj, "clip.vision.image_mean")?.map(f64::from),
            image_std: f32x3(&proj, "clip.vision.image_std")?.map(f64::from),
            image_seq_len: smol.config.image_seq_len(),
            ..Idefics3ProcessorConfig::default()
        };
        return Ok(Vlm {
            model: Model::Idefics3(smol),
            tokenizer,
            template,
            // llama.cpp's layout: the marker first in the user's text, each image's tiles
            // written out as tokens where the marker was.
            image_parts: ImageParts::MarkerFirst(MEDIA_MARKER.into()),
            image_slot: ImageSlot::Token { id: image_token, per_block: cfg.image_seq_len },
            preprocess: Preprocess::Idefics3 { cfg, order: PassOrder::HorizontalFirst },
            name: model_name,
            grammars: Default::default(),
        });
    }
    let preprocess = Preprocess::LlamaCppLlava {
        size: proj.get_u32("clip.vision.image_size")? as usize,
        mean: f32x3(&proj, "clip.vision.image_mean")?,
        std: f32x3(&proj, "clip.vision.image_std")?,
    };
    let llava = Llava::load_gguf(text, proj, vision.bf16(sixteen_bit))?;
    Ok(Vlm {
        model: Model::Llava(llava),
        tokenizer,
        template,
        image_parts: ImageParts::MarkerFirst(MEDIA_MARKER.into()),
        image_slot: ImageSlot::Marker(MEDIA_MARKER.into()),
        preprocess,
        name: model_name,
        grammars: Default::default(),
    })
}

/// Qwen2-VL or Qwen2.5-VL from a `qwen2vl` text model and its merger mmproj, with
/// llama.cpp's preprocessing.
fn qwen2vl_gguf(text: Arc<GgufFile>, proj: &Arc<GgufFile>, vision_bf16: bool, opts: &LoadOptions, tokenizer: &Tokenizer) -> Result<(Qwen2Vl, Preprocess)> {
    let path = text.path().display().to_string();
    let qwen = Qwen2Vl::load_gguf(text, proj.clone(), vision_bf16)?;
    let preprocess = Preprocess::Qwen2Vl(llamacpp_qwen2vl_processor(proj, &qwen, opts)?);
    if let Some(missing) = [VISION_START, VISION_END].into_iter().find(|t| tokenizer.token_to_id(t).is_none()) {
        return Err(ModelError::Mismatch(format!("{path}: the vocabulary has no `{missing}` token for Qwen2-VL's images")).into());
    }
    Ok((qwen, preprocess))
}

/// mtmd's preprocessing for a Qwen2-VL projector: the tower's patching, the mmproj's
/// mean and std, llama.cpp's sizing and letterbox, and the image's size bounds in merged
/// tokens from `opts` (else llama.cpp's).
fn llamacpp_qwen2vl_processor(proj: &GgufFile, model: &Qwen2Vl, opts: &LoadOptions) -> Result<Qwen2VlProcessorConfig> {
    let v = &model.config.vision;
    let min = opts.image_min_tokens.unwrap_or(LLAMACPP_QWEN2VL_IMAGE_TOKENS.0);
    let max = opts.image_max_tokens.unwrap_or(LLAMACPP_QWEN2VL_IMAGE_TOKENS.1);
    if max == 0 || min > max {
        return Err(EngineError::BadRequest(format!(
            "image tokens {min}..{max}: the minimum must not exceed the maximum, and the maximum must be at least 1"
        )));
    }
    let token_pixels = ((v.patch_size * v.merge_size) as u64).pow(2);
    Ok(Qwen2VlProcessorConfig {
        min_pixels: min as u64 * token_pixels,
        max_pixels: max as u64 * token_pixels,
        image_mean: f32x3(proj, "clip.vision.image_mean")?.map(f64::from),
        image_std: f32x3(proj, "clip.vision.image_std")?.map(f64::from),
        patch_size: v.patch_size,
        temporal_patch_size: v.temporal_patch_size,
        merge_size: v.merge_size,
        style: Qwen2VlStyle::LlamaCpp,
        ..Qwen2VlProcessorConfig::default()
    })
}

fn f32x3(f: &GgufFile, key: &str) -> Result<[f32; 3]> {
    let bad = || EngineError::Model(ModelError::Format { path: f.path().into(), format: "GGUF", detail: format!("`{key}` is not an array of 3 floats") });
    let v = f.get(key).ok_or_else(bad)?.to_vec().map_err(|_| bad())?;
    let xs: Vec<f32> = v.iter().filter_map(|x| x.to_f32().ok()).collect();
    xs.try_into().map_err(|_| bad())
}
