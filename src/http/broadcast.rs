//! Broadcast SSE: every subscriber sees every message. `GET /api/streams/{stream}/events`,
//! `GET /api/events?stream=…` without a group (several streams with `streams=a,b` or repeated
//! `stream`), and seed 002's `GET /sse/connect?channel_id=X`.
//!
//! A subscription starts at new messages, or after the id in the `Last-Event-ID` header, the
//! `lastEventId` parameter or `from` (`0` = the beginning), in that order: a browser's reconnect
//! sends the header while its URL keeps the original `from`. With one stream the SSE `id:` is the
//! entry id; with several it is a cursor covering all of them.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::consume::{ConsumeRequest, Words};
use super::error::ApiError;
use super::events;
use super::extract::{QueryPairs, StreamPath, stream_name};
use super::openapi::{Conflicting, Guarded, Invalid, SseEvent, StartSchema, StreamParam};
use crate::model::StreamName;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(stream_events))
        .routes(routes!(channel_events))
}

/// Broadcast Server-Sent Events: every subscriber sees every message, each
/// `id: <entry id>` / `data: {"id","body","stream"}`. Starts at new messages unless resuming
/// (`Last-Event-ID`, `lastEventId`) or `from` says otherwise; a resume older than the retained
/// history gets an `event: gap` first.
#[utoipa::path(
    get,
    path = "/api/streams/{stream}/events",
    tag = "consume",
    security(("bearer" = []), ("query_token" = [])),
    params(
        StreamParam,
        ("from" = Option<StartSchema>, Query, description = "`0` (the retained history), `$` (new messages, the default) or an id to start after"),
        ("lastEventId" = Option<String>, Query, description = "Resume after this id (the header wins)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this id (browsers send it when they reconnect)"),
    ),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = SseEvent),
        Invalid, Conflicting, Guarded,
    ),
)]
async fn stream_events(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
    headers: HeaderMap,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    query.accept_only(&["from", "lastEventId"])?;
    serve(state, caller, stream, &headers, &query).await
}

/// Seed 002's broadcast: the channel's stream is `broadcast.channel_prefix` + `channel_id`.
#[utoipa::path(
    get,
    path = "/sse/connect",
    tag = "consume",
    security(("bearer" = []), ("query_token" = [])),
    params(
        ("channel_id" = StreamName, Query, description = "The channel"),
        ("from" = Option<StartSchema>, Query, description = "As for `/api/streams/{stream}/events`"),
        ("lastEventId" = Option<String>, Query, description = "Resume after this id (the header wins)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this id"),
    ),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = SseEvent),
        Invalid, Conflicting, Guarded,
    ),
)]
async fn channel_events(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    query.accept_only(&["channel_id", "from", "lastEventId"])?;
    let channel = query
        .one("channel_id")?
        .filter(|channel| !channel.is_empty())
        .ok_or_else(|| ApiError::BadRequest("`channel_id` is required".into()))?;
    let stream = stream_name(format!(
        "{}{channel}",
        state.config.broadcast.channel_prefix
    ))?;
    serve(state, caller, stream, &headers, &query).await
}

/// Serves a one-stream broadcast route: `from` and the resume point as for `/api/events`.
async fn serve(
    state: AppState,
    caller: Caller,
    stream: StreamName,
    headers: &HeaderMap,
    query: &QueryPairs,
) -> Result<Response, ApiError> {
    let words = Words {
        streams_field: "stream",
        streams: vec![stream.as_str().to_owned()],
        from: query.one("from")?.map(str::to_owned),
        resume: events::resume_point(headers, query)?,
        ..Words::default()
    };
    events::serve(state, caller, ConsumeRequest::parse(words)?).await
}
