//! Counters for `/metrics`, in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use seer_engine::{EngineError, FinishReason, Generation};

use crate::state::AppState;

/// Upper bounds of the time-to-first-token buckets, in seconds.
const TTFT_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Default)]
pub struct Metrics {
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Finished generations by how they ended: stop, length, cancelled, error.
    finished: [AtomicU64; 4],
    ttft: Histogram,
}

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; TTFT_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

const ENDINGS: [&str; 4] = ["stop", "length", "cancelled", "error"];

impl Metrics {
    /// Time from a request's arrival in the queue to its first text.
    pub fn first_token(&self, after: Duration) {
        let h = &self.ttft;
        let secs = after.as_secs_f64();
        for (bucket, bound) in h.buckets.iter().zip(TTFT_BUCKETS) {
            if secs <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_micros.fetch_add(after.as_micros() as u64, Ordering::Relaxed);
    }

    /// Called by the model worker when a generation ends, whether anyone still listens.
    pub fn generation_done(&self, outcome: &Result<Generation, EngineError>) {
        let ending = match outcome {
            Ok(g) => {
                self.prompt_tokens.fetch_add(g.usage.prompt_tokens as u64, Ordering::Relaxed);
                self.completion_tokens.fetch_add(g.usage.completion_tokens as u64, Ordering::Relaxed);
                match g.finish_reason {
                    FinishReason::Stop => 0,
                    FinishReason::Length => 1,
                    FinishReason::Cancelled => 2,
                }
            }
            Err(_) => 3,
        };
        self.finished[ending].fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, loaded: bool, queue_depth: usize, running: usize) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (suffix, value) in lines {
                let _ = writeln!(out, "{name}{suffix} {value}");
            }
        };
        let one = |v: u64| vec![(String::new(), v.to_string())];
        metric("seer_model_loaded", "gauge", "1 once the model has loaded.", one(loaded as u64));
        metric("seer_requests_total", "counter", "API requests received (not /health or /metrics).", one(get(&self.requests)));
        metric("seer_request_errors_total", "counter", "API requests answered with an HTTP error status.", one(get(&self.errors)));
        metric("seer_prompt_tokens_total", "counter", "Prompt tokens processed, image tokens included.", one(get(&self.prompt_tokens)));
        metric("seer_completion_tokens_total", "counter", "Tokens generated.", one(get(&self.completion_tokens)));
        let endings = ENDINGS.iter().zip(&self.finished).map(|(e, c)| (format!("{{reason=\"{e}\"}}"), get(c).to_string())).collect();
        metric("seer_generations_total", "counter", "Finished generations by how they ended (cancelled: the client went away).", endings);
        metric("seer_queue_depth", "gauge", "Requests waiting for the model.", one(queue_depth as u64));
        metric("seer_requests_running", "gauge", "Requests being generated now.", one(running as u64));
        metric("seer_time_to_first_token_seconds", "histogram", "From queueing to the first generated text.", self.ttft_lines());
        out
    }

    fn ttft_lines(&self) -> Vec<(String, String)> {
        let h = &self.ttft;
        let mut lines: Vec<(String, String)> = TTFT_BUCKETS
            .iter()
            .zip(&h.buckets)
            .map(|(bound, c)| (format!("_bucket{{le=\"{bound}\"}}"), c.load(Ordering::Relaxed).to_string()))
            .collect();
        let count = h.count.load(Ordering::Relaxed);
        lines.push(("_bucket{le=\"+Inf\"}".into(), count.to_string()));
        lines.push(("_sum".into(), (h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6).to_string()));
        lines.push(("_count".into(), count.to_string()));
        lines
    }
}

/// `GET /metrics`.
pub async fn handler(State(state): State<AppState>) -> Response {
    let (depth, running) = state.model.get().map_or((0, 0), |m| (m.scheduler.queue_depth(), m.scheduler.running()));
    let body = state.metrics.render(state.model.get().is_some(), depth, running);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// Middleware: counts API requests and those answered with an error status.
pub async fn count(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let counted = !matches!(req.uri().path(), "/health" | "/metrics");
    let start = Instant::now();
    let response = next.run(req).await;
    if counted {
        state.metrics.requests.fetch_add(1, Ordering::Relaxed);
        if response.status().is_client_error() || response.status().is_server_error() {
            state.metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(status = %response.status(), ms = start.elapsed().as_millis() as u64, "request");
    }
    response
}
