//! Loading a llama.cpp GGUF text model and its projector (mmproj): the projector type
//! picks the family; tokenizer, chat template and preprocessing come from the metadata,
//! done as llama.cpp's mtmd does them.

use super::*;

/// llama.cpp's default media marker; any string works since it never reaches the tokenizer.
const MEDIA_MARKER: &str = "<__media__>";

/// What mtmd writes around each image's embeddings for Qwen2-VL's projectors.
const VISION_START: &str = "<|vision_start|>";
const VISION_END: &str = "<|vision_end|>";

/// llama.cpp's bounds on a Qwen2-VL image in merged tokens (clip.cpp), where
/// [`LoadOptions`] gives none: 8 .. 4096 tokens of 28×28 pixels.
pub const LLAMACPP_QWEN2VL_IMAGE_TOKENS: (usize, usize) = (8, 4096);

pub(super) fn load_gguf(model: &Path, mmproj: &Path, opts: &LoadOptions) -> Result<Vlm> {
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
    let gemma3 = proj.opt_str("clip.projector_type") == Some("gemma3");
    if arch != "llama" && !qwen && !gemma3 {
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
    let plan = opts.plan(sixteen_bit);
    if qwen {
        let (qwen, preprocess) = qwen2vl_gguf(text, &proj, &plan, opts, &tokenizer)?;
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
    if gemma3 {
        let preprocess = Preprocess::LlamaCppGemma3 {
            size: proj.get_u32("clip.vision.image_size")?,
            mean: f32x3(&proj, "clip.vision.image_mean")?,
            std: f32x3(&proj, "clip.vision.image_std")?,
        };
        let gemma = Gemma3::load_gguf(text, proj.clone(), &plan)?;
        return Ok(Vlm {
            model: Model::Gemma3(gemma),
            tokenizer,
            template,
            // mtmd writes `<start_of_image>`, the embeddings and `<end_of_image>` where the
            // marker was, with no blank lines around them (transformers adds two).
            image_parts: ImageParts::MarkerFirst(format!("<start_of_image>{MEDIA_MARKER}<end_of_image>")),
            image_slot: ImageSlot::Marker(MEDIA_MARKER.into()),
            preprocess,
            name: model_name,
            grammars: Default::default(),
        });
    }
    if proj.opt_str("clip.projector_type") == Some("idefics3") {
        let smol = Idefics3::load_gguf(text, proj.clone(), &plan)?;
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
    // LLaVA 1.5 or, with grid resolutions in its projector, LLaVA-1.6.
    let (model, preprocess) = if proj.get(PINPOINTS).is_some() {
        let (next, preprocess) = llava_next_gguf(text, proj, &plan)?;
        (Model::LlavaNext(next), preprocess)
    } else {
        let preprocess = Preprocess::LlamaCppLlava {
            size: proj.get_u32("clip.vision.image_size")? as usize,
            mean: f32x3(&proj, "clip.vision.image_mean")?,
            std: f32x3(&proj, "clip.vision.image_std")?,
        };
        (Model::Llava(Llava::load_gguf(text, proj, &plan)?), preprocess)
    };
    Ok(Vlm {
        model,
        tokenizer,
        template,
        image_parts: ImageParts::MarkerFirst(MEDIA_MARKER.into()),
        image_slot: ImageSlot::Marker(MEDIA_MARKER.into()),
        preprocess,
        name: model_name,
        grammars: Default::default(),
    })
}

/// What marks a LLaVA-1.6 mmproj: its grid resolutions, `[w0, h0, w1, h1, ...]`.
const PINPOINTS: &str = "clip.vision.image_grid_pinpoints";

/// LLaVA-1.6 from a Llama text model and the legacy converter's mmproj. The image is the
/// model's own: the base tile, then the grid with the padding's rows or columns dropped and
/// `image_newline` after each row, as transformers packs it (llama.cpp 0c1e57098 reads the
/// same file as tiles then the base, without either: tests/fixtures/llava_next/README.md).
/// The pixels are llama.cpp's: its resampler runs the horizontal pass first.
fn llava_next_gguf(text: Arc<GgufFile>, proj: Arc<GgufFile>, plan: &LoadPlan) -> Result<(LlavaNext, Preprocess)> {
    let size = proj.get_u32("clip.vision.image_size")?;
    let bad = |detail: String| EngineError::Model(ModelError::Format { path: proj.path().into(), format: "GGUF", detail });
    let values: Vec<u32> = proj.get(PINPOINTS).and_then(|v| v.to_vec().ok()).into_iter().flatten().filter_map(|v| v.to_u32().ok().or_else(|| v.to_i32().ok().and_then(|x| u32::try_from(x).ok()))).collect();
    if values.is_empty() || !values.len().is_multiple_of(2) || values.iter().any(|&v| v == 0 || !v.is_multiple_of(size)) {
        return Err(bad(format!("`{PINPOINTS}` {values:?} is not a list of (width, height) pairs in whole {size}-px tiles")));
    }
    let pinpoints = values.chunks_exact(2).map(|wh| (wh[1], wh[0])).collect();
    let clip = ClipProcessorConfig {
        size: seer_vision::clip::ResizeTarget::ShortestEdge(size),
        crop_size: seer_vision::clip::CropSize { height: size, width: size },
        image_mean: f32x3(&proj, "clip.vision.image_mean")?.map(f64::from),
        image_std: f32x3(&proj, "clip.vision.image_std")?.map(f64::from),
        ..ClipProcessorConfig::default()
    };
    let model = LlavaNext::load_gguf(text, proj, plan)?;
    let cfg = LlavaNextProcessorConfig { clip, pinpoints, order: PassOrder::HorizontalFirst };
    let preprocess = Preprocess::LlavaNext { cfg, cells: model.cells_per_tile(), base_tokens: model.llava.config.image_tokens() };
    Ok((model, preprocess))
}

/// Qwen2-VL or Qwen2.5-VL from a `qwen2vl` text model and its merger mmproj, with
/// llama.cpp's preprocessing.
fn qwen2vl_gguf(text: Arc<GgufFile>, proj: &Arc<GgufFile>, plan: &LoadPlan, opts: &LoadOptions, tokenizer: &Tokenizer) -> Result<(Qwen2Vl, Preprocess)> {
    let path = text.path().display().to_string();
    let qwen = Qwen2Vl::load_gguf(text, proj.clone(), plan)?;
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
