//! Seed 004's long-polling: `GET /api/v1/poll` answers as soon as a message is available (or
//! empty after `timeout`), and `POST /api/v1/ack` acknowledges by `message_id` on any instance.
//!
//! A poll is a short-lived subscriber on the same delivery core as SSE. With `group` it is a
//! consumer of the group (named `client_id`, or a generated name): what it returned stays pending
//! until acknowledged, and a later poll with the same `client_id` gets back what was not. Without
//! a group it is a broadcast subscriber resuming from `cursor` (or starting at new messages), and
//! the reply's `cursor` is where the next poll continues.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::consume::{self, ConsumeRequest, Delivery, Words};
use super::error::ApiError;
use super::extract::{LimitedBody, QueryPairs, parse_json};
use super::message_id::MessageRef;
use super::openapi::{Conflicting, Guarded, Invalid, MessageIdSchema, TooLarge};
use crate::auth::Scope;
use crate::metrics;
use crate::model::{ConsumerName, Entry, EntryId, GroupName, StreamName};

/// Longest a poll waits, whatever it asks for.
const MAX_TIMEOUT_SECS: u64 = 60;
const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// Most messages one poll returns.
const MAX_MESSAGES: usize = 1000;
const DEFAULT_MESSAGES: usize = 100;

pub fn polling_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(poll))
}

pub fn ack_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(ack))
}

#[derive(Serialize, ToSchema)]
struct PolledMessage {
    /// An opaque token: acknowledge with it (`POST /api/v1/ack`).
    message_id: String,
    topic: StreamName,
    #[schema(value_type = serde_json::Value)]
    payload: Box<RawValue>,
    /// Fields beside the payload (an entry written by another client, a dead letter's origin),
    /// as history shows them.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<std::collections::HashMap<String, String>>)]
    fields: Option<Box<RawValue>>,
    /// Milliseconds since the epoch, from the entry id.
    timestamp: u64,
}

/// Messages a broadcast poll missed because they were trimmed away.
#[derive(Serialize, ToSchema)]
struct Gap {
    topic: StreamName,
    requested: EntryId,
    resumed_from: EntryId,
}

#[derive(Serialize, ToSchema)]
struct PollReply {
    messages: Vec<PolledMessage>,
    /// Where a broadcast poll continues (pass it back as `cursor`); null for group polls.
    cursor: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    gaps: Vec<Gap>,
}

fn polled_message(
    topic: StreamName,
    group: Option<GroupName>,
    entry: &Entry,
) -> Result<PolledMessage, ApiError> {
    let body = String::from_utf8(entry.body_json().to_vec())
        .map_err(|error| ApiError::Internal(error.to_string()))?;
    let payload =
        RawValue::from_string(body).map_err(|error| ApiError::Internal(error.to_string()))?;
    let message_id = MessageRef {
        stream: topic.clone(),
        group,
        id: entry.id,
    }
    .encode();
    let fields = entry
        .extra_fields_json()
        .map(|fields| {
            let text =
                String::from_utf8(fields).map_err(|error| ApiError::Internal(error.to_string()))?;
            RawValue::from_string(text).map_err(|error| ApiError::Internal(error.to_string()))
        })
        .transpose()?;
    Ok(PolledMessage {
        message_id,
        topic,
        payload,
        fields,
        timestamp: entry.id.ms,
    })
}

/// Seed 004's long-poll: answers as soon as messages are available, or empty after `timeout`.
/// With `group` the poll is a consumer of the group (`client_id` names it; what it returns stays
/// pending until acknowledged); without, a broadcast subscriber continuing from `cursor`.
#[utoipa::path(
    get,
    path = "/api/v1/poll",
    tag = "consume",
    security(("bearer" = []), ("query_token" = [])),
    params(
        ("topics" = String, Query, description = "Streams, comma-separated (or repeated)"),
        ("group" = Option<GroupName>, Query, description = "The consumer group; absent = broadcast"),
        ("client_id" = Option<ConsumerName>, Query, description = "Group polls: the consumer's name (generated when absent)"),
        ("cursor" = Option<String>, Query, description = "Broadcast polls: the previous reply's `cursor`"),
        ("timeout" = Option<u64>, Query, description = "Seconds to wait for a message (default 30, at most 60)"),
        ("max" = Option<usize>, Query, minimum = 1, description = "Most messages returned (default 100, at most 1000)"),
    ),
    responses(
        (status = 200, description = "The messages (possibly none)", body = PollReply),
        Invalid, Conflicting, Guarded,
    ),
)]
async fn poll(
    State(state): State<AppState>,
    caller: Caller,
    query: QueryPairs,
) -> Result<Json<PollReply>, ApiError> {
    query.accept_only(&["topics", "group", "client_id", "cursor", "timeout", "max"])?;
    let timeout = query
        .parsed("timeout", |text| text.parse::<u64>().ok())?
        .unwrap_or(DEFAULT_TIMEOUT_SECS)
        .min(MAX_TIMEOUT_SECS);
    let max = query
        .parsed("max", |text| {
            text.parse::<usize>().ok().filter(|max| *max >= 1)
        })?
        .unwrap_or(DEFAULT_MESSAGES)
        .min(MAX_MESSAGES);
    let group = query.one("group")?;
    let cursor = query.one("cursor")?;
    if group.is_some() && cursor.is_some() {
        return Err(ApiError::BadRequest(
            "`cursor` is for polls without a group".into(),
        ));
    }
    let words = Words {
        streams_field: "topics",
        streams: query
            .all("topics")
            .flat_map(|list| list.split(','))
            .map(str::to_owned)
            .collect(),
        group: group.map(str::to_owned),
        consumer: query.one("client_id")?.map(str::to_owned),
        // A group poll has at most `max` messages in flight.
        limit: group.map(|_| max.to_string()),
        resume: cursor.map(str::to_owned),
        ..Words::default()
    };
    let request = ConsumeRequest::parse(words)?;
    let _permit = state.streaming_permit()?;
    let _connection = state.connections.open_long_poll();
    let opened = consume::open(&state, &caller, request, metrics::transport::LONG_POLL).await?;
    let topics: Vec<(StreamName, Option<GroupName>)> = opened
        .iter()
        .map(|opened| {
            let group = opened.group.as_ref().map(|(group, _)| group.clone());
            (opened.stream.clone(), group)
        })
        .collect();
    let mut positions = opened[0]
        .group
        .is_none()
        .then(|| consume::positions(&opened));
    let mut merged = consume::merge(opened);
    let mut reply = PollReply {
        messages: Vec::new(),
        cursor: None,
        gaps: Vec::new(),
    };
    // Wait for the first message (or the timeout, the credential's expiry, or shutdown); then
    // take what is already there.
    let mut wait = Duration::from_secs(timeout);
    if let Some(left) = caller.0.valid_for() {
        wait = wait.min(left);
    }
    let first = tokio::select! {
        polled = merged.next() => polled,
        _ = tokio::time::sleep(wait) => None,
        _ = state.shutdown.cancelled() => None,
    };
    let mut next = first;
    while let Some((index, delivery)) = next {
        let (topic, group) = &topics[index];
        match delivery {
            Delivery::Message(message) => {
                reply.messages.push(polled_message(
                    topic.clone(),
                    group.clone(),
                    &message.entry,
                )?);
            }
            Delivery::Broadcast(frame) => {
                if let Some(positions) = positions.as_mut() {
                    positions.advance_at(index, frame.id());
                }
                reply
                    .messages
                    .push(polled_message(topic.clone(), None, &frame.entry)?);
            }
            Delivery::Gap {
                requested,
                resumed_from,
            } => reply.gaps.push(Gap {
                topic: topic.clone(),
                requested,
                resumed_from,
            }),
            // The group or its stream went away: answer with what there is.
            Delivery::End(_) => break,
        }
        if reply.messages.len() >= max {
            break;
        }
        next = merged.next().now_or_never().flatten();
    }
    reply.cursor = positions.map(|positions| positions.encode());
    Ok(Json(reply))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AckBody {
    /// `message_id`s from polls or WebSocket messages.
    #[schema(value_type = Vec<MessageIdSchema>)]
    message_ids: Vec<String>,
}

#[derive(Serialize, ToSchema)]
struct Acked {
    /// How many were pending and are now acknowledged.
    acked: u64,
}

/// Acknowledges messages by `message_id`, on any instance. Every id is checked before anything
/// is acknowledged: one garbled id makes the whole request a 400.
#[utoipa::path(
    post,
    path = "/api/v1/ack",
    tag = "consume",
    request_body(content = AckBody, example = json!({"message_ids": ["m1.WyJub3RpZmljYXRpb25zIiwid29ya2VycyIsIjE3MDAwMDAwMDAwMDAtMCJd.QK1GvI47"]})),
    responses((status = 200, description = "Acknowledged", body = Acked), Invalid, TooLarge, Conflicting, Guarded),
)]
async fn ack(
    State(state): State<AppState>,
    caller: Caller,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Acked>, ApiError> {
    let AckBody { message_ids } = parse_json(&body)?;
    let references = decode_all(&message_ids)?;
    Ok(Json(Acked {
        acked: acknowledge(&state, &caller, references).await?,
    }))
}

/// Decodes every token, or names the first that is not one.
pub(super) fn decode_all(tokens: &[String]) -> Result<Vec<MessageRef>, ApiError> {
    tokens
        .iter()
        .map(|token| {
            MessageRef::decode(token).ok_or_else(|| {
                let shown: String = token.chars().take(80).collect();
                ApiError::BadRequest(format!("`{shown}` is not a message_id from this server"))
            })
        })
        .collect()
}

/// Acknowledges group messages (broadcast messages need none); returns how many were pending.
pub(super) async fn acknowledge(
    state: &AppState,
    caller: &Caller,
    references: Vec<MessageRef>,
) -> Result<u64, ApiError> {
    let mut by_group: Vec<((StreamName, GroupName), Vec<EntryId>)> = Vec::new();
    for reference in references {
        caller.require(Scope::Consume, &reference.stream)?;
        let Some(group) = reference.group else {
            continue;
        };
        let key = (reference.stream, group);
        match by_group.iter_mut().find(|(known, _)| *known == key) {
            Some((_, ids)) => ids.push(reference.id),
            None => by_group.push((key, vec![reference.id])),
        }
    }
    let mut acked = 0;
    for ((stream, group), ids) in by_group {
        acked += state.groups.finish(&stream, &group, None, &ids).await?;
    }
    Ok(acked)
}
