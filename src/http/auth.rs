//! Authentication middleware and the `Caller` extractor. The credential comes from the
//! `Authorization: Bearer` header or, on streaming GET routes only (browsers' EventSource and
//! WebSocket cannot set headers), from `?token=` / `?access_token=`. What a principal may do is
//! decided by [`crate::auth`].

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
use super::error::ApiError;
use crate::auth::{Principal, Scope};
use crate::model::StreamName;

/// Query parameters that may carry a token on streaming routes (and are redacted from logs).
pub const QUERY_TOKEN_PARAMETERS: [&str; 2] = ["token", "access_token"];

/// Authenticates with the `Authorization` header only.
pub async fn require_header_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    authenticate(&state, request, next, false).await
}

/// Authenticates with the header or, for GET requests, a query token.
pub async fn require_header_or_query_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    authenticate(&state, request, next, true).await
}

async fn authenticate(
    state: &AppState,
    mut request: Request,
    next: Next,
    query_allowed: bool,
) -> Result<Response, ApiError> {
    let outcome = presented_token(
        request.method(),
        request.headers(),
        request.uri().query(),
        query_allowed,
    )
    .and_then(|token| match token {
        None => Err(ApiError::Unauthorized {
            detail: "missing credentials: send Authorization: Bearer <token>".into(),
            invalid_token: false,
        }),
        Some(token) => state
            .authenticator
            .authenticate(&token)
            .ok_or(ApiError::Unauthorized {
                detail: "invalid token".into(),
                invalid_token: true,
            }),
    });
    if let Some(rate_limit) = &state.rate_limit {
        // Per credential; per client address for requests without a valid one, so guessing
        // tokens is limited too.
        let key = match &outcome {
            Ok(principal) => format!("credential:{}", principal.name),
            Err(_) => {
                let address = request.extensions().get::<ConnectInfo<SocketAddr>>();
                format!(
                    "address:{}",
                    address.map_or_else(|| "unknown".to_owned(), |info| info.0.ip().to_string())
                )
            }
        };
        rate_limit.check(key)?;
    }
    request.extensions_mut().insert(outcome?);
    Ok(next.run(request).await)
}

/// The token a request presents, if any.
fn presented_token(
    method: &Method,
    headers: &axum::http::HeaderMap,
    query: Option<&str>,
    query_allowed: bool,
) -> Result<Option<String>, ApiError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let malformed = || ApiError::Unauthorized {
            detail: "malformed Authorization header: expected `Bearer <token>`".into(),
            invalid_token: true,
        };
        let text = value.to_str().map_err(|_| malformed())?;
        let (scheme, token) = text.trim().split_once(' ').ok_or_else(malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(malformed());
        }
        return Ok(Some(token.trim().to_owned()));
    }
    if query_allowed && method == Method::GET {
        let token = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(name, _)| QUERY_TOKEN_PARAMETERS.contains(&name.as_ref()))
            .map(|(_, value)| value.into_owned());
        return Ok(token);
    }
    Ok(None)
}

/// The authenticated principal of a request, for handlers to check permissions with.
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // A route mounted without the middleware has no principal: refuse rather than allow.
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or(ApiError::Unauthorized {
                detail: "missing credentials".into(),
                invalid_token: false,
            })
    }
}

impl Caller {
    /// Whether the caller has `scope` on `stream`.
    pub fn may(&self, scope: Scope, stream: &StreamName) -> bool {
        self.0.may(scope, stream)
    }

    /// 403 unless the caller has `scope` on `stream`.
    pub fn require(&self, scope: Scope, stream: &StreamName) -> Result<(), ApiError> {
        if self.0.may(scope, stream) {
            Ok(())
        } else {
            Err(self.forbidden(scope, Some(stream)))
        }
    }

    /// 403 unless the caller has `scope` (for routes not about one stream).
    pub fn require_scope(&self, scope: Scope) -> Result<(), ApiError> {
        if self.0.has_scope(scope) {
            Ok(())
        } else {
            Err(self.forbidden(scope, None))
        }
    }

    /// 403 unless the caller has `scope` on every stream (for routes that touch all of them).
    pub fn require_everywhere(&self, scope: Scope) -> Result<(), ApiError> {
        self.require_scope(scope)?;
        if self.0.is_unrestricted() {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "credential `{}` is limited to some streams; this route touches all of them",
                self.0.name
            )))
        }
    }

    fn forbidden(&self, scope: Scope, stream: Option<&StreamName>) -> ApiError {
        let name = &self.0.name;
        ApiError::Forbidden(match stream {
            Some(stream) => {
                format!("credential `{name}` lacks the `{scope}` scope on stream `{stream}`")
            }
            None => format!("credential `{name}` lacks the `{scope}` scope"),
        })
    }
}
