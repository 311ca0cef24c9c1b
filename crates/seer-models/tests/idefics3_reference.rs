//! seer's Idefics3 (SmolVLM) against transformers on the tiny fixtures
//! (tests/fixtures/idefics3, made by scripts/make_idefics3_fixtures.py): the processor's
//! pixels and input ids in, first-step logits and 16 greedy tokens out.
//!
//! Logits: seer's f32 must be within 1e-4 of the float64 reference, the exact answer
//! (transformers' own f32 run is 2e-5 to 5e-5 from it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use seer_models::gguf::GgufFile;
use seer_models::idefics3::Idefics3;
use seer_models::llava::safetensors_files;
use seer_models::weights::SafetensorsSource;
use seer_models::{LoadPlan, ModelError};
use serde_json::Value;

const GREEDY_STEPS: usize = 16;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics3")
}

/// A raw little-endian array from `cases/` (as the fixture script writes them).
fn fixture_tensor(file: &Value, dtype: DType, shape: &[usize]) -> Tensor {
    let path = fixtures().join("cases").join(file.as_str().unwrap());
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tensor::from_raw_buffer(&bytes, dtype, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn shape(case: &Value, key: &str) -> Vec<usize> {
    serde_json::from_value(case[key].clone()).unwrap()
}

/// The cases `cases/summary.json` lists, by name.
fn cases() -> Vec<(String, Value)> {
    let read = |name: &str| -> Value {
        let path = fixtures().join("cases").join(name);
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
    };
    let summary = read("summary.json");
    let names: Vec<&String> = summary.as_object().unwrap().keys().collect();
    assert_eq!(names.len(), 5, "expected the five fixture cases");
    names.into_iter().map(|name| (name.clone(), read(&format!("{name}.json")))).collect()
}

fn case(name: &str) -> Value {
    cases().into_iter().find(|(n, _)| n == name).unwrap().1
}

/// The processor's `pixel_values` `[1, tiles, 3, H, W]` as `[tiles, 3, H, W]`, and its
/// `pixel_attention_mask` as `[tiles, H, W]`.
fn pixels_and_mask(case: &Value) -> (Tensor, Tensor) {
    let pixels = fixture_tensor(&case["pixel_values_file"], DType::F32, &shape(case, "pixel_values_shape")[1..]);
    let mask = fixture_tensor(&case["pixel_attention_mask_file"], DType::U8, &shape(case, "pixel_attention_mask_shape")[1..]);
    (pixels, mask)
}

/// The token embeddings of `ids` with the image features in place of the `<image>`
/// tokens, in order (transformers' `inputs_merger`).
fn merged_embeddings(model: &Idefics3, ids: &[u32], features: &Tensor) -> Tensor {
    let image_token = model.config.image_token_id.expect("image token id");
    let hidden = model.language_model.hidden_size();
    let features: Vec<Vec<f32>> = features.reshape(((), hidden)).unwrap().to_vec2().unwrap();
    let embeds: Vec<Vec<f32>> = model.language_model.embed(ids).unwrap().to_vec2().unwrap();
    let n_image = ids.iter().filter(|&&id| id == image_token).count();
    assert_eq!(n_image, features.len(), "one feature row per <image> token");
    let mut next = features.into_iter();
    let rows: Vec<f32> = ids
        .iter()
        .zip(embeds)
        .flat_map(|(&id, e)| if id == image_token { next.next().unwrap() } else { e })
        .collect();
    Tensor::from_vec(rows, (ids.len(), hidden), &Device::Cpu).unwrap()
}

/// The last prompt position's logits and `GREEDY_STEPS` greedy tokens (nothing masked).
fn run(model: &Idefics3, ids: &[u32], pixels: &Tensor, mask: &Tensor) -> (Tensor, Vec<u32>) {
    let features = model.encode_images(pixels, Some(mask)).unwrap();
    assert_eq!(features.dims()[1], model.config.image_seq_len());
    let mut cache = model.new_cache();
    let lm = &model.language_model;
    let argmax = |logits: &Tensor| logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    let first = lm.forward(&merged_embeddings(model, ids, &features), &mut cache).unwrap();
    let mut tokens = vec![argmax(&first)];
    while tokens.len() < GREEDY_STEPS {
        let logits = lm.forward(&lm.embed(&tokens[tokens.len() - 1..]).unwrap(), &mut cache).unwrap();
        tokens.push(argmax(&logits));
    }
    (first, tokens)
}

/// One case against transformers: first-step logits within 1e-4 of the float64
/// reference (the distance to transformers' own f32 run is printed too), and the greedy tokens.
fn check_case(model: &Idefics3, label: &str, case: &Value) {
    let (pixels, mask) = pixels_and_mask(case);
    let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
    let (logits, tokens) = run(model, &ids, &pixels, &mask);
    let vocab = shape(case, "logits_shape");
    let exact = max_abs_diff(&logits, &fixture_tensor(&case["logits_f64_file"], DType::F32, &vocab));
    let f32_diff = max_abs_diff(&logits, &fixture_tensor(&case["logits_file"], DType::F32, &vocab));
    eprintln!("{label}: logits vs float64 {exact:.2e} (vs transformers f32 {f32_diff:.2e}), tokens {tokens:?}");
    assert!(exact < 1e-4, "{label}: logits differ from the float64 reference by {exact}");
    let want: Vec<u32> = serde_json::from_value(case["greedy_tokens"].clone()).unwrap();
    assert_eq!(tokens, want, "{label}: greedy tokens (first-step logits {exact:.2e} from float64)");
}

fn load_hf() -> Idefics3 {
    let dir = fixtures().join("tiny-smolvlm");
    let src = Arc::new(SafetensorsSource::open(&safetensors_files(&dir).unwrap()).unwrap());
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    Idefics3::load_hf(src, &config, &LoadPlan::default()).expect("fixture model loads")
}

fn gguf(name: &str) -> Arc<GgufFile> {
    Arc::new(GgufFile::open(&fixtures().join("gguf").join(name)).unwrap())
}

fn gguf_from(path: &str) -> Arc<GgufFile> {
    Arc::new(GgufFile::open(&fixtures().join("..").join(path)).unwrap())
}

#[test]
fn hf_folder_matches_transformers() {
    let model = load_hf();
    assert_eq!(model.config.image_seq_len(), 16);
    assert_eq!(model.config.image_token_id, Some(49190));
    for (name, case) in cases() {
        check_case(&model, &name, &case);
    }
}

/// The same model converted by llama.cpp (weights in f16, which holds the bf16 values
/// exactly unless tiny) on case a_square.
#[test]
fn gguf_files_match_transformers() {
    let model = Idefics3::load_gguf(gguf("tiny-smolvlm-F16.gguf"), gguf("mmproj-tiny-smolvlm-F16.gguf"), &LoadPlan::default()).unwrap();
    assert_eq!(model.config.scale_factor, 2);
    assert_eq!(model.config.image_token_id, Some(49190));
    check_case(&model, "gguf F16 a_square", &case("a_square"));
}

#[test]
fn projector_of_another_model_is_refused() {
    let text = gguf("tiny-smolvlm-F16.gguf");
    let llava_mmproj = gguf_from("llava/gguf/mmproj-tiny-llava-F16.gguf");
    let err = Idefics3::load_gguf(text, llava_mmproj, &LoadPlan::default()).err().expect("a LLaVA projector is refused");
    assert!(matches!(err, ModelError::UnsupportedArchitecture { .. }), "{err}");
    assert!(err.to_string().contains("`mlp`") && err.to_string().contains("idefics3"), "{err}");

    let llava_text = gguf_from("llava/gguf/tiny-llava-F16.gguf");
    let err = Idefics3::load_gguf(llava_text, gguf("mmproj-tiny-smolvlm-F16.gguf"), &LoadPlan::default()).err().expect("size mismatch");
    assert!(matches!(err, ModelError::Mismatch(_)), "{err}");
    assert!(err.to_string().contains("size 32") && err.to_string().contains("hidden size 64"), "{err}");
}

/// Padded tiles (the fixture's cases have none): a_square's first two tiles, the second
/// cut to its top-left 19x24 pixels as the processor pads (mask 0 and pixels 0 beyond),
/// so 5x6 real patches. Reference: transformers 5.23, the folder loaded in float64,
/// `model.get_image_features(pixel_values, pixel_attention_mask).pooler_output`, summed
/// per token over the 32 features (`sum`) and over their squares (`sumsq`).
#[test]
fn padded_tile_matches_transformers() {
    #[rustfmt::skip]
    let want_sum = [
        [0.933083, 2.137925, 0.710744, 3.017288, 1.853641, 0.481151, 4.575255, 1.382867, 3.890242, -0.845272, -8.186404, 9.643502, -0.18114, -11.367733, 10.244426, 8.979245],
        [3.087988, 2.968663, 0.593727, -1.975581, -2.121338, 0.158089, -0.452742, -1.975581, 0.008587, -9.023662, -1.426613, -1.975581, -1.975581, -1.975581, -1.975581, -1.975581],
    ];
    #[rustfmt::skip]
    let want_sumsq = [
        [77.547078, 78.527456, 82.018248, 75.915858, 85.546082, 83.765337, 83.697527, 82.687139, 89.513797, 84.668582, 63.375032, 76.966714, 87.953236, 73.785626, 72.201977, 75.302269],
        [64.815769, 70.436603, 64.417033, 82.032319, 75.920917, 66.693587, 66.554339, 82.032319, 69.170312, 77.346262, 79.098835, 82.032319, 82.032319, 82.032319, 82.032319, 82.032319],
    ];
    let model = load_hf();
    let (pixels, _) = pixels_and_mask(&case("a_square"));
    let real = |y: usize, x: usize| y < 19 && x < 24;
    let mask: Vec<u8> = (0..2 * 32 * 32).map(|k| u8::from(k < 32 * 32 || real(k / 32 % 32, k % 32))).collect();
    let mask = Tensor::from_vec(mask, (2, 32, 32), &Device::Cpu).unwrap();
    let pixels = pixels.narrow(0, 0, 2).unwrap().broadcast_mul(&mask.to_dtype(DType::F32).unwrap().unsqueeze(1).unwrap()).unwrap();
    let features: Vec<Vec<Vec<f32>>> = model.encode_images(&pixels, Some(&mask)).unwrap().to_vec3().unwrap();
    let mut worst = 0f64;
    for (tile, tokens) in features.iter().enumerate() {
        for (t, f) in tokens.iter().enumerate() {
            let sum: f64 = f.iter().map(|&x| x as f64).sum();
            let sumsq: f64 = f.iter().map(|&x| (x as f64).powi(2)).sum();
            worst = worst.max((sum - want_sum[tile][t]).abs()).max((sumsq - want_sumsq[tile][t]).abs());
        }
    }
    eprintln!("padded tiles: per-token sums within {worst:.2e} of transformers");
    assert!(worst < 1e-4, "padded tiles: per-token sums differ from transformers by {worst}");
}
