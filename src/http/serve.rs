//! The connection front: the accept loop and each connection's first steps, until hyper (or the
//! SSE fast path) serves it. Replaces `axum::serve` because:
//!
//! - HTTP/1.1 and HTTP/2 share the listener: a TLS connection chooses by ALPN (`h2` offered
//!   first), a plain one by its first bytes (the HTTP/2 preface: h2c with prior knowledge).
//! - One deadline, `HEADER_READ_TIMEOUT` from the accept, covers the TLS handshake and the first
//!   request head, so a client trickling bytes (slowloris) cannot hold a connection; hyper
//!   enforces the same timeout and limits on later requests of a keep-alive connection. A head
//!   refused here (408, 414, 431, 400) is answered with problem+json, logged and counted.
//! - An HTTP/1.1 SSE request (the usual first and only request of an `EventSource` connection) is
//!   served without hyper: the router answers it as any other request, and the response is
//!   written straight to the socket with chunked coding (its last chunk tells a deliberate end
//!   from a cut connection), then the connection closes. hyper keeps an 8 KiB read and an 8 KiB
//!   write buffer for as long as a response streams, which would be most of an idle SSE
//!   connection's memory. Everything else, WebSocket upgrades included, goes to hyper with the
//!   bytes already read.
//! - Every write of every connection is bounded by `sse_write_timeout` ([`WriteTimeout`]): a
//!   client that stops reading is disconnected instead of holding its permit forever.
//!
//! Shutdown: stop accepting, let hyper's connections finish their request in flight (HTTP/2:
//! GOAWAY), and wait for every connection and session — SSE streams end on the same token;
//! fast-path event streams and upgraded WebSockets run as tasks of their own, tracked by
//! [`Front::sessions`] — until the deadline.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode, Version, header};
use axum::response::Response;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::future::Either;
use futures_util::{FutureExt, StreamExt};
use hyper::body::Body as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::error::problem_response;
use crate::metrics::Metrics;

/// How long a client may take, from the accept, to finish the TLS handshake and send its first
/// request's head (and, on a keep-alive connection, to send each later head).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head accepted (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The longest request line accepted (a longer one is 414).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// The most headers one request may have: hyper's own limit, so that every head gets the same
/// (a lower one would make hyper allocate its header array on the heap for every request).
const MAX_HEADERS: usize = 100;
/// Most bytes of ready events written in one go.
const WRITE_BATCH: usize = 64 * 1024;
/// How a plain connection speaking HTTP/2 with prior knowledge begins (RFC 9113, 3.4).
const H2_PREFACE_HEAD: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";
/// How long a refused connection's remaining input is read (and discarded) after the answer, so
/// that closing it does not reset the connection before the client has read the answer.
const LINGER: Duration = Duration::from_secs(1);

/// What every connection is served with.
#[derive(Clone)]
pub struct Front {
    pub router: Router,
    pub metrics: Arc<Metrics>,
    /// How long one write may stay blocked before the connection is dropped.
    pub write_timeout: Duration,
    /// Sessions that outlive their connection's first task (fast-path event streams, upgraded
    /// WebSockets): the drain waits for them too.
    pub sessions: TaskTracker,
}

/// What a plain connection does after its first request head.
enum Next {
    /// Nothing more: closed, refused, or never used.
    Closed,
    /// An SSE response whose head is written: its body streams, then the connection closes.
    Stream(Streaming),
    /// hyper serves the connection as HTTP/1.1, starting with these bytes.
    Http1(Bytes),
    /// hyper serves the connection as HTTP/2 (prior knowledge), starting with these bytes.
    Http2(Bytes),
}

/// Serves `front` on `listener` (over TLS with `tls`) until `shutdown`, then drains within
/// `drain_deadline`.
pub async fn serve(
    listener: TcpListener,
    front: Front,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    drain_deadline: Duration,
) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = Accepted {
            front: front.clone(),
            remote,
            shutdown: shutdown.clone(),
            deadline: tokio::time::Instant::now() + HEADER_READ_TIMEOUT,
        };
        let tls = tls.clone();
        // Each task's future is one allocation that lives as long as the task, sized for its
        // largest state: the TLS and hyper paths are boxed on their own so that a connection pays
        // only for the path it takes (measured: 10 KiB per task when inline).
        let served = async move {
            let stream = WriteTimeout::new(stream, connection.front.write_timeout);
            let remote = connection.remote;
            let served = match tls {
                Some(tls) => Box::pin(connection.tls(tls, stream)).await,
                None => connection.plain(stream).await,
            };
            if let Err(error) = served {
                tracing::debug!(%error, %remote, "connection ended with an error");
            }
        };
        connections.spawn(served);
    }
    drop(listener);
    connections.close();
    front.sessions.close();
    let drained = async {
        connections.wait().await;
        front.sessions.wait().await;
    };
    if tokio::time::timeout(drain_deadline, drained).await.is_err() {
        tracing::warn!("drain deadline passed; closing the remaining connections");
    }
}

/// One accepted connection before its protocol is known.
struct Accepted {
    front: Front,
    remote: SocketAddr,
    shutdown: CancellationToken,
    /// When the handshake and the first head must be complete.
    deadline: tokio::time::Instant,
}

impl Accepted {
    /// A TLS connection: HTTP/2 when the client chose `h2`, else as a plain one.
    async fn tls(self, tls: TlsAcceptor, stream: impl Connection) -> io::Result<()> {
        let stream = match tokio::time::timeout_at(self.deadline, tls.accept(stream)).await {
            Ok(accepted) => accepted?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ));
            }
        };
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            return Box::pin(self.http2(stream, Bytes::new())).await;
        }
        self.plain(stream).await
    }

    /// Reads the first request head; serves it here if it is an SSE request, else hands the
    /// connection to hyper (HTTP/2 when it began with the preface).
    async fn plain(self, mut stream: impl Connection) -> io::Result<()> {
        // Boxed: reading, parsing and routing the first request need buffers, timers and every
        // middleware's state, none of which an SSE stream needs once its head is out.
        match Box::pin(self.first_request(&mut stream)).await? {
            Next::Closed => Ok(()),
            Next::Stream(body) => {
                // The stream goes on in a task of its own, sized for streaming alone: this one
                // is sized for every way a connection can go (measured: 1,075 B per idle SSE
                // connection against under 700). The drain waits for it as for any session.
                let remote = self.remote;
                self.front
                    .sessions
                    .spawn(stream_body(stream, body).map(move |outcome| {
                        if let Err(error) = outcome {
                            tracing::debug!(%error, %remote, "event stream ended with an error");
                        }
                    }));
                Ok(())
            }
            Next::Http1(prefix) => Box::pin(self.http1(stream, prefix)).await,
            Next::Http2(prefix) => Box::pin(self.http2(stream, prefix)).await,
        }
    }

    /// Reads the first request head and decides: an SSE request is routed and its response head
    /// written here; anything else goes to hyper with the bytes read; a head over a limit or late
    /// is refused.
    async fn first_request(&self, stream: &mut impl Connection) -> io::Result<Next> {
        let mut head = BytesMut::with_capacity(1024);
        let deadline = tokio::time::sleep_until(self.deadline);
        tokio::pin!(deadline);
        let head_length = loop {
            let read = tokio::select! {
                read = stream.read_buf(&mut head) => read?,
                _ = &mut deadline => {
                    if head.is_empty() {
                        // Opened and never used (a browser's speculative connection): nothing
                        // to answer.
                        return Ok(Next::Closed);
                    }
                    return self.refuse(stream, Refusal::Timeout).await;
                }
                // No request yet, so nothing to finish.
                _ = self.shutdown.cancelled() => return Ok(Next::Closed),
            };
            if read == 0 {
                return Ok(Next::Closed);
            }
            match head_length(&head) {
                Some(length) => break length,
                None => match oversized(&head) {
                    Some(refusal) => return self.refuse(stream, refusal).await,
                    None => continue,
                },
            }
        };
        if head.starts_with(H2_PREFACE_HEAD) {
            return Ok(Next::Http2(head.freeze()));
        }
        if let Some(refusal) = oversized(&head[..head_length]) {
            return self.refuse(stream, refusal).await;
        }
        match parse_head(&head[..head_length]) {
            Err(refusal) => self.refuse(stream, refusal).await,
            Ok(Some(request)) if head_length == head.len() => {
                drop(head);
                self.sse(stream, request).await
            }
            Ok(_) => Ok(Next::Http1(head.freeze())),
        }
    }

    /// Serves the rest of an HTTP/1.1 connection with hyper, starting with the bytes already
    /// read, with the same limits and deadline as the first head.
    async fn http1(self, stream: impl Connection, prefix: Bytes) -> io::Result<()> {
        let io = TokioIo::new(Rewind {
            prefix,
            inner: stream,
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_header_size(MAX_HEAD_BYTES)
            // Routed in place: this is every HTTP/1.1 request's path (measured: boxing it costs
            // publish throughput).
            .serve_connection(
                io,
                service(self.front.clone(), self.remote, |routed| routed),
            )
            .with_upgrades();
        // At shutdown: finish the request in flight, then close (idle keep-alive connections at
        // once).
        let served = until_drained(connection, &self.shutdown, |connection| {
            connection.graceful_shutdown()
        })
        .await;
        if let Err(error) = &served {
            self.count_refused_by_hyper(error);
        }
        served.map_err(io::Error::other)
    }

    /// Serves an HTTP/2 connection (after TLS with ALPN `h2`, or in clear text with prior
    /// knowledge, `prefix` then holding the bytes already read). Each request is a stream of
    /// its own; SSE and long-poll responses are streams too, so `limits.max_connections`
    /// (taken per streaming response) counts them.
    async fn http2(self, stream: impl Connection, prefix: Bytes) -> io::Result<()> {
        let io = TokioIo::new(Rewind {
            prefix,
            inner: stream,
        });
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            // Routed in a box: hyper runs each HTTP/2 stream as a task sized for the larger of
            // routing and streaming the body, and routing is much the larger; boxed, an idle SSE
            // stream's task holds only the body (measured: 524 B per stream in place, 393 boxed).
            .serve_connection(io, service(self.front.clone(), self.remote, Box::pin));
        // At shutdown, GOAWAY: no new streams; those in flight finish (SSE ends on the same
        // token).
        until_drained(connection, &self.shutdown, |connection| {
            connection.graceful_shutdown()
        })
        .await
        .map_err(io::Error::other)
    }

    /// Answers a plain HTTP/1.1 SSE request: the router decides; its response head is written
    /// here, and its body is what the connection streams next.
    async fn sse(
        &self,
        stream: &mut impl Connection,
        mut request: Request<Body>,
    ) -> io::Result<Next> {
        request.extensions_mut().insert(ConnectInfo(self.remote));
        let response = match self.front.router.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        start_response(stream, response).await.map(Next::Stream)
    }

    /// Answers a request head that cannot be served (problem+json, then close), logs and counts
    /// it.
    async fn refuse(&self, stream: &mut impl Connection, why: Refusal) -> io::Result<Next> {
        let (response, length) = refusal(&self.front, self.remote, why);
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, length).await.unwrap_or_default();
        let mut out = response_head(&parts, Some(body.len()));
        out.put_slice(&body);
        stream.write_all(&out).await?;
        stream.shutdown().await?;
        // Read what the client still sends (the rest of an oversized head) for a moment: closing
        // with unread input would reset the connection and could discard the answer unread.
        let mut sink = [0u8; 1024];
        let _ = tokio::time::timeout(LINGER, async {
            while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        Ok(Next::Closed)
    }

    /// Logs and counts a later request head hyper refused (its answer has no body). Not its
    /// header timeouts: hyper reports an idle keep-alive connection it closes after
    /// `HEADER_READ_TIMEOUT` the same way as a late head, and idle connections are no refusal.
    fn count_refused_by_hyper(&self, error: &hyper::Error) {
        let status = if error.is_parse_too_large() {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        } else if error.is_parse() {
            StatusCode::BAD_REQUEST
        } else {
            return;
        };
        tracing::info!(status = status.as_u16(), remote = %self.remote, %error, "refused a request head");
        self.front.metrics.refused_head(status.as_u16());
    }
}

/// Runs a hyper connection to its end; once `shutdown` is cancelled, asks it to end gracefully
/// (`graceful`) and waits for that.
async fn until_drained<C: Future>(
    connection: C,
    shutdown: &CancellationToken,
    graceful: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => served,
        _ = shutdown.cancelled() => {
            graceful(connection.as_mut());
            connection.await
        }
    }
}

/// The router's answer to one request, as hyper awaits it.
type Routed = tower::util::Oneshot<Router, Request<Body>>;

/// The router as a hyper service, telling handlers the client's address; `route` makes the
/// future hyper awaits (see [`Accepted::http1`] and [`Accepted::http2`] for why each chooses
/// its own). A request line over the limit is refused here as on a connection's first head
/// (hyper's own limit is the whole head's).
fn service<F>(
    front: Front,
    remote: SocketAddr,
    route: fn(Routed) -> F,
) -> impl hyper::service::Service<
    Request<hyper::body::Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response, std::convert::Infallible>> + Send,
> + Clone
where
    F: Future<Output = Result<Response, std::convert::Infallible>> + Send,
{
    hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        let target = request.uri().path_and_query();
        let line = request.method().as_str().len()
            + target.map_or(0, |target| target.as_str().len())
            + " HTTP/1.1".len()
            + 1;
        if line > MAX_REQUEST_LINE {
            let (response, _) = refusal(&front, remote, Refusal::RequestLineTooLong);
            return Either::Left(std::future::ready(Ok(response)));
        }
        request.extensions_mut().insert(ConnectInfo(remote));
        Either::Right(route(front.router.clone().oneshot(request.map(Body::new))))
    })
}

/// The answer to a refused head (problem+json, connection closed after it), logged and counted;
/// with its body's length.
fn refusal(front: &Front, remote: SocketAddr, refusal: Refusal) -> (Response, usize) {
    let (status, slug, detail) = refusal.describe();
    tracing::info!(
        status = status.as_u16(),
        %remote,
        detail,
        "refused a request head"
    );
    front.metrics.refused_head(status.as_u16());
    let mut response = problem_response(status, slug, detail.to_owned());
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    let length = response.body().size_hint().exact().unwrap_or(0) as usize;
    (response, length)
}

/// Why a request head was refused before any handler saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Timeout,
    RequestLineTooLong,
    HeadTooLarge,
    Malformed,
}

impl Refusal {
    fn describe(self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Refusal::Timeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "the request head did not arrive in time (10 s)",
            ),
            Refusal::RequestLineTooLong => (
                StatusCode::URI_TOO_LONG,
                "uri-too-long",
                "the request line is longer than 8 KiB",
            ),
            Refusal::HeadTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header-fields-too-large",
                "the request head is larger than 16 KiB or has more than 100 headers",
            ),
            Refusal::Malformed => (
                StatusCode::BAD_REQUEST,
                "bad-request",
                "the request head is not valid HTTP/1.1",
            ),
        }
    }
}

/// The length of the request head in `bytes` once it is complete: up to the first empty line,
/// whether lines end with CRLF or a bare LF (as hyper accepts them).
fn head_length(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes).find_map(|at| match &bytes[at + 1..] {
        [b'\n', ..] => Some(at + 2),
        [b'\r', b'\n', ..] => Some(at + 3),
        _ => None,
    })
}

/// Whether `head` (complete or not yet) is already over a limit.
fn oversized(head: &[u8]) -> Option<Refusal> {
    let line = memchr::memchr(b'\n', head).unwrap_or(head.len());
    if line > MAX_REQUEST_LINE {
        Some(Refusal::RequestLineTooLong)
    } else if head.len() > MAX_HEAD_BYTES {
        Some(Refusal::HeadTooLarge)
    } else {
        None
    }
}

/// Parses a complete head: the request when it is a plain HTTP/1.1 GET of an SSE route with no
/// body and no upgrade, `None` for any other valid request (hyper serves it).
fn parse_head(head: &[u8]) -> Result<Option<Request<Body>>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Refusal::Malformed),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(_) => return Err(Refusal::Malformed),
    }
    Ok(sse_request(&parsed))
}

/// The request, if `parsed` is a plain HTTP/1.1 GET of an SSE route with no body and no upgrade.
fn sse_request(parsed: &httparse::Request<'_, '_>) -> Option<Request<Body>> {
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let target = parsed.path?;
    let path = target.split('?').next().unwrap_or(target);
    if !is_sse_path(path) {
        return None;
    }
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(target)
        .version(Version::HTTP_11);
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let carries_body_or_upgrade = name == header::CONTENT_LENGTH && field.value != b"0"
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE;
        if carries_body_or_upgrade {
            return None;
        }
        request = request.header(name, HeaderValue::from_bytes(field.value).ok()?);
    }
    request.body(Body::empty()).ok()
}

/// Whether a path is one of the SSE routes (a test checks this against the router's routes).
pub fn is_sse_path(path: &str) -> bool {
    path == "/api/events"
        || path == "/sse/connect"
        || (path.starts_with("/api/streams/") && path.ends_with("/events"))
}

/// A response body being written to an HTTP/1.1 connection that closes after it.
struct Streaming {
    frames: axum::body::BodyDataStream,
    /// Chunked coding (the length was not known).
    chunked: bool,
}

/// Writes `response`'s head to an HTTP/1.1 connection that closes after its body: with its
/// length when known, else chunked.
async fn start_response(stream: &mut impl Connection, response: Response) -> io::Result<Streaming> {
    let (parts, body) = response.into_parts();
    let length = body.size_hint().exact().map(|length| length as usize);
    stream.write_all(&response_head(&parts, length)).await?;
    Ok(Streaming {
        frames: body.into_data_stream(),
        chunked: length.is_none(),
    })
}

/// Writes a response body as it comes, ready events batched into one write, until it ends
/// (then the last chunk) or the client goes away, and closes the connection. This future is most
/// of an idle SSE connection's memory, so it holds only the socket, the body and a small probe
/// (an async block, not an async fn, which would keep a second copy of its arguments).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep a second copy of its arguments"
)]
fn stream_body(
    mut stream: impl Connection,
    mut body: Streaming,
) -> impl Future<Output = io::Result<()>> + Send {
    async move {
        // Reading tells when the client has gone (end of file); it sends nothing else.
        let mut probe = [0u8; 16];
        loop {
            let first = tokio::select! {
                frame = body.frames.next() => match frame {
                    Some(Ok(frame)) => frame,
                    _ => break,
                },
                read = stream.read(&mut probe) => match read {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => continue,
                },
            };
            // Several ready (a burst): one write for all of them, up to a bound.
            let mut batch = vec![first];
            let mut size = batch[0].len();
            let mut ended = false;
            while size < WRITE_BATCH {
                match body.frames.next().now_or_never() {
                    Some(Some(Ok(frame))) => {
                        size += frame.len();
                        batch.push(frame);
                    }
                    Some(_) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            stream
                .write_all(&encode(&batch, size, body.chunked))
                .await?;
            if ended {
                break;
            }
        }
        if body.chunked {
            stream.write_all(b"0\r\n\r\n").await?;
        }
        stream.shutdown().await
    }
}

/// `frames` as one write: one chunk when `chunked`, else as they are.
fn encode(frames: &[Bytes], size: usize, chunked: bool) -> Bytes {
    if let ([frame], false) = (frames, chunked) {
        return frame.clone();
    }
    let mut out = BytesMut::with_capacity(size + 16);
    if chunked {
        out.put_slice(format!("{size:x}\r\n").as_bytes());
    }
    for frame in frames {
        out.put_slice(frame);
    }
    if chunked {
        out.put_slice(b"\r\n");
    }
    out.freeze()
}

/// `HTTP/1.1 <status>` and the headers, ending the connection after the body: with its
/// `content_length` when known, else chunked.
fn response_head(parts: &axum::http::response::Parts, content_length: Option<usize>) -> BytesMut {
    let mut head = BytesMut::with_capacity(512);
    head.put_slice(b"HTTP/1.1 ");
    head.put_slice(parts.status.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.put_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        head.put_slice(name.as_str().as_bytes());
        head.put_slice(b": ");
        head.put_slice(value.as_bytes());
        head.put_slice(b"\r\n");
    }
    match content_length {
        Some(length) => head.put_slice(format!("content-length: {length}\r\n").as_bytes()),
        None => head.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.put_slice(b"date: ");
    head.put_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    head.put_slice(b"\r\nconnection: close\r\n\r\n");
    head
}

/// What a connection runs over: TCP, or TLS over TCP.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection for S {}

/// The TLS acceptor for a PEM certificate chain and private key, offering HTTP/2 and HTTP/1.1.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| {
            format!(
                "cannot read the certificate chain {}: {error}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!("no certificate in {}", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|error| format!("cannot read the private key {}: {error}", key.display()))?;
    // The provider is named, not looked up: one crypto library for TLS and JWT (aws-lc-rs).
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS versions: {error}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| format!("the certificate and key do not form a TLS identity: {error}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A TCP connection whose writes fail once one has stayed blocked for `timeout` (the client
/// stopped reading: its receive window is full). The timer is made the first time a write
/// blocks, so a connection that never blocks pays nothing for it.
pub struct WriteTimeout {
    inner: TcpStream,
    timeout: Duration,
    /// Armed while a write is blocked.
    blocked: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl WriteTimeout {
    fn new(inner: TcpStream, timeout: Duration) -> WriteTimeout {
        WriteTimeout {
            inner,
            timeout,
            blocked: None,
            armed: false,
        }
    }

    /// Passes on a write's outcome; while it is pending, fails it once `timeout` has passed
    /// since it first blocked.
    fn bound<T>(
        &mut self,
        cx: &mut Context<'_>,
        outcome: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if outcome.is_ready() {
            self.armed = false;
            return outcome;
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timer = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading (sse_write_timeout)",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bound(cx, outcome)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bound(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.inner).poll_flush(cx);
        self.bound(cx, outcome)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.bound(cx, outcome)
    }
}

/// A stream that first yields bytes already read from it.
struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if !self.prefix.has_remaining() {
                // Read through: let go of the buffer it was read into, which would otherwise
                // live as long as the connection (an upgraded WebSocket's, for one).
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(head: &[u8]) -> Option<Request<Body>> {
        parse_head(head).expect("a valid head")
    }

    #[test]
    fn only_plain_sse_gets_qualify() {
        let head = b"GET /api/streams/news/events?from=0 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1-0\r\n\r\n";
        let request = sse(head).expect("an SSE request");
        assert_eq!(request.uri(), "/api/streams/news/events?from=0");
        assert_eq!(request.headers()["last-event-id"], "1-0");
        assert!(sse(b"GET /api/events?stream=s HTTP/1.1\r\nHost: x\r\n\r\n").is_some());
        assert!(sse(b"GET /sse/connect?channel_id=a HTTP/1.1\n\n").is_some());
        for other in [
            &b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"[..],
            b"POST /api/events HTTP/1.1\r\nContent-Length: 2\r\n\r\n",
            b"GET /api/events HTTP/1.0\r\n\r\n",
            b"GET /api/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /admin/streams HTTP/1.1\r\n\r\n",
            b"GET /api/streams/a/messages HTTP/1.1\r\n\r\n",
        ] {
            assert!(sse(other).is_none(), "{}", String::from_utf8_lossy(other));
        }
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nbad header\r\n\r\n").err(),
            Some(Refusal::Malformed)
        );
    }

    #[test]
    fn heads_end_at_the_first_empty_line_with_crlf_or_bare_lf() {
        assert_eq!(head_length(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_length(b"GET / HTTP/1.1\n\nrest"), Some(16));
        assert_eq!(head_length(b"GET / HTTP/1.1\nHost: x\r\n\r\n"), Some(26));
        assert_eq!(head_length(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(head_length(H2_PREFACE_HEAD), Some(H2_PREFACE_HEAD.len()));
    }

    /// A response written as the fast path writes it.
    async fn write_response(mut stream: impl Connection, response: Response) -> io::Result<()> {
        let body = start_response(&mut stream, response).await?;
        stream_body(stream, body).await
    }

    #[tokio::test]
    async fn a_large_answer_on_the_fast_path_is_written_whole() {
        let body = vec![b'x'; 3 << 20];
        let response = Response::new(Body::from(body.clone()));
        let (server, mut client) = tokio::io::duplex(64 * 1024);
        let writing = tokio::spawn(write_response(server, response));
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        writing.await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&answer[..200]);
        assert!(text.contains("content-length: 3145728\r\n"), "{text}");
        let end = head_length(&answer).unwrap();
        assert_eq!(&answer[end..], &body[..]);
    }

    #[tokio::test]
    async fn a_streamed_answer_is_chunked_with_a_last_chunk() {
        let frames = futures_util::stream::iter(["data: a\n\n", "data: b\n\n"])
            .map(|frame| Ok::<_, std::convert::Infallible>(Bytes::from_static(frame.as_bytes())));
        let response = Response::new(Body::from_stream(frames));
        let (server, mut client) = tokio::io::duplex(64 * 1024);
        let writing = tokio::spawn(write_response(server, response));
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        writing.await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        let end = head_length(&answer).unwrap();
        assert_eq!(&text[end..], "12\r\ndata: a\n\ndata: b\n\n\r\n0\r\n\r\n");
    }

    #[test]
    fn over_long_lines_and_heads_are_told_apart() {
        let long_line = format!("GET /{} HTTP/1.1", "a".repeat(MAX_REQUEST_LINE));
        assert_eq!(
            oversized(long_line.as_bytes()),
            Some(Refusal::RequestLineTooLong)
        );
        let big_head = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(oversized(big_head.as_bytes()), Some(Refusal::HeadTooLarge));
        assert_eq!(oversized(b"GET / HTTP/1.1\r\n"), None);
    }
}
