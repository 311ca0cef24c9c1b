//! One request, start to finish: images in → pixels → vision encoder and projector →
//! embeddings spliced into the token stream → prefill → decode loop → text out.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use seer_vision::{load_image_with, ImageInput, ImageLimits};
use serde::Serialize;

use crate::chat::{ImageParts, Message, Part};
use crate::constraint::{Constraint, Guide};
use crate::error::{EngineError, Result};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::TextStream;
use crate::vlm::{ImageBatch, ImageSlot, Preprocess, Vlm};

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub messages: Vec<Message>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Generation ends before the first of these strings; it is not part of the text.
    pub stop: Vec<String>,
    /// Report each token's log-probability with this many alternatives (OpenAI's
    /// `logprobs` + `top_logprobs`).
    pub logprobs: Option<usize>,
    /// A prompt the caller wrote in the model's own format, used as is instead of
    /// rendering the chat template (KoboldCpp's `prompt`, Ollama's `raw`). The images of
    /// `messages` go before it, as KoboldCpp places them; their text is not used.
    pub raw_prompt: Option<String>,
    /// What the answer must match (a JSON schema, a pattern, a grammar, a choice).
    pub constraint: Option<Constraint>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            messages: Vec::new(),
            max_tokens: 256,
            sampling: SamplingParams::default(),
            ignore_eos: false,
            stop: Vec::new(),
            logprobs: None,
            raw_prompt: None,
            constraint: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    /// The most likely alternatives at this step, best first (the chosen one included).
    pub top: Vec<(u32, String, f32)>,
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
    /// The embeddings each image block becomes, by block number.
    pub block_tokens: Vec<usize>,
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
    /// Time spent computing constraint masks and advancing the constraint, in all.
    pub constraint_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Option<Vec<TokenLogprob>>,
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
        ImageInput::Decoded(img) => format!("decoded {}x{} image", img.width(), img.height()),
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Vlm {
    /// Renders the conversation and cuts it into token runs and image slots.
    pub fn build_prompt(&self, messages: &[Message]) -> Result<Prompt> {
        let (text, n_blocks) = self.expand_images(self.render(messages)?, messages)?;
        let segments = match &self.image_slot {
            ImageSlot::Token { id, per_block } => self.split_on_token(&text, *id, *per_block)?,
            ImageSlot::Marker(marker) => self.split_on_marker(&text, marker)?,
            // The whole text as tokens: its image tokens mark where each image is seen from.
            ImageSlot::CrossAttention(id) => {
                let ids = self.split_on_token(&text, u32::MAX, 1)?;
                let slots = ids.iter().map(|s| if let Segment::Tokens(t) = s { t.iter().filter(|&&x| x == *id).count() } else { 0 }).sum();
                if slots != n_blocks {
                    return Err(self.misplaced_images(messages, slots));
                }
                return Ok(Prompt { text, segments: ids, block_tokens: Vec::new() });
            }
        };
        let slots = segments.iter().filter(|s| matches!(s, Segment::Image(_))).count();
        if slots != n_blocks {
            return Err(self.misplaced_images(messages, slots));
        }
        let block_tokens = self.block_tokens(messages, n_blocks)?;
        Ok(Prompt { text, segments, block_tokens })
    }

    /// Why a rendered prompt holds another number of image slots than the conversation
    /// has images: a marker typed into the text, or a template that drops or repeats them.
    fn misplaced_images(&self, messages: &[Message], slots: usize) -> EngineError {
        let marker = self.image_marker();
        if messages.iter().flat_map(|m| &m.parts).any(|p| matches!(p, Part::Text(t) if t.contains(&marker))) {
            return EngineError::BadRequest(format!("a message's text contains the image marker `{marker}`; send images as image parts"));
        }
        let n_images: usize = messages.iter().map(|m| m.images().count()).sum();
        EngineError::Template(format!("the chat template placed {slots} image(s) but the conversation has {n_images}"))
    }

    /// The embeddings of each of `n_blocks` image blocks: the model's fixed count, or
    /// each image's own from its size (Qwen2-VL, one block per image).
    fn block_tokens(&self, messages: &[Message], n_blocks: usize) -> Result<Vec<usize>> {
        if let Some(n) = self.model.block_tokens() {
            return Ok(vec![n; n_blocks]);
        }
        let sizes = self.image_sizes(messages)?;
        sizes
            .iter()
            .enumerate()
            .map(|(index, &(w, h))| {
                let n = self.preprocess.image_embeddings(w, h).map_err(|error| EngineError::Image {
                    index,
                    what: format!("{w}x{h} image"),
                    error,
                })?;
                Ok(n.unwrap_or(0))
            })
            .collect()
    }

    /// Replaces each image's marker in `text` by the text its processor expands it to (for
    /// families whose image text depends on the image's size); returns the text and the
    /// blocks of image features it calls for.
    fn expand_images(&self, text: String, messages: &[Message]) -> Result<(String, usize)> {
        let n_images: usize = messages.iter().map(|m| m.images().count()).sum();
        if !self.preprocess.expands() || n_images == 0 {
            return Ok((text, n_images));
        }
        // Where the template wrote the image: a marker string, or the image token itself.
        let marker = match (self.preprocess.marker(), &self.image_parts) {
            (Some(m), _) => m.to_string(),
            (None, ImageParts::MarkerFirst(m)) => m.clone(),
            _ => self.image_marker(),
        };
        let pieces: Vec<&str> = text.split(&marker).collect();
        if pieces.len() - 1 != n_images {
            return Err(EngineError::Template(format!(
                "the chat template placed {} image(s) but the conversation has {n_images}",
                pieces.len() - 1
            )));
        }
        let mut out = pieces[0].to_string();
        let mut blocks = 0;
        for (size, piece) in self.image_sizes(messages)?.into_iter().zip(&pieces[1..]) {
            let (expansion, n) = self.preprocess.expansion(size.0, size.1).unwrap_or_else(|| (marker.clone(), 1));
            out.push_str(&expansion);
            out.push_str(piece);
            blocks += n;
        }
        Ok((out, blocks))
    }

    /// Each image's width and height, decoding those not decoded yet.
    fn image_sizes(&self, messages: &[Message]) -> Result<Vec<(u32, u32)>> {
        let alpha = self.preprocess.alpha_mode();
        let inputs = messages.iter().flat_map(|m| m.images());
        inputs
            .enumerate()
            .map(|(index, input)| match input {
                ImageInput::Decoded(img) => Ok(img.dimensions()),
                _ => load_image_with(input, &ImageLimits::default(), alpha)
                    .map(|img| img.dimensions())
                    .map_err(|error| EngineError::Image { index, what: describe(input), error }),
            })
            .collect()
    }

    /// The text that stands for an image in a rendered prompt.
    fn image_marker(&self) -> String {
        match &self.image_slot {
            ImageSlot::Token { id, .. } | ImageSlot::CrossAttention(id) => self.tokenizer.token_to_string(*id),
            ImageSlot::Marker(marker) => marker.clone(),
        }
    }

    /// A prompt the caller wrote (no chat template): BOS, the images, then the text.
    /// KoboldCpp's layout: images right after BOS, "\n\n" between two images, the
    /// prompt text tokenized on its own after them.
    pub fn build_raw_prompt(&self, text: &str, n_images: usize) -> Result<Prompt> {
        let mut prompt = self.build_raw_prompt_with(text, vec![None; n_images])?;
        if let Some(n) = self.model.block_tokens() {
            let blocks = prompt.segments.iter().filter(|s| matches!(s, Segment::Image(_))).count();
            prompt.block_tokens = vec![n; blocks];
        }
        Ok(prompt)
    }

    /// [`Vlm::build_raw_prompt`] where some images stand for text of their own (their
    /// processor's expansion, with its image tokens).
    fn build_raw_prompt_with(&self, text: &str, images: Vec<Option<String>>) -> Result<Prompt> {
        let mut segments = Vec::new();
        let mut ids = self.tokenizer.encode_plain(text)?;
        if let Some(bos) = self.tokenizer.bos_id().filter(|_| self.tokenizer.add_bos) {
            // A BOS the caller wrote still goes before the images.
            if ids.first() == Some(&bos) {
                ids.remove(0);
            }
            segments.push(Segment::Tokens(vec![bos]));
        }
        if let ImageSlot::CrossAttention(image_id) = self.image_slot {
            // Llama 3.2 Vision: one image token per image after BOS, so the whole text
            // sees every image; the images take no positions themselves.
            if ids.contains(&image_id) {
                return Err(EngineError::BadRequest(format!("the prompt contains the image token `{}`; send images in `images`", self.image_marker())));
            }
            let run: Vec<u32> = std::iter::repeat_n(image_id, images.len()).chain(ids).collect();
            if !run.is_empty() {
                segments.push(Segment::Tokens(run));
            }
            return Ok(Prompt { text: text.to_string(), segments, block_tokens: Vec::new() });
        }
        let separator = self.tokenizer.encode_plain("\n\n")?;
        let mut block = 0;
        for (i, expansion) in images.into_iter().enumerate() {
            if i > 0 && !separator.is_empty() {
                segments.push(Segment::Tokens(separator.clone()));
            }
            match (expansion, &self.image_slot) {
                (Some(t), ImageSlot::Token { id, per_block }) => {
                    let ids = self.tokenizer.encode_with_specials(&t, false)?;
                    let parts = segments_from_ids(ids, *id, *per_block, block)?;
                    block += parts.iter().filter(|s| matches!(s, Segment::Image(_))).count();
                    segments.extend(parts);
                }
                _ => {
                    segments.push(Segment::Image(block));
                    block += 1;
                }
            }
        }
        if let ImageSlot::Token { id: image_id, .. } = self.image_slot {
            if ids.contains(&image_id) {
                return Err(EngineError::BadRequest(format!(
                    "the prompt contains the image marker `{}`; send images in `images`",
                    self.image_marker()
                )));
            }
        }
        if !ids.is_empty() {
            segments.push(Segment::Tokens(ids));
        }
        let blocks = segments.iter().filter(|s| matches!(s, Segment::Image(_))).count();
        Ok(Prompt { text: text.to_string(), segments, block_tokens: vec![self.model.block_tokens().unwrap_or(0); blocks] })
    }

    /// The request's prompt: the caller's raw text, or the rendered conversation.
    pub fn prompt_for(&self, req: &GenerateRequest) -> Result<Prompt> {
        match &req.raw_prompt {
            Some(text) if self.preprocess.needs_sizes() => {
                let sizes = self.image_sizes(&req.messages)?;
                let mut prompt = self.build_raw_prompt_with(text, sizes.iter().map(|&(w, h)| self.preprocess.expansion(w, h).map(|e| e.0)).collect())?;
                if self.model.block_tokens().is_none() {
                    prompt.block_tokens = self.block_tokens(&req.messages, sizes.len())?;
                }
                Ok(prompt)
            }
            Some(text) => self.build_raw_prompt(text, req.messages.iter().map(|m| m.images().count()).sum()),
            None => self.build_prompt(&req.messages),
        }
    }

    /// Token counts of a prompt, refusing one that leaves no room to generate.
    fn prompt_usage(&self, prompt: &Prompt) -> Result<Usage> {
        let tokens: usize = prompt.segments.iter().map(|s| if let Segment::Tokens(ids) = s { ids.len() } else { 0 }).sum();
        let (image_tokens, prompt_tokens) = match self.image_slot {
            // Llama 3.2 Vision: each image takes its one `<|image|>` token of the prompt.
            ImageSlot::CrossAttention(id) => {
                let count = prompt.segments.iter().map(|s| if let Segment::Tokens(ids) = s { ids.iter().filter(|&&t| t == id).count() } else { 0 }).sum();
                (count, tokens)
            }
            _ => {
                let images: usize = prompt.block_tokens.iter().sum();
                (images, tokens + images)
            }
        };
        let context = self.context_length();
        if prompt_tokens == 0 {
            return Err(EngineError::BadRequest("the prompt is empty".into()));
        }
        if prompt_tokens >= context {
            return Err(EngineError::ContextOverflow { prompt_tokens, image_tokens, context });
        }
        Ok(Usage { prompt_tokens, image_tokens, completion_tokens: 0 })
    }

    /// Builds and measures a request's prompt without running the model: a server
    /// calls it before queueing, so a prompt too long for the context is refused at once.
    pub fn check_prompt(&self, req: &GenerateRequest) -> Result<Usage> {
        self.guide(req)?;
        self.prompt_usage(&self.prompt_for(req)?)
    }

    /// The request's constraint, compiled; an invalid one is refused here.
    fn guide(&self, req: &GenerateRequest) -> Result<Option<Guide>> {
        req.constraint.as_ref().map(|c| self.grammars.start(&self.tokenizer, c)).transpose()
    }

    /// Fetches and decodes every image of the conversation now, replacing each with
    /// [`ImageInput::Decoded`]: a server does this in its request handler, so a bad
    /// image is refused at once and a slow URL holds no model time.
    pub fn decode_images(&self, messages: &mut [Message], limits: &ImageLimits) -> Result<()> {
        let alpha = self.preprocess.alpha_mode();
        let inputs = messages.iter_mut().flat_map(|m| m.parts.iter_mut()).filter_map(|p| match p {
            Part::Image(input) => Some(input),
            Part::Text(_) => None,
        });
        for (index, input) in inputs.enumerate() {
            if matches!(input, ImageInput::Decoded(_)) {
                continue;
            }
            let img = load_image_with(input, limits, alpha).map_err(|error| EngineError::Image { index, what: describe(input), error })?;
            *input = ImageInput::Decoded(Arc::new(img));
        }
        Ok(())
    }

    /// Hugging Face processors tokenize the whole text; every `per_block` image tokens
    /// in a row mark one block of image features.
    fn split_on_token(&self, text: &str, image_token: u32, per_block: usize) -> Result<Vec<Segment>> {
        let has_bos = self.tokenizer.bos_token.as_deref().is_some_and(|b| !b.is_empty() && text.starts_with(b));
        let ids = self.tokenizer.encode_with_specials(text, !has_bos)?;
        segments_from_ids(ids, image_token, per_block, 0)
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
        prompt
            .segments
            .iter()
            .flat_map(|s| match s {
                Segment::Tokens(ids) => ids.clone(),
                Segment::Image(b) => vec![image_id; prompt.block_tokens[*b]],
            })
            .collect()
    }

    /// Loads, decodes and preprocesses every image of the conversation, in order.
    pub fn load_pixels(&self, messages: &[Message], limits: &ImageLimits) -> Result<ImageBatch> {
        let images = messages
            .iter()
            .flat_map(|m| m.images())
            .enumerate()
            .map(|(index, input)| match input {
                ImageInput::Decoded(img) => Ok((index, img.clone())),
                _ => load_image_with(input, limits, self.preprocess.alpha_mode())
                    .map(|img| (index, Arc::new(img)))
                    .map_err(|error| EngineError::Image { index, what: describe(input), error }),
            })
            .collect::<Result<Vec<_>>>()?;
        if let Preprocess::Qwen2Vl(cfg) = &self.preprocess {
            return qwen2vl_batch(&images, cfg);
        }
        // Llama 3.2 Vision: each image's tile count and aspect-ratio id, from the same pass.
        let mut tiles = Vec::new();
        let pixels: Vec<_> = images
            .iter()
            .map(|(_, img)| match &self.preprocess {
                Preprocess::Mllama(cfg) => {
                    let p = seer_vision::mllama::preprocess(img, cfg);
                    tiles.push((p.tiles.len(), p.aspect_ratio_id));
                    p.tiles
                }
                other => other.apply(img),
            })
            .collect();
        let layouts = match &self.preprocess {
            Preprocess::LlavaNext { cfg, cells, .. } => images.iter().map(|(_, img)| cfg.layout(img.width(), img.height(), *cells)).collect(),
            _ => Vec::new(),
        };
        let tensors = pixels
            .into_iter()
            .flatten()
            .map(|p| Tensor::from_vec(p.data, (p.channels, p.height, p.width), &Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(ImageBatch { pixels: Tensor::stack(&tensors, 0)?, grids: Vec::new(), layouts, tiles })
    }

    /// The decoder's input for the whole prompt, `[positions, hidden]`.
    fn prompt_embeddings(&self, prompt: &Prompt, image_features: Option<&[Tensor]>) -> Result<Tensor> {
        let parts = prompt
            .segments
            .iter()
            .map(|s| match s {
                Segment::Tokens(ids) => self.model.language_model().embed(ids),
                Segment::Image(i) => {
                    let f = image_features.expect("images were encoded when the prompt has image slots");
                    Ok(f[*i].clone())
                }
            })
            .collect::<seer_models::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Logits for the token after the prompt, with the cache left holding the prompt.
    pub fn prefill(&self, prompt: &Prompt, images: Option<&ImageBatch>, cache: &mut seer_models::KvCache, timings: &mut Timings) -> Result<Tensor> {
        if let (crate::vlm::Model::Mllama(m), Some(batch)) = (&self.model, images) {
            return self.prefill_cross(m, prompt, batch, cache, timings);
        }
        let start = Instant::now();
        let features = match images {
            Some(b) => Some(self.model.encode_images(b)?),
            None => None,
        };
        timings.image_encode_ms = ms(start);
        let embeds = self.prompt_embeddings(prompt, features.as_deref())?;
        let positions = embeds.dim(0)?;
        let context = self.context_length();
        if positions >= context {
            return Err(EngineError::ContextOverflow { prompt_tokens: positions, image_tokens: prompt.block_tokens.iter().sum(), context });
        }
        let start_prefill = Instant::now();
        let lm = self.model.language_model();
        let rope = match images {
            Some(b) => self.model.rope_index(&self.expanded_ids(prompt, crate::vlm::IMAGE_SLOT), b)?,
            None => None,
        };
        let logits = match rope {
            // Image tokens on their grid; the text after the prompt continues from where
            // the positions end, which the cache remembers for the decode steps.
            Some(r) => {
                let logits = lm.forward_at(&embeds, cache, &r.positions)?;
                cache.set_position_offset(r.delta);
                logits
            }
            // Gemma 3: each image's tokens see each other whole.
            None if self.model.bidirectional_images() => lm.forward_with_blocks(&embeds, cache, &image_runs(prompt))?,
            None => lm.forward(&embeds, cache)?,
        };
        timings.prefill_ms = ms(start_prefill);
        timings.prefill_tokens_per_s = positions as f64 / (timings.prefill_ms / 1e3);
        Ok(logits)
    }

    /// Llama 3.2 Vision's prefill: the images become cross-attention states, which the
    /// cache keeps for the decode steps; the text sees each image from its image token on.
    fn prefill_cross(&self, m: &seer_models::mllama::Mllama, prompt: &Prompt, batch: &ImageBatch, cache: &mut seer_models::KvCache, timings: &mut Timings) -> Result<Tensor> {
        let start = Instant::now();
        let states = Tensor::cat(&self.model.encode_images(batch)?, 0)?;
        timings.image_encode_ms = ms(start);
        let start = Instant::now();
        let ids: Vec<u32> = prompt.segments.iter().flat_map(|s| if let Segment::Tokens(t) = s { t.clone() } else { Vec::new() }).collect();
        let cfg = &m.vision.config;
        let rows = cross_rows(&ids, m.image_token_id, &batch.tiles, cfg.max_tiles, cfg.tile_tokens());
        let lm = self.model.language_model();
        let cross = lm.cross_states(&states)?;
        let mask = seer_models::llama::CrossMask::new(&rows)?;
        let logits = lm.forward_cross(&lm.embed(&ids)?, cache, &cross, &mask)?;
        let decode = seer_models::llama::CrossMask::new(&rows[rows.len().saturating_sub(1)..])?;
        cache.cross = Some(seer_models::llama::CrossContext { states: cross, decode });
        timings.prefill_ms = ms(start);
        timings.prefill_tokens_per_s = ids.len() as f64 / (timings.prefill_ms / 1e3);
        Ok(logits)
    }

    /// Runs a request. `on_text` receives each piece of text as it becomes final and
    /// returns `false` to stop early.
    pub fn generate(&self, req: &GenerateRequest, limits: &ImageLimits, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Generation> {
        let start = Instant::now();
        // Where the prompt depends on image sizes, decode each image once, up front.
        let decoded;
        let req = if self.preprocess.needs_sizes() && req.messages.iter().flat_map(|m| m.images()).any(|i| !matches!(i, ImageInput::Decoded(_))) {
            let mut r = req.clone();
            self.decode_images(&mut r.messages, limits)?;
            decoded = r;
            &decoded
        } else {
            req
        };
        let prompt = self.prompt_for(req)?;
        let Usage { prompt_tokens, image_tokens, .. } = self.prompt_usage(&prompt)?;
        let mut guide = self.guide(req)?;
        let cross_images = matches!(self.image_slot, ImageSlot::CrossAttention(_)) && req.messages.iter().any(|m| m.images().next().is_some());
        let has_images = cross_images || prompt.segments.iter().any(|s| matches!(s, Segment::Image(_)));
        let pixels = if has_images { Some(self.load_pixels(&req.messages, limits)?) } else { None };
        let context = self.context_length();
        let mut timings = Timings::default();
        let mut cache = self.model.new_cache();
        // Room for the whole answer now: growing the cache mid-answer would copy all of it.
        cache.reserve((prompt_tokens + req.max_tokens).min(context));
        let mut logits = self.prefill(&prompt, pixels.as_ref(), &mut cache, &mut timings)?;
        timings.ttft_ms = ms(start);

        let prompt_ids: Vec<u32> = prompt.segments.iter().flat_map(|s| match s {
            Segment::Tokens(ids) => ids.clone(),
            Segment::Image(_) => Vec::new(),
        }).collect();
        let mut sampler = Sampler::new(req.sampling.clone(), &prompt_ids);
        let mut stream = TextStream::new();
        let mut stops = StopWatch::new(&req.stop);
        let mut tokens = Vec::new();
        let mut logprobs = Vec::new();
        let mut finish = FinishReason::Length;
        let decode_start = Instant::now();
        while tokens.len() < req.max_tokens {
            let mut scores = logits.to_vec1::<f32>()?;
            sampler.penalize(&mut scores);
            if let Some(g) = guide.as_mut() {
                let t = Instant::now();
                g.mask(&mut scores)?;
                timings.constraint_ms += ms(t);
            }
            let next = sampler.sample(&scores);
            // A constrained answer ends where its constraint allows the end, even for benchmarks.
            if (!req.ignore_eos || guide.is_some()) && self.tokenizer.stop_ids.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            if let Some(g) = guide.as_mut() {
                let t = Instant::now();
                g.accept(next)?;
                timings.constraint_ms += ms(t);
            }
            if let Some(top) = req.logprobs {
                logprobs.push(self.token_logprob(&scores, next, top));
            }
            tokens.push(next);
            sampler.observe(next);
            let (piece, stopped) = stops.push(&stream.push(&self.tokenizer, next)?);
            if !piece.is_empty() && !on_text(&piece) {
                finish = FinishReason::Cancelled;
                break;
            }
            // A complete constrained answer needs no end-of-sequence step.
            if stopped || guide.as_ref().is_some_and(Guide::is_finished) {
                finish = FinishReason::Stop;
                break;
            }
            if tokens.len() == req.max_tokens || cache.len() + 1 >= context {
                break;
            }
            let lm = self.model.language_model();
            logits = lm.forward(&lm.embed(&[next])?, &mut cache)?;
        }
        if finish != FinishReason::Cancelled && !stops.stopped {
            // Text held back for a possible stop string, or an unfinished character.
            let (mut rest, _) = stops.push(&stream.flush(&self.tokenizer)?);
            rest.push_str(&stops.finish());
            if !rest.is_empty() {
                on_text(&rest);
            }
        }
        if tokens.len() > 1 {
            timings.decode_tokens_per_s = (tokens.len() - 1) as f64 / decode_start.elapsed().as_secs_f64();
        }
        Ok(Generation {
            text: stops.text,
            logprobs: req.logprobs.map(|_| logprobs),
            token_ids: tokens.clone(),
            finish_reason: finish,
            usage: Usage { prompt_tokens, image_tokens, completion_tokens: tokens.len() },
            timings,
        })
    }

    fn token_logprob(&self, scores: &[f32], id: u32, top: usize) -> TokenLogprob {
        let lp = crate::sampler::log_softmax(scores);
        let piece = |i: u32| self.tokenizer.token_to_string(i);
        let mut best: Vec<u32> = (0..lp.len() as u32).collect();
        let top = top.min(best.len());
        if top > 0 {
            best.select_nth_unstable_by(top - 1, |a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
        }
        best.truncate(top);
        // Tokens a constraint ruled out are no alternatives.
        best.retain(|&i| lp[i as usize].is_finite());
        best.sort_by(|a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
        TokenLogprob {
            id,
            token: piece(id),
            logprob: lp[id as usize],
            top: best.into_iter().map(|i| (i, piece(i), lp[i as usize])).collect(),
        }
    }
}

/// Which image states each prompt row sees (transformers' `get_cross_attention_token_mask`):
/// image i from its image token up to the next image token, the last to the end; images
/// whose tokens are adjacent all see as far as the last of the run. Each image is
/// `max_tiles × tile_tokens` states, of which its real tiles' are visible.
fn cross_rows(ids: &[u32], image_token: u32, tiles: &[(usize, usize)], max_tiles: usize, tile_tokens: usize) -> Vec<Vec<bool>> {
    let at: Vec<usize> = ids.iter().enumerate().filter(|(_, &t)| t == image_token).map(|(i, _)| i).collect();
    let mut spans: Vec<(usize, usize)> = at.iter().enumerate().map(|(k, &s)| (s, at.get(k + 1).copied().unwrap_or(ids.len()))).collect();
    let mut end = ids.len();
    for span in spans.iter_mut().rev() {
        if span.0 + 1 == span.1 {
            span.1 = end;
        }
        end = span.1;
    }
    let per_image = max_tiles * tile_tokens;
    (0..ids.len())
        .map(|row| {
            let mut seen = vec![false; per_image * tiles.len()];
            for (i, &(start, stop)) in spans.iter().enumerate().take(tiles.len()) {
                if (start..stop).contains(&row) {
                    seen[i * per_image..][..tiles[i].0 * tile_tokens].fill(true);
                }
            }
            seen
        })
        .collect()
}

/// Where each image block sits in the prompt's positions.
fn image_runs(prompt: &Prompt) -> Vec<std::ops::Range<usize>> {
    let mut at = 0;
    let mut runs = Vec::new();
    for s in &prompt.segments {
        match s {
            Segment::Tokens(ids) => at += ids.len(),
            Segment::Image(b) => {
                runs.push(at..at + prompt.block_tokens[*b]);
                at += prompt.block_tokens[*b];
            }
        }
    }
    runs
}

/// Qwen2-VL's images: every image's flattened patches, one after another, and its grid.
fn qwen2vl_batch(images: &[(usize, Arc<image::RgbImage>)], cfg: &seer_vision::qwen2vl::Qwen2VlProcessorConfig) -> Result<ImageBatch> {
    let mut patches = Vec::new();
    let mut grids = Vec::new();
    let mut dim = 0;
    for (index, img) in images {
        let p = seer_vision::qwen2vl::preprocess(img, cfg)
            .map_err(|error| EngineError::Image { index: *index, what: format!("{}x{} image", img.width(), img.height()), error })?;
        dim = p.patch_dim;
        patches.extend_from_slice(&p.patches);
        grids.push(p.grid_thw);
    }
    let rows = patches.len() / dim.max(1);
    Ok(ImageBatch { pixels: Tensor::from_vec(patches, (rows, dim), &Device::Cpu)?, grids, layouts: Vec::new(), tiles: Vec::new() })
}

/// Cuts `ids` into token runs and image blocks, numbered from `first_block`: every
/// `per_block` image tokens in a row are one block.
fn segments_from_ids(ids: Vec<u32>, image_token: u32, per_block: usize, first_block: usize) -> Result<Vec<Segment>> {
    let mut segments = Vec::new();
    let mut run = Vec::new();
    let (mut block, mut in_block) = (first_block, 0);
    for id in ids {
        if id != image_token {
            if in_block != 0 {
                return Err(EngineError::Template(format!("an image block ended after {in_block} of its {per_block} image tokens")));
            }
            run.push(id);
            continue;
        }
        if !run.is_empty() {
            segments.push(Segment::Tokens(std::mem::take(&mut run)));
        }
        in_block += 1;
        if in_block == per_block {
            segments.push(Segment::Image(block));
            block += 1;
            in_block = 0;
        }
    }
    if in_block != 0 {
        return Err(EngineError::Template(format!("the prompt ended {in_block} tokens into an image block of {per_block}")));
    }
    if !run.is_empty() {
        segments.push(Segment::Tokens(run));
    }
    Ok(segments)
}

/// Watches the generated text for stop strings, holding back any tail that could still
/// become one, so a client never sees part of a stop string.
struct StopWatch<'a> {
    stops: &'a [String],
    /// Everything accepted so far (emitted or held back).
    text: String,
    emitted: usize,
    stopped: bool,
}

impl<'a> StopWatch<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopWatch { stops, text: String::new(), emitted: 0, stopped: false }
    }

    /// Adds generated text; returns what may be shown now and whether a stop string ended it.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[self.emitted..].find(s.as_str()).map(|p| p + self.emitted))
            .min();
        if let Some(pos) = hit {
            self.text.truncate(pos);
            self.stopped = true;
            return (self.take(pos), true);
        }
        let pending = &self.text[self.emitted..];
        let hold = self.stops.iter().map(|s| partial_match(pending, s)).max().unwrap_or(0);
        (self.take(self.text.len() - hold), false)
    }

    fn take(&mut self, end: usize) -> String {
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }

    /// Releases what was held back once generation ends without a stop string.
    fn finish(&mut self) -> String {
        self.take(self.text.len())
    }
}

/// The length of the longest tail of `text` that is a proper prefix of `stop`.
fn partial_match(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut w = StopWatch::new(&stops);
        let mut shown = Vec::new();
        for p in pieces {
            let (out, stopped) = w.push(p);
            shown.push(out);
            if stopped {
                return (shown, w.text, true);
            }
        }
        shown.push(w.finish());
        (shown, w.text, false)
    }

    #[test]
    fn stop_string_split_across_pieces_is_never_shown() {
        let (shown, text, stopped) = run(&["</end>"], &["Hello </", "en", "d> world"]);
        assert!(stopped);
        assert_eq!(text, "Hello ");
        assert_eq!(shown.concat(), "Hello ");
        assert_eq!(shown[0], "Hello ", "the possible start of a stop string waits");
    }

    #[test]
    fn held_text_is_released_when_it_is_not_a_stop() {
        let (shown, text, stopped) = run(&["STOP"], &["go ST", "ART", " ST"]);
        assert!(!stopped);
        assert_eq!(text, "go START ST");
        assert_eq!(shown, vec!["go ", "START", " ", "ST"]);
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (_, text, stopped) = run(&["b", "a"], &["xxabyy"]);
        assert!(stopped);
        assert_eq!(text, "xx");
    }

    #[test]
    fn partial_match_respects_characters() {
        assert_eq!(partial_match("abc é", "éz"), 2);
        assert_eq!(partial_match("abc", "xyz"), 0);
        assert_eq!(partial_match("ab", "abc"), 2);
    }
}
