//! Loading a Hugging Face folder: config.json picks the family; safetensors, the
//! tokenizer, the chat template and the image processor's settings come with it.

use super::*;

pub(super) fn load_hf(dir: &Path, opts: &LoadOptions) -> Result<Vlm> {
    let isq = opts.isq;
    let config = read_json(&dir.join("config.json"))?;
    let family = hf_family(&config)?;
    let files = llava::safetensors_files(dir)?;
    let src = Arc::new(SafetensorsSource::open(&files)?);
    // With ISQ the language model ends up quantized and the vision tower in bf16 (read in
    // place where the checkpoint is 16-bit) or f32: a quarter of a byte per weight on top
    // covers the tower and the working memory, with room to spare (an 11B Llama 3.2 Vision
    // with q4k: 8.7 GB estimated, 6.7 GiB = 7.3 GB measured at its peak).
    let need = match isq {
        Some(q) => (src.f32_bytes() as f64 / 4.0 * (q.bytes_per_weight() + 0.25)) as u64,
        None => src.f32_bytes(),
    };
    // Matrices multiplied on a GPU go there one at a time: the host keeps only the
    // embedding table, the norms and whatever matrix is on its way.
    if opts.products_on.as_ref().is_none_or(Device::is_cpu) {
        check_memory(dir, need, isq.is_some())?;
    }
    let plan = opts.plan(isq.is_some());
    let model = match family {
        HfFamily::Llava => Model::Llava(Llava::load_hf(src, &config, &plan)?),
        HfFamily::LlavaNext => Model::LlavaNext(LlavaNext::load_hf(src, &config, &plan)?),
        HfFamily::Gemma3 => Model::Gemma3(Gemma3::load_hf(src, &config, &plan)?),
        HfFamily::Mllama => Model::Mllama(Mllama::load_hf(src, &config, &plan)?),
        HfFamily::Idefics3 => Model::Idefics3(Idefics3::load_hf(src, &config, &plan)?),
        HfFamily::Qwen2Vl => Model::Qwen2Vl(Qwen2Vl::load_hf(src, &config, &plan)?),
    };
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let source = hf_chat_template(dir)?.ok_or_else(|| {
        EngineError::Template(format!("{} has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)", dir.display()))
    })?;
    let template = ChatTemplate::new(&source, tokenizer.bos_token.as_deref().unwrap_or(""), tokenizer.eos_token.as_deref().unwrap_or(""))?;
    let configured = match &model {
        Model::Llava(m) => m.config.image_token_id,
        Model::LlavaNext(m) => m.llava.config.image_token_id,
        Model::Gemma3(m) => Some(m.config.image_token_id),
        Model::Mllama(m) => Some(m.image_token_id),
        Model::Idefics3(m) => m.config.image_token_id,
        Model::Qwen2Vl(m) => Some(m.config.image_token_id),
    };
    let image_token = configured
        .or_else(|| tokenizer.token_to_id("<image>"))
        .ok_or_else(|| EngineError::Model(ModelError::Config("config.json names no image token".into())))?;
    let (preprocess, per_block) = match family {
        HfFamily::Llava => (Preprocess::Hf(hf_image_processor(dir)?), 1),
        HfFamily::Mllama => (Preprocess::Mllama(read_image_processor(dir, seer_vision::mllama::MllamaProcessorConfig::from_json_value)?), 0),
        HfFamily::Gemma3 => {
            let Model::Gemma3(m) = &model else { unreachable!("the family decides the model") };
            (gemma3_processor(dir, m, &tokenizer)?, m.config.mm_tokens_per_image)
        }
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
        image_slot: if per_block == 0 { ImageSlot::CrossAttention(image_token) } else { ImageSlot::Token { id: image_token, per_block } },
        preprocess,
        name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        grammars: Default::default(),
    })
}

/// Refuses a load that cannot fit, instead of letting the system kill the process halfway.
fn check_memory(dir: &Path, need: u64, isq: bool) -> Result<()> {
    let Some(available) = available_memory() else { return Ok(()) };
    if need > available {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let (how, advice) = if isq {
            ("quantized as asked", "try a smaller --isq type (q4k, q4_0) or a quantized GGUF of this model")
        } else {
            ("in f32", "use --isq q4k or q8_0, or a quantized GGUF of this model (with its mmproj)")
        };
        return Err(EngineError::BadRequest(format!(
            "{} needs about {:.1} GiB {how} but only {:.1} GiB of memory is available; {advice}",
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
    Mllama,
    LlavaNext,
    Gemma3,
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
        "Gemma3ForConditionalGeneration" | "gemma3" => Ok(HfFamily::Gemma3),
        "MllamaForConditionalGeneration" | "mllama" => Ok(HfFamily::Mllama),
        "Idefics3ForConditionalGeneration" | "idefics3" => Ok(HfFamily::Idefics3),
        "Qwen2VLForConditionalGeneration" | "Qwen2_5_VLForConditionalGeneration" | "qwen2_vl" | "qwen2_5_vl" => Ok(HfFamily::Qwen2Vl),
        other => Err(ModelError::UnsupportedArchitecture { found: other.into(), supported: SUPPORTED.into() }.into()),
    }
}

/// Gemma 3's image processor: a plain resize to the tower's size (no center crop), and
/// the text its processor writes for each image.
fn gemma3_processor(dir: &Path, m: &Gemma3, tokenizer: &Tokenizer) -> Result<Preprocess> {
    let mut cfg = hf_image_processor(dir)?;
    cfg.do_center_crop = false;
    if cfg.do_resize && !matches!(cfg.size, seer_vision::clip::ResizeTarget::Exact { .. }) {
        return Err(ModelError::Config(format!("{}: Gemma 3's image processor resizes to a height and width", dir.display())).into());
    }
    let name = |id: u32| {
        tokenizer.inner().id_to_token(id).ok_or_else(|| EngineError::Model(ModelError::Config(format!("the vocabulary has no token {id} for Gemma 3's images"))))
    };
    let (boi, image, eoi) = (name(m.config.boi_token_id)?, name(m.config.image_token_id)?, name(m.config.eoi_token_id)?);
    let full = format!("\n\n{boi}{}{eoi}\n\n", image.repeat(m.config.mm_tokens_per_image));
    let pan_and_scan = read_image_processor(dir, |v| Ok(seer_vision::gemma3::PanAndScan::from_json_value(v)))?;
    Ok(Preprocess::Gemma3 { cfg, boi, full, pan_and_scan })
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
