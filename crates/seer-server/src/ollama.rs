//! Ollama's API: `POST /api/chat` and `POST /api/generate` (newline-delimited JSON
//! streamed by default, one object with `stream: false`), `GET /api/tags`,
//! `GET /api/version`.

use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use seer_engine::{Constraint, FinishReason, GenerateRequest, Generation, Message, Part, Role, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::images;
use crate::limits::JsonBody;
use crate::state::AppState;
use crate::submit::{self, check_range, Event};

#[derive(Deserialize)]
pub struct ChatRequest {
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
    options: Option<Options>,
    /// Not Ollama's: generate past end-of-sequence.
    ignore_eos: Option<bool>,
    /// `"json"` or a JSON schema.
    format: Option<Value>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<String>,
    images: Option<Vec<String>>,
}

#[derive(Deserialize)]
pub struct GenerateBody {
    prompt: Option<String>,
    system: Option<String>,
    images: Option<Vec<String>>,
    /// The prompt is already in the model's format: no chat template.
    raw: Option<bool>,
    stream: Option<bool>,
    options: Option<Options>,
    ignore_eos: Option<bool>,
    format: Option<Value>,
}

#[derive(Deserialize, Default)]
struct Options {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    num_predict: Option<i64>,
    seed: Option<i64>,
    stop: Option<Vec<String>>,
    repeat_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
}

/// `POST /api/chat`.
pub async fn chat(State(state): State<AppState>, JsonBody(body): JsonBody<ChatRequest>) -> Result<Response, ApiError> {
    let reply = Reply::new(&state, Kind::Chat)?;
    if body.messages.is_empty() {
        return Ok(Json(reply.loaded()).into_response());
    }
    let mut req = base_request(body.options, &state, body.ignore_eos)?;
    req.constraint = format(body.format)?;
    req.messages = to_messages(body.messages)?;
    run(&state, req, reply, body.stream.unwrap_or(true)).await
}

/// `POST /api/generate`.
pub async fn generate(State(state): State<AppState>, JsonBody(body): JsonBody<GenerateBody>) -> Result<Response, ApiError> {
    let reply = Reply::new(&state, Kind::Generate)?;
    let prompt = body.prompt.unwrap_or_default();
    let images: Vec<Part> = body.images.unwrap_or_default().iter().map(|b| Part::Image(images::from_base64(b))).collect();
    if prompt.is_empty() && images.is_empty() {
        // Ollama's way of asking for the model to be loaded.
        return Ok(Json(reply.loaded()).into_response());
    }
    let mut req = base_request(body.options, &state, body.ignore_eos)?;
    req.constraint = format(body.format)?;
    if body.raw.unwrap_or(false) {
        req.messages = vec![Message { role: Role::User, parts: images }];
        req.raw_prompt = Some(prompt);
    } else {
        if let Some(system) = body.system.filter(|s| !s.is_empty()) {
            req.messages.push(Message::text(Role::System, system));
        }
        let mut parts = images;
        parts.push(Part::Text(prompt));
        req.messages.push(Message { role: Role::User, parts });
    }
    run(&state, req, reply, body.stream.unwrap_or(true)).await
}

/// The sampling settings, with Ollama's defaults for those left out.
fn base_request(options: Option<Options>, state: &AppState, ignore_eos: Option<bool>) -> Result<GenerateRequest, ApiError> {
    let o = options.unwrap_or_default();
    check_range("options.temperature", o.temperature, 0.0, 100.0)?;
    check_range("options.top_p", o.top_p, 0.0, 1.0)?;
    check_range("options.min_p", o.min_p, 0.0, 1.0)?;
    check_range("options.repeat_penalty", o.repeat_penalty, 0.01, 10.0)?;
    let sampling = SamplingParams {
        temperature: o.temperature.unwrap_or(0.8),
        top_p: o.top_p.unwrap_or(0.9),
        top_k: o.top_k.unwrap_or(40).max(0) as usize,
        min_p: o.min_p.unwrap_or(0.0),
        seed: submit::seed(o.seed),
        repetition_penalty: o.repeat_penalty.unwrap_or(1.1),
        frequency_penalty: o.frequency_penalty.unwrap_or(0.0),
        presence_penalty: o.presence_penalty.unwrap_or(0.0),
    };
    let context = state.loaded()?.vlm.context_length();
    Ok(GenerateRequest {
        messages: Vec::new(),
        max_tokens: submit::max_tokens(o.num_predict, context, context),
        sampling,
        ignore_eos: ignore_eos.unwrap_or(false),
        stop: o.stop.unwrap_or_default().into_iter().filter(|s| !s.is_empty()).collect(),
        logprobs: None,
        raw_prompt: None,
        constraint: None,
    })
}

/// Ollama's `format`: `"json"` for any JSON object, or a JSON schema.
fn format(format: Option<Value>) -> Result<Option<Constraint>, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(Constraint::json_object())),
        Some(mut schema @ Value::Object(_)) => {
            // As llama.cpp (Ollama's engine) reads a schema: objects closed unless it says otherwise.
            seer_engine::constraint::close_objects(&mut schema);
            Ok(Some(Constraint::JsonSchema(schema)))
        }
        Some(other) => Err(ApiError::invalid("format", format!("format must be \"json\" or a JSON schema object, not {other}"))),
    }
}

/// Each message's images go before its text, as Ollama places them.
fn to_messages(messages: Vec<ChatMessage>) -> Result<Vec<Message>, ApiError> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = submit::role(i, &m.role)?;
            let mut parts: Vec<Part> = m.images.unwrap_or_default().iter().map(|b| Part::Image(images::from_base64(b))).collect();
            parts.push(Part::Text(m.content.unwrap_or_default()));
            Ok(Message { role, parts })
        })
        .collect()
}

async fn run(state: &AppState, req: GenerateRequest, reply: Reply, stream: bool) -> Result<Response, ApiError> {
    let events = submit::submit(state, req, 1).await?;
    if !stream {
        let g = submit::collect(events, 1).await?.remove(0);
        return Ok(Json(reply.last(&g, &g.text)).into_response());
    }
    let events = submit::start_stream(events).await?;
    let lines = events.map(move |(_, event)| {
        let value = match event {
            Event::Text(text) => reply.piece(&text),
            Event::Done(Ok(g)) => reply.last(&g, ""),
            Event::Done(Err(e)) => json!({"error": e.to_string()}),
        };
        Ok::<_, Infallible>(Bytes::from(format!("{value}\n")))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response())
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Generate,
}

/// Builds the response objects of one request.
struct Reply {
    model: String,
    kind: Kind,
    start: Instant,
}

impl Reply {
    fn new(state: &AppState, kind: Kind) -> Result<Self, ApiError> {
        Ok(Reply { model: state.loaded()?.vlm.name.clone(), kind, start: Instant::now() })
    }

    fn object(&self, text: &str, done: bool) -> Value {
        let mut v = json!({"model": self.model, "created_at": rfc3339(SystemTime::now()), "done": done});
        match self.kind {
            Kind::Chat => v["message"] = json!({"role": "assistant", "content": text}),
            Kind::Generate => v["response"] = json!(text),
        }
        v
    }

    fn piece(&self, text: &str) -> Value {
        self.object(text, false)
    }

    /// The closing object, with Ollama's counts and durations (nanoseconds).
    fn last(&self, g: &Generation, text: &str) -> Value {
        let mut v = self.object(text, true);
        let t = &g.timings;
        let n = g.usage.completion_tokens;
        let eval_s = if n > 1 && t.decode_tokens_per_s > 0.0 { (n - 1) as f64 / t.decode_tokens_per_s } else { 0.0 };
        v["done_reason"] = json!(if g.finish_reason == FinishReason::Length { "length" } else { "stop" });
        v["total_duration"] = json!(self.start.elapsed().as_nanos() as u64);
        v["load_duration"] = json!(0);
        v["prompt_eval_count"] = json!(g.usage.prompt_tokens);
        v["prompt_eval_duration"] = json!((t.ttft_ms * 1e6) as u64);
        v["eval_count"] = json!(n);
        v["eval_duration"] = json!((eval_s * 1e9) as u64);
        v
    }

    /// Ollama's answer to an empty request: the model is loaded.
    fn loaded(&self) -> Value {
        let mut v = self.object("", true);
        v["done_reason"] = json!("load");
        v
    }
}

/// `GET /api/tags`: the loaded model, as Ollama lists local models.
pub async fn tags(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let loaded = state.loaded()?;
    let name = &loaded.vlm.name;
    let modified = UNIX_EPOCH + std::time::Duration::from_secs(loaded.created);
    Ok(Json(json!({
        "models": [{
            "name": name,
            "model": name,
            "modified_at": rfc3339(modified),
            "size": loaded.size_bytes,
            "digest": "",
            "details": {"format": loaded.format, "family": "llava", "families": ["llava"], "parameter_size": "", "quantization_level": ""},
        }],
    })))
}

/// `GET /api/version`: seer's version.
pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

/// RFC 3339 in UTC with nanoseconds, as Ollama writes `created_at`.
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z", s / 3600, s / 60 % 60, s % 60, since.subsec_nanos())
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + std::time::Duration::new(951_827_696, 5); // a leap day
        assert_eq!(rfc3339(t), "2000-02-29T12:34:56.000000005Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_735_689_599);
        assert_eq!(rfc3339(t), "2024-12-31T23:59:59.000000000Z");
    }
}
