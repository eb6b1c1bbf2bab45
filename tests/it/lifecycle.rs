//! The process's life: start-up against a missing Redis, secrets kept out of logs, and a clean
//! exit on SIGTERM.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::process::{self, Process};
use crate::helpers::{RedisServer, json};

#[test]
fn start_up_retries_then_exits_naming_the_cause() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let started = Instant::now();
    let output = process::run(
        &[
            "--redis-url",
            &url,
            "--bearer-token",
            "t",
            "--http-address",
            "127.0.0.1:0",
        ],
        &[("STREAMGATE_REDIS__CONNECT_RETRIES", "2")],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot connect to Redis at 127.0.0.1:{port} (tried 3 times)"
        )),
        "{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("refused"),
        "the cause is named: {stderr}"
    );
    assert_eq!(stderr.matches("retrying").count(), 2, "{stderr}");
    // Said once, each cause once.
    let failure = stderr
        .lines()
        .filter(|line| line.contains("cannot connect to Redis at"))
        .collect::<Vec<_>>();
    assert_eq!(failure.len(), 1, "{stderr}");
    assert_eq!(failure[0].matches("refused").count(), 1, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let redis_url = redis.url();
    let mut process = Process::spawn(
        &[
            "--redis-url",
            &redis_url,
            "--bearer-token",
            "t",
            "--http-address",
            "127.0.0.1:0",
        ],
        &[],
    );
    let url = process.wait_for_url().await;
    // An open keep-alive connection must not hold the exit up.
    let client = reqwest::Client::new();
    let response = client
        .get(format!("{url}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    process.signal("TERM");
    let status = process
        .wait(Duration::from_secs(10))
        .await
        .expect("exited within 10 s");
    assert!(
        status.success(),
        "exit status {status}: {}",
        process.stderr()
    );
    assert!(
        process.stderr().contains("shutting down"),
        "{}",
        process.stderr()
    );
    assert!(process.stderr().contains("stopped"), "{}", process.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let _: () = redis.cmd(&["CONFIG", "SET", "requirepass", "redis-pa55-secret"]);
    let redis_url = format!("redis://:redis-pa55-secret@{}", redis.address());
    let token = "very-secret-token-4242";
    for format in ["text", "json"] {
        let mut process = Process::spawn(
            &[
                "--redis-url",
                &redis_url,
                "--bearer-token",
                token,
                "--http-address",
                "127.0.0.1:0",
                "--log-level",
                "trace",
                "--log-format",
                format,
            ],
            &[],
        );
        let url = process.wait_for_url().await;
        let client = reqwest::Client::new();
        let response = client
            .post(format!("{url}/api/streams/s/messages"))
            .bearer_auth(token)
            .json(&json!({ "data": 1 }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        // Query tokens are not accepted here, but still kept out of the logs: under any case of
        // their names, and a credential under any name at all.
        for path in [
            format!("/admin/ping?token={token}"),
            format!("/admin/streams?access_token={token}&x=1"),
            format!("/admin/ping?Token={token}"),
            format!("/admin/ping?ACCESS_TOKEN={token}"),
            format!("/admin/ping?note={token}"),
        ] {
            let response = client.get(format!("{url}{path}")).send().await.unwrap();
            assert_eq!(response.status(), 401, "{path}");
        }
        // On a streaming route the query token is accepted, and still kept out of the logs.
        let events = client
            .get(format!("{url}/api/events?stream=s&group=g&token={token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(events.status(), 200);
        drop(events);
        let response = client
            .get(format!("{url}/admin/ping"))
            .bearer_auth("wrong-guess")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        let response = client
            .get(format!("{url}/admin/stats"))
            .header("x-correlation-id", "trace-me-123")
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-correlation-id"], "trace-me-123");
        assert_eq!(json(response).await["streams"][0]["name"], "s");
        process.signal("TERM");
        process.wait(Duration::from_secs(10)).await.expect("exit");

        let logs = format!("{}\n{}", process.stdout(), process.stderr());
        assert!(
            logs.contains("trace-me-123"),
            "correlation ids are logged ({format}):\n{logs}"
        );
        assert!(
            logs.contains("<redacted>"),
            "query tokens are logged redacted ({format})"
        );
        for secret in [token, "redis-pa55-secret", "wrong-guess"] {
            assert!(
                !logs.contains(secret),
                "{secret} leaked into the {format} logs:\n{logs}"
            );
        }
        if format == "json" {
            for line in process.stderr().lines() {
                let parsed: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|error| panic!("not a JSON log line ({error}): {line}"));
                if line.contains("served") {
                    assert!(parsed["span"]["correlation_id"].is_string(), "{line}");
                }
            }
        }
    }
}

/// Sends `bytes` on a raw connection and returns what comes back before the server closes it.
async fn raw_exchange(app: &crate::helpers::TestApp, bytes: &[u8], pause: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(app.address).await.unwrap();
    socket.write_all(bytes).await.unwrap();
    tokio::time::sleep(pause).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), socket.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_trickled_request_heads_are_refused() {
    let app = crate::helpers::TestApp::on_embedded("").await;
    let huge = format!(
        "GET /health/live HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let reply = raw_exchange(&app, huge.as_bytes(), Duration::ZERO).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    // Half a head, then nothing: the server gives up after its header-read timeout.
    let started = Instant::now();
    let reply = raw_exchange(
        &app,
        b"GET /health/live HTTP/1.1\r\nHost: x\r\n",
        Duration::ZERO,
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    // A complete head is served, on the plain path and on the SSE path.
    let reply = raw_exchange(
        &app,
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::ZERO,
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let reply = raw_exchange(
        &app,
        b"GET /api/streams/s/events HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::ZERO,
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    assert!(
        reply.contains("content-type: application/problem+json")
            && reply.contains("www-authenticate"),
        "{reply}"
    );
}
