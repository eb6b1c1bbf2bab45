//! Health: liveness (the process runs), readiness (the backend answers within a deadline, the
//! synthetic probe came back through delivery, and shutdown has not begun), a detailed report for
//! dashboards and the metrics, all unauthenticated; and `POST /trigger-test-event` (admin scope),
//! which runs the probe on demand.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, Problem, problem_response};
use super::openapi::Guarded;
use crate::auth::Scope;
use crate::backend::Backend;
use crate::probe::Outcome;

/// How long readiness waits for the backend before calling it unreachable.
const BACKEND_DEADLINE: Duration = Duration::from_secs(1);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(ready_alias))
        .routes(routes!(detailed))
        .routes(routes!(detailed_alias))
        .routes(routes!(metrics))
}

/// The on-demand probe (mounted behind authentication).
pub fn trigger_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(trigger_test_event))
}

/// A one-word answer.
#[derive(Serialize, ToSchema)]
struct Status {
    #[schema(example = "ready")]
    status: &'static str,
}

/// Prometheus metrics (OpenMetrics text; scrape without credentials).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(()),
    responses((
        status = 200,
        description = "The series of the metrics section in the README",
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8",
        body = String,
    )),
)]
async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(state.connections.snapshot());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Liveness: 200 while the process runs.
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The process runs", body = Status)),
)]
async fn live() -> Json<Status> {
    Json(Status { status: "alive" })
}

/// One timed round trip to the backend.
async fn check_backend(state: &AppState) -> Result<Duration, String> {
    let started = Instant::now();
    match tokio::time::timeout(BACKEND_DEADLINE, state.backend.ping()).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {BACKEND_DEADLINE:?}")),
    }
}

/// Readiness: whether this instance should get traffic.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Ready", body = Status),
        (
            status = 503,
            description = "Not ready: the backend is unreachable, the delivery probe failed, or \
                           shutdown has begun (the detail says which)",
            content_type = "application/problem+json",
            body = Problem,
        ),
    ),
)]
async fn ready(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        return problem_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "shutting down".into(),
        );
    }
    let reason = match check_backend(&state).await {
        Ok(_) => match state.probe.check() {
            Ok(()) => return Json(Status { status: "ready" }).into_response(),
            Err(reason) => reason,
        },
        Err(reason) => format!("{} backend unreachable: {reason}", state.backend.kind()),
    };
    problem_response(StatusCode::SERVICE_UNAVAILABLE, "not-ready", reason)
}

/// Readiness under its short name.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Ready", body = Status),
        (status = 503, description = "Not ready (see `/health/ready`)", content_type = "application/problem+json", body = Problem),
    ),
)]
async fn ready_alias(state: State<AppState>) -> Response {
    ready(state).await
}

/// The probe's answer.
#[derive(Serialize, ToSchema)]
struct Probed {
    #[schema(example = "ok")]
    status: &'static str,
    /// From publishing the probe message to its delivery through both paths.
    round_trip_ms: f64,
}

/// Fires the synthetic probe now (at most 1 per second per instance): publishes to the
/// instance's probe stream and waits for the message to come back through broadcast and group
/// delivery.
#[utoipa::path(
    post,
    path = "/trigger-test-event",
    tag = "operations",
    responses(
        (status = 200, description = "The probe came back", body = Probed),
        Guarded,
    ),
)]
async fn trigger_test_event(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require_everywhere(Scope::Admin)?;
    let outcome = state
        .probe
        .trigger()
        .await
        .map_err(|too_soon| ApiError::TooManyRequests {
            detail: "test events are limited to 1 per second".to_owned(),
            retry_after_secs: too_soon.retry_after.as_secs_f64().ceil() as u64,
        })?;
    match outcome.round_trip_ms {
        Some(round_trip_ms) if outcome.ok => Ok(Json(Probed {
            status: "ok",
            round_trip_ms,
        })
        .into_response()),
        _ => Ok(problem_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "probe-failed",
            outcome.error.unwrap_or_default(),
        )),
    }
}

#[derive(Serialize, ToSchema)]
struct BackendHealth {
    kind: &'static str,
    address: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    round_trip_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Open streaming connections on this instance.
#[derive(Serialize, ToSchema)]
struct Connections {
    sse: u64,
    websocket: u64,
    long_poll: u64,
}

#[derive(Serialize, ToSchema)]
struct Report {
    service: &'static str,
    version: &'static str,
    status: &'static str,
    uptime_seconds: u64,
    shutting_down: bool,
    backend: BackendHealth,
    connections: Connections,
    /// The last synthetic probe (absent until the first one finishes).
    probe: Option<Outcome>,
}

/// The detailed report, for dashboards.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Healthy", body = Report),
        (status = 503, description = "Degraded: same report, `status` is `degraded`", body = Report),
    ),
)]
async fn detailed(State(state): State<AppState>) -> Response {
    let check = check_backend(&state).await;
    let (sse, websocket, long_poll) = state.connections.snapshot();
    let healthy = check.is_ok() && state.probe.check().is_ok() && !state.shutdown.is_cancelled();
    let report = Report {
        service: "streamgate",
        version: env!("CARGO_PKG_VERSION"),
        status: if healthy { "ok" } else { "degraded" },
        uptime_seconds: state.started_at.elapsed().as_secs(),
        shutting_down: state.shutdown.is_cancelled(),
        backend: BackendHealth {
            kind: state.backend.kind(),
            address: state.backend.address(),
            status: if check.is_ok() { "up" } else { "down" },
            round_trip_ms: check
                .as_ref()
                .ok()
                .map(|elapsed| crate::model::millis(*elapsed)),
            error: check.err(),
        },
        connections: Connections {
            sse,
            websocket,
            long_poll,
        },
        probe: state.probe.last(),
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

/// The detailed report under seed 003's name.
#[utoipa::path(
    get,
    path = "/health-check",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Healthy (see `/health`)", body = Report),
        (status = 503, description = "Degraded", body = Report),
    ),
)]
async fn detailed_alias(state: State<AppState>) -> Response {
    detailed(state).await
}
