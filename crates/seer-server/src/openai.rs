//! OpenAI's chat completions (`POST /v1/chat/completions`, streamed as server-sent
//! events or not) and `GET /v1/models`.

use std::convert::Infallible;
use std::fmt;
use std::marker::PhantomData;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{stream, StreamExt};
use seer_engine::generate::TokenLogprob;
use seer_engine::{Constraint, FinishReason, GenerateRequest, Generation, Message, Part, SamplingParams};
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::images;
use crate::limits::JsonBody;
use crate::state::{unix_now, AppState};
use crate::submit::{self, check_range, Event};

/// The most choices (`n`) one request may ask for.
const MAX_CHOICES: u32 = 8;
const MAX_STOPS: usize = 16;

#[derive(Deserialize)]
pub struct ChatRequest {
    messages: Vec<ChatMessage>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<StringOr<String>>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    n: Option<u32>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    /// Not OpenAI's: generate past end-of-sequence (as vLLM's extension does).
    ignore_eos: Option<bool>,
    response_format: Option<ResponseFormat>,
    /// vLLM's constraints, which several clients send instead of `response_format`.
    guided_json: Option<Value>,
    guided_regex: Option<String>,
    guided_choice: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// `name` and `strict` are accepted and not needed: objects take no properties beyond
/// those they list unless the schema allows them (`additionalProperties`), as in OpenAI's
/// strict mode and as llama.cpp's server reads every schema.
#[derive(Deserialize)]
struct JsonSchemaFormat {
    schema: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<StringOr<ContentPart>>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

/// `{"url": ..., "detail": ...}` (`detail` is accepted and ignored), or the URL alone.
#[derive(Deserialize)]
#[serde(untagged)]
enum ImageUrl {
    Object { url: String },
    Plain(String),
}

/// A string, or a list of `T` (OpenAI's `content` and `stop` take either).
enum StringOr<T> {
    One(String),
    Many(Vec<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for StringOr<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = StringOr<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(StringOr::One(s.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(StringOr::Many(items))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat(State(state): State<AppState>, JsonBody(body): JsonBody<ChatRequest>) -> Result<Response, ApiError> {
    let loaded = state.loaded()?;
    let n = body.n.unwrap_or(1);
    let stream = body.stream.unwrap_or(false);
    let include_usage = body.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    let req = to_request(body, &state, loaded.vlm.context_length())?;
    let want_logprobs = req.logprobs.is_some();
    let events = submit::submit(&state, req, n as usize).await?;
    let reply = Reply { id: format!("chatcmpl-{:016x}", rand::random::<u64>()), created: unix_now(), model: loaded.vlm.name.clone() };
    if !stream {
        let generations = submit::collect(events, n as usize).await?;
        return Ok(Json(reply.completion(&generations, want_logprobs)).into_response());
    }
    let events = submit::start_stream(events).await?;
    let mut chunks = Chunks { reply, n: n as usize, include_usage, want_logprobs, started: vec![false; n as usize], finished: 0, usage: [0; 3] };
    let frames = events
        .flat_map(move |(index, event)| stream::iter(chunks.frames(index, event)))
        .chain(stream::once(async { SseEvent::default().data("[DONE]") }))
        .map(Ok::<_, Infallible>);
    Ok(Sse::new(frames).into_response())
}

fn to_request(body: ChatRequest, state: &AppState, context: usize) -> Result<GenerateRequest, ApiError> {
    check_params(&body)?;
    let sampling = SamplingParams {
        temperature: body.temperature.unwrap_or(1.0),
        top_p: body.top_p.unwrap_or(1.0),
        top_k: body.top_k.unwrap_or(0).max(0) as usize,
        min_p: body.min_p.unwrap_or(0.0),
        seed: submit::seed(body.seed),
        repetition_penalty: body.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: body.frequency_penalty.unwrap_or(0.0),
        presence_penalty: body.presence_penalty.unwrap_or(0.0),
    };
    let requested = body.max_completion_tokens.or(body.max_tokens).map(i64::from);
    let constraint = constraint(body.response_format, body.guided_json, body.guided_regex, body.guided_choice)?;
    Ok(GenerateRequest {
        messages: to_messages(body.messages, state)?,
        max_tokens: submit::max_tokens(requested, context, context),
        sampling,
        ignore_eos: body.ignore_eos.unwrap_or(false),
        stop: stops(body.stop)?,
        logprobs: body.logprobs.unwrap_or(false).then(|| body.top_logprobs.unwrap_or(0) as usize),
        raw_prompt: None,
        constraint,
    })
}

/// The one constraint a request asks for, from OpenAI's `response_format` or vLLM's
/// `guided_*` fields.
fn constraint(format: Option<ResponseFormat>, json: Option<Value>, regex: Option<String>, choice: Option<Vec<String>>) -> Result<Option<Constraint>, ApiError> {
    let format = match format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(Constraint::json_object()),
        // No schema: any JSON value.
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let mut schema = json_schema.schema.unwrap_or_else(|| json!({}));
            seer_engine::constraint::close_objects(&mut schema);
            Some(Constraint::JsonSchema(schema))
        }
    };
    let json = json.map(|mut schema| {
        seer_engine::constraint::close_objects(&mut schema);
        Constraint::JsonSchema(schema)
    });
    let asked: Vec<Constraint> = [format, json, regex.map(Constraint::Regex), choice.map(Constraint::Choice)]
        .into_iter()
        .flatten()
        .collect();
    if asked.len() > 1 {
        return Err(ApiError::invalid("response_format", "give one of response_format, guided_json, guided_regex and guided_choice"));
    }
    Ok(asked.into_iter().next())
}

fn check_params(body: &ChatRequest) -> Result<(), ApiError> {
    check_range("temperature", body.temperature, 0.0, 2.0)?;
    check_range("top_p", body.top_p, 0.0, 1.0)?;
    check_range("min_p", body.min_p, 0.0, 1.0)?;
    check_range("frequency_penalty", body.frequency_penalty, -2.0, 2.0)?;
    check_range("presence_penalty", body.presence_penalty, -2.0, 2.0)?;
    check_range("repetition_penalty", body.repetition_penalty, 0.01, 10.0)?;
    if body.top_k.is_some_and(|k| k < -1) {
        return Err(ApiError::invalid("top_k", "top_k must be -1 (no limit), 0 (no limit) or positive"));
    }
    if body.max_completion_tokens.or(body.max_tokens) == Some(0) {
        return Err(ApiError::invalid("max_tokens", "max_tokens must be at least 1"));
    }
    if body.n.is_some_and(|n| n == 0 || n > MAX_CHOICES) {
        return Err(ApiError::invalid("n", format!("n must be between 1 and {MAX_CHOICES}")));
    }
    if body.top_logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::invalid("top_logprobs", "top_logprobs must be between 0 and 20"));
    }
    if body.top_logprobs.is_some() && body.logprobs != Some(true) {
        return Err(ApiError::invalid("top_logprobs", "top_logprobs needs logprobs: true"));
    }
    if body.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    Ok(())
}

fn stops(stop: Option<StringOr<String>>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None => Vec::new(),
        Some(StringOr::One(s)) => vec![s],
        Some(StringOr::Many(list)) => list,
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::invalid("stop", format!("at most {MAX_STOPS} stop strings")));
    }
    Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
}

fn to_messages(messages: Vec<ChatMessage>, state: &AppState) -> Result<Vec<Message>, ApiError> {
    let local = state.limits.local_images.as_deref();
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = submit::role(i, &m.role)?;
        let parts = match m.content {
            None => Vec::new(),
            Some(StringOr::One(text)) => vec![Part::Text(text)],
            Some(StringOr::Many(parts)) => parts
                .into_iter()
                .enumerate()
                .map(|(j, p)| match p {
                    ContentPart::Text { text } => Ok(Part::Text(text)),
                    ContentPart::ImageUrl { image_url: ImageUrl::Object { url } | ImageUrl::Plain(url) } => {
                        images::from_url(&url, local, &format!("messages[{i}].content[{j}].image_url.url")).map(Part::Image)
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        out.push(Message { role, parts });
    }
    Ok(out)
}

/// What every response of one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// `usage`, with the prompt counted once however many choices there are.
fn usage(prompt: usize, images: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": images},
    })
}

fn logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.token, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|(_, s, lp)| entry(s, *lp)).collect();
            e
        })
        .collect();
    json!({"content": content})
}

fn choice_logprobs(g: &Generation, wanted: bool) -> Value {
    match (&g.logprobs, wanted) {
        (Some(tokens), true) => logprobs(tokens),
        _ => Value::Null,
    }
}

impl Reply {
    fn completion(&self, generations: &[Generation], want_logprobs: bool) -> Value {
        let choices: Vec<Value> = generations
            .iter()
            .enumerate()
            .map(|(i, g)| {
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": g.text},
                    "logprobs": choice_logprobs(g, want_logprobs),
                    "finish_reason": finish_reason(g.finish_reason),
                })
            })
            .collect();
        let first = &generations[0].usage;
        let completion = generations.iter().map(|g| g.usage.completion_tokens).sum();
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(first.prompt_tokens, first.image_tokens, completion),
        })
    }
}

/// Turns engine events into `chat.completion.chunk` events.
struct Chunks {
    reply: Reply,
    n: usize,
    include_usage: bool,
    want_logprobs: bool,
    started: Vec<bool>,
    finished: usize,
    /// Prompt, image and completion tokens so far.
    usage: [usize; 3],
}

impl Chunks {
    fn frames(&mut self, index: usize, event: Event) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !std::mem::replace(&mut self.started[index], true) {
            out.push(self.choice(index, json!({"role": "assistant", "content": ""}), Value::Null, Value::Null));
        }
        match event {
            Event::Text(text) => out.push(self.choice(index, json!({"content": text}), Value::Null, Value::Null)),
            Event::Done(Ok(g)) => {
                let lp = choice_logprobs(&g, self.want_logprobs);
                out.push(self.choice(index, json!({}), json!(finish_reason(g.finish_reason)), lp));
                self.usage = [g.usage.prompt_tokens, g.usage.image_tokens, self.usage[2] + g.usage.completion_tokens];
                self.finished += 1;
                if self.include_usage && self.finished == self.n {
                    let [prompt, images, completion] = self.usage;
                    out.push(self.frame(json!([]), usage(prompt, images, completion)));
                }
            }
            Event::Done(Err(e)) => out.push(SseEvent::default().data(ApiError::from(e).body().to_string())),
        }
        out
    }

    fn choice(&self, index: usize, delta: Value, finish: Value, logprobs: Value) -> SseEvent {
        let choice = json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish});
        self.frame(json!([choice]), Value::Null)
    }

    fn frame(&self, choices: Value, usage: Value) -> SseEvent {
        let r = &self.reply;
        let mut chunk = json!({"id": r.id, "object": "chat.completion.chunk", "created": r.created, "model": r.model, "choices": choices});
        if self.include_usage {
            chunk["usage"] = usage;
        }
        SseEvent::default().data(chunk.to_string())
    }
}

/// `GET /v1/models`: the one loaded model, its context and that it takes images.
pub async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let loaded = state.loaded()?;
    let vlm = &loaded.vlm;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": vlm.name,
            "object": "model",
            "created": loaded.created,
            "owned_by": "seer",
            "context_length": vlm.context_length(),
            "input_modalities": ["text", "image"],
            "capabilities": {"vision": true},
        }],
    })))
}
