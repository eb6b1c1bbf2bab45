//! The accept loop and each connection's first steps. Replaces `axum::serve` for two reasons:
//!
//! - The first request's head is read here, within `HEADER_READ_TIMEOUT` and `MAX_HEAD_BYTES`,
//!   so a client trickling headers (slowloris) cannot hold a connection; hyper enforces the same
//!   timeout on later requests of a keep-alive connection.
//! - An SSE request (the usual first and only request of an `EventSource` connection) is served
//!   without hyper: the router answers it as any other request, and its event stream is written
//!   straight to the socket, ended by `Connection: close`. hyper keeps an 8 KiB read and an 8 KiB
//!   write buffer for as long as a response streams, which would be most of an idle SSE
//!   connection's memory (measured: 19 KiB with them). Everything else, WebSocket upgrades
//!   included, goes to hyper with the bytes already read.
//!
//! Shutdown: stop accepting, let hyper's connections finish their request in flight, and wait for
//! every connection (SSE streams end on the same token) until the deadline.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode, Version, header};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How long a client may take to send a request's head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The most headers one request may have.
const MAX_HEADERS: usize = 64;
/// Most bytes of ready events written in one go.
const WRITE_BATCH: usize = 64 * 1024;

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown`, then drains within
/// `drain_deadline`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
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
        let router = router.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        // Each task's future is one allocation that lives as long as the connection, sized for
        // its largest state: the TLS and hyper paths are boxed on their own so that a plain idle
        // SSE connection pays only for what it uses (measured: 10 KiB per task when inline).
        let served = async move {
            let served = match tls {
                Some(tls) => Box::pin(tls_connection(tls, stream, remote, router, shutdown)).await,
                None => connection(stream, remote, router, shutdown).await,
            };
            if let Err(error) = served {
                tracing::debug!(%error, %remote, "connection ended with an error");
            }
        };
        connections.spawn(served);
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(drain_deadline, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing the remaining connections");
    }
}

/// A TLS connection: the handshake counts against the same deadline as the request head.
async fn tls_connection(
    tls: TlsAcceptor,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(stream)) => connection(stream, remote, router, shutdown).await,
        Ok(Err(error)) => Err(error),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    }
}

/// A connection: read its first request head; serve it here if it is an SSE request, else hand
/// the connection to hyper.
async fn connection(
    mut stream: impl Connection,
    remote: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut head = BytesMut::with_capacity(1024);
    let deadline = tokio::time::sleep(HEADER_READ_TIMEOUT);
    tokio::pin!(deadline);
    let head_length = loop {
        let read = tokio::select! {
            read = stream.read_buf(&mut head) => read?,
            _ = &mut deadline => {
                return refuse(&mut stream, StatusCode::REQUEST_TIMEOUT).await;
            }
            // No request yet, so nothing to finish.
            _ = shutdown.cancelled() => return Ok(()),
        };
        if read == 0 {
            return Ok(());
        }
        match head_length(&head) {
            Some(length) if length <= MAX_HEAD_BYTES => break length,
            None if head.len() <= MAX_HEAD_BYTES => continue,
            _ => return refuse(&mut stream, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).await,
        }
    };
    if head_length == head.len()
        && let Some(request) = sse_request(&head)
    {
        drop(head);
        return Box::pin(serve_sse(stream, remote, router, request)).await;
    }
    Box::pin(serve_hyper(stream, head.freeze(), remote, router, shutdown)).await
}

/// Serves the rest of a connection with hyper, starting with the bytes already read.
async fn serve_hyper(
    stream: impl Connection,
    prefix: Bytes,
    remote: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let io = TokioIo::new(Rewind {
        prefix,
        inner: stream,
    });
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        router.clone().oneshot(request.map(Body::new))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        _ = shutdown.cancelled() => {
            // Finish the request in flight, then close (idle keep-alive connections at once).
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    served.map_err(io::Error::other)
}

/// The length of the request head in `bytes` once it is complete.
fn head_length(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|end| end + 4)
}

/// A minimal answer to a client that never sent a complete head.
async fn refuse(stream: &mut impl Connection, status: StatusCode) -> io::Result<()> {
    let reply = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(reply.as_bytes())).await;
    Ok(())
}

/// Whether a path is one of the SSE routes.
fn is_sse_path(path: &str) -> bool {
    path == "/api/events"
        || path == "/sse/connect"
        || (path.starts_with("/api/streams/") && path.ends_with("/events"))
}

/// The request, if the head is a plain HTTP/1.1 GET of an SSE route with no body and no upgrade.
fn sse_request(head: &[u8]) -> Option<Request<Body>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
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

/// Answers an SSE request: the router decides; an event stream is written straight to the
/// socket until it ends or the client goes away; anything else (a 401, a 409) is written whole.
async fn serve_sse(
    stream: impl Connection,
    remote: SocketAddr,
    router: Router,
    mut request: Request<Body>,
) -> io::Result<()> {
    request.extensions_mut().insert(ConnectInfo(remote));
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (mut reader, mut writer) = tokio::io::split(stream);
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20)
            .await
            .unwrap_or_default();
        let mut out = response_head(&parts, Some(body.len()));
        out.put_slice(&body);
        writer.write_all(&out).await?;
        return writer.shutdown().await;
    }
    let (parts, body) = response.into_parts();
    writer.write_all(&response_head(&parts, None)).await?;
    let mut events = body.into_data_stream();
    // Reading tells when the client has gone (end of file); it sends nothing else.
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(Ok(first)) = event else { break };
                let Some(mut next) = events.next().now_or_never() else {
                    // The usual case, one event ready: written without a copy.
                    writer.write_all(&first).await?;
                    continue;
                };
                // Several ready (a burst): one write for all of them, up to a bound.
                let mut batch = BytesMut::with_capacity(WRITE_BATCH);
                batch.put_slice(&first);
                let ended = loop {
                    match next {
                        Some(Ok(event)) => batch.put_slice(&event),
                        _ => break true,
                    }
                    if batch.len() >= WRITE_BATCH {
                        break false;
                    }
                    match events.next().now_or_never() {
                        Some(event) => next = event,
                        None => break false,
                    }
                };
                writer.write_all(&batch).await?;
                if ended {
                    break;
                }
            }
            read = reader.read(&mut probe) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
        }
    }
    writer.shutdown().await
}

/// `HTTP/1.1 <status>` and the headers, ending the connection after the body.
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
    if let Some(length) = content_length {
        head.put_slice(format!("content-length: {length}\r\n").as_bytes());
    }
    head.put_slice(b"date: ");
    head.put_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    head.put_slice(b"\r\nconnection: close\r\n\r\n");
    head
}

/// What a connection runs over: TCP, or TLS over TCP.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection for S {}

/// The TLS acceptor for a PEM certificate chain and private key.
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
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS versions: {error}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| format!("the certificate and key do not form a TLS identity: {error}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(std::sync::Arc::new(config)))
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

    #[test]
    fn only_plain_sse_gets_qualify() {
        let sse = b"GET /api/streams/news/events?from=0 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1-0\r\n\r\n";
        let request = sse_request(sse).expect("an SSE request");
        assert_eq!(request.uri(), "/api/streams/news/events?from=0");
        assert_eq!(request.headers()["last-event-id"], "1-0");
        assert!(sse_request(b"GET /api/events?stream=s HTTP/1.1\r\nHost: x\r\n\r\n").is_some());
        assert!(sse_request(b"GET /sse/connect?channel_id=a HTTP/1.1\r\n\r\n").is_some());
        for other in [
            &b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"[..],
            b"POST /api/events HTTP/1.1\r\nContent-Length: 2\r\n\r\n",
            b"GET /api/events HTTP/1.0\r\n\r\n",
            b"GET /api/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /admin/streams HTTP/1.1\r\n\r\n",
            b"GET /api/streams/a/messages HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                sse_request(other).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        assert_eq!(head_length(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_length(b"GET / HTTP/1.1\r\n"), None);
    }
}
