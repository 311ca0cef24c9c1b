//! Llama 3.2 Vision's decoder against transformers 5.23 on the tiny fixture
//! (tests/fixtures/mllama), on its own: the fixture's token ids and cross-attention states
//! (after the projector), with the processor's cross-attention mask, give the first-step
//! logits within 1e-4 of float64 and the same 16 greedy tokens (decode steps see the
//! images as the last prompt token does).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use seer_models::llama::{CrossMask, Llama, LlamaConfig};
use seer_models::weights::{SafetensorsSource, Vb};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mllama")
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn argmax(x: &[f32]) -> u32 {
    (0..x.len()).fold(0, |best, i| if x[i] > x[best] { i } else { best }) as u32
}

#[test]
fn mllama_decoder_matches_transformers() {
    let root = fixtures();
    let config: Value = serde_json::from_str(&std::fs::read_to_string(root.join("tiny-mllama/config.json")).unwrap()).unwrap();
    let cfg = LlamaConfig::from_hf(&config["text_config"], &config).unwrap();
    let vb = Vb::new(Arc::new(SafetensorsSource::open(&[root.join("tiny-mllama/model.safetensors")]).unwrap()));
    let lm = Llama::load(&vb.pp("language_model.model"), &vb.pp("language_model"), &cfg).unwrap();
    let tile_tokens = 17;
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root.join("cases")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "json") && !p.ends_with("summary.json")).collect();
    cases.sort();
    for path in cases {
        let case: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = case["case"].as_str().unwrap();
        let file = |key: &str| root.join("cases").join(case[key].as_str().unwrap());
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let states = read_f32(&file("image_features_file"));
        let n = states.len() / cfg.hidden_size;
        let states = Tensor::from_vec(states, (n, cfg.hidden_size), &Device::Cpu).unwrap();
        let shape: Vec<usize> = serde_json::from_value(case["cross_attention_mask_shape"].clone()).unwrap();
        let mask = std::fs::read(file("cross_attention_mask_file")).unwrap();
        let rows: Vec<Vec<bool>> = mask.chunks_exact(shape[1] * shape[2]).map(|r| r.iter().flat_map(|&m| std::iter::repeat_n(m != 0, tile_tokens)).collect()).collect();
        assert_eq!(rows.len(), ids.len());
        let cross = lm.cross_states(&states).unwrap();
        let mut cache = lm.new_cache();
        let logits: Vec<f32> = lm.forward_cross(&lm.embed(&ids).unwrap(), &mut cache, &cross, &CrossMask::new(&rows).unwrap()).unwrap().to_vec1().unwrap();
        let exact = read_f32(&file("logits_f64_file"));
        let diff = logits.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "{name}: logits differ from float64 by {diff}");

        let masked: Vec<u32> = serde_json::from_value(case["greedy_masked_ids"].clone()).unwrap_or_default();
        let want: Vec<u32> = serde_json::from_value(case["greedy_tokens"].clone()).unwrap();
        let last = CrossMask::new(&rows[rows.len() - 1..]).unwrap();
        let (mut got, mut scores) = (Vec::new(), logits);
        for _ in 0..want.len() {
            masked.iter().for_each(|&m| scores[m as usize] = f32::NEG_INFINITY);
            let t = argmax(&scores);
            got.push(t);
            scores = lm.forward_cross(&lm.embed(&[t]).unwrap(), &mut cache, &cross, &last).unwrap().to_vec1().unwrap();
        }
        assert_eq!(got, want, "{name}: greedy tokens");
        eprintln!("{name}: logits vs f64 {diff:.1e}, 16 greedy tokens equal");
    }
}
