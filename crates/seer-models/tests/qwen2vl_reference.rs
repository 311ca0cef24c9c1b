//! seer against transformers on the tiny Qwen2-VL and Qwen2.5-VL fixtures
//! (tests/fixtures/qwen2vl, made by scripts/make_qwen2vl_fixtures.py): from the fixture's
//! pixels, grids and input ids, the M-RoPE positions, the first-step logits and 16 greedy
//! tokens.
//!
//! Logits: seer's f32 must be within 1e-4 of the float64 reference, the exact answer
//! (transformers' own f32 run is 2e-5 to 2e-4 away from it). Greedy decoding masks the
//! generation config's end-of-sequence ids, as the fixture's `generate(min_new_tokens=16)`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use seer_models::llava::safetensors_files;
use seer_models::qwen2vl::{decode_position, mrope_positions, Qwen2Vl, RopeIndex, Variant};
use seer_models::weights::SafetensorsSource;
use seer_models::LoadPlan;
use serde_json::Value;

const CASES: [&str; 5] = ["a_square", "b_wide", "c_tall", "d_two_images", "e_system"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2vl")
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length differs");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn load(folder: &str) -> Qwen2Vl {
    let dir = fixtures().join(folder);
    let src = SafetensorsSource::open(&safetensors_files(&dir).unwrap()).unwrap();
    Qwen2Vl::load_hf(Arc::new(src), &read_json(&dir.join("config.json")), &LoadPlan::default()).expect("fixture model loads")
}

fn ids_of(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The case's `position_ids` ([3, seq]) as one triple per token.
fn positions_of(case: &Value) -> Vec<[u32; 3]> {
    let rows: Vec<Vec<u32>> = serde_json::from_value(case["position_ids"].clone()).unwrap();
    (0..rows[0].len()).map(|i| [rows[0][i], rows[1][i], rows[2][i]]).collect()
}

/// Greedy `n` tokens after the prompt, never choosing `masked`, each step at the
/// position M-RoPE gives generated text.
fn greedy(model: &Qwen2Vl, first: Vec<f32>, cache: &mut seer_models::KvCache, index: &RopeIndex, masked: &[u32], n: usize) -> Vec<u32> {
    let lm = &model.language_model;
    let mut logits = first;
    let mut out = Vec::new();
    for step in 0..n {
        for &m in masked {
            logits[m as usize] = f32::NEG_INFINITY;
        }
        let next = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap() as u32;
        out.push(next);
        if step + 1 < n {
            let pos = decode_position(index.positions.len() + step, index.delta);
            logits = lm.forward_at(&lm.embed(&[next]).unwrap(), cache, &[pos]).unwrap().to_vec1().unwrap();
        }
    }
    out
}

fn check_folder(folder: &str, variant: Variant) {
    let model = load(folder);
    assert_eq!(model.config.vision.variant, variant);
    let merge = model.config.vision.merge_size;
    for name in CASES {
        let dir = fixtures().join("cases").join(folder);
        let case = read_json(&dir.join(format!("{name}.json")));
        let ids = ids_of(&case["input_ids"]);
        let grids: Vec<[usize; 3]> = serde_json::from_value(case["image_grid_thw"].clone()).unwrap();
        let shape: Vec<usize> = serde_json::from_value(case["pixel_values_shape"].clone()).unwrap();
        let pixels = Tensor::from_vec(read_f32(&dir.join(format!("{name}.pixels.f32"))), shape, &Device::Cpu).unwrap();

        let index = mrope_positions(&ids, model.config.image_token_id, &grids, merge).unwrap();
        assert_eq!(index.positions, positions_of(&case), "{folder}/{name}: M-RoPE positions");
        assert_eq!(index.delta, case["rope_delta"].as_i64().unwrap(), "{folder}/{name}: rope delta");

        let features = model.encode_images(&pixels, &grids).unwrap();
        let embeds = model.embed_prompt(&ids, &features).unwrap();
        let mut cache = model.new_cache();
        let logits: Vec<f32> =
            model.language_model.forward_at(&embeds, &mut cache, &index.positions).unwrap().to_vec1().unwrap();
        let exact = max_abs_diff(&logits, &read_f32(&dir.join(format!("{name}.logits_f64.f32"))));
        let vs_f32 = max_abs_diff(&logits, &read_f32(&dir.join(format!("{name}.logits.f32"))));
        assert!(exact < 1e-4, "{folder}/{name}: logits differ from the float64 reference by {exact}");

        let masked = ids_of(&case["greedy_masked_ids"]);
        let tokens = greedy(&model, logits, &mut cache, &index, &masked, 16);
        assert_eq!(tokens, ids_of(&case["greedy_tokens"]), "{folder}/{name}: greedy tokens");
        eprintln!("{folder}/{name}: positions equal, logits vs f64 {exact:.2e} (vs transformers f32 {vs_f32:.2e}), 16 tokens equal");
    }
}

#[test]
fn qwen2_vl_matches_transformers() {
    check_folder("tiny-qwen2-vl", Variant::Qwen2Vl);
}

#[test]
fn qwen2_5_vl_matches_transformers() {
    check_folder("tiny-qwen2.5-vl", Variant::Qwen25Vl);
}
