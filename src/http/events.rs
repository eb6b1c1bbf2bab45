//! `GET /api/events`: Server-Sent Events. With `group=` each connection is one consumer of the
//! group, receiving messages up to its `limit` in flight until it finishes them; without it, a
//! broadcast subscription (see [`super::broadcast`]).

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::consume::{self, ConsumeRequest, Delivery, Kind, Opened, Words};
use super::error::ApiError;
use super::extract::QueryPairs;
use super::openapi::{Conflicting, Guarded, Invalid, SseEvent, StartSchema};
use super::sse::{self, json_string};
use crate::delivery::groups::GroupMessage;
use crate::delivery::hub::Frame;
use crate::metrics;
use crate::model::{ConsumerName, Entry, EntryId, GroupName, StreamName};

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
    query.accept_only(&[
        "stream",
        "streams",
        "group",
        "consumer",
        "limit",
        "mode",
        "from",
        "lastEventId",
    ])?;
    let listed = query.all("streams").flat_map(|list| list.split(','));
    let streams: Vec<String> = query
        .all("stream")
        .chain(listed)
        .map(str::to_owned)
        .collect();
    let words = Words {
        streams_field: "stream",
        streams,
        group: query.one("group")?.map(str::to_owned),
        consumer: query.one("consumer")?.map(str::to_owned),
        limit: query.one("limit")?.map(str::to_owned),
        mode: query.one("mode")?.map(str::to_owned),
        from: query.one("from")?.map(str::to_owned),
        resume: resume_point(&headers, &query)?,
    };
    let request = ConsumeRequest::parse(words)?;
    if matches!(request.kind, Kind::Group(_)) && request.streams.len() > 1 {
        return Err(ApiError::BadRequest(
            "a group consumer reads one `stream`".into(),
        ));
    }
    serve(state, caller, request).await
}

/// Where a reconnecting SSE client left off: the `Last-Event-ID` header (a browser's reconnect
/// sends it while its URL keeps the original query), else `lastEventId`.
pub(super) fn resume_point(
    headers: &HeaderMap,
    query: &QueryPairs,
) -> Result<Option<String>, ApiError> {
    if let Some(value) = headers.get("last-event-id") {
        let text = value
            .to_str()
            .map_err(|_| ApiError::BadRequest("Last-Event-ID is not text".into()))?
            .trim();
        if !text.is_empty() {
            return Ok(Some(text.to_owned()));
        }
    }
    Ok(query
        .one("lastEventId")?
        .filter(|id| !id.is_empty())
        .map(str::to_owned))
}

/// Opens `request` and answers with its event stream: with one stream, each message's `id:` is
/// its entry id; with several (broadcast), a cursor covering all of them.
pub(super) async fn serve(
    state: AppState,
    caller: Caller,
    request: ConsumeRequest,
) -> Result<Response, ApiError> {
    let permit = state.streaming_permit()?;
    let opened = consume::open(&state, &caller, request, metrics::transport::SSE).await?;
    let mut extra_headers = Vec::new();
    let frames = match <[Opened; 1]>::try_from(opened) {
        Ok([opened]) => {
            if let Some((_, consumer)) = &opened.group {
                let value = HeaderValue::from_str(consumer.as_str()).map_err(|_| {
                    ApiError::BadRequest("the consumer name cannot be sent in a header".into())
                })?;
                extra_headers.push((HeaderName::from_static("x-consumer"), value));
            }
            one_stream_frames(opened).boxed()
        }
        Err(opened) => several_streams_frames(opened).boxed(),
    };
    let connection = state.connections.open_sse();
    Ok(sse::response(
        frames,
        state.config.sse_keepalive_interval_sec,
        state.ends(&caller),
        extra_headers,
        (permit, connection),
    ))
}

/// The frames of one stream's subscription; a broadcast message's frame is encoded once for
/// every subscriber.
fn one_stream_frames(opened: Opened) -> impl Stream<Item = Bytes> + Send + 'static {
    let tail = opened
        .group
        .as_ref()
        .map(|(group, consumer)| group_tail(&opened.stream, group, consumer));
    let stream = opened.stream;
    opened.deliveries.map(move |delivery| match delivery {
        Delivery::Message(message) => message_frame(&message, tail.as_deref().unwrap_or_default()),
        Delivery::Broadcast(frame) => frame.encoded(SLOT_SSE_FRAME, |frame| {
            sse::frame(None, Some(&frame.id().to_string()), &broadcast_json(frame))
        }),
        Delivery::Gap {
            requested,
            resumed_from,
        } => gap_frame(&stream, requested, resumed_from),
        Delivery::End(reason) => sse::end_frame(reason),
    })
}

/// Broadcast events of several streams, interleaved as they come, each with the cursor of every
/// stream's position as its id.
fn several_streams_frames(opened: Vec<Opened>) -> impl Stream<Item = Bytes> + Send + 'static {
    let mut positions = consume::positions(&opened);
    consume::merge(opened).filter_map(move |(index, delivery)| {
        let frame = match delivery {
            Delivery::Broadcast(frame) => {
                positions.advance_at(index, frame.id());
                let token = positions.encode();
                let data = frame.encoded(SLOT_SSE_DATA, |frame| {
                    sse::frame(None, None, &broadcast_json(frame))
                });
                let mut bytes = BytesMut::with_capacity(token.len() + data.len() + 8);
                bytes.put_slice(b"id: ");
                bytes.put_slice(token.as_bytes());
                bytes.put_u8(b'\n');
                bytes.put_slice(&data);
                Some(bytes.freeze())
            }
            Delivery::Gap {
                requested,
                resumed_from,
            } => Some(gap_frame(positions.stream(index), requested, resumed_from)),
            Delivery::End(reason) => Some(sse::end_frame(reason)),
            // Several streams are broadcast only (see `events`).
            Delivery::Message(_) => None,
        };
        std::future::ready(frame)
    })
}

/// The frame caches each broadcast message keeps (see [`Frame::encoded`]).
const SLOT_SSE_FRAME: usize = 0;
const SLOT_SSE_DATA: usize = 1;

/// What every message of a group subscription ends with: `,"stream":…,"group":…,"consumer":…`.
fn group_tail(stream: &StreamName, group: &GroupName, consumer: &ConsumerName) -> Bytes {
    Bytes::from(format!(
        r#","stream":{},"group":{},"consumer":{}"#,
        json_string(stream.as_str()),
        json_string(group.as_str()),
        json_string(consumer.as_str()),
    ))
}

/// `id: …` and `data: {"id","body"[,"fields"],"stream","group","consumer","deliveries"}`.
fn message_frame(message: &GroupMessage, tail: &[u8]) -> Bytes {
    let id = message.entry.id.to_string();
    let body = message.entry.body_json();
    let mut data = Vec::with_capacity(body.len() + tail.len() + id.len() + 48);
    data.extend_from_slice(b"{\"id\":\"");
    data.extend_from_slice(id.as_bytes());
    data.extend_from_slice(b"\",\"body\":");
    data.extend_from_slice(&body);
    put_fields(&mut data, &message.entry);
    data.extend_from_slice(tail);
    data.extend_from_slice(b",\"deliveries\":");
    data.extend_from_slice(itoa::Buffer::new().format(message.deliveries).as_bytes());
    data.push(b'}');
    sse::frame(None, Some(&id), &data)
}

/// `{"id":"…","body":…[,"fields":{…}],"stream":"…"}`.
fn broadcast_json(frame: &Frame) -> Vec<u8> {
    let id = frame.id().to_string();
    let body = frame.entry.body_json();
    let mut json = Vec::with_capacity(body.len() + frame.stream.as_str().len() + 48);
    json.extend_from_slice(b"{\"id\":\"");
    json.extend_from_slice(id.as_bytes());
    json.extend_from_slice(b"\",\"body\":");
    json.extend_from_slice(&body);
    put_fields(&mut json, &frame.entry);
    json.extend_from_slice(b",\"stream\":");
    json.extend_from_slice(json_string(frame.stream.as_str()).as_bytes());
    json.push(b'}');
    json
}

/// `,"fields":{…}` when the entry has fields beside its body (written by another client, or a
/// dead letter's origin), as history shows them.
fn put_fields(json: &mut Vec<u8>, entry: &Entry) {
    if let Some(fields) = entry.extra_fields_json() {
        json.extend_from_slice(b",\"fields\":");
        json.extend_from_slice(&fields);
    }
}

/// `event: gap` with `{"stream","requested","resumed_from"}`.
fn gap_frame(stream: &StreamName, requested: EntryId, resumed_from: EntryId) -> Bytes {
    let data = format!(
        r#"{{"stream":{},"requested":"{requested}","resumed_from":"{resumed_from}"}}"#,
        json_string(stream.as_str())
    );
    sse::frame(Some("gap"), None, data.as_bytes())
}
