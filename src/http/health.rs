//! Health probes, unauthenticated: liveness (the process runs), readiness (the backend answers
//! within a deadline and shutdown has not begun) and a detailed report for dashboards.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::AppState;
use super::error::problem_response;
use crate::backend::Backend;

/// How long readiness waits for the backend before calling it unreachable.
const BACKEND_DEADLINE: Duration = Duration::from_secs(1);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/ready", get(ready))
        .route("/health", get(detailed))
        .route("/health-check", get(detailed))
}

async fn live() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "alive" }))
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

async fn ready(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        return problem_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "shutting down".into(),
        );
    }
    match check_backend(&state).await {
        Ok(_) => Json(serde_json::json!({ "status": "ready" })).into_response(),
        Err(reason) => problem_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            format!("{} backend unreachable: {reason}", state.backend.kind()),
        ),
    }
}

#[derive(Serialize)]
struct BackendHealth {
    kind: &'static str,
    address: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    round_trip_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct Connections {
    sse: u64,
    websocket: u64,
    long_poll: u64,
}

#[derive(Serialize)]
struct Report {
    service: &'static str,
    version: &'static str,
    status: &'static str,
    uptime_seconds: u64,
    shutting_down: bool,
    backend: BackendHealth,
    connections: Connections,
}

async fn detailed(State(state): State<AppState>) -> Response {
    let check = check_backend(&state).await;
    let (sse, websocket, long_poll) = state.connections.snapshot();
    let healthy = check.is_ok() && !state.shutdown.is_cancelled();
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
                .map(|elapsed| elapsed.as_secs_f64() * 1000.0),
            error: check.err(),
        },
        connections: Connections {
            sse,
            websocket,
            long_poll,
        },
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}
