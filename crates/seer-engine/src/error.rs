//! What can go wrong serving a request, split by who can fix it: the caller (bad input,
//! a prompt too long) or the installation (a model that does not load).

use seer_models::ModelError;
use seer_vision::VisionError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An image that cannot be read, fetched or decoded.
    /// `index` counts from 0; `what` names the image as the caller gave it.
    #[error("image {} ({what}): {error}", index + 1)]
    Image { index: usize, what: String, error: VisionError },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("prompt of {prompt_tokens} tokens ({image_tokens} of them for images) does not fit the context of {context} tokens")]
    ContextOverflow { prompt_tokens: usize, image_tokens: usize, context: usize },
    #[error("{0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request that asks for something this model or engine cannot do.
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A JSON schema, grammar or pattern that cannot be compiled, found before decoding.
    #[error("{0}")]
    Constraint(String),
    /// A model that could not be fetched from the hub.
    #[error("download: {0}")]
    Download(String),
}

impl EngineError {
    /// True when the request, not the model, is at fault (a server answers 4xx).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            EngineError::Image { .. } | EngineError::ContextOverflow { .. } | EngineError::BadRequest(_) | EngineError::Constraint(_)
        )
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
