//! What every handler shares: the options, the model once it has loaded, the metrics.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use seer_engine::scheduler::Scheduler;
use seer_engine::{LoadOptions, Vlm};
use seer_vision::ImageLimits;
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::metrics::Metrics;

pub const DEFAULT_MAX_QUEUE: usize = 32;

/// How `seer serve` was started.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub model: PathBuf,
    pub mmproj: Option<PathBuf>,
    /// In-situ quantization of a Hugging Face checkpoint.
    pub load: LoadOptions,
    pub host: String,
    pub port: u16,
    /// Clients must send `Authorization: Bearer <key>` (all endpoints but /health).
    pub api_key: Option<String>,
    pub limits: Limits,
    /// Requests that may wait for the model; past this a request is answered 503.
    pub max_queue: usize,
}

/// What one request may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_images: usize,
    /// Sizes, pixels, timeouts, redirects and private addresses for image inputs.
    pub image: ImageLimits,
    /// Local image paths are allowed only inside this folder (none: refused).
    pub local_images: Option<PathBuf>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 20 << 20,
            max_images: 8,
            // Far more than any vision encoder looks at (they resize to a few hundred
            // pixels), small enough that a queue full of decoded images stays in memory.
            image: ImageLimits { max_pixels: 4096 * 4096, ..ImageLimits::default() },
            local_images: None,
        }
    }
}

impl ServeOptions {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        ServeOptions {
            model: model.into(),
            mmproj: None,
            load: LoadOptions::default(),
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            limits: Limits::default(),
            max_queue: DEFAULT_MAX_QUEUE,
        }
    }
}

/// The model and the queue in front of it.
pub struct Loaded {
    pub vlm: Arc<Vlm>,
    pub scheduler: Scheduler,
    /// When loading finished, as Unix seconds (OpenAI's `created`).
    pub created: u64,
    /// The model's files on disk, for Ollama's `/api/tags`.
    pub size_bytes: u64,
    pub format: &'static str,
}

pub struct Shared {
    pub api_key: Option<String>,
    pub limits: Limits,
    pub model: OnceLock<Loaded>,
    pub metrics: Metrics,
    /// Bounds how many requests fetch and decode images at once (CPU and memory).
    pub decoding: Semaphore,
}

pub type AppState = Arc<Shared>;

impl Shared {
    pub fn new(opts: &ServeOptions) -> anyhow::Result<AppState> {
        let mut limits = opts.limits.clone();
        if let Some(dir) = &limits.local_images {
            // Canonical once, so each request compares against the real folder.
            let real = dir.canonicalize().with_context(|| format!("--allow-local-images {}", dir.display()))?;
            anyhow::ensure!(real.is_dir(), "--allow-local-images {}: not a folder", dir.display());
            limits.local_images = Some(real);
        }
        // An empty key (`--api-key "$UNSET"`) must not quietly mean "no key".
        anyhow::ensure!(opts.api_key.as_deref() != Some(""), "--api-key is empty");
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Arc::new(Shared {
            api_key: opts.api_key.clone(),
            limits,
            model: OnceLock::new(),
            metrics: Metrics::default(),
            decoding: Semaphore::new(workers),
        }))
    }

    /// The model, or 503 while it is still loading.
    pub fn loaded(&self) -> Result<&Loaded, ApiError> {
        self.model.get().ok_or_else(ApiError::loading)
    }
}

/// Loads the model (blocking; run it off the async threads) and starts its worker.
pub fn load(model: &Path, mmproj: Option<&Path>, opts: &LoadOptions, max_queue: usize) -> anyhow::Result<Loaded> {
    let vlm = Arc::new(Vlm::load_with(model, mmproj, opts).context("loading the model")?);
    let size_bytes = [Some(model), mmproj].into_iter().flatten().map(disk_size).sum();
    Ok(Loaded {
        scheduler: Scheduler::new(vlm.clone(), max_queue),
        vlm,
        created: unix_now(),
        size_bytes,
        format: if model.is_dir() { "safetensors" } else { "gguf" },
    })
}

/// A file's size, or the total of a folder's files.
fn disk_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    let entries = std::fs::read_dir(path).into_iter().flatten().flatten();
    entries.filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
