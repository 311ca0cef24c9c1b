//! Raw prompts (no chat template, images first as KoboldCpp places them), images decoded
//! ahead of time, and the prompt check a server runs before queueing.

use std::path::{Path, PathBuf};

use seer_engine::chat::{Message, Part, Role};
use seer_engine::generate::Segment;
use seer_engine::{EngineError, GenerateRequest, Vlm};
use seer_vision::{ImageInput, ImageLimits};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava")
}

fn vlm() -> Vlm {
    Vlm::load(&fixtures().join("tiny-llava-hub"), None).unwrap()
}

fn image(name: &str) -> ImageInput {
    ImageInput::Path(fixtures().join("images").join(name))
}

fn raw(text: &str, images: Vec<ImageInput>) -> GenerateRequest {
    GenerateRequest {
        messages: vec![Message { role: Role::User, parts: images.into_iter().map(Part::Image).collect() }],
        raw_prompt: Some(text.into()),
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn a_raw_prompt_without_images_tokenizes_like_the_template() {
    let vlm = vlm();
    let chat = [Message::text(Role::User, "Hello there")];
    let templated = vlm.build_prompt(&chat).unwrap();
    let raw = vlm.build_raw_prompt(&templated.text, 0).unwrap();
    assert_eq!(vlm.expanded_ids(&raw, 0), vlm.expanded_ids(&templated, 0));
}

#[test]
fn images_go_after_bos_with_a_blank_line_between_them() {
    let vlm = vlm();
    let prompt = vlm.build_raw_prompt("Describe.", 2).unwrap();
    let bos = vlm.tokenizer.bos_id().unwrap();
    let separator = vlm.tokenizer.encode_plain("\n\n").unwrap();
    let text = vlm.tokenizer.encode_plain("Describe.").unwrap();
    let layout = |text: Vec<u32>| vec![Segment::Tokens(vec![bos]), Segment::Image(0), Segment::Tokens(separator.clone()), Segment::Image(1), Segment::Tokens(text)];
    assert_eq!(prompt.segments, layout(text));
    // A BOS the caller wrote is not doubled and still comes before the images.
    let written = vlm.tokenizer.encode_plain("<s>Describe.").unwrap();
    assert_eq!(written[0], bos);
    assert_eq!(vlm.build_raw_prompt("<s>Describe.", 2).unwrap().segments, layout(written[1..].to_vec()));
}

#[test]
fn raw_generation_counts_image_tokens() {
    let vlm = vlm();
    let req = raw("Describe.", vec![image("square-64x64.png")]);
    let gen = vlm.generate(&req, &ImageLimits::default(), &mut |_| true).unwrap();
    let text_ids = vlm.tokenizer.encode_plain("Describe.").unwrap().len();
    assert_eq!(gen.usage.image_tokens, 16);
    assert_eq!(gen.usage.prompt_tokens, 1 + 16 + text_ids);
    assert_eq!(vlm.check_prompt(&req).unwrap().prompt_tokens, gen.usage.prompt_tokens);
    assert_eq!(gen.token_ids.len(), 8);
}

#[test]
fn decoded_images_give_the_same_answer() {
    let vlm = vlm();
    let messages = vec![Message::user_with_images("What is in this image?", vec![image("wide-120x72.jpg")])];
    let req = GenerateRequest { messages, max_tokens: 8, ignore_eos: true, ..Default::default() };
    let limits = ImageLimits::default();
    let from_path = vlm.generate(&req, &limits, &mut |_| true).unwrap();
    let mut decoded = req.clone();
    vlm.decode_images(&mut decoded.messages, &limits).unwrap();
    assert!(matches!(decoded.messages[0].parts[0], Part::Image(ImageInput::Decoded(_))));
    let from_decoded = vlm.generate(&decoded, &limits, &mut |_| true).unwrap();
    assert_eq!(from_decoded.token_ids, from_path.token_ids);
}

#[test]
fn bad_prompts_are_the_callers_fault() {
    let vlm = vlm();
    let long = raw(&"word ".repeat(600), vec![]);
    let err = vlm.check_prompt(&long).unwrap_err();
    assert!(matches!(err, EngineError::ContextOverflow { context: 512, .. }), "{err}");
    let marker = raw("look: <image>", vec![]);
    assert!(vlm.check_prompt(&marker).unwrap_err().is_client_error());
    let in_chat = GenerateRequest { messages: vec![Message::text(Role::User, "look: <image>")], ..Default::default() };
    let err = vlm.check_prompt(&in_chat).unwrap_err();
    assert!(err.is_client_error(), "{err}");
    let mut missing = vec![Message::user_with_images("hi", vec![image("missing.png")])];
    let err = vlm.decode_images(&mut missing, &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, EngineError::Image { index: 0, .. }), "{err}");
}
