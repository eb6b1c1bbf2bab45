//! `GET /ws`: seed 004's WebSocket protocol, JSON text frames. A client subscribes to topics
//! (as a consumer of a group, or as a broadcast subscriber), acknowledges, publishes and pings
//! on one socket; every reply echoes the request's optional `ref`. A malformed frame gets an
//! `error` reply and the socket stays usable.
//!
//! One task per socket: it reads client frames and forwards what its subscriptions yield. The
//! subscriptions are the same delivery core SSE uses (a transport is a thin adapter). Buffers are
//! small (tungstenite's default is 128 KiB each way), so idle sockets are cheap.

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{SinkExt, StreamExt};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_stream::StreamMap;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::consume::{self, ConsumeRequest, Delivery, Kind, MAX_STREAMS, Opened, Words};
use super::error::ApiError;
use super::extract::QueryPairs;
use super::message_id::MessageRef;
use super::openapi::{Conflicting, Guarded, Invalid};
use super::poll::{acknowledge, decode_all};
use super::produce::{TopicMessage, publish_one, v1_message_id};
use super::sse::json_string;
use crate::delivery::hub::Frame;
use crate::metrics;
use crate::model::{ConsumerName, Entry, EntryId, GroupName, StreamName};

/// The frame cache slot of a broadcast message's WebSocket encoding.
const SLOT_WS: usize = 2;
/// Socket buffer sizes (reads; writes are flushed past this size). Client frames are small
/// commands; a larger one is read in several steps.
const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 8 * 1024;
/// A socket that cannot take a frame for this long is closed with 1013 (try again later).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Close codes.
const POLICY_VIOLATION: u16 = 1008;
const SERVICE_RESTART: u16 = 1012;
const TRY_AGAIN_LATER: u16 = 1013;
/// How long the closing handshake waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(upgrade))
}

/// Seed 004's WebSocket: JSON text frames to `subscribe` (to topics, as a group consumer or a
/// broadcast subscriber), `ack`, `publish`, `ping` and `unsubscribe`, each answered with an
/// optional `ref` echoed; messages arrive as `{"type":"message",…}`. See the README for the
/// frames. Over the connection cap the socket opens and closes at once with 1013.
#[utoipa::path(
    get,
    path = "/ws",
    tag = "consume",
    security(("bearer" = []), ("query_token" = [])),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        Invalid, Conflicting, Guarded,
    ),
)]
async fn upgrade(
    State(state): State<AppState>,
    caller: Caller,
    query: QueryPairs,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // What to consume comes in frames; the query carries at most a token.
    query.accept_only(&[])?;
    let upgrade = upgrade.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    // The drain waits for every session, as for any connection.
    let tracked = state.sessions.token();
    let Ok(permit) = state.streaming_permit() else {
        // Over the connection cap. A browser never sees an upgrade's HTTP status, only the close
        // code, so the socket opens and closes at once with 1013 (try again later).
        return Ok(upgrade.on_upgrade(|socket| async move {
            let (mut sink, mut incoming) = socket.split();
            close(
                &mut sink,
                &mut incoming,
                TRY_AGAIN_LATER,
                "at capacity, retry in 1 s",
            )
            .await;
            drop(tracked);
        }));
    };
    let connection = state.connections.open_websocket();
    let max_message = state.config.limits.max_body_bytes;
    Ok(upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + max_message + 1024)
        .max_message_size(max_message)
        .max_frame_size(max_message)
        // Split here, not in an async block: a future holds what it is given for as long as it
        // lives, and the whole socket is most of an idle session's memory.
        .on_upgrade(move |socket| {
            let (sink, incoming) = socket.split();
            session(sink, incoming, state, caller, (permit, connection, tracked))
        }))
}

/// What the socket task forwards from a subscription: a frame to send.
type Outgoing = BoxStream<'static, Utf8Bytes>;

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;
type Incoming = futures_util::stream::SplitStream<WebSocket>;

/// One WebSocket's life; `guard` (its permit, its place in the counts and the drain) is dropped
/// when it ends.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep a second copy of its arguments"
)]
fn session<G: Send + 'static>(
    mut sink: Sink,
    mut incoming: Incoming,
    state: AppState,
    caller: Caller,
    guard: G,
) -> impl Future<Output = ()> + Send {
    // An async block, not an async fn: what it captures is its state, where an async fn keeps a
    // second copy of each argument for as long as it lives (measured: 824 B against 624).
    async move {
        // Named here so the block captures it: it lives as long as the session.
        let _guard = &guard;
        let mut subscriptions: StreamMap<StreamName, Outgoing> = StreamMap::new();
        let expires = caller
            .0
            .valid_for()
            .map(|left| Box::pin(tokio::time::sleep(left)));
        let expired = async {
            match expires {
                Some(sleep) => sleep.await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        loop {
            let replies: Vec<Utf8Bytes> = tokio::select! {
                _ = state.shutdown.cancelled() => {
                    Box::pin(close(&mut sink, &mut incoming, SERVICE_RESTART, "server restarting")).await;
                    return;
                }
                _ = &mut expired => {
                    Box::pin(close(&mut sink, &mut incoming, POLICY_VIOLATION, "token expired")).await;
                    return;
                }
                frame = incoming.next() => match frame {
                    // Boxed: the handler's state is large and exists only while a frame is handled,
                    // so an idle socket's task stays small.
                    Some(Ok(Message::Text(text))) => Box::pin(handle(&state, &caller, &mut subscriptions, text)).await,
                    Some(Ok(Message::Binary(_))) => vec![error_frame(None, "unsupported", "send JSON text frames")],
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) => {
                        // The client began the closing handshake: the reply tungstenite queued goes
                        // out with this flush, so the client sees a clean close.
                        let _ = Box::pin(tokio::time::timeout(CLOSE_WAIT, sink.close())).await;
                        return;
                    }
                    Some(Err(_)) | None => return,
                },
                Some((_, frame)) = subscriptions.next(), if !subscriptions.is_empty() => vec![frame],
            };
            for reply in replies {
                match tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Text(reply))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        Box::pin(close(
                            &mut sink,
                            &mut incoming,
                            TRY_AGAIN_LATER,
                            "too slow to keep up",
                        ))
                        .await;
                        return;
                    }
                }
            }
        }
    }
}

/// The server's side of the closing handshake: its close frame, then what the client still sends
/// is read (and dropped) until the client's close frame or [`CLOSE_WAIT`]. Closing the socket
/// with unread input would reset the connection, and a client that was sending at that moment
/// would lose the close frame unread.
async fn close(sink: &mut Sink, incoming: &mut Incoming, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if sink.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = incoming.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// What every client frame has: its kind, and the `ref` a reply echoes (raw, as sent).
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: FrameKind,
    #[serde(rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
}

/// A frame's `type`.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum FrameKind {
    Subscribe,
    Unsubscribe,
    Ack,
    Publish,
    Ping,
    #[serde(other)]
    Unknown,
}

/// A client frame: one JSON object, its kind named by `type`.
enum ClientFrame<'a> {
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Ack(Ack),
    Publish(Publish<'a>),
    Ping,
}

impl<'a> ClientFrame<'a> {
    /// The frame of `kind` in `bytes` (its envelope already read). Each kind is read straight
    /// into its own fields rather than through `#[serde(tag)]`, which would first copy the whole
    /// object into a buffer of its own — a publish's payload included — and cannot hold the raw
    /// payload a publish stores exactly as received. `None` for an unknown kind.
    fn parse(kind: FrameKind, bytes: &'a [u8]) -> Option<serde_json::Result<ClientFrame<'a>>> {
        Some(match kind {
            FrameKind::Subscribe => serde_json::from_slice(bytes).map(ClientFrame::Subscribe),
            FrameKind::Unsubscribe => serde_json::from_slice(bytes).map(ClientFrame::Unsubscribe),
            FrameKind::Ack => serde_json::from_slice(bytes).map(ClientFrame::Ack),
            FrameKind::Publish => serde_json::from_slice(bytes).map(ClientFrame::Publish),
            FrameKind::Ping => serde_json::from_slice::<Ping>(bytes).map(|_| ClientFrame::Ping),
            FrameKind::Unknown => return None,
        })
    }
}

// Each kind refuses fields it does not know, naming them (a typo such as `grop` must not turn a
// group consumer into a broadcast subscriber); so each declares the envelope's `type` and `ref`
// too, read already.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Subscribe {
    #[serde(rename = "type", default)]
    _kind: IgnoredAny,
    #[serde(rename = "ref", default)]
    _reference: IgnoredAny,
    topics: Vec<String>,
    group: Option<String>,
    client_id: Option<String>,
    from: Option<String>,
    limit: Option<u32>,
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Unsubscribe {
    #[serde(rename = "type", default)]
    _kind: IgnoredAny,
    #[serde(rename = "ref", default)]
    _reference: IgnoredAny,
    topics: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ack {
    #[serde(rename = "type", default)]
    _kind: IgnoredAny,
    #[serde(rename = "ref", default)]
    _reference: IgnoredAny,
    message_id: Option<String>,
    message_ids: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Publish<'a> {
    #[serde(rename = "type", default)]
    _kind: IgnoredAny,
    #[serde(rename = "ref", default)]
    _reference: IgnoredAny,
    topic: String,
    /// Borrowed from the frame's bytes: stored exactly as received.
    #[serde(borrow)]
    payload: &'a RawValue,
    ttl: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ping {
    #[serde(rename = "type", default)]
    _kind: IgnoredAny,
    #[serde(rename = "ref", default)]
    _reference: IgnoredAny,
}

/// Handles one client frame; returns the replies.
async fn handle(
    state: &AppState,
    caller: &Caller,
    subscriptions: &mut StreamMap<StreamName, Outgoing>,
    text: Utf8Bytes,
) -> Vec<Utf8Bytes> {
    // A publish's payload borrows from these bytes.
    let bytes = Bytes::from(text);
    let envelope: Envelope = match serde_json::from_slice(&bytes) {
        Ok(envelope) => envelope,
        Err(error) => {
            return vec![error_frame(
                None,
                "invalid_frame",
                &format!("expected a JSON object with a `type`: {error}"),
            )];
        }
    };
    let reference = envelope.reference;
    let outcome = match ClientFrame::parse(envelope.kind, &bytes) {
        None => Err((
            "unknown_type",
            "unknown frame type: expected subscribe, unsubscribe, ack, publish or ping".to_owned(),
        )),
        Some(Err(error)) => Err(("invalid_frame", error.to_string())),
        Some(Ok(ClientFrame::Subscribe(frame))) => {
            subscribe(state, caller, subscriptions, frame, reference).await
        }
        Some(Ok(ClientFrame::Unsubscribe(frame))) => unsubscribe(subscriptions, frame, reference),
        Some(Ok(ClientFrame::Ack(frame))) => ack(state, caller, frame, reference).await,
        Some(Ok(ClientFrame::Publish(frame))) => {
            publish(state, caller, &bytes, frame, reference).await
        }
        Some(Ok(ClientFrame::Ping)) => Ok(Reply::Pong.encode(reference)),
    };
    match outcome {
        Ok(reply) => vec![reply],
        Err((code, message)) => vec![error_frame(reference, code, &message)],
    }
}

type Outcome = Result<Utf8Bytes, (&'static str, String)>;

/// A failure of the REST-shared code, as an `error` reply's code and message.
fn from_api(error: ApiError) -> (&'static str, String) {
    let code = match &error {
        ApiError::BadRequest(_) => "bad_request",
        ApiError::Unauthorized { .. } => "unauthorized",
        ApiError::Forbidden(_) => "forbidden",
        ApiError::NotFound(_) => "not_found",
        ApiError::Conflict(_) => "conflict",
        ApiError::PayloadTooLarge(_) => "payload_too_large",
        ApiError::TooManyRequests { .. } => "rate_limited",
        ApiError::AtCapacity(_) | ApiError::Unavailable { .. } => "unavailable",
        ApiError::MethodNotAllowed | ApiError::Internal(_) => "internal",
    };
    let message = match &error {
        ApiError::Unavailable { .. } => "the backend is unavailable; retry later".to_owned(),
        ApiError::Internal(cause) => {
            tracing::error!(%cause, "internal error on a WebSocket");
            "internal error".to_owned()
        }
        other => other.to_string(),
    };
    (code, message)
}

/// What the server sends besides messages (those are encoded by hand, once per message for
/// every subscriber: see [`message_frame`]).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Reply<'a> {
    Subscribed {
        topics: &'a [StreamName],
        #[serde(skip_serializing_if = "Option::is_none")]
        group: Option<&'a GroupName>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a ConsumerName>,
    },
    Unsubscribed {
        topics: &'a [StreamName],
    },
    Ack {
        acked: u64,
    },
    Published {
        topic: &'a StreamName,
        message_id: String,
    },
    Pong,
    Gap {
        topic: &'a StreamName,
        requested: EntryId,
        resumed_from: EntryId,
    },
    Error {
        code: &'a str,
        message: &'a str,
        /// Why a subscription ended (`subscription_ended`).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        topic: Option<&'a StreamName>,
    },
}

impl Reply<'_> {
    /// The reply as a text frame, echoing the request's `ref`.
    fn encode(&self, reference: Option<&RawValue>) -> Utf8Bytes {
        #[derive(Serialize)]
        struct Envelope<'a, 'b> {
            #[serde(flatten)]
            reply: &'a Reply<'b>,
            #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
            reference: Option<&'a RawValue>,
        }
        let envelope = Envelope {
            reply: self,
            reference,
        };
        // Names, ids and text: nothing here fails to serialize.
        serde_json::to_string(&envelope)
            .map(Utf8Bytes::from)
            .unwrap_or_else(|_| Utf8Bytes::from_static(r#"{"type":"error","code":"internal"}"#))
    }
}

fn error_frame(reference: Option<&RawValue>, code: &str, message: &str) -> Utf8Bytes {
    Reply::Error {
        code,
        message,
        reason: None,
        topic: None,
    }
    .encode(reference)
}

async fn subscribe(
    state: &AppState,
    caller: &Caller,
    subscriptions: &mut StreamMap<StreamName, Outgoing>,
    frame: Subscribe,
    reference: Option<&RawValue>,
) -> Outcome {
    let words = Words {
        streams_field: "topics",
        streams: frame.topics,
        group: frame.group,
        consumer: frame.client_id,
        limit: frame.limit.map(|limit| limit.to_string()),
        mode: frame.mode,
        from: frame.from,
        resume: None,
    };
    let mut request = ConsumeRequest::parse(words).map_err(from_api)?;
    let others = request
        .streams
        .iter()
        .filter(|topic| !subscriptions.contains_key(*topic))
        .count();
    if subscriptions.len() + others > MAX_STREAMS {
        return Err((
            "bad_request",
            format!("at most {MAX_STREAMS} topics per socket"),
        ));
    }
    // Subscribing to a topic again replaces the earlier subscription: the old one lets go of its
    // consumer name first (its lease is released in the background, so a name it held is
    // waited for a moment).
    let mut replacing = false;
    for topic in &request.streams {
        replacing |= subscriptions.remove(topic).is_some();
    }
    if let Kind::Group(group) = &mut request.kind {
        group.replacing = replacing;
    }
    let topics = request.streams.clone();
    let opened = consume::open(state, caller, request, metrics::transport::WEBSOCKET)
        .await
        .map_err(from_api)?;
    let group = opened.first().and_then(|opened| opened.group.clone());
    let reply = Reply::Subscribed {
        topics: &topics,
        group: group.as_ref().map(|(group, _)| group),
        client_id: group.as_ref().map(|(_, consumer)| consumer),
    }
    .encode(reference);
    for opened in opened {
        subscriptions.insert(opened.stream.clone(), frames(opened));
    }
    Ok(reply)
}

/// A subscription's deliveries as frames; a broadcast message's frame is encoded once for every
/// WebSocket subscriber. If the group or its stream goes away, an `error` frame with code
/// `subscription_ended` and the `reason` (as SSE's `event: end`) is the last.
fn frames(opened: Opened) -> Outgoing {
    let stream = opened.stream;
    let group = opened.group.map(|(group, _)| group);
    opened
        .deliveries
        .map(move |delivery| match delivery {
            Delivery::Message(message) => {
                let reference = MessageRef {
                    stream: stream.clone(),
                    group: group.clone(),
                    id: message.entry.id,
                };
                message_frame(
                    &stream,
                    &reference.encode(),
                    &message.entry,
                    Some(message.deliveries),
                )
            }
            Delivery::Broadcast(frame) => {
                let bytes = frame.encoded(SLOT_WS, broadcast_frame);
                // Encoded from valid UTF-8 text, so this does not fail.
                Utf8Bytes::try_from(bytes).unwrap_or_else(|_| Utf8Bytes::from_static("{}"))
            }
            Delivery::Gap {
                requested,
                resumed_from,
            } => Reply::Gap {
                topic: &stream,
                requested,
                resumed_from,
            }
            .encode(None),
            Delivery::End(reason) => Reply::Error {
                code: "subscription_ended",
                message: &format!(
                    "the subscription to {stream} ended ({}); subscribe again to recreate it",
                    reason.as_str()
                ),
                reason: Some(reason.as_str()),
                topic: Some(&stream),
            }
            .encode(None),
        })
        .boxed()
}

fn broadcast_frame(frame: &Frame) -> Bytes {
    let message_id = v1_message_id(&frame.stream, frame.id());
    Bytes::from(message_frame(
        &frame.stream,
        &message_id,
        &frame.entry,
        None,
    ))
}

/// `{"type":"message","topic","message_id","payload"[,"fields"][,"deliveries"]}`: `fields` as
/// history shows an entry's fields beside its body.
fn message_frame(
    topic: &StreamName,
    message_id: &str,
    entry: &Entry,
    deliveries: Option<u64>,
) -> Utf8Bytes {
    let body = entry.body_json();
    let payload = String::from_utf8_lossy(&body);
    let mut text =
        String::with_capacity(payload.len() + topic.as_str().len() + message_id.len() + 64);
    text.push_str(r#"{"type":"message","topic":"#);
    text.push_str(&json_string(topic.as_str()));
    text.push_str(r#","message_id":""#);
    text.push_str(message_id);
    text.push_str(r#"","payload":"#);
    text.push_str(&payload);
    if let Some(fields) = entry.extra_fields_json() {
        text.push_str(r#","fields":"#);
        text.push_str(&String::from_utf8_lossy(&fields));
    }
    if let Some(deliveries) = deliveries {
        text.push_str(&format!(r#","deliveries":{deliveries}"#));
    }
    text.push('}');
    Utf8Bytes::from(text)
}

fn unsubscribe(
    subscriptions: &mut StreamMap<StreamName, Outgoing>,
    request: Unsubscribe,
    reference: Option<&RawValue>,
) -> Outcome {
    let mut removed = Vec::new();
    for topic in request.topics {
        if let Ok(topic) = StreamName::parse(topic)
            && subscriptions.remove(&topic).is_some()
        {
            removed.push(topic);
        }
    }
    Ok(Reply::Unsubscribed { topics: &removed }.encode(reference))
}

async fn ack(
    state: &AppState,
    caller: &Caller,
    request: Ack,
    reference: Option<&RawValue>,
) -> Outcome {
    let tokens: Vec<String> = request
        .message_id
        .into_iter()
        .chain(request.message_ids.into_iter().flatten())
        .collect();
    if tokens.is_empty() {
        return Err(("bad_request", "give `message_id` or `message_ids`".into()));
    }
    let references =
        decode_all(&tokens).map_err(|error| ("invalid_message_id", error.to_string()))?;
    let acked = acknowledge(state, caller, references)
        .await
        .map_err(from_api)?;
    Ok(Reply::Ack { acked }.encode(reference))
}

async fn publish(
    state: &AppState,
    caller: &Caller,
    body: &Bytes,
    request: Publish<'_>,
    reference: Option<&RawValue>,
) -> Outcome {
    // The payload is stored exactly as received, borrowed from the frame's bytes (`body`).
    let message = TopicMessage {
        topic: request.topic,
        payload: request.payload,
        ttl: request.ttl,
    };
    let (topic, outcome) = publish_one(
        state,
        caller,
        body,
        message,
        None,
        metrics::source::WEBSOCKET,
    )
    .await
    .map_err(from_api)?;
    let id = outcome
        .ids
        .first()
        .copied()
        .ok_or(("internal", "no id".to_owned()))?;
    let message_id = v1_message_id(&topic, id);
    Ok(Reply::Published {
        topic: &topic,
        message_id,
    }
    .encode(reference))
}
