//! Reading a request body as JSON within the size limit, with errors that name the
//! field at fault, and the checks on a request's size that come before any work.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// A JSON body: too big is a 413, malformed or mistyped a 400 naming the field.
/// Unknown fields are ignored, as OpenAI's server ignores them.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(state.limits.max_body_bytes)
            } else {
                ApiError::bad_request(format!("cannot read the request body: {}", rejection.body_text()))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty; send a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = format!("invalid request: {}", e.inner());
        if path == "." {
            ApiError::bad_request(message)
        } else {
            ApiError::invalid(&path, format!("{path}: {message}"))
        }
    })?;
    de.end().map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))?;
    Ok(value)
}

/// Refuses a request with more images than the server takes.
pub fn check_image_count(count: usize, state: &AppState) -> Result<(), ApiError> {
    let max = state.limits.max_images;
    if count > max {
        return Err(ApiError {
            code: Some("too_many_images"),
            ..ApiError::bad_request(format!("the request has {count} images; this server takes at most {max} (--max-images)"))
        });
    }
    Ok(())
}
