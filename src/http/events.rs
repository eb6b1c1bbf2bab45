//! `GET /api/events`: Server-Sent Events. With `group=` each connection is one consumer of the
//! group, receiving messages up to its `limit` in flight until it finishes them; without it, a
//! broadcast subscription (see [`super::broadcast`]).

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::broadcast;
use super::error::ApiError;
use super::extract::{QueryPairs, stream_name};
use super::groups::parse_start;
use super::openapi::{Conflicting, Guarded, Invalid, SseEvent, StartSchema};
use super::sse::{self, json_string};
use crate::auth::Scope;
use crate::backend::GroupStart;
use crate::delivery::groups::{
    ConnectError, ConsumerSpec, GroupMessage, MAX_LIMIT, Mode, Subscription,
};
use crate::metrics;
use crate::model::{ConsumerName, EntryId, GroupName, StreamName};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(events))
}

/// Server-Sent Events. With `group`: this connection is one consumer of the group (created at
/// `from` if new) and receives messages up to `limit` unfinished, each
/// `data: {"id","body","stream","group","consumer","deliveries"}`; finish them with the finish
/// routes. Without `group`: a broadcast subscription to `stream` (or several), as
/// `/api/streams/{stream}/events`.
#[utoipa::path(
    get,
    path = "/api/events",
    tag = "consume",
    security(("bearer" = []), ("query_token" = [])),
    params(
        ("stream" = Option<StreamName>, Query, description = "The stream (repeatable without `group`)"),
        ("streams" = Option<String>, Query, description = "Without `group`: several streams, comma-separated"),
        ("group" = Option<GroupName>, Query, description = "The consumer group; absent = broadcast"),
        ("consumer" = Option<ConsumerName>, Query, description = "This consumer's name (generated when absent; a named consumer gets back its unfinished messages first)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 10000, description = "Most messages unfinished at once (the group's default when absent)"),
        ("mode" = Option<String>, Query, pattern = "^(at-least-once|at-most-once)$", description = "`at-least-once` (default: finish each message) or `at-most-once` (nothing pending)"),
        ("from" = Option<StartSchema>, Query, description = "Where a new group starts: `0` (default), `$` or an id; for broadcast, where to start (`0`, `$` = default, or an id)"),
        ("lastEventId" = Option<String>, Query, description = "Broadcast: resume after this id or cursor (the `Last-Event-ID` header wins)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Broadcast: resume after this id or cursor. Group without `consumer`: come back as the consumer this message was delivered to, when it is not connected (its unfinished messages first)"),
    ),
    responses(
        (
            status = 200,
            description = "The event stream (`retry:`, then `id:`/`data:` frames and keep-alive comments)",
            content_type = "text/event-stream",
            body = SseEvent,
            headers(("X-Consumer" = String, description = "Group consumers: the consumer's name")),
        ),
        Invalid, Conflicting, Guarded,
    ),
)]
async fn events(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    // The group's own parameters are checked without a group too: a bad one is a 400, not
    // silently ignored.
    let consumer = query
        .one("consumer")?
        .map(|name| {
            ConsumerName::parse(name)
                .map_err(|error| ApiError::BadRequest(format!("invalid consumer name: {error}")))
        })
        .transpose()?;
    let limit = query.parsed("limit", |text| {
        text.parse::<u32>()
            .ok()
            .filter(|limit| (1..=MAX_LIMIT).contains(limit))
    })?;
    let mode = query.parsed("mode", |text| match text {
        "at-least-once" => Some(Mode::AtLeastOnce),
        "at-most-once" => Some(Mode::AtMostOnce),
        _ => None,
    })?;
    let Some(group) = query.one("group")? else {
        // Without a group every subscriber sees every message.
        let streams = broadcast::requested_streams(&query)?;
        return broadcast::serve(state, caller, streams, &headers, &query).await;
    };
    let stream = stream_name(
        query
            .one("stream")?
            .ok_or_else(|| ApiError::BadRequest("`stream` is required".into()))?,
    )?;
    caller.require(Scope::Consume, &stream)?;
    let group = GroupName::parse(group)
        .map_err(|error| ApiError::BadRequest(format!("invalid group name: {error}")))?;
    let start = query
        .parsed("from", parse_start)?
        .unwrap_or(GroupStart::After(EntryId::MIN));
    let spec_mode = mode.unwrap_or(Mode::AtLeastOnce);
    // A browser's EventSource reconnects to the same URL with the last id it received: it comes
    // back as the consumer that message was delivered to, if that one is free, so the messages it
    // held come back at once instead of after the visibility timeout.
    let resumed = match (&consumer, last_event_id(&headers)?) {
        (None, Some(id)) if spec_mode == Mode::AtLeastOnce => {
            state.groups.owner_of(&stream, &group, id).await?
        }
        _ => None,
    };
    let spec = ConsumerSpec {
        stream,
        group,
        consumer: consumer.or(resumed.clone()),
        limit,
        start,
        mode: spec_mode,
    };
    let permit = state.streaming_permit()?;
    let connected = match state.groups.connect(spec.clone()).await {
        // That consumer is connected elsewhere: this one is a new consumer after all.
        Err(ConnectError::Duplicate(_)) if resumed.is_some() => {
            let fresh = ConsumerSpec {
                consumer: None,
                ..spec
            };
            state.groups.connect(fresh).await
        }
        connected => connected,
    };
    let subscription = connected.map_err(|error| match error {
        ConnectError::Duplicate(name) => ApiError::Conflict(format!(
            "consumer `{name}` is already connected to this group (here or on another instance)"
        )),
        ConnectError::Backend(error) => error.into(),
    })?;
    let consumer_header = HeaderValue::from_str(subscription.consumer.as_str())
        .map_err(|_| ApiError::BadRequest("the consumer name cannot be sent in a header".into()))?;
    let connection = state.connections.open_sse();
    let metrics = state.metrics.clone();
    let mode = match spec_mode {
        Mode::AtLeastOnce => metrics::mode::AT_LEAST_ONCE,
        Mode::AtMostOnce => metrics::mode::AT_MOST_ONCE,
    };
    let tail = frame_tail(&subscription);
    // The messages, then `event: end` when the group or its stream goes away.
    let frames = futures_util::stream::unfold(Some(subscription), move |subscription| {
        let (metrics, tail) = (metrics.clone(), tail.clone());
        async move {
            let mut subscription = subscription?;
            match subscription.next().await {
                Some(message) => {
                    metrics.delivered(metrics::transport::SSE, mode, &message.entry);
                    Some((message_frame(&message, &tail), Some(subscription)))
                }
                None => Some((sse::end_frame(subscription.end_reason()?), None)),
            }
        }
    });
    Ok(sse::response(
        frames,
        state.config.sse_keepalive_interval_sec,
        state.ends(&caller),
        vec![(HeaderName::from_static("x-consumer"), consumer_header)],
        (permit, connection),
    ))
}

/// The entry id in `Last-Event-ID`, if the header holds one (other values are a broadcast
/// cursor's business, not a group's: they are ignored here).
fn last_event_id(headers: &HeaderMap) -> Result<Option<EntryId>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("Last-Event-ID is not text".into()))?;
    Ok(text.trim().parse().ok())
}

/// What every message of a subscription ends with: `,"stream":…,"group":…,"consumer":…`.
fn frame_tail(subscription: &Subscription) -> Bytes {
    Bytes::from(format!(
        r#","stream":{},"group":{},"consumer":{}"#,
        json_string(subscription.stream.as_str()),
        json_string(subscription.group.as_str()),
        json_string(subscription.consumer.as_str()),
    ))
}

/// `id: …` and `data: {"id","body","stream","group","consumer","deliveries"}`.
fn message_frame(message: &GroupMessage, tail: &[u8]) -> Bytes {
    let id = message.entry.id.to_string();
    let body = message.entry.body_json();
    let mut data = Vec::with_capacity(body.len() + tail.len() + id.len() + 48);
    data.extend_from_slice(b"{\"id\":\"");
    data.extend_from_slice(id.as_bytes());
    data.extend_from_slice(b"\",\"body\":");
    data.extend_from_slice(&body);
    data.extend_from_slice(tail);
    data.extend_from_slice(b",\"deliveries\":");
    data.extend_from_slice(itoa::Buffer::new().format(message.deliveries).as_bytes());
    data.push(b'}');
    sse::frame(None, Some(&id), &data)
}
