//! Errors in OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`,
//! with the HTTP status each failure deserves.

use crate::cache::CacheError;
use crate::catalog::CatalogError;
use crate::pipeline::PipelineError;
use crate::routes::RouteError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub(super) status: StatusCode,
    message: String,
    kind: &'static str,
    code: &'static str,
    /// The request field at fault, as OpenAI's errors name it.
    pub(super) param: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        message: impl Into<String>,
        kind: &'static str,
        code: &'static str,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            code,
            param: None,
            retry_after: None,
        }
    }

    /// Names the request field at fault.
    pub(super) fn param(mut self, field: &'static str) -> Self {
        self.param = Some(field);
        self
    }

    /// 400: something in the request is wrong; the message says what.
    pub(super) fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            message,
            "invalid_request_error",
            "invalid_value",
        )
    }

    /// 500: a failure of the agent, not of the request.
    pub(super) fn internal(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            message,
            "server_error",
            "internal_error",
        )
    }

    /// The message without the host's paths (see [`crate::catalog::Catalog::redact`]).
    pub(super) fn redacted(mut self, catalog: &crate::catalog::Catalog) -> Self {
        self.message = catalog.redact(&self.message);
        self
    }

    /// Tells the client when to try again (`Retry-After`, seconds).
    pub(super) fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The body OpenAI's errors have, `{"error": {...}}`.
    pub(super) fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::Ambiguous(_) => ApiError::invalid(e.to_string()),
            RouteError::Unknown(_) | RouteError::NotPlaced(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                e.to_string(),
                "invalid_request_error",
                "model_not_found",
            ),
        }
        .param("model")
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Unknown(_) => ApiError::invalid(e.to_string()),
            CatalogError::Model { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                e.to_string(),
                "server_error",
                "model_unavailable",
            ),
        }
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Cache(c @ CacheError::CacheFull { .. }) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                c.to_string(),
                "server_error",
                "cache_full",
            )
            .retry_after(5),
            PipelineError::Cache(c) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                c.to_string(),
                "server_error",
                "model_load_failed",
            ),
            PipelineError::Model { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                e.to_string(),
                "server_error",
                "model_unavailable",
            ),
            PipelineError::Invalid(m @ crate::pipeline::RequestError::Control { .. }) => {
                ApiError::invalid(m.to_string()).param("controlnet")
            }
            PipelineError::Invalid(m @ crate::pipeline::RequestError::IpAdapter { .. }) => {
                ApiError::invalid(m.to_string()).param("ip_adapter")
            }
            PipelineError::Invalid(m) => ApiError::invalid(m.to_string()),
            PipelineError::Cancelled => ApiError::new(
                // 499: nginx's "client closed request"; nobody reads it, the client is gone.
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "request cancelled",
                "invalid_request_error",
                "cancelled",
            ),
            PipelineError::Compute(_) => ApiError::internal(e.to_string()),
        }
    }
}
