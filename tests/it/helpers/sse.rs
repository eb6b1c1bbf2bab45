//! A small Server-Sent Events client over reqwest, reading frames exactly as a browser would.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use reqwest::header::HeaderMap;
use serde_json::Value;

/// One event (comments are kept separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|error| panic!("event data is not JSON ({error}): {}", self.data))
    }
}

pub struct SseClient {
    pub status: u16,
    pub headers: HeaderMap,
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buffer: BytesMut,
    /// Comment lines seen so far (`: keepalive`, …), without the colon.
    pub comments: Vec<String>,
    ended: bool,
    /// The stream ended with an error (a cut connection), not with the body's clean end.
    pub cut: bool,
}

impl SseClient {
    /// Opens the stream; the response's status and headers are available at once.
    pub async fn open(request: reqwest::RequestBuilder) -> SseClient {
        let sent = request.header("accept", "text/event-stream").send();
        let response = tokio::time::timeout(Duration::from_secs(15), sent)
            .await
            .expect("no SSE response headers within 15 s")
            .expect("SSE request");
        SseClient {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.bytes_stream().boxed(),
            buffer: BytesMut::new(),
            comments: Vec::new(),
            ended: false,
            cut: false,
        }
    }

    /// Whether the server has ended the stream (as far as has been read).
    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Parses one complete frame out of the buffer, if there is one.
    fn parse_frame(&mut self) -> Option<Option<Event>> {
        let text = std::str::from_utf8(&self.buffer).ok()?;
        let end = text.find("\n\n")?;
        let frame = text[..end].to_owned();
        let _ = self.buffer.split_to(end + 2);
        let mut event = Event {
            event: None,
            id: None,
            data: String::new(),
        };
        let mut has_data = false;
        for line in frame.lines() {
            if let Some(comment) = line.strip_prefix(':') {
                self.comments.push(comment.trim().to_owned());
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event.event = Some(value.to_owned()),
                "id" => event.id = Some(value.to_owned()),
                "data" => {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                    has_data = true;
                }
                _ => {}
            }
        }
        Some(has_data.then_some(event))
    }

    /// The next event within `timeout`; `None` on timeout or when the stream ends.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(frame) = self.parse_frame() {
                if let Some(event) = frame {
                    return Some(event);
                }
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.extend_from_slice(&chunk),
                Ok(Some(Err(_))) => (self.ended, self.cut) = (true, true),
                Ok(None) => self.ended = true,
                Err(_) => return None,
            }
        }
    }

    /// Exactly `n` events, each within `timeout` of the previous; panics otherwise.
    pub async fn events(&mut self, n: usize, timeout: Duration) -> Vec<Event> {
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            match self.next_event(timeout).await {
                Some(event) => events.push(event),
                None => panic!("expected {n} events, got {}: {events:?}", events.len()),
            }
        }
        events
    }

    /// Waits until the server ends the stream; true if it did within `timeout`.
    pub async fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.ended {
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.extend_from_slice(&chunk),
                Ok(Some(Err(_))) => (self.ended, self.cut) = (true, true),
                Ok(None) => self.ended = true,
                Err(_) => return false,
            }
        }
        true
    }

    /// Reads for `duration` and returns whether any comment arrived meanwhile.
    pub async fn comments_within(&mut self, duration: Duration) -> Vec<String> {
        let before = self.comments.len();
        let _ = self.next_event(duration).await;
        self.comments[before..].to_vec()
    }
}
