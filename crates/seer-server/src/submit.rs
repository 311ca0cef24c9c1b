//! The one path every API takes: check the request, fetch and decode its images, queue
//! it for the model, then receive its text and outcome as events. Only the wire formats
//! around this differ between OpenAI, KoboldCpp and Ollama.

use std::time::Instant;

use futures_util::{stream, Stream, StreamExt};
use seer_engine::scheduler::{OnDone, OnText, QueueFull};
use seer_engine::{EngineError, GenerateRequest, Generation, Role};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::ApiError;
use crate::limits::check_image_count;
use crate::state::{AppState, Loaded};

pub enum Event {
    /// The next piece of text.
    Text(String),
    /// The end of a choice (the last event for it).
    Done(Result<Generation, EngineError>),
}

/// Events of all choices, each tagged with its choice index. Dropping the receiver
/// cancels the generations: the model worker's next piece of text finds nobody listening.
pub type Events = UnboundedReceiver<(usize, Event)>;

/// Checks and queues a request; `n` choices run as `n` jobs, choice `i` with seed + i.
pub async fn submit(state: &AppState, req: GenerateRequest, n: usize) -> Result<Events, ApiError> {
    let loaded = state.loaded()?;
    check_image_count(req.messages.iter().map(|m| m.images().count()).sum(), state)?;
    let req = prepare(state, loaded, req).await?;
    let (tx, rx) = unbounded_channel();
    for index in 0..n {
        let mut choice = req.clone();
        choice.sampling.seed = req.sampling.seed.wrapping_add(index as u64);
        queue(state, loaded, choice, index, tx.clone())?;
    }
    Ok(rx)
}

/// Fetches and decodes the images and measures the prompt, off the async threads and
/// before queueing: a bad image or an over-long prompt is refused at once, and a slow
/// image URL holds no model time.
async fn prepare(state: &AppState, loaded: &Loaded, mut req: GenerateRequest) -> Result<GenerateRequest, ApiError> {
    let _permit = state.decoding.acquire().await.map_err(|_| ApiError::internal("the server is shutting down"))?;
    let vlm = loaded.vlm.clone();
    let limits = state.limits.image.clone();
    let checked = tokio::task::spawn_blocking(move || {
        vlm.decode_images(&mut req.messages, &limits)?;
        vlm.check_prompt(&req)?;
        Ok::<_, EngineError>(req)
    })
    .await
    .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))?;
    Ok(checked?)
}

fn queue(state: &AppState, loaded: &Loaded, req: GenerateRequest, index: usize, tx: UnboundedSender<(usize, Event)>) -> Result<(), ApiError> {
    let queued = Instant::now();
    let (shared, text_tx) = (state.clone(), tx.clone());
    let mut first = true;
    let on_text: OnText = Box::new(move |piece| {
        if std::mem::take(&mut first) {
            shared.metrics.first_token(queued.elapsed());
        }
        // A closed channel means the client went away: returning false cancels.
        text_tx.send((index, Event::Text(piece.to_string()))).is_ok()
    });
    let shared = state.clone();
    let on_done: OnDone = Box::new(move |outcome| {
        shared.metrics.generation_done(&outcome);
        let _ = tx.send((index, Event::Done(outcome)));
    });
    loaded
        .scheduler
        .submit(req, state.limits.image.clone(), on_text, on_done)
        .map_err(|QueueFull(waiting)| ApiError::queue_full(waiting))
}

/// Waits for every choice to finish (non-streaming answers).
pub async fn collect(mut events: Events, n: usize) -> Result<Vec<Generation>, ApiError> {
    let mut done: Vec<Option<Generation>> = (0..n).map(|_| None).collect();
    while let Some((index, event)) = events.recv().await {
        if let Event::Done(outcome) = event {
            done[index] = Some(outcome?);
        }
    }
    done.into_iter().map(|g| g.ok_or_else(|| ApiError::internal("a generation ended without an answer"))).collect()
}

/// The events as a stream, once the first has arrived: a request the engine refuses
/// before any text still gets an HTTP error status instead of a stream that breaks.
pub async fn start_stream(mut events: Events) -> Result<impl Stream<Item = (usize, Event)>, ApiError> {
    let first = match events.recv().await {
        Some((_, Event::Done(Err(e)))) => return Err(e.into()),
        other => other,
    };
    let rest = stream::unfold(events, |mut rx| async move { rx.recv().await.map(|event| (event, rx)) });
    Ok(stream::iter(first).chain(rest))
}

/// A seed from the request, or a fresh one (negative means random, as in llama.cpp and
/// KoboldCpp), so unseeded sampling differs between requests.
pub fn seed(requested: Option<i64>) -> u64 {
    match requested {
        Some(s) if s >= 0 => s as u64,
        _ => rand::random(),
    }
}

/// A message's role; `index` names the message in the error.
pub fn role(index: usize, role: &str) -> Result<Role, ApiError> {
    Role::parse(role).ok_or_else(|| {
        let param = format!("messages[{index}].role");
        ApiError::invalid(&param, format!("{param}: `{role}` is not supported (system, developer, user, assistant)"))
    })
}

/// Checks that a number lies in `lo..=hi`.
pub fn check_range(param: &str, value: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) => Err(ApiError::invalid(param, format!("{param} must be between {lo} and {hi}, got {v}"))),
        _ => Ok(()),
    }
}

/// How many tokens to generate: a positive request (capped at the context), zero or
/// negative for "until the context is full" (Ollama's -1), nothing for the API's default.
pub fn max_tokens(requested: Option<i64>, default: usize, context: usize) -> usize {
    match requested {
        Some(n) if n > 0 => (n as usize).min(context),
        Some(_) => context,
        None => default.min(context),
    }
}
