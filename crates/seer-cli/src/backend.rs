//! Where `seer chat`, `seer ocr` and `seer describe` get their answers: a model loaded in
//! this process, or a running server that speaks OpenAI's chat API (`--server URL`: seer
//! serve, llama.cpp's server, vLLM...).

use std::io::{BufRead, BufReader};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use clap::Args;
use seer::{Constraint, FinishReason, ImageInput, Message, Options, Part, Role, SamplingParams};
use serde_json::{json, Value};

use crate::ModelArgs;

/// The model flags of `seer run`, or `--server`.
#[derive(Args)]
pub struct BackendArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Use a running OpenAI-compatible server (`seer serve` or another) instead of loading a model.
    #[arg(long, value_name = "URL", conflicts_with_all = ["model", "mmproj", "isq", "quant"])]
    pub server: Option<String>,
    /// The key for --server (`Authorization: Bearer KEY`).
    #[arg(long, env = "SEER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// 0 picks the most likely token every time.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Generate max-tokens tokens even past end-of-sequence (for tests).
    #[arg(long, hide = true)]
    pub ignore_eos: bool,
}

/// One answer, however it was made.
pub struct Answer {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub image_tokens: usize,
    pub completion_tokens: usize,
}

pub enum Backend {
    Local(Box<seer::Model>),
    Remote { url: String, key: Option<String>, client: reqwest::blocking::Client },
}

impl Backend {
    pub fn new(args: &BackendArgs) -> Result<Backend> {
        let Some(server) = &args.server else {
            let (vlm, _) = crate::load(&args.model)?;
            return Ok(Backend::Local(Box::new(seer::Model::from_engine(vlm))));
        };
        let base = server.trim_end_matches('/').trim_end_matches("/v1");
        let client = reqwest::blocking::Client::builder().connect_timeout(Duration::from_secs(10)).build()?;
        Ok(Backend::Remote { url: format!("{base}/v1/chat/completions"), key: args.api_key.clone(), client })
    }

    /// Answers the conversation, passing text to `on_text` as it arrives (`false` stops).
    pub fn answer(&self, args: &BackendArgs, messages: &[Message], schema: Option<&Value>, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Answer> {
        match self {
            Backend::Local(model) => {
                let options = Options {
                    max_tokens: args.max_tokens,
                    sampling: SamplingParams { temperature: args.temperature, ..Default::default() },
                    ignore_eos: args.ignore_eos,
                    ..Default::default()
                };
                let constraint = schema.map(|s| {
                    let mut s = s.clone();
                    seer_engine::constraint::close_objects(&mut s);
                    Constraint::JsonSchema(s)
                });
                let r = model.respond(messages, &options, constraint, on_text)?;
                Ok(Answer {
                    text: r.text,
                    finish_reason: r.finish_reason,
                    prompt_tokens: r.usage.prompt_tokens,
                    image_tokens: r.usage.image_tokens,
                    completion_tokens: r.usage.completion_tokens,
                })
            }
            Backend::Remote { url, key, client } => remote_answer(client, url, key.as_deref(), args, messages, schema, on_text),
        }
    }
}

fn remote_answer(
    client: &reqwest::blocking::Client,
    url: &str,
    key: Option<&str>,
    args: &BackendArgs,
    messages: &[Message],
    schema: Option<&Value>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Answer> {
    let mut body = json!({
        "model": "seer",
        "messages": messages.iter().map(openai_message).collect::<Result<Vec<_>>>()?,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(schema) = schema {
        body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": true}});
    }
    if args.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    let mut request = client.post(url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body.to_string());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().with_context(|| format!("sending the request to {url}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["error"]["message"].as_str().map(String::from)).unwrap_or(text);
        bail!("{url} answered {status}: {message}");
    }
    let mut answer = Answer { text: String::new(), finish_reason: FinishReason::Stop, prompt_tokens: 0, image_tokens: 0, completion_tokens: 0 };
    for line in BufReader::new(response).lines() {
        let line = line.with_context(|| format!("reading the answer from {url}"))?;
        let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
        if data == "[DONE]" {
            break;
        }
        let event: Value = serde_json::from_str(data).with_context(|| format!("{url} sent an event that is not JSON: {data}"))?;
        if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
            answer.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            answer.completion_tokens = usage["completion_tokens"].as_u64().unwrap_or(0) as usize;
            answer.image_tokens = usage["prompt_tokens_details"]["image_tokens"].as_u64().unwrap_or(0) as usize;
        }
        let choice = &event["choices"][0];
        if let Some(piece) = choice["delta"]["content"].as_str() {
            answer.text.push_str(piece);
            if !on_text(piece) {
                // Dropping the response closes the connection, which stops the server's generation.
                answer.finish_reason = FinishReason::Cancelled;
                return Ok(answer);
            }
        }
        if choice["finish_reason"] == "length" {
            answer.finish_reason = FinishReason::Length;
        }
    }
    Ok(answer)
}

/// A message as OpenAI's chat API takes it, local images inlined as `data:` URLs.
pub fn openai_message(m: &Message) -> Result<Value> {
    let role = match m.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    let parts = m
        .parts
        .iter()
        .map(|p| match p {
            Part::Text(t) => Ok(json!({"type": "text", "text": t})),
            Part::Image(img) => Ok(json!({"type": "image_url", "image_url": {"url": image_url(img)?}})),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(json!({"role": role, "content": parts}))
}

fn image_url(img: &ImageInput) -> Result<String> {
    let data_url = |bytes: &[u8]| format!("data:{};base64,{}", mime(bytes), base64::engine::general_purpose::STANDARD.encode(bytes));
    Ok(match img {
        ImageInput::Url(u) => u.clone(),
        ImageInput::Base64(b) if b.starts_with("data:") => b.clone(),
        ImageInput::Base64(b) => format!("data:image/png;base64,{b}"),
        ImageInput::Path(p) => data_url(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
        ImageInput::Bytes(b) => data_url(b),
        ImageInput::Decoded(rgb) => {
            let mut png = Vec::new();
            rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            data_url(&png)
        }
    })
}

/// The media type servers expect in a data URL, from the file's first bytes.
fn mime(bytes: &[u8]) -> &'static str {
    match image::guess_format(bytes) {
        Ok(image::ImageFormat::Jpeg) => "image/jpeg",
        Ok(image::ImageFormat::WebP) => "image/webp",
        Ok(image::ImageFormat::Gif) => "image/gif",
        Ok(image::ImageFormat::Bmp) => "image/bmp",
        _ => "image/png",
    }
}
