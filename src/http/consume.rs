//! The consume core every transport shares (SPEC 3.2–3.4): what a client asks to consume, parsed
//! once into one typed [`ConsumeRequest`] whether it came as query parameters (SSE, long-poll) or
//! as a WebSocket `subscribe` frame; one place that checks it (scopes, the stream-count limit),
//! opens the group or broadcast subscriptions and maps their refusals to [`ApiError`]s; and the
//! deliveries as one `Stream` per stream, counted in the metrics. SSE, WebSocket and long-poll
//! only gather a request's words and encode [`Delivery`]s as their frames.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::stream_name;
use crate::auth::Scope;
use crate::backend::GroupStart;
use crate::delivery::EndReason;
use crate::delivery::cursor;
use crate::delivery::groups::{ConnectError, ConsumerSpec, GroupMessage, MAX_LIMIT, Mode};
use crate::delivery::hub::{Frame, HubEvent, Start, SubscribeError};
use crate::metrics;
use crate::model::{ConsumerName, EntryId, GroupName, StreamName};

/// Most streams one subscription may cover: one SSE connection, one poll, one WebSocket.
pub const MAX_STREAMS: usize = 64;

/// A request's words as a transport found them (query parameters, frame fields), before any is
/// checked.
#[derive(Debug, Default)]
pub struct Words {
    /// What the transport calls its streams, for error messages (`stream`, `topics`).
    pub streams_field: &'static str,
    pub streams: Vec<String>,
    pub group: Option<String>,
    pub consumer: Option<String>,
    pub limit: Option<String>,
    pub mode: Option<String>,
    /// Where to start: `0`, `$`, an entry id (one stream) or a cursor.
    pub from: Option<String>,
    /// Where a reconnecting client left off (`Last-Event-ID`, `lastEventId`, a poll's
    /// `cursor`): an entry id or a cursor; it wins over `from`.
    pub resume: Option<String>,
}

/// What a client asks to consume.
#[derive(Debug)]
pub struct ConsumeRequest {
    pub streams: Vec<StreamName>,
    pub kind: Kind,
}

/// As a consumer of a group, or as a broadcast subscriber.
#[derive(Debug)]
pub enum Kind {
    Group(GroupRequest),
    /// Where each stream starts, in the order of `streams`.
    Broadcast(Vec<Start>),
}

/// A consumer of a group on each stream.
#[derive(Debug, Clone)]
pub struct GroupRequest {
    pub group: GroupName,
    /// The consumer's name; generated when absent.
    pub consumer: Option<ConsumerName>,
    pub limit: Option<u32>,
    pub mode: Mode,
    /// Where the group starts if this request creates it.
    pub start: GroupStart,
    /// The id a reconnecting client last received: without a name, it comes back as the
    /// consumer that id was delivered to (its unfinished messages first), if that one is free.
    pub resume: Option<EntryId>,
    /// Wait a moment for a name still held by a subscription being replaced (WebSocket).
    pub replacing: bool,
}

impl ConsumeRequest {
    /// Checks every word: a bad one is a 400 naming it, whether or not it applies (a consumer
    /// name without a group is still checked, not silently ignored).
    pub fn parse(words: Words) -> Result<ConsumeRequest, ApiError> {
        let mut streams = Vec::new();
        for name in words.streams.iter().filter(|name| !name.is_empty()) {
            let stream = stream_name(name.as_str())?;
            if !streams.contains(&stream) {
                streams.push(stream);
            }
        }
        if streams.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "`{}` is required",
                words.streams_field
            )));
        }
        if streams.len() > MAX_STREAMS {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_STREAMS} streams per subscription"
            )));
        }
        let consumer = words
            .consumer
            .map(|name| {
                ConsumerName::parse(name).map_err(|error| {
                    ApiError::BadRequest(format!("invalid consumer name: {error}"))
                })
            })
            .transpose()?;
        let limit = words
            .limit
            .map(|text| {
                text.parse::<u32>()
                    .ok()
                    .filter(|limit| (1..=MAX_LIMIT).contains(limit))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "invalid `limit`: {text:?} (between 1 and {MAX_LIMIT})"
                        ))
                    })
            })
            .transpose()?;
        let mode = match words.mode.as_deref() {
            None | Some("at-least-once") => Mode::AtLeastOnce,
            Some("at-most-once") => Mode::AtMostOnce,
            Some(other) => return Err(ApiError::BadRequest(format!("invalid `mode`: {other:?}"))),
        };
        let kind = match words.group {
            Some(group) => {
                let group = GroupName::parse(group).map_err(|error| {
                    ApiError::BadRequest(format!("invalid group name: {error}"))
                })?;
                let start = match words.from.as_deref() {
                    None => GroupStart::After(EntryId::MIN),
                    Some(from) => group_start(from)
                        .ok_or_else(|| ApiError::BadRequest(format!("invalid `from`: {from:?}")))?,
                };
                // Other values (a broadcast cursor) are not a group's business: ignored.
                let resume = words.resume.and_then(|text| text.trim().parse().ok());
                Kind::Group(GroupRequest {
                    group,
                    consumer,
                    limit,
                    mode,
                    start,
                    resume,
                    replacing: false,
                })
            }
            None => Kind::Broadcast(broadcast_starts(
                &streams,
                words.from.as_deref(),
                words.resume.as_deref(),
            )?),
        };
        Ok(ConsumeRequest { streams, kind })
    }
}

/// Where a new group starts: `$` (new entries), `0` (the beginning) or after an id.
pub fn group_start(text: &str) -> Option<GroupStart> {
    match text {
        "$" => Some(GroupStart::Latest),
        "0" => Some(GroupStart::After(EntryId::MIN)),
        _ => EntryId::parse_bound(text, false)
            .ok()
            .map(GroupStart::After),
    }
}

/// Where each broadcast stream starts: after the resume point (an id with one stream, else a
/// cursor; a stream the cursor does not name starts as `from` says), else `from` (`0`, `$` = the
/// default, an id with one stream, or a cursor).
fn broadcast_starts(
    streams: &[StreamName],
    from: Option<&str>,
    resume: Option<&str>,
) -> Result<Vec<Start>, ApiError> {
    let bad_id = |text: &str| {
        ApiError::BadRequest(format!(
            "`{text}` is not an entry id or cursor from this server"
        ))
    };
    let resume = resume.map(str::trim).filter(|text| !text.is_empty());
    let (default, positions) = match (resume, from) {
        (Some(token), _) | (None, Some(token)) if token.starts_with("c1.") => {
            let positions =
                cursor::decode(token).map_err(|error| ApiError::BadRequest(error.to_string()))?;
            let default = match from {
                Some("0") => Start::Beginning,
                _ => Start::Latest,
            };
            (default, positions)
        }
        (Some(id), _) if streams.len() == 1 => {
            return Ok(vec![Start::After(id.parse().map_err(|_| bad_id(id))?)]);
        }
        (Some(other), _) => {
            return Err(ApiError::BadRequest(format!(
                "with several streams, resume with the cursor (got {other:?})"
            )));
        }
        (None, None | Some("$")) => (Start::Latest, Vec::new()),
        (None, Some("0")) => (Start::Beginning, Vec::new()),
        (None, Some(id)) if streams.len() == 1 => {
            let id = EntryId::parse_bound(id, false).map_err(|_| bad_id(id))?;
            return Ok(vec![Start::After(id)]);
        }
        (None, Some(other)) => {
            return Err(ApiError::BadRequest(format!(
                "with several streams `from` takes only 0 or $ (got {other:?}); resume with the cursor"
            )));
        }
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

/// What a subscription yields.
pub enum Delivery {
    /// A group message: at-least-once, pending until finished.
    Message(GroupMessage),
    /// A broadcast message, encoded once for every subscriber ([`Frame::encoded`]).
    Broadcast(Arc<Frame>),
    /// Entries after `requested` were removed: delivery resumes from `resumed_from`.
    Gap {
        requested: EntryId,
        resumed_from: EntryId,
    },
    /// The server ended the subscription on purpose; nothing follows.
    End(EndReason),
}

/// One stream's subscription, as opened.
pub struct Opened {
    pub stream: StreamName,
    /// The group and this connection's consumer name in it (group subscriptions).
    pub group: Option<(GroupName, ConsumerName)>,
    /// Where a broadcast subscription starts (for cursors).
    pub position: EntryId,
    pub deliveries: BoxStream<'static, Delivery>,
}

/// Opens `request` for `caller`, counting what it delivers under `transport`.
pub async fn open(
    state: &AppState,
    caller: &Caller,
    request: ConsumeRequest,
    transport: &'static str,
) -> Result<Vec<Opened>, ApiError> {
    for stream in &request.streams {
        caller.require(Scope::Consume, stream)?;
    }
    let mut opened = Vec::with_capacity(request.streams.len());
    match request.kind {
        Kind::Group(group) => {
            for stream in request.streams {
                opened.push(open_group(state, stream, &group, transport).await?);
            }
        }
        Kind::Broadcast(starts) => {
            for (stream, start) in request.streams.into_iter().zip(starts) {
                opened.push(open_broadcast(state, stream, start, transport).await?);
            }
        }
    }
    Ok(opened)
}

/// Where each of several broadcast subscriptions starts, as the cursor their events carry.
pub fn positions(opened: &[Opened]) -> cursor::Positions {
    cursor::Positions::new(
        opened
            .iter()
            .map(|opened| (opened.stream.clone(), opened.position))
            .collect(),
    )
}

/// The deliveries of several subscriptions, interleaved as they come, each with the index of
/// the subscription it came from.
pub fn merge(opened: Vec<Opened>) -> BoxStream<'static, (usize, Delivery)> {
    futures_util::stream::select_all(
        opened
            .into_iter()
            .enumerate()
            .map(|(index, opened)| opened.deliveries.map(move |delivery| (index, delivery))),
    )
    .boxed()
}

async fn open_group(
    state: &AppState,
    stream: StreamName,
    request: &GroupRequest,
    transport: &'static str,
) -> Result<Opened, ApiError> {
    let resumed = match (&request.consumer, request.resume) {
        (None, Some(id)) if request.mode == Mode::AtLeastOnce => {
            state.groups.owner_of(&stream, &request.group, id).await?
        }
        _ => None,
    };
    let spec = ConsumerSpec {
        stream: stream.clone(),
        group: request.group.clone(),
        consumer: request.consumer.clone().or(resumed.clone()),
        limit: request.limit,
        start: request.start,
        mode: request.mode,
    };
    let mut attempts = 0;
    let connected = loop {
        match state.groups.connect(spec.clone()).await {
            // The consumer a reconnect would resume is connected elsewhere: a new one after all.
            Err(ConnectError::Duplicate(_)) if resumed.is_some() => {
                let fresh = ConsumerSpec {
                    consumer: None,
                    ..spec.clone()
                };
                break state.groups.connect(fresh).await;
            }
            // The subscription being replaced lets go of its name in the background.
            Err(ConnectError::Duplicate(_)) if request.replacing && attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            connected => break connected,
        }
    };
    let subscription = connected.map_err(|error| match error {
        ConnectError::Duplicate(name) => ApiError::Conflict(format!(
            "consumer `{name}` is already connected to {stream} in this group (here or on another instance)"
        )),
        ConnectError::Backend(error) => error.into(),
    })?;
    let group = Some((subscription.group.clone(), subscription.consumer.clone()));
    let metrics = state.metrics.clone();
    let mode = match request.mode {
        Mode::AtLeastOnce => metrics::mode::AT_LEAST_ONCE,
        Mode::AtMostOnce => metrics::mode::AT_MOST_ONCE,
    };
    // The messages, then the end when the group or its stream goes away.
    let deliveries = futures_util::stream::unfold(Some(subscription), move |subscription| {
        let metrics = metrics.clone();
        async move {
            let mut subscription = subscription?;
            match subscription.next().await {
                Some(message) => {
                    metrics.delivered(transport, mode, &message.entry);
                    Some((Delivery::Message(message), Some(subscription)))
                }
                None => Some((Delivery::End(subscription.end_reason()?), None)),
            }
        }
    })
    .boxed();
    Ok(Opened {
        stream,
        group,
        position: EntryId::MIN,
        deliveries,
    })
}

async fn open_broadcast(
    state: &AppState,
    stream: StreamName,
    start: Start,
    transport: &'static str,
) -> Result<Opened, ApiError> {
    let subscription = state
        .hub
        .subscribe(&stream, start)
        .await
        .map_err(|error| match error {
            SubscribeError::FutureId { requested, last } => ApiError::BadRequest(format!(
                "cannot resume {stream} after {requested}: its last id is {last}"
            )),
            SubscribeError::Backend(error) => error.into(),
        })?;
    let position = subscription.position();
    let metrics = state.metrics.clone();
    let deliveries = futures_util::stream::unfold(subscription, move |mut subscription| {
        let metrics = metrics.clone();
        async move {
            let delivery = match subscription.next().await? {
                HubEvent::Message(frame) => {
                    metrics.delivered(transport, metrics::mode::BROADCAST, &frame.entry);
                    Delivery::Broadcast(frame)
                }
                HubEvent::Gap {
                    requested,
                    resumed_from,
                } => Delivery::Gap {
                    requested,
                    resumed_from,
                },
            };
            Some((delivery, subscription))
        }
    })
    .boxed();
    Ok(Opened {
        stream,
        group: None,
        position,
        deliveries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(streams: &[&str]) -> Words {
        Words {
            streams_field: "stream",
            streams: streams.iter().map(|name| name.to_string()).collect(),
            ..Words::default()
        }
    }

    fn starts(words: Words) -> Result<Vec<Start>, ApiError> {
        match ConsumeRequest::parse(words)?.kind {
            Kind::Broadcast(starts) => Ok(starts),
            Kind::Group(_) => panic!("a group request"),
        }
    }

    #[test]
    fn broadcast_starts_follow_resume_then_from() {
        let id: EntryId = "5-1".parse().unwrap();
        let one = |from: Option<&str>, resume: Option<&str>| {
            starts(Words {
                from: from.map(str::to_owned),
                resume: resume.map(str::to_owned),
                ..words(&["a"])
            })
        };
        assert_eq!(one(None, None).unwrap(), [Start::Latest]);
        assert_eq!(one(Some("0"), None).unwrap(), [Start::Beginning]);
        assert_eq!(one(Some("5-1"), None).unwrap(), [Start::After(id)]);
        assert_eq!(one(Some("0"), Some("5-1")).unwrap(), [Start::After(id)]);
        assert!(one(Some("soon"), None).is_err());
        let several = |from: &str| {
            starts(Words {
                from: Some(from.to_owned()),
                ..words(&["a", "b"])
            })
        };
        assert_eq!(several("0").unwrap(), [Start::Beginning, Start::Beginning]);
        assert!(several("5-1").is_err());
    }

    #[test]
    fn every_word_is_checked_and_streams_are_bounded() {
        let too_many: Vec<String> = (0..=MAX_STREAMS).map(|n| format!("s{n}")).collect();
        let refused = ConsumeRequest::parse(Words {
            streams: too_many,
            ..words(&[])
        });
        assert!(refused.is_err());
        assert!(ConsumeRequest::parse(words(&[])).is_err());
        for bad in [
            Words {
                limit: Some("0".into()),
                ..words(&["a"])
            },
            Words {
                mode: Some("sometimes".into()),
                ..words(&["a"])
            },
            Words {
                consumer: Some(String::new()),
                ..words(&["a"])
            },
        ] {
            assert!(ConsumeRequest::parse(bad).is_err());
        }
        let duplicates = ConsumeRequest::parse(words(&["a", "a", "b"])).unwrap();
        assert_eq!(duplicates.streams.len(), 2);
    }
}
