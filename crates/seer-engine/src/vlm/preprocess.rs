//! How each family's images become pixel blocks and prompt text, and how the prompt
//! marks where they go.

use super::*;


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
    /// Llama 3.2 Vision's tiles (`MllamaImageProcessorPil`).
    Mllama(seer_vision::mllama::MllamaProcessorConfig),
    /// What llama.cpp does for Gemma 3's projector: letterbox on black (bilinear), normalize.
    LlamaCppGemma3 { size: u32, mean: [f32; 3], std: [f32; 3] },
    /// Gemma 3: the whole image resized to the tower's size (`Gemma3ImageProcessorPil`),
    /// then its pan-and-scan crops if the processor asks for them; the processor writes
    /// `full` (the soft tokens between `<start_of_image>` and `<end_of_image>`) for each,
    /// where the template wrote `boi`.
    Gemma3 { cfg: ClipProcessorConfig, boi: String, full: String, pan_and_scan: Option<seer_vision::gemma3::PanAndScan> },
}

impl Preprocess {
    /// What happens to transparency: HF processors composite onto white, llama.cpp drops it.
    pub fn alpha_mode(&self) -> seer_vision::AlphaMode {
        match self {
            Preprocess::Qwen2Vl(cfg) if cfg.style == Qwen2VlStyle::LlamaCpp => seer_vision::AlphaMode::Drop,
            Preprocess::Hf(_)
            | Preprocess::Idefics3 { order: PassOrder::Pillow13, .. }
            | Preprocess::Qwen2Vl(_)
            | Preprocess::Gemma3 { .. }
            | Preprocess::Mllama(_) => {
                seer_vision::AlphaMode::OverWhite
            }
            Preprocess::Idefics3 { .. } => seer_vision::AlphaMode::Drop,
            // transformers composites onto white; llama.cpp (its resampler's pass order) drops alpha
            Preprocess::LlavaNext { cfg, .. } if cfg.order == PassOrder::Pillow13 => seer_vision::AlphaMode::OverWhite,
            Preprocess::LlavaNext { .. } => seer_vision::AlphaMode::Drop,
            Preprocess::LlamaCppLlava { .. } | Preprocess::LlamaCppGemma3 { .. } => seer_vision::AlphaMode::Drop,
        }
    }

    /// The blocks of pixels one image becomes (one, or one per tile). Qwen2-VL's patches
    /// are not a picture: see [`Preprocess::patches`].
    pub fn apply(&self, img: &image::RgbImage) -> Vec<Pixels> {
        match self {
            Preprocess::Qwen2Vl(_) => unreachable!("Qwen2-VL images are cut into patches, not pixel blocks"),
            Preprocess::Hf(cfg) => vec![seer_vision::clip::preprocess_hf(img, cfg)],
            Preprocess::Mllama(cfg) => seer_vision::mllama::preprocess(img, cfg).tiles,
            Preprocess::Gemma3 { cfg, pan_and_scan, .. } => {
                let crops = pan_and_scan.map(|p| p.crops(img.width(), img.height())).unwrap_or_default();
                let crops = crops.into_iter().map(|(x, y, w, h)| image::imageops::crop_imm(img, x, y, w, h).to_image());
                std::iter::once(img.clone()).chain(crops).map(|i| seer_vision::clip::preprocess_hf(&i, cfg)).collect()
            }
            Preprocess::LlamaCppLlava { size, mean, std } => vec![seer_vision::clip::preprocess_llamacpp_llava(img, *size, *mean, *std)],
            Preprocess::LlamaCppGemma3 { size, mean, std } => vec![seer_vision::clip::preprocess_llamacpp_gemma3(img, *size, *mean, *std)],
            Preprocess::Idefics3 { cfg, order } => seer_vision::idefics3::preprocess_with_order(img, cfg, *order).tiles,
            Preprocess::LlavaNext { cfg, .. } => seer_vision::llava_next::preprocess(img, cfg),
        }
    }

    /// Whether the prompt text of an image depends on its size ([`Preprocess::expansion`]).
    pub fn expands(&self) -> bool {
        matches!(self, Preprocess::Idefics3 { .. } | Preprocess::Gemma3 { .. })
    }

    /// What the chat template writes for an image where the processor expands something
    /// other than the image token (Gemma 3's `<start_of_image>`).
    pub fn marker(&self) -> Option<&str> {
        match self {
            Preprocess::Gemma3 { boi, .. } => Some(boi),
            _ => None,
        }
    }

    /// Whether the prompt needs each image's size (its text or its embedding count).
    pub fn needs_sizes(&self) -> bool {
        matches!(self, Preprocess::Idefics3 { .. } | Preprocess::Qwen2Vl(_) | Preprocess::LlavaNext { .. } | Preprocess::Gemma3 { pan_and_scan: Some(_), .. })
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
            Preprocess::Gemma3 { full, pan_and_scan, .. } => {
                let crops = pan_and_scan.map_or(0, |p| p.crops(width, height).len());
                if crops == 0 {
                    return Some((full.clone(), 1));
                }
                let rest = vec![full.as_str(); crops].join(" ");
                Some((format!("Here is the original image {full} and here are some crops to help you see better {rest}"), 1 + crops))
            }
            _ => None,
        }
    }
}

/// How the rendered prompt says "an image goes here".
pub enum ImageSlot {
    /// The image token stays in the text, and the decoder cross-attends to the image
    /// (Llama 3.2 Vision): images take no positions in the sequence.
    CrossAttention(u32),
    /// The (expanded) text holds `per_block` of this token for each block of image
    /// features: once per image for LLaVA, one run per tile for Idefics3.
    Token { id: u32, per_block: usize },
    /// The text carries a marker that is cut out; text around it is tokenized piecewise
    /// (llama.cpp's mtmd).
    Marker(String),
}
