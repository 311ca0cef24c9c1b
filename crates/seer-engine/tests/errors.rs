//! Bad input gets an error that names the problem, never a panic or gibberish.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use seer_engine::{EngineError, GenerateRequest, Message, SamplingParams, Vlm};
use seer_vision::{ImageInput, ImageLimits};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava")
}

/// A fresh scratch folder per test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seer-errors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the hub-layout fixture folder that a test may break.
fn hub_copy(name: &str) -> PathBuf {
    let dir = scratch(name);
    for entry in std::fs::read_dir(fixtures().join("tiny-llava-hub")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn load_err(model: &Path, mmproj: Option<&Path>) -> String {
    match Vlm::load(model, mmproj) {
        Ok(_) => panic!("{} loaded but should not have", model.display()),
        Err(e) => e.to_string(),
    }
}

fn truncate(path: &Path, keep: f64) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..(bytes.len() as f64 * keep) as usize]).unwrap();
}

fn gguf_dir() -> PathBuf {
    fixtures().join("gguf")
}

#[test]
fn missing_model_names_the_path() {
    let msg = load_err(Path::new("/nonexistent/llava-model"), None);
    assert!(msg.contains("/nonexistent/llava-model"), "{msg}");
}

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let dir = hub_copy("arch");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.replace("LlavaForConditionalGeneration", "FancyVisionModel")).unwrap();
    let msg = load_err(&dir, None);
    assert!(msg.contains("FancyVisionModel") && msg.contains("LlavaForConditionalGeneration"), "{msg}");
}

#[test]
fn truncated_safetensors_is_reported_as_truncated() {
    let dir = hub_copy("trunc-st");
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    truncate(&shard, 0.5);
    let msg = load_err(&dir, None);
    assert!(msg.contains("truncated") && msg.contains(&*shard.file_name().unwrap().to_string_lossy()), "{msg}");
}

#[test]
fn unreadable_config_is_reported() {
    let dir = hub_copy("bad-config");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let msg = load_err(&dir, None);
    assert!(msg.contains("config.json") && msg.contains("JSON"), "{msg}");
}

#[test]
fn truncated_gguf_is_reported_as_truncated() {
    let dir = scratch("trunc-gguf");
    let model = dir.join("model.gguf");
    std::fs::copy(gguf_dir().join("tiny-llava-Q8_0.gguf"), &model).unwrap();
    truncate(&model, 0.7);
    let msg = load_err(&model, Some(&gguf_dir().join("mmproj-tiny-llava-F16.gguf")));
    assert!(msg.contains("truncated") && msg.contains("model.gguf"), "{msg}");
}

#[test]
fn gguf_without_mmproj_asks_for_one() {
    let msg = load_err(&gguf_dir().join("tiny-llava-Q8_0.gguf"), None);
    assert!(msg.contains("--mmproj"), "{msg}");
}

#[test]
fn swapped_model_and_mmproj_are_explained() {
    let msg = load_err(&gguf_dir().join("mmproj-tiny-llava-F16.gguf"), Some(&gguf_dir().join("tiny-llava-Q8_0.gguf")));
    assert!(msg.contains("projector") && msg.contains("--mmproj"), "{msg}");
}

/// Rewrites the fixture mmproj as `name`: with `narrow`, the projector's output is 32
/// wide instead of the text model's 64 (an mmproj made for another model); with
/// `projector_type`, that metadata value is replaced.
fn rewritten_mmproj(dir: &Path, name: &str, narrow: bool, projector_type: Option<&str>) -> PathBuf {
    let src = gguf_dir().join("mmproj-tiny-llava-F16.gguf");
    let mut file = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let mut t = content.tensor(&mut file, name, &candle_core::Device::Cpu).unwrap();
        if narrow && (name == "mm.2.weight" || name == "mm.2.bias") {
            let dense = t.dequantize(&candle_core::Device::Cpu).unwrap().narrow(0, 0, 32).unwrap();
            // A fresh buffer: quantize reads the whole storage, not the narrowed view.
            let dense = candle_core::Tensor::from_vec(dense.flatten_all().unwrap().to_vec1::<f32>().unwrap(), dense.shape(), &candle_core::Device::Cpu).unwrap();
            t = candle_core::quantized::QTensor::quantize(&dense, candle_core::quantized::GgmlDType::F32).unwrap();
        }
        tensors.push((name.clone(), t));
    }
    let out = dir.join(name);
    let mut w = std::fs::File::create(&out).unwrap();
    let mut meta = content.metadata.clone();
    if let Some(kind) = projector_type {
        meta.insert("clip.projector_type".into(), gguf_file::Value::String(kind.into()));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &candle_core::quantized::QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut w, &metadata, &tensors).unwrap();
    out
}

#[test]
fn mmproj_for_another_model_names_both_files_and_sizes() {
    let dir = scratch("mismatch");
    let mmproj = rewritten_mmproj(&dir, "mmproj-other.gguf", true, None);
    let msg = load_err(&gguf_dir().join("tiny-llava-Q8_0.gguf"), Some(&mmproj));
    for want in ["mmproj-other.gguf", "tiny-llava-Q8_0.gguf", "32", "64"] {
        assert!(msg.contains(want), "`{want}` missing from: {msg}");
    }
}

#[test]
fn mmproj_of_another_projector_type_is_refused() {
    let dir = scratch("projector-type");
    let mmproj = rewritten_mmproj(&dir, "mmproj-pixtral.gguf", false, Some("pixtral"));
    let msg = load_err(&gguf_dir().join("tiny-llava-Q8_0.gguf"), Some(&mmproj));
    assert!(msg.contains("pixtral") && msg.contains("mmproj-pixtral.gguf") && msg.contains("mlp"), "{msg}");
}

fn ask(vlm: &Vlm, text: String, images: Vec<ImageInput>) -> Result<seer_engine::Generation, EngineError> {
    let req = GenerateRequest {
        messages: vec![Message::user_with_images(text, images)],
        max_tokens: 4,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        ..Default::default()
    };
    vlm.generate(&req, &ImageLimits::default(), &mut |_| true)
}

#[test]
fn request_errors_name_the_problem() {
    let vlm = Vlm::load(&fixtures().join("tiny-llava-hub"), None).unwrap();
    let dir = scratch("request");

    let broken = dir.join("broken.png");
    let png = std::fs::read(fixtures().join("images/square-64x64.png")).unwrap();
    std::fs::write(&broken, &png[..png.len() / 2]).unwrap();
    let err = ask(&vlm, "hi".into(), vec![ImageInput::Path(broken)]).unwrap_err();
    assert!(err.is_client_error() && matches!(err, EngineError::Image { index: 0, .. }), "{err}");

    let err = ask(&vlm, "hi".into(), vec![ImageInput::Path(dir.join("nowhere.jpg"))]).unwrap_err();
    assert!(err.to_string().contains("nowhere.jpg"), "{err}");

    // The fixture's context is 512 positions.
    let long = "lighthouse ".repeat(600);
    let err = ask(&vlm, long, vec![ImageInput::Path(fixtures().join("images/square-64x64.png"))]).unwrap_err();
    match err {
        EngineError::ContextOverflow { prompt_tokens, image_tokens, context } => {
            assert!(prompt_tokens > 512 && image_tokens == 16 && context == 512);
        }
        other => panic!("expected a context overflow, got {other}"),
    }
}

/// The LLaVA-1.6 fixture mmproj rewritten as `name` without the tensor `drop` and with the
/// metadata in `set`.
fn rewritten_next_mmproj(dir: &Path, name: &str, drop: Option<&str>, set: &[(&str, gguf_file::Value)]) -> PathBuf {
    let src = fixtures().join("../llava_next/gguf/mmproj-tiny-llava-next-F16.gguf");
    let mut file = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
        .tensor_infos
        .keys()
        .filter(|n| Some(n.as_str()) != drop)
        .map(|n| (n.clone(), content.tensor(&mut file, n, &candle_core::Device::Cpu).unwrap()))
        .collect();
    let mut meta = content.metadata.clone();
    for (k, v) in set {
        meta.insert(k.to_string(), v.clone());
    }
    let out = dir.join(name);
    let metadata: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &candle_core::quantized::QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(&out).unwrap(), &metadata, &tensors).unwrap();
    out
}

#[test]
fn broken_llava_next_mmproj_is_explained() {
    let dir = scratch("next-mmproj");
    let text = fixtures().join("../llava_next/gguf/tiny-llava-next-F16.gguf");
    let no_newline = rewritten_next_mmproj(&dir, "mmproj-no-newline.gguf", Some("model.image_newline"), &[]);
    let msg = load_err(&text, Some(&no_newline));
    assert!(msg.contains("image_newline") && msg.contains("mmproj-no-newline.gguf"), "{msg}");
    let odd = [gguf_file::Value::I32(56), gguf_file::Value::I32(100)];
    let bad_grid = rewritten_next_mmproj(&dir, "mmproj-bad-grid.gguf", None, &[("clip.vision.image_grid_pinpoints", gguf_file::Value::Array(odd.to_vec()))]);
    let msg = load_err(&text, Some(&bad_grid));
    assert!(msg.contains("image_grid_pinpoints") && msg.contains("56-px") && msg.contains("mmproj-bad-grid.gguf"), "{msg}");
}
