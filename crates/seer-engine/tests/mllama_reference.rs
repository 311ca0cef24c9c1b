//! seer against transformers on the tiny Llama 3.2 Vision fixture (tests/fixtures/mllama,
//! made by scripts/make_mllama_fixtures.py), end to end from the Hugging Face folder:
//! prompt text and ids (each `<|image|>` where the chat template puts it), every real
//! tile's pixels, first-step logits (cross-attention to each image from its image token
//! on) and 16 greedy tokens, for a square, a very wide and a very tall image, two
//! adjacent images, a second turn adding an image, and images between text.

mod support;

use seer_engine::{GenerateRequest, Vlm};
use seer_vision::ImageLimits;
use support::{max_abs_diff, read_f32};

#[test]
fn mllama_matches_transformers() {
    let root = support::fixtures("mllama");
    let vlm = Vlm::load(&root.join("tiny-mllama"), None).expect("fixture model loads");
    let limits = ImageLimits::default();
    let cases = support::cases(&root.join("cases"));
    assert!(cases.len() >= 6);
    for (name, case) in cases {
        let file = |key: &str| read_f32(&root.join("cases").join(case[key].as_str().unwrap()));
        let msgs = support::messages(&case, &root);
        let prompt = vlm.build_prompt(&msgs).unwrap();
        assert_eq!(prompt.text, case["prompt"].as_str().unwrap(), "{name}: prompt text");
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(vlm.expanded_ids(&prompt, 0), want_ids, "{name}: input ids");

        let batch = vlm.load_pixels(&msgs, &limits).unwrap();
        let shape: Vec<usize> = serde_json::from_value(case["pixel_values_shape"].clone()).unwrap();
        let tile = shape[3] * shape[4] * shape[5];
        let all = file("pixel_values_file");
        let tiles: Vec<usize> = serde_json::from_value(case["num_tiles"].clone()).unwrap();
        let want: Vec<f32> = tiles.iter().enumerate().flat_map(|(i, &n)| all[i * shape[2] * tile..][..n * tile].to_vec()).collect();
        let pixels: Vec<f32> = batch.pixels.flatten_all().unwrap().to_vec1().unwrap();
        let pixel_diff = max_abs_diff(&pixels, &want);
        assert!(pixel_diff < 1e-5, "{name}: pixels differ by {pixel_diff}");

        let n_images = tiles.len();
        let exact_diff = support::check_logits_and_greedy(&vlm, &name, &case, &root.join("cases"), &prompt, &batch, msgs.clone());
        // The images take one `<|image|>` token each of the prompt (their states are cross-attended).
        let gen = vlm.generate(&seer_engine::GenerateRequest { messages: msgs, max_tokens: 1, ..Default::default() }, &limits, &mut |_| true).unwrap();
        assert_eq!(gen.usage.image_tokens, n_images, "{name}: usage.image_tokens");
        eprintln!("{name}: pixels {pixel_diff:.1e}, logits vs f64 {exact_diff:.1e}, 16 tokens equal");
    }
}

/// A prompt written in the model's own format (KoboldCpp's `prompt`, Ollama's `raw`): each
/// image token goes right after BOS, so the whole text sees the image.
#[test]
fn raw_prompt_places_the_images_after_bos() {
    let root = support::fixtures("mllama");
    let vlm = Vlm::load(&root.join("tiny-mllama"), None).unwrap();
    let prompt = vlm.build_raw_prompt("Describe it.", 1).unwrap();
    let ids = vlm.expanded_ids(&prompt, 0);
    assert_eq!(&ids[..2], &[768, 1024], "BOS, then the image token: {ids:?}");
    let req = GenerateRequest {
        messages: vec![seer_engine::Message::user_with_images("", vec![seer_vision::ImageInput::Path(root.join("images/square-96x96.png"))])],
        raw_prompt: Some("Describe it.".into()),
        max_tokens: 4,
        ignore_eos: true,
        ..Default::default()
    };
    let gen = vlm.generate(&req, &ImageLimits::default(), &mut |_| true).unwrap();
    assert_eq!(gen.token_ids.len(), 4);
    let err = vlm.build_raw_prompt("<|image|>Describe it.", 1).unwrap_err();
    assert!(err.to_string().contains("image token"), "{err}");
}
