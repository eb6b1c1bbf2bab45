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

/// The fields of an event read so far.
#[derive(Default)]
struct Block {
    event: Option<String>,
    id: Option<String>,
    data: Option<String>,
}

pub struct SseClient {
    pub status: u16,
    pub headers: HeaderMap,
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buffer: BytesMut,
    /// Comment lines seen so far (`: keepalive`, …), without the colon.
    pub comments: Vec<String>,
    /// The last `retry:` (milliseconds) seen.
    pub retry: Option<u64>,
    /// Blocks ended by a blank line without any `data` so far.
    pub empty_blocks: usize,
    /// The event being read.
    block: Block,
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
            retry: None,
            empty_blocks: 0,
            block: Block::default(),
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

    /// Reads the complete lines in the buffer as a browser does, up to the next event: a
    /// comment is noted as it is read, a blank line ends a block, and a block is an event only
    /// when it has `data` (one without is counted in `empty_blocks`: common clients other than
    /// browsers yield it as an empty event).
    fn parse_event(&mut self) -> Option<Event> {
        loop {
            let newline = self.buffer.iter().position(|&byte| byte == b'\n')?;
            let line = self.buffer.split_to(newline + 1);
            let line = std::str::from_utf8(&line[..newline]).expect("SSE is UTF-8");
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() {
                let block = std::mem::take(&mut self.block);
                match block.data {
                    Some(data) => {
                        return Some(Event {
                            event: block.event,
                            id: block.id,
                            data,
                        });
                    }
                    None => self.empty_blocks += 1,
                }
                continue;
            }
            if let Some(comment) = line.strip_prefix(':') {
                self.comments.push(comment.trim().to_owned());
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.block.event = Some(value.to_owned()),
                "id" => self.block.id = Some(value.to_owned()),
                "retry" => self.retry = value.parse().ok(),
                "data" => match &mut self.block.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.block.data = Some(value.to_owned()),
                },
                _ => {}
            }
        }
    }

    /// The next event within `timeout`; `None` on timeout or when the stream ends.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(event) = self.parse_event() {
                return Some(event);
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
