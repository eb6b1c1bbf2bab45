//! The one error type of the HTTP layer and its one response shape: RFC 9457
//! `application/problem+json` carrying the request's correlation id. Internal causes are logged,
//! never sent to clients.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::backend::BackendError;

tokio::task_local! {
    /// The correlation id of the request being served (set by the correlation middleware).
    pub static CORRELATION_ID: String;
}

/// Marks a response caused by a backend failure (`unavailable` or `internal`), for the metrics.
#[derive(Debug, Clone, Copy)]
pub struct BackendFailure(pub &'static str);

/// The media type of error bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Everything a handler can fail with. Each variant is one status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// No or unknown credentials. `invalid_token` says whether a credential was presented.
    #[error("{detail}")]
    Unauthorized { detail: String, invalid_token: bool },
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{detail}")]
    TooManyRequests {
        detail: String,
        retry_after_secs: u64,
    },
    /// This instance is at a configured capacity (streaming connections); retry elsewhere or later.
    #[error("{0}")]
    AtCapacity(String),
    /// The backend (or the server) cannot serve now; the cause is logged.
    #[error("service unavailable: {cause}")]
    Unavailable {
        cause: String,
        retry_after_secs: u64,
    },
    /// A bug or an unexpected failure; the cause is logged, the client sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::AtCapacity(_) | ApiError::Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The last part of the problem `type` URI.
    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::TooManyRequests { .. } => "rate-limited",
            ApiError::AtCapacity(_) => "at-capacity",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// What the client is told. 5xx details are generic; their causes go to the log.
    fn detail(&self) -> String {
        match self {
            ApiError::Unavailable { .. } => "the backend is unavailable; retry later".to_owned(),
            ApiError::Internal(_) => {
                "internal error; see the server log for this correlation id".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// A 503 for a backend that cannot be reached.
    pub fn unavailable(cause: impl Into<String>) -> ApiError {
        ApiError::Unavailable {
            cause: cause.into(),
            retry_after_secs: 1,
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(error: BackendError) -> Self {
        match error {
            BackendError::Unavailable(cause) => ApiError::unavailable(cause),
            BackendError::StreamNotFound => ApiError::NotFound("stream not found".into()),
            BackendError::GroupNotFound => ApiError::NotFound("consumer group not found".into()),
            BackendError::InvalidId(detail) => ApiError::BadRequest(detail),
            BackendError::WrongType => {
                ApiError::Conflict("the key exists in the backend and is not a stream".into())
            }
            BackendError::Internal(cause) => ApiError::Internal(cause),
        }
    }
}

/// An RFC 9457 problem document (`application/problem+json`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `urn:streamgate:problem:{slug}`, one slug per kind of problem.
    #[serde(rename = "type")]
    #[schema(example = "urn:streamgate:problem:bad-request")]
    pub kind: String,
    /// The status's reason phrase.
    #[schema(example = "Bad Request")]
    pub title: &'static str,
    pub status: u16,
    /// What went wrong, for a person to read.
    pub detail: String,
    /// The request's correlation id (also in the `X-Correlation-ID` header and the server log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// A problem+json response with `status`; used by the error type and by readiness.
pub fn problem_response(status: StatusCode, slug: &str, detail: String) -> Response {
    let problem = Problem {
        kind: format!("urn:streamgate:problem:{slug}"),
        title: status.canonical_reason().unwrap_or("Error"),
        status: status.as_u16(),
        detail,
        correlation_id: CORRELATION_ID.try_with(Clone::clone).ok(),
    };
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))],
        body,
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(cause) => tracing::error!(%cause, "internal error"),
            ApiError::Unavailable { cause, .. } => tracing::warn!(%cause, "backend unavailable"),
            _ => {}
        }
        let mut response = problem_response(self.status(), self.slug(), self.detail());
        match &self {
            ApiError::Unavailable { .. } => {
                response
                    .extensions_mut()
                    .insert(BackendFailure("unavailable"));
            }
            ApiError::Internal(_) => {
                response.extensions_mut().insert(BackendFailure("internal"));
            }
            _ => {}
        }
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthorized { invalid_token, .. } => {
                let challenge = if *invalid_token {
                    r#"Bearer realm="streamgate", error="invalid_token""#
                } else {
                    r#"Bearer realm="streamgate""#
                };
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            ApiError::TooManyRequests {
                retry_after_secs, ..
            }
            | ApiError::Unavailable {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::AtCapacity(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            _ => {}
        }
        response
    }
}
