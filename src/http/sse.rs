//! Server-Sent Events: frames encoded once as bytes (never re-serialized per subscriber), and
//! the response shape every SSE route shares (headers sent at once, keep-alive comments, end on
//! shutdown).
//!
//! axum's `sse::Event` is not used: it re-encodes for every subscriber and panics on CR/LF in
//! `id`/`event` (see PITFALLS.md).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::delivery::EndReason;

/// The comment sent when nothing else has been sent for a keep-alive interval. A comment line
/// alone, without the blank line that ends an event: a block with no `data` dispatches nothing
/// in a browser, but common SSE clients (Python `httpx-sse`, Go `r3labs/sse`) yield it as an
/// empty event, which their users then fail to parse. The line becomes part of the next event's
/// block, where every client ignores it.
const KEEPALIVE: &[u8] = b": keepalive\n";

/// What every SSE response starts with. `retry:` asks browsers to reconnect after one second
/// (their default is three); like the keep-alive, it is not followed by a blank line (a client
/// applies `retry` as it reads the line, and a block of its own would be an empty event to the
/// clients above).
const OPENING: &[u8] = b": connected\nretry: 1000\n";

/// Appends `field: value` lines; a value with line breaks becomes several lines of the same
/// field (SSE joins them with `\n`, so JSON stays valid: line breaks in JSON text are only ever
/// whitespace).
fn put_field(frame: &mut BytesMut, field: &[u8], value: &[u8]) {
    if memchr::memchr2(b'\n', b'\r', value).is_none() {
        // The usual case (compact JSON): one line.
        frame.put_slice(field);
        frame.put_slice(b": ");
        frame.put_slice(value);
        frame.put_u8(b'\n');
        return;
    }
    for line in value.split(|&byte| byte == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        for part in line.split(|&byte| byte == b'\r') {
            frame.put_slice(field);
            frame.put_slice(b": ");
            frame.put_slice(part);
            frame.put_u8(b'\n');
        }
    }
}

/// One event: optional `event:` type, optional `id:`, and the data.
pub fn frame(event: Option<&str>, id: Option<&str>, data: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(data.len() + 64);
    if let Some(event) = event {
        put_field(&mut frame, b"event", event.as_bytes());
    }
    if let Some(id) = id {
        put_field(&mut frame, b"id", id.as_bytes());
    }
    put_field(&mut frame, b"data", data);
    frame.put_u8(b'\n');
    frame.freeze()
}

/// A JSON string literal.
pub fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// What ends a stream besides its own events: shutdown, and the expiry of the credential that
/// opened it.
pub struct Ends {
    pub shutdown: CancellationToken,
    /// How long until the credential expires.
    pub valid_for: Option<Duration>,
}

/// The last event of a stream the server ends on purpose: `event: end` with the reason.
pub fn end_frame(reason: EndReason) -> Bytes {
    let data = format!(r#"{{"reason":"{}"}}"#, reason.as_str());
    frame(Some("end"), None, data.as_bytes())
}

/// An SSE response over `events`, with keep-alive comments every `keepalive` (if set), ending
/// when `events` ends, or with an `event: end` frame at shutdown or when the credential expires
/// (`ends`). The first bytes go out at once, so clients see the headers without waiting for a
/// message. `guard` (a connection permit, a counter) lives as long as the response body.
pub fn response<G: Send + Unpin + 'static>(
    events: BoxStream<'static, Bytes>,
    keepalive: Option<Duration>,
    ends: Ends,
    extra_headers: Vec<(HeaderName, HeaderValue)>,
    guard: G,
) -> Response {
    let body = EventStream {
        events,
        keepalive: keepalive.map(KeepAlive::new),
        shutdown: Box::pin(ends.shutdown.cancelled_owned()),
        expiry: ends
            .valid_for
            .map(|left| Box::pin(tokio::time::sleep(left))),
        started: false,
        ended: false,
        _guard: guard,
    };
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    for (name, value) in extra_headers {
        headers.insert(name, value);
    }
    response
}

/// An SSE response body. Written by hand rather than as an async block: it lives as long as the
/// stream, once per idle subscriber, and as a plain struct it holds each piece of state once
/// (an async block holds its state and a future over it).
struct EventStream<G> {
    events: BoxStream<'static, Bytes>,
    /// Set when keep-alives are on.
    keepalive: Option<KeepAlive>,
    /// Made once (registering with the token once, not once per event).
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Set when the credential expires (boxed: most streams have none).
    expiry: Option<Pin<Box<Sleep>>>,
    started: bool,
    ended: bool,
    _guard: G,
}

impl<G: Unpin> Stream for EventStream<G> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if !this.started {
            this.started = true;
            return Poll::Ready(Some(Ok(Bytes::from_static(OPENING))));
        }
        // In this order: an end wins over events, and a keep-alive is sent only when nothing
        // else is.
        let expired = |expiry: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>| {
            expiry
                .as_mut()
                .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
        };
        let next = if this.shutdown.as_mut().poll(cx).is_ready() {
            this.ended = true;
            Some(end_frame(EndReason::Shutdown))
        } else if expired(&mut this.expiry, cx) {
            this.ended = true;
            Some(end_frame(EndReason::TokenExpired))
        } else if let Poll::Ready(event) = this.events.poll_next_unpin(cx) {
            event
        } else if this
            .keepalive
            .as_mut()
            .is_some_and(|keepalive| keepalive.poll_due(cx).is_ready())
        {
            Some(Bytes::from_static(KEEPALIVE))
        } else {
            return Poll::Pending;
        };
        if let (Some(_), Some(keepalive)) = (&next, this.keepalive.as_mut()) {
            keepalive.sent();
        }
        Poll::Ready(next.map(Ok))
    }
}

/// When the next keep-alive comment is due. Sending an event only notes the time; the timer is
/// moved when it fires early, so a busy stream does not re-arm a timer for every event.
struct KeepAlive {
    period: Duration,
    last_sent: Instant,
    timer: Pin<Box<Sleep>>,
}

impl KeepAlive {
    fn new(period: Duration) -> KeepAlive {
        let now = Instant::now();
        KeepAlive {
            period,
            last_sent: now,
            timer: Box::pin(tokio::time::sleep_until(now + period)),
        }
    }

    fn sent(&mut self) {
        self.last_sent = Instant::now();
    }

    /// Ready when a keep-alive is due: `period` after the last bytes sent.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            std::task::ready!(self.timer.as_mut().poll(cx));
            let due_at = self.last_sent + self.period;
            if Instant::now() >= due_at {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(due_at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalives_come_only_after_a_quiet_period() {
        let period = Duration::from_millis(300);
        let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(8);
        let events = tokio_stream::wrappers::ReceiverStream::new(receiver);
        let ends = Ends {
            shutdown: CancellationToken::new(),
            valid_for: None,
        };
        let response = response(events.boxed(), Some(period), ends, vec![], ());
        let mut body = response.into_body().into_data_stream();
        let first = body.next().await.unwrap().unwrap();
        assert!(first.starts_with(b": connected"));
        // Busy: an event every 100 ms for a second, never a keep-alive in between.
        for n in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            sender
                .send(frame(None, None, n.to_string().as_bytes()))
                .await
                .unwrap();
            let next = body.next().await.unwrap().unwrap();
            assert_ne!(next, Bytes::from_static(KEEPALIVE), "after {n} events");
        }
        // Quiet: the keep-alive comes one period after the last event, not before.
        let quiet = Instant::now();
        let next = tokio::time::timeout(Duration::from_secs(2), body.next())
            .await
            .expect("a keep-alive")
            .unwrap()
            .unwrap();
        assert_eq!(next, Bytes::from_static(KEEPALIVE));
        assert!(
            quiet.elapsed() >= period - Duration::from_millis(20),
            "{:?}",
            quiet.elapsed()
        );
        drop(sender);
    }

    #[test]
    fn frames_split_data_lines() {
        assert_eq!(
            frame(None, Some("1-0"), b"{\"a\":1}"),
            Bytes::from_static(b"id: 1-0\ndata: {\"a\":1}\n\n")
        );
        assert_eq!(
            frame(Some("gap"), None, b"{\n \"a\": 1\r\n}"),
            Bytes::from_static(b"event: gap\ndata: {\ndata:  \"a\": 1\ndata: }\n\n")
        );
        assert_eq!(
            frame(None, None, b"a\rb"),
            Bytes::from_static(b"data: a\ndata: b\n\n")
        );
    }
}
