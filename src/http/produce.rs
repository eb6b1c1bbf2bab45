//! Publishing: `POST /api/streams/{stream}/messages` (and `/batch`) and seed 004's
//! `POST /api/v1/messages` (and `/bulk`). Payloads are stored as the JSON text received, never
//! re-encoded. A request is checked completely (names, sizes, permissions) before anything is
//! written.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{LimitedBody, StreamPath, parse_json, stream_name, whole};
use super::message_id::MessageRef;
use super::openapi::{Conflicting, Guarded, IdempotencyHeader, Invalid, StreamParam, TooLarge};
use crate::auth::Scope;
use crate::backend::{AppendOutcome, AppendRequest, Backend, IdempotencyKey, Retention};
use crate::config::IDEMPOTENCY_TTL;
use crate::metrics::source::HTTP;
use crate::model::{EntryId, INTERNAL_PREFIX, NewEntry, StreamName, now_ms};

/// The longest accepted `ttl`: ten years, in seconds.
const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// Header a replayed idempotent answer carries.
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(publish))
        .routes(routes!(publish_batch))
        .routes(routes!(publish_v1))
        .routes(routes!(publish_v1_bulk))
}

/// One message.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    /// The payload: any JSON value, stored as the exact text received.
    #[serde(borrow)]
    #[schema(value_type = serde_json::Value)]
    data: &'a RawValue,
    /// Trim the stream to about this many entries (the configured retention may keep fewer).
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "whole")]
    maxlen: Option<u64>,
    /// Seconds until the message expires: it is then no longer delivered.
    #[schema(minimum = 1, maximum = 315_360_000)]
    #[serde(default, deserialize_with = "whole")]
    ttl: Option<u64>,
}

/// Several messages, appended together in order.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchBody<'a> {
    /// The payloads (at most `limits.max_batch_messages`).
    #[serde(borrow)]
    #[schema(value_type = Vec<serde_json::Value>, min_items = 1)]
    messages: Vec<&'a RawValue>,
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "whole")]
    maxlen: Option<u64>,
    #[schema(minimum = 1, maximum = 315_360_000)]
    #[serde(default, deserialize_with = "whole")]
    ttl: Option<u64>,
}

/// Seed 004's message: a topic (stream) and its payload.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct V1Message<'a> {
    /// The stream.
    #[schema(value_type = StreamName)]
    topic: String,
    #[serde(borrow)]
    #[schema(value_type = serde_json::Value)]
    payload: &'a RawValue,
    #[schema(minimum = 1, maximum = 315_360_000)]
    #[serde(default, deserialize_with = "whole")]
    ttl: Option<u64>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct V1BulkBody<'a> {
    #[serde(borrow)]
    #[schema(min_items = 1)]
    messages: Vec<V1Message<'a>>,
}

#[derive(Serialize, ToSchema)]
struct Published<'a> {
    #[schema(example = "ok")]
    status: &'static str,
    stream: &'a StreamName,
    /// The entry id.
    id: EntryId,
}

#[derive(Serialize, ToSchema)]
struct PublishedBatch<'a> {
    #[schema(example = "ok")]
    status: &'static str,
    stream: &'a StreamName,
    count: usize,
    /// The entry ids, in request order.
    ids: &'a [EntryId],
}

#[derive(Serialize, ToSchema)]
struct PublishedV1<'a> {
    /// An opaque token naming the message (acknowledge with it after receiving it).
    message_id: String,
    topic: &'a StreamName,
}

#[derive(Serialize, ToSchema)]
struct PublishedV1Bulk<'a> {
    /// One per message, in request order.
    results: Vec<PublishedV1<'a>>,
}

/// Publishes one message to a stream (created on first use).
#[utoipa::path(
    post,
    path = "/api/streams/{stream}/messages",
    tag = "publish",
    params(StreamParam, IdempotencyHeader),
    request_body(content = PublishBody, example = json!({"data": {"order_id": 42, "status": "paid"}})),
    responses(
        (
            status = 201,
            description = "Stored (a replayed idempotent publish carries `Idempotent-Replayed: true`)",
            body = Published,
            headers(("Idempotent-Replayed" = String, description = "`true` when the key was seen before")),
        ),
        Invalid, TooLarge, Conflicting, Guarded,
    ),
)]
async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let stream = publishable(stream)?;
    caller.require(Scope::Publish, &stream)?;
    let request: PublishBody = parse_json(&body)?;
    let entry = new_entry(&state, &body, request.data, request.ttl, None)?;
    let retention = retention(&state, &stream, request.maxlen)?;
    let idempotency = idempotency_key(&headers, "single")?;
    let outcome = append(&state, &stream, vec![entry], retention, idempotency, HTTP).await?;
    let reply = Published {
        status: "ok",
        stream: &stream,
        id: first_id(&outcome)?,
    };
    Ok(created(&reply, outcome.replayed))
}

/// Publishes several messages to a stream, all or nothing.
#[utoipa::path(
    post,
    path = "/api/streams/{stream}/messages/batch",
    tag = "publish",
    params(StreamParam, IdempotencyHeader),
    request_body(content = BatchBody, example = json!({"messages": [{"order_id": 42}, {"order_id": 43}]})),
    responses(
        (
            status = 201,
            description = "Stored",
            body = PublishedBatch,
            headers(("Idempotent-Replayed" = String, description = "`true` when the key was seen before")),
        ),
        Invalid, TooLarge, Conflicting, Guarded,
    ),
)]
async fn publish_batch(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let stream = publishable(stream)?;
    caller.require(Scope::Publish, &stream)?;
    let request: BatchBody = parse_json(&body)?;
    check_batch_size(&state, request.messages.len())?;
    let entries = request
        .messages
        .iter()
        .enumerate()
        .map(|(index, data)| new_entry(&state, &body, data, request.ttl, Some(index)))
        .collect::<Result<Vec<_>, _>>()?;
    let retention = retention(&state, &stream, request.maxlen)?;
    let idempotency = idempotency_key(&headers, "batch")?;
    let outcome = append(&state, &stream, entries, retention, idempotency, HTTP).await?;
    let reply = PublishedBatch {
        status: "ok",
        stream: &stream,
        count: outcome.ids.len(),
        ids: &outcome.ids,
    };
    Ok(created(&reply, outcome.replayed))
}

/// Seed 004's publish: one message to a topic.
#[utoipa::path(
    post,
    path = "/api/v1/messages",
    tag = "publish",
    params(IdempotencyHeader),
    request_body(content = V1Message, example = json!({"topic": "notifications", "payload": {"user_id": 123}})),
    responses(
        (status = 201, description = "Stored", body = PublishedV1),
        Invalid, TooLarge, Conflicting, Guarded,
    ),
)]
async fn publish_v1(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let request: V1Message = parse_json(&body)?;
    // The same namespace as the single route: both append one message to one stream.
    let idempotency = idempotency_key(&headers, "single")?;
    let message = TopicMessage {
        topic: request.topic,
        payload: request.payload,
        ttl: request.ttl,
    };
    let (topic, outcome) = publish_one(&state, &caller, &body, message, idempotency, HTTP).await?;
    let reply = PublishedV1 {
        message_id: v1_message_id(&topic, first_id(&outcome)?),
        topic: &topic,
    };
    Ok(created(&reply, outcome.replayed))
}

/// One message for one topic, as seed 004's route and WebSocket frame carry it.
pub(super) struct TopicMessage<'a> {
    pub topic: String,
    /// Borrowed from the request's bytes.
    pub payload: &'a RawValue,
    pub ttl: Option<u64>,
}

/// Publishes one message to a topic, checked as every publish is: the v1 route and WebSocket
/// `publish` share it. The message's payload must borrow from `body`.
pub(super) async fn publish_one(
    state: &AppState,
    caller: &Caller,
    body: &Bytes,
    message: TopicMessage<'_>,
    idempotency: Option<IdempotencyKey>,
    source: &'static str,
) -> Result<(StreamName, AppendOutcome), ApiError> {
    let topic = publishable(stream_name(message.topic)?)?;
    caller.require(Scope::Publish, &topic)?;
    let entry = new_entry(state, body, message.payload, message.ttl, None)?;
    let retention = retention(state, &topic, None)?;
    let outcome = append(state, &topic, vec![entry], retention, idempotency, source).await?;
    Ok((topic, outcome))
}

/// A published message's `message_id` in seed 004's API: the opaque token, without a group.
pub(super) fn v1_message_id(topic: &StreamName, id: EntryId) -> String {
    MessageRef {
        stream: topic.clone(),
        group: None,
        id,
    }
    .encode()
}

/// Messages for several topics: each topic's messages are appended together, topics one after
/// another, so a failure part-way leaves the earlier topics written (the reply is then an error).
/// Seed 004's bulk publish: messages to several topics. Each topic's messages are appended
/// together, topics one after another.
#[utoipa::path(
    post,
    path = "/api/v1/messages/bulk",
    tag = "publish",
    request_body(content = V1BulkBody, example = json!({"messages": [{"topic": "alerts", "payload": {"level": "info"}}, {"topic": "notifications", "payload": {"user_id": 123}}]})),
    responses(
        (status = 201, description = "Stored", body = PublishedV1Bulk),
        Invalid, TooLarge, Conflicting, Guarded,
    ),
)]
async fn publish_v1_bulk(
    State(state): State<AppState>,
    caller: Caller,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let request: V1BulkBody = parse_json(&body)?;
    check_batch_size(&state, request.messages.len())?;
    // Validate everything first, grouping the messages by topic.
    let mut topics: Vec<(StreamName, Vec<(usize, NewEntry)>)> = Vec::new();
    let mut topic_of = Vec::with_capacity(request.messages.len());
    for (index, message) in request.messages.iter().enumerate() {
        let topic = publishable(stream_name(message.topic.clone())?)?;
        caller.require(Scope::Publish, &topic)?;
        let entry = new_entry(&state, &body, message.payload, message.ttl, Some(index))?;
        let position = match topics.iter().position(|(name, _)| *name == topic) {
            Some(position) => position,
            None => {
                topics.push((topic, Vec::new()));
                topics.len() - 1
            }
        };
        topics[position].1.push((index, entry));
        topic_of.push(position);
    }
    let mut ids = vec![EntryId::MIN; request.messages.len()];
    for (topic, entries) in &topics {
        let retention = retention(&state, topic, None)?;
        let (positions, entries): (Vec<usize>, Vec<NewEntry>) = entries.iter().cloned().unzip();
        let outcome = append(&state, topic, entries, retention, None, HTTP).await?;
        for (position, id) in positions.into_iter().zip(outcome.ids) {
            ids[position] = id;
        }
    }
    let results = topic_of
        .iter()
        .zip(ids)
        .map(|(&position, id)| PublishedV1 {
            message_id: v1_message_id(&topics[position].0, id),
            topic: &topics[position].0,
        })
        .collect();
    Ok(created(&PublishedV1Bulk { results }, false))
}

/// A stream clients may publish to: a valid name outside streamgate's own `streamgate:` prefix
/// (403 inside it: the name is well-formed, writing there is not allowed).
fn publishable(stream: StreamName) -> Result<StreamName, ApiError> {
    if stream.is_internal() {
        return Err(ApiError::Forbidden(format!(
            "stream names starting with `{INTERNAL_PREFIX}` are reserved for streamgate itself"
        )));
    }
    Ok(stream)
}

/// Builds an entry from a payload that borrows from `body` (so the stored bytes are exactly the
/// bytes received), checking its size and `ttl`.
fn new_entry(
    state: &AppState,
    body: &Bytes,
    payload: &RawValue,
    ttl: Option<u64>,
    index: Option<usize>,
) -> Result<NewEntry, ApiError> {
    let data = body.slice_ref(payload.get().as_bytes());
    let limit = state.config.limits.max_message_bytes;
    if data.len() > limit {
        let which = index
            .map(|index| format!("message {index}"))
            .unwrap_or_else(|| "the message".into());
        return Err(ApiError::PayloadTooLarge(format!(
            "{which} is {} bytes; the limit is {limit} bytes",
            data.len()
        )));
    }
    let expires_at_ms = match ttl {
        None => None,
        Some(0) => return Err(ApiError::BadRequest("ttl must be at least 1 second".into())),
        Some(ttl) if ttl > MAX_TTL_SECS => {
            return Err(ApiError::BadRequest(format!(
                "ttl must be at most {MAX_TTL_SECS} seconds"
            )));
        }
        Some(ttl) => Some(now_ms() + ttl * 1000),
    };
    Ok(NewEntry::new(data, expires_at_ms))
}

fn check_batch_size(state: &AppState, count: usize) -> Result<(), ApiError> {
    let limit = state.config.limits.max_batch_messages;
    if count == 0 {
        return Err(ApiError::BadRequest("`messages` must not be empty".into()));
    }
    if count > limit {
        return Err(ApiError::PayloadTooLarge(format!(
            "{count} messages in one request; the limit is {limit}"
        )));
    }
    Ok(())
}

/// The configured retention for the stream, with the request's `maxlen` (the smaller one wins).
fn retention(
    state: &AppState,
    stream: &StreamName,
    maxlen: Option<u64>,
) -> Result<Retention, ApiError> {
    let mut retention = state.config.retention_for(stream.as_str());
    match maxlen {
        None => {}
        Some(0) => return Err(ApiError::BadRequest("maxlen must be at least 1".into())),
        Some(maxlen) => {
            retention.max_len = Some(
                retention
                    .max_len
                    .map_or(maxlen, |configured| configured.min(maxlen)),
            );
        }
    }
    Ok(retention)
}

/// The `Idempotency-Key` header, qualified by the kind of request so that a single publish and a
/// batch with the same key are different operations.
fn idempotency_key(headers: &HeaderMap, kind: &str) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|key| (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into())
        })?;
    Ok(Some(IdempotencyKey {
        key: format!("{kind}:{key}"),
        ttl: IDEMPOTENCY_TTL,
    }))
}

/// Appends and counts what was written (`source`: http, websocket).
async fn append(
    state: &AppState,
    stream: &StreamName,
    entries: Vec<NewEntry>,
    retention: Retention,
    idempotency: Option<IdempotencyKey>,
    source: &'static str,
) -> Result<AppendOutcome, ApiError> {
    let request = AppendRequest {
        entries,
        retention,
        idempotency,
    };
    let outcome = state.backend.append(stream, request).await?;
    if !outcome.replayed {
        state.metrics.received(source, outcome.ids.len() as u64);
    }
    Ok(outcome)
}

fn first_id(outcome: &AppendOutcome) -> Result<EntryId, ApiError> {
    outcome
        .ids
        .first()
        .copied()
        .ok_or_else(|| ApiError::Internal("the backend returned no id".into()))
}

fn created(body: &impl Serialize, replayed: bool) -> Response {
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}
