//! seer against transformers on the tiny LLaVA-NeXT fixture (tests/fixtures/llava_next,
//! made by scripts/make_llava_next_fixtures.py): prompt text, input ids (the processor's
//! count of image tokens per image), every tile's pixels, the packed image features
//! (unpadding and image_newline), first-step logits and 16 greedy tokens, for a square,
//! a very wide and a very tall image, two images, and a second turn that adds an image.

mod support;

use seer_engine::{GenerateRequest, Vlm};
use seer_vision::ImageLimits;
use support::{max_abs_diff, read_f32};

#[test]
fn llava_next_matches_transformers() {
    let root = support::fixtures("llava_next");
    let vlm = Vlm::load(&root.join("tiny-llava-next"), None).expect("fixture model loads");
    let limits = ImageLimits::default();
    let cases = support::cases(&root.join("cases"));
    assert_eq!(cases.len(), 5);
    for (name, case) in cases {
        let file = |key: &str| read_f32(&root.join("cases").join(case[key].as_str().unwrap()));
        let msgs = support::messages(&case, &root);
        let prompt = vlm.build_prompt(&msgs).unwrap();
        assert_eq!(prompt.text, case["prompt"].as_str().unwrap(), "{name}: prompt text");
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(vlm.expanded_ids(&prompt, 32000), want_ids, "{name}: input ids");
        let per_image: Vec<usize> = serde_json::from_value(case["num_image_tokens_per_image"].clone()).unwrap();
        assert_eq!(prompt.block_tokens, per_image, "{name}: image tokens per image");

        // transformers pads every image to the most tiles in the batch; seer keeps each
        // image's own blocks, one after another.
        let batch = vlm.load_pixels(&msgs, &limits).unwrap();
        let got: Vec<f32> = batch.pixels.flatten_all().unwrap().to_vec1().unwrap();
        let want = file("pixel_values_file");
        let shape: Vec<usize> = serde_json::from_value(case["pixel_values_shape"].clone()).unwrap();
        let block = shape[2] * shape[3] * shape[4];
        let patches: Vec<usize> = serde_json::from_value(case["num_patches_per_image"].clone()).unwrap();
        let want: Vec<f32> = patches.iter().enumerate().flat_map(|(i, &n)| want[i * shape[1] * block..][..n * block].to_vec()).collect();
        let pixel_diff = max_abs_diff(&got, &want);
        assert!(pixel_diff < 1e-5, "{name}: pixels differ by {pixel_diff}");

        let features = vlm.model.encode_images(&batch).unwrap();
        let got: Vec<f32> = features.iter().flat_map(|f| f.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        let feature_diff = max_abs_diff(&got, &file("image_features_file"));
        assert!(feature_diff < 1e-4, "{name}: packed image features differ by {feature_diff}");

        let exact_diff = support::check_logits_and_greedy(&vlm, &name, &case, &root.join("cases"), &prompt, &batch, msgs.clone());
        let gen = vlm.generate(&GenerateRequest { messages: msgs, max_tokens: 1, ..Default::default() }, &limits, &mut |_| true).unwrap();
        assert_eq!(gen.usage.image_tokens, per_image.iter().sum::<usize>(), "{name}: usage.image_tokens");
        eprintln!("{name}: pixels {pixel_diff:.1e}, features {feature_diff:.1e}, logits vs f64 {exact_diff:.1e}, 16 tokens equal");
    }
}
