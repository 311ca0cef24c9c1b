//! Llama 3.2 Vision preprocessing against `tests/fixtures/mllama/`
//! (`scripts/make_mllama_fixtures.py`): transformers 5.23 `MllamaImageProcessorPil` with
//! Pillow 13: every real tile's pixels, the tile grid and the aspect-ratio id of each image.

use std::path::{Path, PathBuf};

use seer_vision::mllama::{preprocess, MllamaProcessorConfig};
use seer_vision::{load_image, ImageInput, ImageLimits};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mllama").join(name)
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[test]
fn tiles_match_transformers() {
    let processor: Value = serde_json::from_str(&std::fs::read_to_string(fixture("tiny-mllama/processor_config.json")).unwrap()).unwrap();
    let cfg = MllamaProcessorConfig::from_json_value(&processor).unwrap();
    let mut dir: Vec<PathBuf> = std::fs::read_dir(fixture("cases")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "json") && !p.ends_with("summary.json")).collect();
    dir.sort();
    assert!(dir.len() >= 5);
    for path in dir {
        let case: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = case["case"].as_str().unwrap();
        let want = read_f32(&fixture(&format!("cases/{}", case["pixel_values_file"].as_str().unwrap())));
        let shape: Vec<usize> = serde_json::from_value(case["pixel_values_shape"].clone()).unwrap();
        let tile_len = shape[3] * shape[4] * shape[5];
        let images: Vec<&str> = case["messages"].as_array().unwrap().iter().flat_map(|m| m["content"].as_array().into_iter().flatten()).filter_map(|p| p["path"].as_str()).collect();
        let ids: Vec<usize> = serde_json::from_value(case["aspect_ratio_ids"].clone()).unwrap();
        let tiles: Vec<usize> = serde_json::from_value(case["num_tiles"].clone()).unwrap();
        for (i, rel) in images.iter().enumerate() {
            let img = load_image(&ImageInput::Path(fixture(rel)), &ImageLimits::default()).unwrap();
            let got = preprocess(&img, &cfg);
            assert_eq!(got.aspect_ratio_id, ids[i], "{name} image {i}: aspect-ratio id");
            assert_eq!(got.tiles.len(), tiles[i], "{name} image {i}: tiles");
            for (t, px) in got.tiles.iter().enumerate() {
                let at = (i * shape[2] + t) * tile_len;
                let diff = px.data.iter().zip(&want[at..at + tile_len]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-6, "{name} image {i} tile {t}: pixels differ by {diff}");
            }
        }
    }
}
