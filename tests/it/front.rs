//! The connection front (SPEC 3.7): HTTP/2 in clear text and over TLS beside HTTP/1.1 on one
//! listener, request heads refused the same way wherever they arrive, streams that end cleanly
//! with a reason, the write timeout, and WebSocket closing handshakes.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::helpers::scripts::ScriptRun;
use crate::helpers::sse::SseClient;
use crate::helpers::{TOKEN, TestApp, json};

/// A client that speaks HTTP/2 in clear text with prior knowledge (as `curl
/// --http2-prior-knowledge`).
fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client")
}

on_each_backend!(every_kind_of_route_works_over_h2c);

async fn every_kind_of_route_works_over_h2c(app: TestApp) {
    let client = h2c_client();
    let url = |path: &str| app.url(path);
    // REST.
    let published = client
        .post(url("/api/streams/h2-rest/messages"))
        .bearer_auth(TOKEN)
        .json(&json!({ "data": { "over": "h2c" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(published.version(), reqwest::Version::HTTP_2);
    assert_eq!(published.status(), 201);
    let history = client
        .get(url("/api/streams/h2-rest/messages"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(history.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        json(history).await["messages"][0]["body"],
        json!({ "over": "h2c" })
    );
    let refused = client.get(url("/admin/streams")).send().await.unwrap();
    crate::helpers::problem(refused, 401).await;

    // A broadcast stream and a group consumer, as HTTP/2 streams.
    let mut broadcast = SseClient::open(
        client
            .get(url("/api/streams/h2-events/events"))
            .bearer_auth(TOKEN),
    )
    .await;
    let mut consumer = SseClient::open(
        client
            .get(url("/api/events?stream=h2-events&group=g&consumer=c1"))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!((broadcast.status, consumer.status), (200, 200));
    let id = app.publish("h2-events", json!("both")).await;
    let seen = broadcast.events(1, Duration::from_secs(10)).await;
    assert_eq!(seen[0].id.as_deref(), Some(id.as_str()));
    let taken = consumer.events(1, Duration::from_secs(10)).await;
    assert_eq!(taken[0].json()["consumer"], "c1");
    assert_eq!(taken[0].json()["body"], "both");

    // A long-poll.
    let poll = tokio::spawn({
        let request = client
            .get(url("/api/v1/poll?topics=h2-poll&timeout=10"))
            .bearer_auth(TOKEN);
        async move { request.send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.publish("h2-poll", json!("polled")).await;
    let polled = poll.await.unwrap();
    assert_eq!(polled.version(), reqwest::Version::HTTP_2);
    assert_eq!(json(polled).await["messages"][0]["payload"], "polled");
}

/// Opens an HTTP/2 connection in clear text with the `h2` crate: every request sent on the
/// returned handle is a stream of that one TCP connection.
async fn h2_connection(app: &TestApp) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(app.address).await.expect("connect");
    let (send, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sse_streams_share_one_http2_connection() {
    let app = TestApp::on_embedded("").await;
    let mut send = h2_connection(&app).await;
    let mut bodies = Vec::new();
    for n in 0..20 {
        let request = axum::http::Request::get(format!(
            "http://{}/api/streams/multiplexed-{n}/events",
            app.address
        ))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(())
        .unwrap();
        send = send.ready().await.expect("a stream slot");
        let (response, _) = send.send_request(request, true).expect("send");
        let response = response.await.expect("response head");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        bodies.push(response.into_body());
    }
    let health = json(app.get("/health").await).await;
    assert_eq!(health["connections"]["sse"], 20, "{health}");
    for n in 0..20 {
        app.publish(&format!("multiplexed-{n}"), json!({ "n": n }))
            .await;
    }
    for (n, body) in bodies.iter_mut().enumerate() {
        let mut received = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !received.contains("\"body\"") {
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, body.data())
                .await
                .unwrap_or_else(|_| panic!("stream {n} received nothing: {received:?}"))
                .expect("the stream is open")
                .expect("data");
            let _ = body.flow_control().release_capacity(chunk.len());
            received.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(
            received.contains(&format!("{{\"n\":{n}}}")),
            "stream {n}: {received}"
        );
    }
}

/// An app serving HTTPS with a fresh test certificate (kept in the returned directory).
async fn on_tls() -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::helpers::test_certificate(dir.path());
    let app = TestApp::on_embedded(&format!("[tls]\ncert = {cert:?}\nkey = {key:?}\n")).await;
    (app, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_offers_http2_by_alpn_and_still_serves_http1() {
    let (app, _dir) = on_tls().await;
    // The test app's client trusts the certificate and offers h2 and http/1.1.
    let health = app.get("/health/live").await;
    assert_eq!(health.version(), reqwest::Version::HTTP_2);
    let mut events = SseClient::open(
        app.client
            .get(app.url("/api/streams/tls-h2/events"))
            .bearer_auth(TOKEN),
    )
    .await;
    let id = app.publish("tls-h2", json!("over h2")).await;
    assert_eq!(
        events.events(1, Duration::from_secs(10)).await[0]
            .id
            .as_deref(),
        Some(id.as_str())
    );
    let pem = std::fs::read(_dir.path().join("cert.pem")).unwrap();
    let http1 = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .build()
        .unwrap();
    let answer = http1.get(app.url("/health/live")).send().await.unwrap();
    assert_eq!(answer.version(), reqwest::Version::HTTP_11);
    assert_eq!(answer.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_receives_on_ten_event_sources_over_http2() {
    if !crate::helpers::scripts::available() {
        return;
    }
    let (app, _dir) = on_tls().await;
    let origin = format!("https://localhost:{}", app.address.port());
    let mut browser = ScriptRun::start("eventsources.mjs", &[&origin, TOKEN, "10", "30000"]);
    browser.ready(Duration::from_secs(60)).await;
    for n in 0..10 {
        app.publish(&format!("page-{n}"), json!({ "source": n }))
            .await;
    }
    let report = browser.report(Duration::from_secs(60)).await;
    assert_eq!(report["protocol"], "h2", "{report}");
    let received = report["received"].as_array().expect("received");
    assert_eq!(received.len(), 10, "{report}");
    for (n, data) in received.iter().enumerate() {
        let data: Value = serde_json::from_str(data.as_str().expect("data")).unwrap();
        assert_eq!(data["body"], json!({ "source": n }), "{report}");
    }
}

/// Sends `request` on a new connection and reads the answer until the server closes it.
async fn exchange(app: &TestApp, request: &[u8]) -> String {
    let mut socket = TcpStream::connect(app.address).await.unwrap();
    socket.write_all(request).await.unwrap();
    read_to_close(&mut socket, Duration::from_secs(20)).await
}

/// Everything the server sends until it closes the connection (an error, such as a reset,
/// fails the test: the answer must be readable whole).
async fn read_to_close(socket: &mut TcpStream, within: Duration) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(within, socket.read_to_end(&mut answer))
        .await
        .expect("the server closed the connection in time")
        .expect("the connection closed cleanly, without a reset");
    String::from_utf8_lossy(&answer).into_owned()
}

/// The problem document of a raw HTTP/1.1 answer, after checking its status line.
fn problem_of(answer: &str, status: u16) -> Value {
    assert!(
        answer.starts_with(&format!("HTTP/1.1 {status} ")),
        "{answer}"
    );
    assert!(
        answer.contains("content-type: application/problem+json"),
        "{answer}"
    );
    let body = &answer[answer.find("\r\n\r\n").expect("a head") + 4..];
    let problem: Value = serde_json::from_str(body).expect("a problem document");
    assert_eq!(problem["status"], status);
    problem
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_get_the_same_limits_first_or_later() {
    let app = TestApp::on_embedded("").await;
    // Bare LF line endings are accepted, on the first request and on a later one (hyper's).
    let answer = exchange(
        &app,
        b"GET /health/live HTTP/1.1\nHost: x\n\nGET /health/live HTTP/1.1\nHost: x\nConnection: close\n\n",
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");

    // An over-long request line is 414, first or later; an over-large head 431; both readable
    // whole (no reset while the client is still sending).
    let long_target = format!("/health/live?{}", "a".repeat(9 * 1024));
    let first = exchange(
        &app,
        format!("GET {long_target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    problem_of(&first, 414);
    let later = exchange(
        &app,
        format!(
            "GET /health/live HTTP/1.1\r\nHost: x\r\n\r\nGET {long_target} HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let second = later
        .find("HTTP/1.1 414")
        .expect("a 414 for the second request");
    assert!(later.starts_with("HTTP/1.1 200 OK"), "{later}");
    problem_of(&later[second..], 414);
    let big_header = format!("x-big: {}\r\n", "b".repeat(8 * 1024));
    let oversized = exchange(
        &app,
        format!("GET /health/live HTTP/1.1\r\nHost: x\r\n{big_header}{big_header}{big_header}\r\n")
            .as_bytes(),
    )
    .await;
    problem_of(&oversized, 431);
    let malformed = exchange(&app, b"GET /health/live HTTP/1.1\r\nno colon here\r\n\r\n").await;
    problem_of(&malformed, 400);

    // A head that never completes is 408 after the head deadline (10 s).
    let started = Instant::now();
    let timed_out = exchange(&app, b"GET /health/live HTTP/1.1\r\nHost: x\r\n").await;
    problem_of(&timed_out, 408);
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );

    // Every refusal is counted.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    for status in ["400", "408", "414", "431"] {
        let counted = metrics.lines().any(|line| {
            line.starts_with("streamgate_http_requests_total")
                && line.contains("route=\"unparsed\"")
                && line.contains(&format!("status=\"{status}\""))
        });
        assert!(counted, "{status} not counted:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deadline_covers_the_tls_handshake_and_the_head() {
    let (app, dir) = on_tls().await;
    let pem = std::fs::read(dir.path().join("cert.pem")).unwrap();
    use rustls_pki_types::pem::PemObject;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for certificate in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(certificate.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let started = Instant::now();
    let tcp = TcpStream::connect(app.address).await.unwrap();
    // A slow handshake (6 s), then a head that never completes: refused 10 s after the accept,
    // not 10 s after the handshake.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    tls.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut answer)).await;
    let elapsed = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    problem_of(&answer, 408);
    assert!(
        elapsed < Duration::from_secs(13),
        "refused {elapsed:?} after connecting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_event_stream_is_chunked_and_ends_with_a_reason() {
    let app = TestApp::on_embedded("").await;
    let mut socket = TcpStream::connect(app.address).await.unwrap();
    socket
        .write_all(
            format!(
                "GET /api/streams/ending/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = socket.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    app.begin_shutdown();
    let rest = read_to_close(&mut socket, Duration::from_secs(10)).await;
    let all = head + &rest;
    assert!(
        all.contains("event: end\ndata: {\"reason\":\"shutdown\"}\n\n"),
        "{all:?}"
    );
    assert!(all.ends_with("\r\n0\r\n\r\n"), "no last chunk: {all:?}");
}

on_each_backend!(a_group_stream_ends_with_the_reason_it_ended);

async fn a_group_stream_ends_with_the_reason_it_ended(app: TestApp) {
    for (stream, deleted, reason) in [
        (
            "ends-group",
            "/api/streams/ends-group/groups/g",
            "group_deleted",
        ),
        ("ends-stream", "/api/streams/ends-stream", "stream_deleted"),
    ] {
        app.publish(stream, json!(1)).await;
        let mut consumer = app.consume(stream, "g", "").await;
        consumer.events(1, Duration::from_secs(10)).await;
        let answer = app
            .request(reqwest::Method::DELETE, deleted)
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{}", answer.status());
        let end = consumer
            .next_event(Duration::from_secs(15))
            .await
            .expect("an end event");
        assert_eq!(end.event.as_deref(), Some("end"));
        assert_eq!(end.json(), json!({ "reason": reason }));
        assert!(consumer.ends_within(Duration::from_secs(5)).await);
        assert!(!consumer.cut, "the stream was cut, not ended");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_the_write_timeout() {
    let app =
        TestApp::on_embedded("sse_write_timeout = \"1s\"\nlimits.max_message_bytes = 1048576\n")
            .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(app.address).await.unwrap();
    stuck
        .write_all(
            format!(
                "GET /api/streams/unread/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = [0u8; 512];
    let _ = stuck.read(&mut head).await.unwrap();
    assert_eq!(
        json(app.get("/health").await).await["connections"]["sse"],
        1
    );
    // Far more than the socket buffers hold; the client reads none of it.
    let big = "x".repeat(500_000);
    let mut dropped = false;
    for _ in 0..80 {
        app.publish("unread", json!(big)).await;
        if json(app.get("/health").await).await["connections"]["sse"] == 0 {
            dropped = true;
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dropped && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        dropped = json(app.get("/health").await).await["connections"]["sse"] == 0;
    }
    assert!(dropped, "the stuck client still holds its connection");
    drop(stuck);
}

/// Connects a WebSocket client to `/ws`.
async fn websocket(
    app: &TestApp,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let url = format!("ws://{}/ws?token={TOKEN}", app.address);
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket handshake");
    socket
}

/// Reads until the server's close frame; its code.
async fn close_code(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
) -> Option<CloseCode> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|frame| frame.code),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_refused_over_capacity_gets_1013_even_while_sending() {
    let app = TestApp::on_embedded("limits.max_connections = 1\n").await;
    let _holder = app.subscribe("/api/streams/full/events", &[]).await;
    let padding = "p".repeat(8 * 1024);
    for attempt in 0..20 {
        let mut socket = websocket(&app).await;
        // The client sends at once (and goes on sending) as the server refuses.
        for _ in 0..8 {
            let ping = format!(r#"{{"type":"ping","ref":"{padding}"}}"#);
            if socket.send(Message::text(ping)).await.is_err() {
                break;
            }
        }
        assert_eq!(
            close_code(&mut socket).await,
            Some(CloseCode::Again),
            "attempt {attempt}"
        );
    }
}

/// A WebSocket subscribed to `topic` (its `subscribed` reply read).
async fn subscribed_websocket(
    app: &TestApp,
    topic: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let mut socket = websocket(app).await;
    let subscribe = json!({ "type": "subscribe", "topics": [topic] }).to_string();
    socket.send(Message::text(subscribe)).await.unwrap();
    let subscribed = socket.next().await;
    assert!(
        matches!(&subscribed, Some(Ok(Message::Text(text))) if text.contains("subscribed")),
        "{subscribed:?}"
    );
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_closes_complete_the_closing_handshake() {
    let app = TestApp::on_embedded("").await;
    // The client closes: the server answers with its close frame (no abnormal 1006).
    let mut socket = subscribed_websocket(&app, "closing").await;
    socket.close(None).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("an answer to the close");
    assert!(
        matches!(reply, Some(Ok(Message::Close(_))) | None),
        "{reply:?}"
    );
    // The server closes (shutdown): 1012, and the handshake completes.
    let mut socket = subscribed_websocket(&app, "closing").await;
    app.begin_shutdown();
    assert_eq!(close_code(&mut socket).await, Some(CloseCode::Restart));
    let after = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("the connection ends");
    assert!(after.is_none(), "{after:?}");
}

/// The HTTP/1.1 fast path serves exactly the routes whose answer is an event stream: checked
/// against the router's own OpenAPI document, so a new SSE route (or a renamed one) cannot be
/// missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_serves_exactly_the_event_stream_routes() {
    let app = TestApp::on_embedded("").await;
    let document = json(app.get("/openapi.json").await).await;
    let paths = document["paths"].as_object().expect("paths");
    let mut streaming = Vec::new();
    for (template, operations) in paths {
        let Some(get) = operations.get("get") else {
            continue;
        };
        let is_event_stream = get["responses"]["200"]["content"]
            .get("text/event-stream")
            .is_some();
        // `{stream}` and the like, filled in with a sample name.
        let path = template
            .split('/')
            .map(|part| {
                if part.starts_with('{') {
                    "sample"
                } else {
                    part
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        assert_eq!(
            streamgate::http::serve::is_sse_path(&path),
            is_event_stream,
            "{template}"
        );
        if is_event_stream {
            streaming.push(template.clone());
        }
    }
    assert_eq!(streaming.len(), 3, "{streaming:?}");
}
