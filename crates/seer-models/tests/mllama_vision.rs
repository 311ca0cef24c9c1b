//! Llama 3.2 Vision's vision encoder and projector against transformers 5.23 on the tiny
//! fixture (tests/fixtures/mllama, made by scripts/make_mllama_fixtures.py): from the
//! fixture's pixels, the encoder's output (a_square) and the cross-attention states after
//! the projector (every case), within 1e-4 of float64.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use seer_models::mllama::{MllamaVision, MllamaVisionConfig};
use seer_models::weights::{SafetensorsSource, Vb};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mllama")
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn vision_encoder_and_projector_match_transformers() {
    let root = fixtures();
    let config: Value = serde_json::from_str(&std::fs::read_to_string(root.join("tiny-mllama/config.json")).unwrap()).unwrap();
    let cfg = MllamaVisionConfig::from_hf(&config["vision_config"]).unwrap();
    let vb = Vb::new(Arc::new(SafetensorsSource::open(&[root.join("tiny-mllama/model.safetensors")]).unwrap()));
    let vision = MllamaVision::load(&vb.pp("vision_model"), &cfg).unwrap();
    let text_hidden = config["text_config"]["hidden_size"].as_u64().unwrap() as usize;
    let projector = vb.pp("multi_modal_projector").linear(cfg.output_dim(), text_hidden, true).unwrap();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root.join("cases")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "json") && !p.ends_with("summary.json")).collect();
    cases.sort();
    for path in cases {
        let case: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = case["case"].as_str().unwrap();
        let file = |key: &str| read_f32(&root.join("cases").join(case[key].as_str().unwrap()));
        let shape: Vec<usize> = serde_json::from_value(case["pixel_values_shape"].clone()).unwrap();
        let pixels = Tensor::from_vec(file("pixel_values_file"), shape.as_slice(), &Device::Cpu).unwrap();
        let ids: Vec<usize> = serde_json::from_value(case["aspect_ratio_ids"].clone()).unwrap();
        let tiles: Vec<usize> = serde_json::from_value(case["num_tiles"].clone()).unwrap();
        let mut outputs = Vec::new();
        let mut states = Vec::new();
        for (i, (&id, &n)) in ids.iter().zip(&tiles).enumerate() {
            let image = pixels.get(0).unwrap().get(i).unwrap().narrow(0, 0, n).unwrap();
            let out = vision.encode(&image, id).unwrap();
            states.extend(projector.forward(&out).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            outputs.extend(out.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        if case.get("vision_output_file").is_some_and(|v| v.is_string()) {
            let diff = max_diff(&outputs, &file("vision_output_file"));
            assert!(diff < 1e-4, "{name}: vision output differs by {diff}");
        }
        let diff = max_diff(&states, &file("image_features_f64_file"));
        assert!(diff < 1e-4, "{name}: cross-attention states differ from float64 by {diff}");
        eprintln!("{name}: cross-attention states within {diff:.1e} of float64");
    }
}
