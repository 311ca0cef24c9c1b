//! Every refusal the server gives, in OpenAI's error shape
//! (`{"error": {"message", "type", "param", "code"}}`), whichever API was called.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use seer_engine::EngineError;
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: who is at fault.
    pub kind: &'static str,
    /// The request field at fault, when there is one (`messages[0].content`).
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message)
    }

    /// A field with a wrong type or value.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.to_string()), code: Some("invalid_value"), ..Self::bad_request(message) }
    }

    pub fn unauthorized() -> Self {
        let message = "missing or wrong API key: send it as `Authorization: Bearer <key>`";
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"), message)
    }

    pub fn too_large(limit: usize) -> Self {
        let message = format!("the request body is larger than {limit} bytes (the server's --max-body-bytes)");
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", Some("request_too_large"), message)
    }

    pub fn queue_full(waiting: usize) -> Self {
        let message = format!("the server is busy: {waiting} requests are already waiting; try again later");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("queue_full"), message)
    }

    pub fn loading() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("model_loading"), "the model is still loading")
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"), format!("no endpoint {path}"))
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, message)
    }

    /// The body of this error, for a stream that has already started.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        if !e.is_client_error() {
            return ApiError::internal(e.to_string());
        }
        let code = match &e {
            EngineError::ContextOverflow { .. } => "context_length_exceeded",
            EngineError::Image { .. } => "invalid_image",
            EngineError::Constraint(_) => "invalid_constraint",
            _ => "invalid_value",
        };
        ApiError { code: Some(code), ..ApiError::bad_request(e.to_string()) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, "{}", self.message);
        }
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}
