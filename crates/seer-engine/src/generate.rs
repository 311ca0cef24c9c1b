//! One request, start to finish: images in → pixels → vision encoder and projector →
//! embeddings spliced into the token stream → prefill → decode loop → text out.

use std::time::Instant;

use candle_core::{Device, Tensor};
use seer_vision::{load_image_with, ImageInput, ImageLimits};
use serde::Serialize;

use crate::chat::Message;
use crate::error::{EngineError, Result};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::TextStream;
use crate::vlm::{ImageSlot, Vlm};

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub messages: Vec<Message>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
}

/// The prompt as the decoder will see it: runs of tokens and the images between them.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Tokens(Vec<u32>),
    /// The n-th image of the conversation.
    Image(usize),
}

#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
    /// The caller stopped listening.
    Cancelled,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub image_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub image_encode_ms: f64,
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub ttft_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}

/// An image as the user gave it, short enough for an error message.
fn describe(input: &ImageInput) -> String {
    match input {
        ImageInput::Path(p) => p.display().to_string(),
        ImageInput::Url(u) => u.chars().take(200).collect(),
        ImageInput::Base64(b) if b.starts_with("data:") => format!("data URL of {} bytes", b.len()),
        ImageInput::Base64(b) => format!("base64 of {} bytes", b.len()),
        ImageInput::Bytes(b) => format!("{} bytes", b.len()),
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Vlm {
    /// Renders the conversation and cuts it into token runs and image slots.
    pub fn build_prompt(&self, messages: &[Message]) -> Result<Prompt> {
        let text = self.render(messages)?;
        let n_images: usize = messages.iter().map(|m| m.images().count()).sum();
        let segments = match &self.image_slot {
            ImageSlot::Token(id) => self.split_on_token(&text, *id)?,
            ImageSlot::Marker(marker) => self.split_on_marker(&text, marker)?,
        };
        let slots = segments.iter().filter(|s| matches!(s, Segment::Image(_))).count();
        if slots != n_images {
            return Err(EngineError::Template(format!(
                "the chat template placed {slots} image(s) but the conversation has {n_images}"
            )));
        }
        Ok(Prompt { text, segments })
    }

    /// Hugging Face processors tokenize the whole text; the image token marks each image.
    fn split_on_token(&self, text: &str, image_token: u32) -> Result<Vec<Segment>> {
        let has_bos = self.tokenizer.bos_token.as_deref().is_some_and(|b| !b.is_empty() && text.starts_with(b));
        let ids = self.tokenizer.encode_with_specials(text, !has_bos)?;
        let mut segments = Vec::new();
        let mut run = Vec::new();
        let mut image = 0;
        for id in ids {
            if id == image_token {
                if !run.is_empty() {
                    segments.push(Segment::Tokens(std::mem::take(&mut run)));
                }
                segments.push(Segment::Image(image));
                image += 1;
            } else {
                run.push(id);
            }
        }
        if !run.is_empty() {
            segments.push(Segment::Tokens(run));
        }
        Ok(segments)
    }

    /// llama.cpp's mtmd tokenizes the text between markers piece by piece, BOS first.
    fn split_on_marker(&self, text: &str, marker: &str) -> Result<Vec<Segment>> {
        let mut segments = Vec::new();
        if self.tokenizer.add_bos {
            if let Some(bos) = self.tokenizer.bos_id() {
                if !self.tokenizer.bos_token.as_deref().is_some_and(|b| text.starts_with(b)) {
                    segments.push(Segment::Tokens(vec![bos]));
                }
            }
        }
        for (i, piece) in text.split(marker).enumerate() {
            if i > 0 {
                segments.push(Segment::Image(i - 1));
            }
            if !piece.is_empty() {
                segments.push(Segment::Tokens(self.tokenizer.encode_plain(piece)?));
            }
        }
        Ok(segments)
    }

    /// The prompt's ids with each image expanded to its embedding count, as HF
    /// processors report `input_ids` (images shown as `image_id`).
    pub fn expanded_ids(&self, prompt: &Prompt, image_id: u32) -> Vec<u32> {
        let n = self.image_tokens();
        prompt
            .segments
            .iter()
            .flat_map(|s| match s {
                Segment::Tokens(ids) => ids.clone(),
                Segment::Image(_) => vec![image_id; n],
            })
            .collect()
    }

    /// Loads, decodes and preprocesses every image of the conversation, in order.
    pub fn load_pixels(&self, messages: &[Message], limits: &ImageLimits) -> Result<Tensor> {
        let pixels = messages
            .iter()
            .flat_map(|m| m.images())
            .enumerate()
            .map(|(index, input)| {
                let img = load_image_with(input, limits, self.preprocess.alpha_mode()).map_err(|error| EngineError::Image { index, what: describe(input), error })?;
                Ok(self.preprocess.apply(&img))
            })
            .collect::<Result<Vec<_>>>()?;
        let tensors = pixels
            .into_iter()
            .map(|p| Tensor::from_vec(p.data, (p.channels, p.height, p.width), &Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&tensors, 0)?)
    }

    /// The decoder's input for the whole prompt, `[positions, hidden]`.
    fn prompt_embeddings(&self, prompt: &Prompt, image_features: Option<&Tensor>) -> Result<Tensor> {
        let parts = prompt
            .segments
            .iter()
            .map(|s| match s {
                Segment::Tokens(ids) => self.model.language_model.embed(ids),
                Segment::Image(i) => {
                    let f = image_features.expect("images were encoded when the prompt has image slots");
                    Ok(f.get(*i)?)
                }
            })
            .collect::<seer_models::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Logits for the token after the prompt, with the cache left holding the prompt.
    pub fn prefill(&self, prompt: &Prompt, pixels: Option<&Tensor>, cache: &mut seer_models::KvCache, timings: &mut Timings) -> Result<Tensor> {
        let start = Instant::now();
        let features = match pixels {
            Some(p) => Some(self.model.encode_images(p)?),
            None => None,
        };
        timings.image_encode_ms = ms(start);
        let embeds = self.prompt_embeddings(prompt, features.as_ref())?;
        let positions = embeds.dim(0)?;
        let context = self.context_length();
        if positions >= context {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: positions,
                image_tokens: self.image_tokens() * features.as_ref().map_or(0, |f| f.dim(0).unwrap_or(0)),
                context,
            });
        }
        let start_prefill = Instant::now();
        let logits = self.model.language_model.forward(&embeds, cache)?;
        timings.prefill_ms = ms(start_prefill);
        timings.prefill_tokens_per_s = positions as f64 / (timings.prefill_ms / 1e3);
        Ok(logits)
    }

    /// Runs a request. `on_text` receives each piece of text as it becomes final and
    /// returns `false` to stop early.
    pub fn generate(&self, req: &GenerateRequest, limits: &ImageLimits, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Generation> {
        let start = Instant::now();
        let prompt = self.build_prompt(&req.messages)?;
        let n_images = prompt.segments.iter().filter(|s| matches!(s, Segment::Image(_))).count();
        let pixels = if n_images > 0 { Some(self.load_pixels(&req.messages, limits)?) } else { None };
        let image_tokens = n_images * self.image_tokens();
        let prompt_tokens = self.expanded_ids(&prompt, 0).len();
        let context = self.context_length();
        if prompt_tokens >= context {
            return Err(EngineError::ContextOverflow { prompt_tokens, image_tokens, context });
        }
        let mut timings = Timings::default();
        let mut cache = self.model.new_cache();
        let mut logits = self.prefill(&prompt, pixels.as_ref(), &mut cache, &mut timings)?;
        timings.ttft_ms = ms(start);

        let mut sampler = Sampler::new(req.sampling.clone());
        let mut stream = TextStream::new();
        let mut tokens = Vec::new();
        let mut finish = FinishReason::Length;
        let decode_start = Instant::now();
        while tokens.len() < req.max_tokens {
            let next = sampler.sample(&logits.to_vec1::<f32>()?);
            if !req.ignore_eos && self.tokenizer.stop_ids.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            tokens.push(next);
            let piece = stream.push(&self.tokenizer, next)?;
            if !piece.is_empty() && !on_text(&piece) {
                finish = FinishReason::Cancelled;
                break;
            }
            if tokens.len() == req.max_tokens || cache.len() + 1 >= context {
                break;
            }
            let embed = self.model.language_model.embed(&[next])?;
            logits = self.model.language_model.forward(&embed, &mut cache)?;
        }
        if tokens.len() > 1 {
            timings.decode_tokens_per_s = (tokens.len() - 1) as f64 / decode_start.elapsed().as_secs_f64();
        }
        Ok(Generation {
            text: self.tokenizer.decode(&tokens)?,
            token_ids: tokens.clone(),
            finish_reason: finish,
            usage: Usage { prompt_tokens, image_tokens, completion_tokens: tokens.len() },
            timings,
        })
    }
}
