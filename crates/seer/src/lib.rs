//! seer from Rust: load a vision-language model, chat with it about images, and pull typed
//! data out of images with output that always parses.
//!
//! ```no_run
//! use seer::{Image, Model};
//!
//! #[derive(serde::Deserialize, schemars::JsonSchema)]
//! struct Receipt {
//!     shop: String,
//!     total: f64,
//!     items: Vec<String>,
//! }
//!
//! let model = Model::builder("HuggingFaceTB/SmolVLM-256M-Instruct").build()?;
//! let receipt: Receipt = model.extract("Read this receipt.", [Image::from("receipt.jpg")])?;
//! let elements: Vec<String> = model.extract("Up to five of the most important elements in this photo.", [Image::from("photo.jpg")])?;
//! let animal = model.classify(&["cat", "dog", "neither"], "Which animal is this?", [Image::from("pet.png")])?;
//! # Ok::<(), seer::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use seer_engine::{hub, GenerateRequest, LoadOptions, Vlm};
use seer_vision::ImageLimits;
use serde::de::DeserializeOwned;

pub use seer_engine::{Constraint, EngineError, FinishReason, Isq, KvType, Message, Part, Role, SamplingParams, Usage, VisionDtype};
pub use seer_vision::ImageInput;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The answer reached `max_tokens` before its JSON was complete.
    #[error("the answer reached max_tokens ({max_tokens}) before it was complete: {text:?}")]
    Incomplete { max_tokens: usize, text: String },
    /// Valid under the schema, yet not what `T` deserializes (a serde attribute the
    /// schema does not describe).
    #[error("the answer does not deserialize: {error}: {text:?}")]
    Deserialize { error: serde_json::Error, text: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An image for a message: a path, an http(s) URL, base64 or a `data:` URL (from a
/// string), raw file bytes, or an already decoded image.
#[derive(Debug, Clone)]
pub struct Image(pub ImageInput);

impl From<&str> for Image {
    fn from(s: &str) -> Self {
        Image(ImageInput::parse(s))
    }
}

impl From<String> for Image {
    fn from(s: String) -> Self {
        Image(ImageInput::parse(&s))
    }
}

impl From<&Path> for Image {
    fn from(p: &Path) -> Self {
        Image(ImageInput::Path(p.to_path_buf()))
    }
}

impl From<PathBuf> for Image {
    fn from(p: PathBuf) -> Self {
        Image(ImageInput::Path(p))
    }
}

/// The bytes of an image file (JPEG, PNG, WebP, GIF, BMP).
impl From<Vec<u8>> for Image {
    fn from(bytes: Vec<u8>) -> Self {
        Image(ImageInput::Bytes(bytes))
    }
}

impl From<&[u8]> for Image {
    fn from(bytes: &[u8]) -> Self {
        Image(ImageInput::Bytes(bytes.to_vec()))
    }
}

impl From<image::DynamicImage> for Image {
    fn from(img: image::DynamicImage) -> Self {
        if !img.color().has_alpha() {
            return Image(ImageInput::Decoded(Arc::new(img.into_rgb8())));
        }
        // Each model flattens transparency its own way when it loads an image: hand it
        // over as a PNG so that happens here too.
        let mut png = Vec::new();
        match img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png) {
            Ok(()) => Image(ImageInput::Bytes(png)),
            Err(_) => Image(ImageInput::Decoded(Arc::new(img.into_rgb8()))),
        }
    }
}

/// A user message with images before the text, the order vision templates expect.
pub fn user(text: impl Into<String>, images: impl IntoIterator<Item = Image>) -> Message {
    Message::user_with_images(text, images.into_iter().map(|i| i.0).collect())
}

/// How an answer is generated.
#[derive(Debug, Clone)]
pub struct Options {
    pub max_tokens: usize,
    /// Temperature 0 (the default) is greedy: the same answer every time.
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence, up to `max_tokens` (benchmarks, tests).
    pub ignore_eos: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { max_tokens: 1024, sampling: SamplingParams::default(), stop: Vec::new(), ignore_eos: false }
    }
}

/// Prompt and answer speeds, as mistral.rs reports them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub image_encode_ms: f64,
    pub time_to_first_token_ms: f64,
    /// Prompt tokens (image tokens included) over the time to the first token.
    pub prompt_tokens_per_s: f64,
    pub completion_tokens_per_s: f64,
    pub total_ms: f64,
}

/// A finished answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Response {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}

/// A loaded model. Calls run one at a time on the calling thread; share it with an `Arc`.
pub struct Model {
    vlm: Vlm,
    limits: ImageLimits,
    options: Options,
}

/// Where a model comes from and how to load it; see [`Model::builder`].
pub struct ModelBuilder {
    source: String,
    mmproj: Option<PathBuf>,
    quant: Option<String>,
    load: LoadOptions,
    threads: Option<usize>,
    options: Options,
}

impl Model {
    /// `source` is what `seer --model` takes: a Hugging Face folder, a GGUF text model
    /// (with [`ModelBuilder::mmproj`]), or a hub repository `org/name` or
    /// `org/name:file.gguf`, downloaded into the Hugging Face cache on first use.
    pub fn builder(source: impl Into<String>) -> ModelBuilder {
        ModelBuilder { source: source.into(), mmproj: None, quant: None, load: LoadOptions::default(), threads: None, options: Options::default() }
    }

    /// Wraps a model the engine has already loaded.
    pub fn from_engine(vlm: Vlm) -> Model {
        Model { vlm, limits: local_limits(), options: Options::default() }
    }

    /// Changes the options [`Model::chat`], [`Model::extract`] and [`Model::classify`] use.
    pub fn set_options(&mut self, options: Options) {
        self.options = options;
    }

    /// The engine underneath, for what this API does not cover.
    pub fn engine(&self) -> &Vlm {
        &self.vlm
    }

    /// Answers a conversation with the model's default [`Options`].
    pub fn chat(&self, messages: &[Message]) -> Result<Response> {
        self.respond(messages, &self.options, None, &mut |_| true)
    }

    /// Answers a conversation, passing each piece of text to `on_text` as it is
    /// generated; `on_text` returns `false` to stop early.
    pub fn chat_stream(&self, messages: &[Message], options: &Options, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Response> {
        self.respond(messages, options, None, on_text)
    }

    /// Answers a conversation under a constraint (a JSON schema, a regex, a grammar, a choice).
    pub fn chat_constrained(&self, messages: &[Message], options: &Options, constraint: Constraint) -> Result<Response> {
        self.respond(messages, options, Some(constraint), &mut |_| true)
    }

    /// Reads a `T` out of the images: the answer is constrained to `T`'s JSON schema,
    /// so it always parses. Fails with [`Error::Incomplete`] when `max_tokens` runs out.
    pub fn extract<T: DeserializeOwned + schemars::JsonSchema>(&self, prompt: &str, images: impl IntoIterator<Item = Image>) -> Result<T> {
        self.extract_with_response(prompt, images).map(|(value, _)| value)
    }

    /// [`Model::extract`], with the response (usage, timings) as well.
    pub fn extract_with_response<T: DeserializeOwned + schemars::JsonSchema>(
        &self,
        prompt: &str,
        images: impl IntoIterator<Item = Image>,
    ) -> Result<(T, Response)> {
        let schema = schemars::schema_for!(T).to_value();
        let (value, response) = self.extract_json(schema, prompt, images)?;
        let value = serde_json::from_value(value).map_err(|error| Error::Deserialize { error, text: response.text.clone() })?;
        Ok((value, response))
    }

    /// Reads JSON that follows `schema` out of the images (a schema known only at run
    /// time, as `seer extract --schema` takes it). Objects take no properties beyond
    /// those they list, as in OpenAI's strict mode.
    pub fn extract_json(&self, mut schema: serde_json::Value, prompt: &str, images: impl IntoIterator<Item = Image>) -> Result<(serde_json::Value, Response)> {
        seer_engine::constraint::close_objects(&mut schema);
        let text = schema_prompt(prompt, &schema);
        let response = self.respond(&[user(text, images)], &self.options, Some(Constraint::JsonSchema(schema)), &mut |_| true)?;
        let value = serde_json::from_str(&response.text).map_err(|error| Error::Deserialize { error, text: response.text.clone() })?;
        Ok((value, response))
    }

    /// Picks exactly one of `labels` for the images.
    pub fn classify(&self, labels: &[&str], prompt: &str, images: impl IntoIterator<Item = Image>) -> Result<String> {
        let choices: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        let text = format!("{prompt}\n\nAnswer with one of: {}.", labels.join(", "));
        let response = self.respond(&[user(text, images)], &self.options, Some(Constraint::Choice(choices)), &mut |_| true)?;
        Ok(response.text)
    }

    /// The general form of the calls above: any options, any constraint, streamed to
    /// `on_text` (which returns `false` to stop). A constrained answer that reaches
    /// `max_tokens` is [`Error::Incomplete`].
    pub fn respond(&self, messages: &[Message], options: &Options, constraint: Option<Constraint>, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Response> {
        let start = Instant::now();
        let req = GenerateRequest {
            messages: messages.to_vec(),
            max_tokens: options.max_tokens,
            sampling: options.sampling.clone(),
            stop: options.stop.clone(),
            ignore_eos: options.ignore_eos,
            constraint: constraint.clone(),
            ..Default::default()
        };
        let g = self.vlm.generate(&req, &self.limits, on_text)?;
        if constraint.is_some() && g.finish_reason == FinishReason::Length {
            return Err(Error::Incomplete { max_tokens: options.max_tokens, text: g.text });
        }
        Ok(Response {
            timings: Timings {
                image_encode_ms: g.timings.image_encode_ms,
                time_to_first_token_ms: g.timings.ttft_ms,
                prompt_tokens_per_s: g.usage.prompt_tokens as f64 / (g.timings.ttft_ms / 1e3),
                completion_tokens_per_s: g.timings.decode_tokens_per_s,
                total_ms: start.elapsed().as_secs_f64() * 1e3,
            },
            text: g.text,
            finish_reason: g.finish_reason,
            usage: g.usage,
        })
    }
}

impl ModelBuilder {
    /// The GGUF projector for a local GGUF text model.
    pub fn mmproj(mut self, path: impl Into<PathBuf>) -> Self {
        self.mmproj = Some(path.into());
        self
    }

    /// For a hub repository of GGUF files: the text model whose name holds this (`Q4_K_M`).
    pub fn quant(mut self, quant: impl Into<String>) -> Self {
        self.quant = Some(quant.into());
        self
    }

    /// Quantizes a Hugging Face checkpoint's language model as it loads.
    pub fn isq(mut self, isq: Isq) -> Self {
        self.load.isq = Some(isq);
        self
    }

    pub fn vision_dtype(mut self, dtype: VisionDtype) -> Self {
        self.load.vision = dtype;
        self
    }

    pub fn kv_cache(mut self, kv: KvType) -> Self {
        self.load.kv_cache = Some(kv);
        self
    }

    /// Where the matrix products run: `"cpu"` (the default, seer's kernels), `"cuda"` or
    /// `"cuda:N"` (a GPU holds the weights; needs the `cuda` feature).
    pub fn device(mut self, device: &str) -> Result<Self> {
        self.load.products_on = seer_engine::parse_device(device)?;
        Ok(self)
    }

    /// Threads for matrix products (default: all cores). Takes effect for the first
    /// model a process loads.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = Some(n);
        self
    }

    /// The options [`Model::chat`], [`Model::extract`] and [`Model::classify`] use.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    pub fn max_tokens(mut self, n: usize) -> Self {
        self.options.max_tokens = n;
        self
    }

    /// Finds (or downloads) the model's files and loads it.
    pub fn build(self) -> Result<Model> {
        if let Some(n) = self.threads {
            // The kernels' thread pools size themselves from these at first use.
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            std::env::set_var("OMP_NUM_THREADS", n.to_string());
        }
        let files = hub::resolve(&self.source, self.quant.as_deref(), self.mmproj.as_deref())?;
        let vlm = Vlm::load_with(&files.model, files.mmproj.as_deref(), &self.load)?;
        Ok(Model { vlm, limits: local_limits(), options: self.options })
    }
}

/// The prompt with the schema after it: the schema tells the model what the fields mean,
/// the constraint makes sure it follows it.
pub fn schema_prompt(prompt: &str, schema: &serde_json::Value) -> String {
    format!("{prompt}\n\nAnswer with JSON that follows this schema:\n{schema}")
}

/// A program on the user's own machine may read images from its own network.
fn local_limits() -> ImageLimits {
    ImageLimits { allow_private_urls: true, ..ImageLimits::default() }
}
