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
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{QueryPairs, StreamPath, stream_name};
use super::openapi::{Conflicting, Guarded, Invalid, SseEvent, StartSchema, StreamParam};
use super::sse::{self, json_string};
use crate::auth::Scope;
use std::sync::Arc;

use crate::delivery::cursor;
use crate::delivery::hub::{Frame, HubEvent, Start, SubscribeError, Subscription};
use crate::metrics::{self, Metrics};
use crate::model::{EntryId, StreamName};

/// The frame caches each broadcast message keeps (see [`Frame::encoded`]).
const SLOT_SSE_FRAME: usize = 0;
const SLOT_SSE_DATA: usize = 1;

/// Most streams on one connection.
const MAX_STREAMS: usize = 64;

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
    serve(state, caller, vec![stream], &headers, &query).await
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
    let channel = query
        .one("channel_id")?
        .filter(|channel| !channel.is_empty())
        .ok_or_else(|| ApiError::BadRequest("`channel_id` is required".into()))?;
    let stream = stream_name(format!(
        "{}{channel}",
        state.config.broadcast.channel_prefix
    ))?;
    serve(state, caller, vec![stream], &headers, &query).await
}

/// The streams of `/api/events` without a group: `stream` (repeatable) and `streams=a,b`.
pub fn requested_streams(query: &QueryPairs) -> Result<Vec<StreamName>, ApiError> {
    let mut streams = Vec::new();
    let listed = query.all("streams").flat_map(|list| list.split(','));
    for name in query
        .all("stream")
        .chain(listed)
        .filter(|name| !name.is_empty())
    {
        let stream = stream_name(name)?;
        if !streams.contains(&stream) {
            streams.push(stream);
        }
    }
    if streams.is_empty() {
        return Err(ApiError::BadRequest(
            "`stream` (or `streams`) is required".into(),
        ));
    }
    if streams.len() > MAX_STREAMS {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_STREAMS} streams per connection"
        )));
    }
    Ok(streams)
}

/// Subscribes to `streams` and answers with the SSE response.
pub async fn serve(
    state: AppState,
    caller: Caller,
    streams: Vec<StreamName>,
    headers: &HeaderMap,
    query: &QueryPairs,
) -> Result<Response, ApiError> {
    for stream in &streams {
        caller.require(Scope::Consume, stream)?;
    }
    let starts = starts(&streams, headers, query)?;
    let permit = state.streaming_permit()?;
    let mut subscriptions = Vec::with_capacity(streams.len());
    for (stream, start) in streams.iter().zip(starts) {
        let subscription =
            state
                .hub
                .subscribe(stream, start)
                .await
                .map_err(|error| match error {
                    SubscribeError::FutureId { requested, last } => ApiError::BadRequest(format!(
                        "cannot resume {stream} after {requested}: its last id is {last}"
                    )),
                    SubscribeError::Backend(error) => error.into(),
                })?;
        subscriptions.push(subscription);
    }
    let connection = state.connections.open_sse();
    let keepalive = state.config.sse_keepalive_interval_sec;
    let ends = state.ends(&caller);
    let frames = match <[Subscription; 1]>::try_from(subscriptions) {
        Ok([subscription]) => {
            let metrics = state.metrics.clone();
            futures_util::stream::unfold(subscription, move |mut subscription| {
                let metrics = metrics.clone();
                async move {
                    let event = subscription.next().await?;
                    count_delivery(&metrics, &event);
                    Some((
                        single_stream_frame(&event, subscription.stream()),
                        subscription,
                    ))
                }
            })
            .boxed()
        }
        Err(subscriptions) => multi_stream_frames(subscriptions, state.metrics.clone()).boxed(),
    };
    Ok(sse::response(
        frames,
        keepalive,
        ends,
        Vec::new(),
        (permit, connection),
    ))
}

/// Where each stream starts: `Last-Event-ID` header, else `lastEventId`, else `from`.
fn starts(
    streams: &[StreamName],
    headers: &HeaderMap,
    query: &QueryPairs,
) -> Result<Vec<Start>, ApiError> {
    let header = headers.get("last-event-id").map(|value| {
        value
            .to_str()
            .map_err(|_| ApiError::BadRequest("Last-Event-ID is not text".into()))
            .map(str::trim)
    });
    let resume = match header.transpose()? {
        Some(id) if !id.is_empty() => Some(id),
        _ => query.one("lastEventId")?.filter(|id| !id.is_empty()),
    };
    let from = query.one("from")?;
    let bad_id = |text: &str| {
        ApiError::BadRequest(format!(
            "`{text}` is not an entry id or cursor from this server"
        ))
    };
    if let [stream] = streams {
        let start = match (resume, from) {
            (Some(id), _) if id.starts_with("c1.") => {
                let positions =
                    cursor::decode(id).map_err(|error| ApiError::BadRequest(error.to_string()))?;
                match positions.into_iter().find(|(name, _)| name == stream) {
                    Some((_, id)) => Start::After(id),
                    None => Start::Latest,
                }
            }
            (Some(id), _) => Start::After(id.parse().map_err(|_| bad_id(id))?),
            (None, Some("0")) => Start::Beginning,
            (None, Some("$") | None) => Start::Latest,
            (None, Some(id)) => {
                Start::After(EntryId::parse_bound(id, false).map_err(|_| bad_id(id))?)
            }
        };
        return Ok(vec![start]);
    }
    let default = match from {
        None | Some("$") => Start::Latest,
        Some("0") => Start::Beginning,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "with several streams `from` takes only 0 or $ (got {other:?}); resume with the cursor"
            )));
        }
    };
    let positions = match resume {
        Some(token) => {
            cursor::decode(token).map_err(|error| ApiError::BadRequest(error.to_string()))?
        }
        None => Vec::new(),
    };
    Ok(streams
        .iter()
        .map(
            |stream| match positions.iter().find(|(name, _)| name == stream) {
                Some((_, id)) => Start::After(*id),
                None => default,
            },
        )
        .collect())
}

/// `{"id":"…","body":…,"stream":"…"}`.
fn message_json(frame: &Frame) -> Vec<u8> {
    let id = frame.id().to_string();
    let body = frame.entry.body_json();
    let mut json = Vec::with_capacity(body.len() + frame.stream.as_str().len() + 48);
    json.extend_from_slice(b"{\"id\":\"");
    json.extend_from_slice(id.as_bytes());
    json.extend_from_slice(b"\",\"body\":");
    json.extend_from_slice(&body);
    json.extend_from_slice(b",\"stream\":");
    json.extend_from_slice(json_string(frame.stream.as_str()).as_bytes());
    json.push(b'}');
    json
}

fn gap_frame(stream: &StreamName, requested: EntryId, resumed_from: EntryId) -> Bytes {
    let data = format!(
        r#"{{"stream":{},"requested":"{requested}","resumed_from":"{resumed_from}"}}"#,
        json_string(stream.as_str())
    );
    sse::frame(Some("gap"), None, data.as_bytes())
}

/// A one-stream event: the message frame with the entry id, shared by every subscriber.
fn single_stream_frame(event: &HubEvent, stream: &StreamName) -> Bytes {
    match event {
        HubEvent::Message(frame) => frame.encoded(SLOT_SSE_FRAME, |frame| {
            sse::frame(None, Some(&frame.id().to_string()), &message_json(frame))
        }),
        HubEvent::Gap {
            requested,
            resumed_from,
        } => gap_frame(stream, *requested, *resumed_from),
    }
}

/// Events of several streams, interleaved as they come, each with the cursor of every stream's
/// position as its id.
/// Counts a broadcast message sent over SSE.
fn count_delivery(metrics: &Metrics, event: &HubEvent) {
    if let HubEvent::Message(frame) = event {
        metrics.delivered(
            metrics::transport::SSE,
            metrics::mode::BROADCAST,
            &frame.entry,
        );
    }
}

fn multi_stream_frames(
    subscriptions: Vec<Subscription>,
    metrics: Arc<Metrics>,
) -> impl futures_util::Stream<Item = Bytes> + Send {
    let mut positions = cursor::Positions::new(
        subscriptions
            .iter()
            .map(|subscription| (subscription.stream().clone(), subscription.position()))
            .collect(),
    );
    let merged = futures_util::stream::select_all(subscriptions.into_iter().enumerate().map(
        |(index, subscription)| {
            futures_util::stream::unfold(subscription, move |mut subscription| async move {
                let event = subscription.next().await?;
                Some(((index, event), subscription))
            })
            .boxed()
        },
    ));
    merged.map(move |(index, event)| match event {
        HubEvent::Message(frame) => {
            metrics.delivered(
                metrics::transport::SSE,
                metrics::mode::BROADCAST,
                &frame.entry,
            );
            positions.advance_at(index, frame.id());
            let token = positions.encode();
            let data = frame.encoded(SLOT_SSE_DATA, |frame| {
                sse::frame(None, None, &message_json(frame))
            });
            let mut bytes = BytesMut::with_capacity(token.len() + data.len() + 8);
            bytes.put_slice(b"id: ");
            bytes.put_slice(token.as_bytes());
            bytes.put_u8(b'\n');
            bytes.put_slice(&data);
            bytes.freeze()
        }
        HubEvent::Gap {
            requested,
            resumed_from,
        } => gap_frame(positions.stream(index), requested, resumed_from),
    })
}
