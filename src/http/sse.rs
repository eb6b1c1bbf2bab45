//! Server-Sent Events: frames encoded once as bytes (never re-serialized per subscriber), and
//! the response shape every SSE route shares (headers sent at once, keep-alive comments, end on
//! shutdown).
//!
//! axum's `sse::Event` is not used: it re-encodes for every subscriber and panics on CR/LF in
//! `id`/`event` (see PITFALLS.md).

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

/// The comment sent when nothing else has been sent for a keep-alive interval.
pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

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

/// An SSE response over `events`, with keep-alive comments every `keepalive` (if set), ending
/// when `events` ends or `shutdown` is cancelled. The first bytes go out at once, so clients see
/// the headers without waiting for a message. `guard` (a connection permit, a counter) lives as
/// long as the response body.
pub fn response<G: Send + 'static>(
    events: impl Stream<Item = Bytes> + Send + 'static,
    keepalive: Option<Duration>,
    shutdown: CancellationToken,
    extra_headers: Vec<(HeaderName, HeaderValue)>,
    guard: G,
) -> Response {
    struct State<S, G> {
        events: std::pin::Pin<Box<S>>,
        keepalive: Option<tokio::time::Interval>,
        shutdown: CancellationToken,
        started: bool,
        _guard: G,
    }
    let keepalive = keepalive.map(|period| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    let state = State {
        events: Box::pin(events),
        keepalive,
        shutdown,
        started: false,
        _guard: guard,
    };
    let body = futures_util::stream::unfold(state, |mut state| async move {
        if !state.started {
            state.started = true;
            // `retry:` asks browsers to reconnect after one second (their default is three).
            return Some((Bytes::from_static(b": connected\nretry: 1000\n\n"), state));
        }
        let next = tokio::select! {
            biased;
            _ = state.shutdown.cancelled() => None,
            event = state.events.next() => event,
            _ = tick(&mut state.keepalive) => Some(Bytes::from_static(KEEPALIVE)),
        };
        if let (Some(_), Some(keepalive)) = (&next, state.keepalive.as_mut()) {
            keepalive.reset();
        }
        next.map(|bytes| (bytes, state))
    });
    let body = Body::from_stream(body.map(Ok::<_, std::convert::Infallible>));
    let mut response = Response::new(body);
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

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
