//! The HTTP layer: the router, shared state, and the middleware every request passes through
//! (correlation id, request log, authentication). The only layer that knows status codes, headers
//! and JSON shapes; one file per endpoint family, each exporting `router()`.

pub mod admin;
pub mod auth;
pub mod broadcast;
pub mod consume;
pub mod consumers;
pub mod error;
pub mod events;
pub mod extract;
pub mod groups;
pub mod health;
pub mod message_id;
pub mod openapi;
pub mod poll;
pub mod produce;
pub mod rate_limit;
pub mod serve;
pub mod sse;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;
use utoipa_axum::router::OpenApiRouter;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::error::{ApiError, BackendFailure, CORRELATION_ID};
use self::rate_limit::RateLimit;
use crate::auth::Authenticator;
use crate::backend::AnyBackend;
use crate::config::Config;
use crate::delivery::Delivery;
use crate::delivery::groups::Groups;
use crate::delivery::hub::Hub;
use crate::metrics::Metrics;
use crate::probe::Probe;

/// Everything handlers share, behind one `Arc`: every request clones it several times (each
/// middleware and the handler take it), so a clone is one reference count.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct Shared {
    pub backend: AnyBackend,
    pub config: Arc<Config>,
    pub authenticator: Arc<Authenticator>,
    pub groups: Groups,
    pub hub: Hub,
    pub probe: Probe,
    pub metrics: Arc<Metrics>,
    /// Requests per credential, when configured.
    pub rate_limit: Option<RateLimit>,
    pub connections: Arc<ConnectionCounts>,
    /// One permit per streaming connection (`limits.max_connections`).
    pub streaming_permits: Arc<Semaphore>,
    /// Cancelled when shutdown begins.
    pub shutdown: CancellationToken,
    /// Sessions that outlive their request (upgraded WebSockets), waited for by the drain.
    pub sessions: TaskTracker,
    pub started_at: Instant,
}

impl AppState {
    pub fn new(
        backend: AnyBackend,
        delivery: Delivery,
        probe: Probe,
        metrics: Arc<Metrics>,
        config: Arc<Config>,
        shutdown: CancellationToken,
    ) -> AppState {
        let Delivery { groups, hub } = delivery;
        let authenticator = Authenticator::new(
            config.bearer_token.as_ref().map(|token| token.expose()),
            &config.tokens,
            config.jwt.as_ref().map(|jwt| jwt.verifier.clone()),
        );
        AppState(Arc::new(Shared {
            backend,
            authenticator: Arc::new(authenticator),
            groups,
            hub,
            probe,
            rate_limit: RateLimit::start(
                config.limits.rate_per_second,
                config.limits.burst,
                metrics.clone(),
                shutdown.clone(),
            ),
            metrics,
            connections: Arc::new(ConnectionCounts::default()),
            streaming_permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            config,
            shutdown,
            sessions: TaskTracker::new(),
            started_at: Instant::now(),
        }))
    }

    /// What ends a stream `caller` opens besides its own events (SSE: [`sse::response`]).
    pub fn ends(&self, caller: &auth::Caller) -> sse::Ends {
        sse::Ends {
            shutdown: self.shutdown.clone(),
            valid_for: caller.0.valid_for(),
        }
    }

    /// A place for one more streaming connection, or 503 at the configured limit.
    pub fn streaming_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.streaming_permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                ApiError::AtCapacity(format!(
                    "this instance serves its maximum of {} streaming connections",
                    self.config.limits.max_connections
                ))
            })
    }
}

/// Open streaming connections by transport.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    pub sse: AtomicU64,
    pub websocket: AtomicU64,
    pub long_poll: AtomicU64,
}

/// Counts one open connection until dropped.
pub struct OpenConnection {
    counts: Arc<ConnectionCounts>,
    transport: fn(&ConnectionCounts) -> &AtomicU64,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        (self.transport)(&self.counts).fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionCounts {
    /// Counts an SSE connection while the returned guard lives.
    pub fn open_sse(self: &Arc<Self>) -> OpenConnection {
        self.open(|counts| &counts.sse)
    }

    /// Counts a WebSocket while the returned guard lives.
    pub fn open_websocket(self: &Arc<Self>) -> OpenConnection {
        self.open(|counts| &counts.websocket)
    }

    /// Counts a waiting long-poll while the returned guard lives.
    pub fn open_long_poll(self: &Arc<Self>) -> OpenConnection {
        self.open(|counts| &counts.long_poll)
    }

    fn open(self: &Arc<Self>, transport: fn(&ConnectionCounts) -> &AtomicU64) -> OpenConnection {
        transport(self).fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            counts: self.clone(),
            transport,
        }
    }

    /// (sse, websocket, long_poll) right now.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.sse.load(Ordering::Relaxed),
            self.websocket.load(Ordering::Relaxed),
            self.long_poll.load(Ordering::Relaxed),
        )
    }
}

/// The whole application's routes.
pub fn router(state: AppState) -> Router {
    let authenticated = OpenApiRouter::new()
        .merge(produce::router())
        .merge(admin::router())
        .merge(consumers::router())
        .merge(groups::router())
        .merge(poll::ack_router())
        .merge(health::trigger_router())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_header_token,
        ));
    // Browsers' EventSource and WebSocket cannot set headers: these accept `?token=` too.
    let streaming = OpenApiRouter::new()
        .merge(events::router())
        .merge(broadcast::router())
        .merge(poll::polling_router())
        .merge(ws::router())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_header_or_query_token,
        ));
    let (router, document) = OpenApiRouter::new()
        .merge(health::router())
        .merge(openapi::router())
        .merge(authenticated)
        .merge(streaming)
        .split_for_parts();
    let router = router
        .layer(Extension(openapi::finish(document)))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read by `extract::LimitedBody` against the configured limit.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), correlate));
    let router = match cors(&state.config.cors.allowed_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

/// CORS for the configured origins (exact matches, no wildcard), or none at all. Browsers may
/// send the token and streamgate's own headers, and read the ones it answers with.
fn cors(allowed_origins: &[String]) -> Option<CorsLayer> {
    if allowed_origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = allowed_origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    let request_headers = [
        header::AUTHORIZATION,
        header::CONTENT_TYPE,
        HeaderName::from_static("idempotency-key"),
        HeaderName::from_static("last-event-id"),
        HeaderName::from_static("x-correlation-id"),
        HeaderName::from_static("x-request-id"),
    ];
    let response_headers = [
        HeaderName::from_static("x-correlation-id"),
        HeaderName::from_static("x-consumer"),
        HeaderName::from_static("idempotent-replayed"),
        header::RETRY_AFTER,
    ];
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers(request_headers)
            .expose_headers(response_headers)
            .max_age(std::time::Duration::from_secs(600)),
    )
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

const CORRELATION_HEADER: &str = "x-correlation-id";

/// The client's correlation id when it is usable in a header and a log line, else a new one.
fn correlation_id(request: &Request) -> String {
    ["x-correlation-id", "x-request-id"]
        .iter()
        .filter_map(|name| request.headers().get(*name)?.to_str().ok())
        .find(|id| (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 12]>()))
}

/// The query string for logging, redacted: token parameters, whatever the case of their names
/// (`?Token=` is no token to the server, but is one to whoever reads the log), and any value that
/// is a configured credential, whatever its name.
fn loggable_query(uri: &Uri, config: &Config) -> String {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .map(|(name, value)| {
            let token_name = auth::QUERY_TOKEN_PARAMETERS
                .iter()
                .any(|token| name.eq_ignore_ascii_case(token));
            if token_name || config.is_secret(&value) {
                format!("{name}=<redacted>")
            } else {
                format!("{name}={value}")
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Gives every request a correlation id (echoed in `X-Correlation-ID`, put in problem bodies
/// and on every log line through the request span) and logs its outcome.
async fn correlate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let id = correlation_id(&request);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().clone();
    let refused_body_may_be_unread = carries_body(&request);
    let span = tracing::info_span!(
        "request",
        correlation_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
        query = tracing::field::Empty,
    );
    if request.uri().query().is_some() {
        span.record("query", loggable_query(request.uri(), &state.config));
    }
    let quiet = is_probe(request.uri().path());
    let started = Instant::now();
    let mut response = CORRELATION_ID
        .scope(id.clone(), next.run(request).instrument(span.clone()))
        .await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    if refused_body_may_be_unread && response.status().is_client_error() {
        // Refused before its body was read (too large, unauthenticated…): hyper closes the
        // connection rather than read the rest; saying so keeps clients from reusing it for
        // their next request, which would then fail.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    state.metrics.request(&route, &method, status, elapsed);
    if let Some(BackendFailure(kind)) = response.extensions().get::<BackendFailure>() {
        state.metrics.backend_error(kind);
    }
    let elapsed_ms = elapsed * 1000.0;
    span.in_scope(|| {
        if quiet {
            tracing::debug!(status, elapsed_ms, "served");
        } else {
            tracing::info!(status, elapsed_ms, "served");
        }
    });
    response.into_response()
}

/// Whether `request` is HTTP/1 with a body (HTTP/2 has no connection to close, and forbids the
/// `Connection` header).
fn carries_body(request: &Request) -> bool {
    let headers = request.headers();
    request.version() <= axum::http::Version::HTTP_11
        && (headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|length| length.as_bytes() != b"0"))
}

/// Probes and scrapes arrive every few seconds; they are logged at debug level only.
fn is_probe(path: &str) -> bool {
    path.starts_with("/health") || path == "/ready" || path == "/metrics"
}
