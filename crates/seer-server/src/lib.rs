//! `seer serve`: one loaded model behind OpenAI-, KoboldCpp- and Ollama-compatible HTTP
//! APIs. Every API turns its request into a `seer_engine::GenerateRequest` and runs it
//! through the same path (`submit`): images fetched and decoded in the handler, then a
//! bounded queue in front of the model's worker thread.

pub mod auth;
pub mod error;
pub mod images;
pub mod kobold;
pub mod limits;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod state;
pub mod submit;

use std::future::{Future, IntoFuture};
use std::time::Instant;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

pub use error::ApiError;
pub use state::{AppState, Limits, ServeOptions, Shared};

/// Every endpoint, behind the API key check, the body size limit and the counters.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics::handler))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/api/v1/generate", post(kobold::generate))
        .route("/api/v1/model", get(kobold::model))
        .route("/api/extra/version", get(kobold::version))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/version", get(ollama::version))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), auth::require_key))
        .layer(from_fn_with_state(state.clone(), metrics::count))
        .with_state(state)
}

/// `GET /health`: 200 once the model has loaded, 503 while it loads.
async fn health(State(state): State<AppState>) -> Response {
    match state.model.get() {
        Some(_) => Json(json!({"status": "ok"})).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response(),
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

/// Binds the port, then loads the model while already answering (`/health` says 503
/// until it is ready), and serves until Ctrl-C or SIGTERM.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let state = Shared::new(&opts)?;
    let listener = TcpListener::bind((opts.host.as_str(), opts.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
    println!("seer: listening on http://{}", listener.local_addr()?);
    run(listener, state, opts, shutdown_signal()).await
}

/// [`serve`] on a listener already bound (tests bind port 0), until `shutdown` resolves.
/// Fails if the model does not load.
pub async fn serve_on(listener: TcpListener, opts: ServeOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let state = Shared::new(&opts)?;
    run(listener, state, opts, shutdown).await
}

async fn run(listener: TcpListener, state: AppState, opts: ServeOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(shutdown).into_future();
    tokio::pin!(server);
    let start = Instant::now();
    let (model, mmproj, load_opts, max_queue) = (opts.model.clone(), opts.mmproj.clone(), opts.load.clone(), opts.max_queue);
    let load = tokio::task::spawn_blocking(move || state::load(&model, mmproj.as_deref(), &load_opts, max_queue));
    tokio::select! {
        served = &mut server => return served.context("serving"),
        loaded = load => {
            let loaded = loaded.context("loading the model")??;
            let name = loaded.vlm.name.clone();
            let _ = state.model.set(loaded);
            println!("seer: model {name} ready in {:.1} s", start.elapsed().as_secs_f64());
        }
    }
    server.await.context("serving")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
