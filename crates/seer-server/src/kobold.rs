//! KoboldCpp's API: `POST /api/v1/generate` (a raw prompt, no chat template, with up to
//! four base64 images that go before the prompt text as KoboldCpp places them),
//! `GET /api/v1/model` and `GET /api/extra/version`.

use axum::extract::State;
use axum::Json;
use seer_engine::{Constraint, FinishReason, GenerateRequest, Message, Part, Role, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::images;
use crate::limits::JsonBody;
use crate::state::AppState;
use crate::submit::{self, check_range};

/// KoboldCpp reads at most this many images per request.
const MAX_IMAGES: usize = 4;

#[derive(Deserialize)]
pub struct KoboldRequest {
    prompt: String,
    max_length: Option<i64>,
    temperature: Option<f32>,
    temp: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    rep_pen: Option<f32>,
    sampler_seed: Option<i64>,
    stop_sequence: Option<Vec<String>>,
    images: Option<Vec<String>>,
    /// KoboldCpp's name for generating past end-of-sequence.
    bypass_eos: Option<bool>,
    ignore_eos: Option<bool>,
    /// A GBNF grammar, as KoboldCpp takes it.
    grammar: Option<String>,
}

/// `POST /api/v1/generate`.
pub async fn generate(State(state): State<AppState>, JsonBody(body): JsonBody<KoboldRequest>) -> Result<Json<Value>, ApiError> {
    let context = state.loaded()?.vlm.context_length();
    let req = to_request(body, context)?;
    let events = submit::submit(&state, req, 1).await?;
    let g = submit::collect(events, 1).await?.remove(0);
    let finish = if g.finish_reason == FinishReason::Length { "length" } else { "stop" };
    Ok(Json(json!({
        "results": [{
            "text": g.text,
            "finish_reason": finish,
            "prompt_tokens": g.usage.prompt_tokens,
            "completion_tokens": g.usage.completion_tokens,
        }],
    })))
}

fn to_request(body: KoboldRequest, context: usize) -> Result<GenerateRequest, ApiError> {
    let temperature = body.temperature.or(body.temp);
    check_range("temperature", temperature, 0.0, 100.0)?;
    check_range("top_p", body.top_p, 0.0, 1.0)?;
    check_range("min_p", body.min_p, 0.0, 1.0)?;
    check_range("rep_pen", body.rep_pen, 0.01, 10.0)?;
    let images = body.images.unwrap_or_default();
    if images.len() > MAX_IMAGES {
        return Err(ApiError::invalid("images", format!("images: at most {MAX_IMAGES} images, as KoboldCpp takes")));
    }
    // KoboldCpp's defaults for a request that leaves a setting out.
    let sampling = SamplingParams {
        temperature: temperature.unwrap_or(0.7),
        top_p: body.top_p.unwrap_or(0.92),
        top_k: body.top_k.unwrap_or(100).max(0) as usize,
        min_p: body.min_p.unwrap_or(0.0),
        seed: submit::seed(body.sampler_seed),
        repetition_penalty: body.rep_pen.unwrap_or(1.0),
        ..SamplingParams::default()
    };
    let parts = images.iter().map(|b64| Part::Image(images::from_base64(b64))).collect();
    Ok(GenerateRequest {
        // Only the images are taken from the message: the prompt is used as written.
        messages: vec![Message { role: Role::User, parts }],
        raw_prompt: Some(body.prompt),
        max_tokens: submit::max_tokens(body.max_length, 100, context),
        sampling,
        ignore_eos: body.bypass_eos.or(body.ignore_eos).unwrap_or(false),
        stop: body.stop_sequence.unwrap_or_default().into_iter().filter(|s| !s.is_empty()).collect(),
        logprobs: None,
        constraint: body.grammar.filter(|g| !g.trim().is_empty()).map(Constraint::Gbnf),
    })
}

/// `GET /api/v1/model`.
pub async fn model(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"result": state.loaded()?.vlm.name})))
}

/// `GET /api/extra/version`: "KoboldCpp" tells clients which API this is; the version
/// is seer's own, so clients do not expect KoboldCpp features seer lacks.
pub async fn version(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"result": "KoboldCpp", "version": env!("CARGO_PKG_VERSION"), "protected": state.api_key.is_some()}))
}
