//! One error type for everything that can go wrong while reading weights or running a model.
//! Every variant names the file or tensor involved, so a user can act on the message alone.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file ends before the data its header promises.
    #[error("{path} is truncated: {detail}")]
    Truncated { path: PathBuf, detail: String },
    /// The file is not what its extension claims, or its header is corrupt.
    #[error("{path} is not a valid {format} file: {detail}")]
    Format { path: PathBuf, format: &'static str, detail: String },
    #[error("tensor `{name}` not found in {source_desc}")]
    MissingTensor { name: String, source_desc: String },
    #[error("unsupported architecture `{found}`; supported: {supported}")]
    UnsupportedArchitecture { found: String, supported: String },
    #[error("invalid config: {0}")]
    Config(String),
    /// Two files that must fit together do not (a projector for another text model, ...).
    #[error("{0}")]
    Mismatch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }
}
