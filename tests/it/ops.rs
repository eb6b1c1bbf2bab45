//! Operations: metrics, rate limits, CORS, JWT, TLS, the synthetic probe, and behaviour through a
//! backend outage.

use std::time::Duration;

use serde_json::json;

use crate::helpers::TestApp;

on_each_backend!(metrics_count_what_happens_with_bounded_labels);

/// The value of one series in a metrics text (0 when absent).
pub fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name_and_labels)?
                .strip_prefix(' ')?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

async fn metrics_count_what_happens_with_bounded_labels(app: TestApp) {
    let mut group = app.consume("metered", "g", "&consumer=m").await;
    let mut broadcast = app.subscribe("/api/streams/metered/events", &[]).await;
    app.publish_batch("metered", vec![json!(1), json!(2)]).await;
    group.events(2, Duration::from_secs(5)).await;
    broadcast.events(2, Duration::from_secs(5)).await;
    app.get("/api/streams/some-stream-name/messages").await;
    let response = reqwest::Client::new()
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "no credentials needed");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics-text")
    );
    let text = response.text().await.unwrap();
    assert_eq!(
        series(
            &text,
            r#"streamgate_messages_received_total{source="http"}"#
        ),
        2.0
    );
    assert_eq!(
        series(
            &text,
            r#"streamgate_messages_delivered_total{transport="sse",mode="at_least_once"}"#
        ),
        2.0
    );
    assert_eq!(
        series(
            &text,
            r#"streamgate_messages_delivered_total{transport="sse",mode="broadcast"}"#
        ),
        2.0
    );
    assert_eq!(
        series(
            &text,
            r#"streamgate_delivery_latency_seconds_count{transport="sse"}"#
        ),
        4.0
    );
    assert_eq!(
        series(&text, r#"streamgate_connections{transport="sse"}"#),
        2.0
    );
    // Routes are templates, not raw paths.
    let browse = r#"streamgate_http_requests_total{route="/api/streams/{stream}/messages",method="GET",status="404"}"#;
    assert_eq!(series(&text, browse), 1.0, "{text}");
    assert!(!text.contains("some-stream-name"));
    assert!(text.contains("# TYPE streamgate_http_request_duration_seconds histogram"));
    assert!(text.contains(r#"streamgate_http_request_duration_seconds_bucket{le="0.005""#));
}

const LIMITED: &str = r#"
[limits]
rate_per_second = 2
burst = 3

[[tokens]]
name = "other"
token = "other-token"
scopes = ["admin"]
"#;

on_each_backend!(bursts_over_the_rate_limit_get_429 = LIMITED);

async fn bursts_over_the_rate_limit_get_429(app: TestApp) {
    for _ in 0..3 {
        assert_eq!(
            app.get("/admin/ping").await.status(),
            200,
            "within the burst"
        );
    }
    let limited = app.get("/admin/ping").await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    crate::helpers::problem(limited, 429).await;
    // Another credential has its own budget; probes, metrics and docs are never limited.
    let client = reqwest::Client::new();
    let other = client
        .get(app.url("/admin/ping"))
        .bearer_auth("other-token")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    for path in [
        "/health/live",
        "/health/ready",
        "/metrics",
        "/health/live",
        "/health/live",
    ] {
        assert_eq!(
            client.get(app.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
    // Guessing tokens is limited per client address.
    let mut statuses = Vec::new();
    for attempt in 0..5 {
        let response = client
            .get(app.url("/admin/ping"))
            .bearer_auth(format!("guess-{attempt}"))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
    let metrics = client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(series(&metrics, "streamgate_rate_limited_total"), 3.0);
    // The budget refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.get("/admin/ping").await.status(), 200);
}

const JWT_SECRET: &str = "jwt-test-secret-0123456789abcdef";
const JWT_HS256: &str = r#"
[jwt]
hs256_secret = "jwt-test-secret-0123456789abcdef"
audience = "streamgate-tests"
issuer = "https://issuer.test"
"#;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(
    claims: &serde_json::Value,
    algorithm: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), claims, key).expect("sign")
}

fn hs256(claims: serde_json::Value) -> String {
    sign(
        &claims,
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
}

async fn status_with(app: &TestApp, method: reqwest::Method, path: &str, token: &str) -> u16 {
    let mut request = reqwest::Client::new()
        .request(method.clone(), app.url(path))
        .bearer_auth(token);
    if method == reqwest::Method::POST {
        request = request.json(&json!({ "data": 1 }));
    }
    request.send().await.unwrap().status().as_u16()
}

on_each_backend!(json_web_tokens_are_verified_and_scoped = JWT_HS256);

async fn json_web_tokens_are_verified_and_scoped(app: TestApp) {
    let claims = |extra: serde_json::Value| {
        let mut claims = json!({
            "sub": "alice", "exp": now_secs() + 300, "aud": "streamgate-tests", "iss": "https://issuer.test",
        });
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        claims
    };
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    let writer = hs256(claims(
        json!({ "scope": "publish consume", "streams": ["orders.*"] }),
    ));
    assert_eq!(
        status_with(
            &app,
            post.clone(),
            "/api/streams/orders.eu/messages",
            &writer
        )
        .await,
        201
    );
    assert_eq!(
        status_with(
            &app,
            post.clone(),
            "/api/streams/payments/messages",
            &writer
        )
        .await,
        403,
        "stream outside its pattern"
    );
    assert_eq!(
        status_with(&app, get.clone(), "/admin/ping", &writer).await,
        403,
        "no admin scope"
    );
    // `scope` and `scopes` count together.
    let admin = hs256(claims(json!({ "scope": "publish", "scopes": ["admin"] })));
    assert_eq!(
        status_with(&app, get.clone(), "/admin/ping", &admin).await,
        200
    );
    assert_eq!(
        status_with(&app, post.clone(), "/api/streams/anything/messages", &admin).await,
        201
    );

    let expired = hs256(claims(
        json!({ "scope": "admin", "exp": now_secs() - 3600 }),
    ));
    let wrong_key = sign(
        &claims(json!({ "scope": "admin" })),
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret-entirely-000000000"),
    );
    let wrong_audience = hs256(claims(json!({ "scope": "admin", "aud": "someone-else" })));
    let wrong_issuer = hs256(claims(
        json!({ "scope": "admin", "iss": "https://evil.test" }),
    ));
    let mut no_expiry = claims(json!({ "scope": "admin" }));
    no_expiry.as_object_mut().unwrap().remove("exp");
    let no_expiry = hs256(no_expiry);
    for (what, token) in [
        ("expired", expired),
        ("signed with another key", wrong_key),
        ("for another audience", wrong_audience),
        ("from another issuer", wrong_issuer),
        ("without exp", no_expiry),
        ("garbled", "a.b.c".to_owned()),
    ] {
        let response = reqwest::Client::new()
            .get(app.url("/admin/ping"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert!(
            response.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token"),
            "{what}"
        );
        crate::helpers::problem(response, 401).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_public_keys_verify_tokens() {
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let config = format!(
        "[jwt]\npublic_key_pem = \"\"\"\n{}\"\"\"\n",
        key_pair.public_key_pem()
    );
    let app = TestApp::on_embedded(&config).await;
    let private =
        jsonwebtoken::EncodingKey::from_ec_pem(key_pair.serialize_pem().as_bytes()).unwrap();
    let claims = json!({ "sub": "svc", "scopes": ["admin"], "exp": now_secs() + 60 });
    let token = sign(&claims, jsonwebtoken::Algorithm::ES256, &private);
    assert_eq!(
        status_with(&app, reqwest::Method::GET, "/admin/ping", &token).await,
        200
    );
    // A token signed with a shared secret is refused by a public-key configuration.
    let hmac = sign(
        &claims,
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(b"x"),
    );
    assert_eq!(
        status_with(&app, reqwest::Method::GET, "/admin/ping", &hmac).await,
        401
    );
}

on_each_backend!(
    cors_preflight_is_allowed_for_listed_origins_only =
        "[cors]\nallowed_origins = [\"https://app.example\"]\n"
);

async fn cors_preflight_is_allowed_for_listed_origins_only(app: TestApp) {
    let preflight = |origin: &str| {
        reqwest::Client::new()
            .request(
                reqwest::Method::OPTIONS,
                app.url("/api/streams/orders/messages"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,idempotency-key",
            )
            .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let headers = allowed.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(
        headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    let allowed_headers = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        allowed_headers.contains("authorization") && allowed_headers.contains("idempotency-key"),
        "{allowed_headers}"
    );
    assert!(headers.get("access-control-allow-credentials").is_none());

    let refused = preflight("https://evil.example").await.unwrap();
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "{:?}",
        refused.headers()
    );

    // A real request from the listed origin may read the answer and streamgate's headers.
    let response = app
        .request(reqwest::Method::GET, "/admin/ping")
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("x-correlation-id"), "{exposed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default() {
    let app = TestApp::on_embedded("").await;
    let response = app
        .request(reqwest::Method::GET, "/admin/ping")
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_requests_and_streams_with_a_pem_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::helpers::test_certificate(dir.path());
    let app = TestApp::on_embedded(&format!("[tls]\ncert = {cert:?}\nkey = {key:?}\n")).await;
    assert!(app.url("/").starts_with("https://"));
    let mut events = app.subscribe("/api/streams/secure/events", &[]).await;
    app.publish("secure", json!({ "over": "tls" })).await;
    let received = events.events(1, Duration::from_secs(5)).await;
    assert_eq!(received[0].json()["body"], json!({ "over": "tls" }));
    // A client that does not trust the certificate is refused, and plain HTTP gets no answer.
    let untrusting = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(
        untrusting
            .get(app.url("/health/live"))
            .send()
            .await
            .is_err()
    );
    let plain = untrusting
        .get(format!("http://{}/health/live", app.address))
        .timeout(Duration::from_secs(15))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_an_acl_user() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::helpers::test_certificate(dir.path());
    let tls_port = crate::helpers::redis_server::free_port();
    let tls_args: Vec<String> = [
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &cert.display().to_string(),
        "--tls-key-file",
        &key.display().to_string(),
        "--tls-ca-cert-file",
        &cert.display().to_string(),
        "--tls-auth-clients",
        "no",
    ]
    .map(str::to_owned)
    .to_vec();
    let Some(redis) = crate::helpers::RedisServer::start_with(&tls_args) else {
        return;
    };
    let _: String = redis.cmd(&[
        "ACL",
        "SETUSER",
        "app",
        "on",
        ">app-secret",
        "~*",
        "&*",
        "+@all",
    ]);
    let url = format!("rediss://app:app-secret@127.0.0.1:{tls_port}");
    let app = TestApp::spawn(
        crate::helpers::Backend::RedisAt(url),
        &format!("redis.tls_ca = {cert:?}\n"),
    )
    .await;
    let mut group = app.consume("secure", "g", "").await;
    let id = app.publish("secure", json!("over rediss")).await;
    assert_eq!(
        group.events(1, Duration::from_secs(5)).await[0]
            .id
            .as_deref(),
        Some(id.as_str())
    );
    let clients: String = redis.cmd(&["CLIENT", "LIST"]);
    assert!(
        clients.lines().any(|line| line.contains("user=app")),
        "{clients}"
    );
    let length: u64 = redis.cmd(&["XLEN", "secure"]);
    assert_eq!(length, 1);
}

on_each_backend!(the_probe_runs_on_schedule_and_on_demand);

async fn the_probe_runs_on_schedule_and_on_demand(app: TestApp) {
    let scheduled = app.probed().await;
    assert_eq!(scheduled["ok"], true, "{scheduled}");
    assert!(scheduled["round_trip_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(app.get("/health/ready").await.status(), 200);

    let triggered = app
        .request(reqwest::Method::POST, "/trigger-test-event")
        .send()
        .await
        .unwrap();
    assert_eq!(triggered.status(), 200);
    let body = crate::helpers::json(triggered).await;
    assert_eq!(body["status"], "ok");
    let round_trip = body["round_trip_ms"].as_f64().unwrap();
    assert!(round_trip > 0.0 && round_trip < 5000.0, "{body}");
    let decimals = body["round_trip_ms"]
        .to_string()
        .split('.')
        .nth(1)
        .map_or(0, str::len);
    assert!(decimals <= 3, "milliseconds to the microsecond: {body}");
    // One per second.
    let again = app
        .request(reqwest::Method::POST, "/trigger-test-event")
        .send()
        .await
        .unwrap();
    assert_eq!(again.headers()["retry-after"], "1");
    crate::helpers::problem(again, 429).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = app
        .request(reqwest::Method::POST, "/trigger-test-event")
        .send()
        .await
        .unwrap();
    assert_eq!(later.status(), 200);
    // The probe round trips are measured.
    let metrics = reqwest::Client::new()
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        series(&metrics, "streamgate_probe_round_trip_seconds_count") >= 3.0,
        "{metrics}"
    );
    assert_eq!(series(&metrics, "streamgate_probe_failures_total"), 0.0);
}

on_each_backend!(the_probe_survives_an_admin_flush);

/// A flush deletes the probe's stream and group; that is not a delivery failure.
async fn the_probe_survives_an_admin_flush(app: TestApp) {
    assert_eq!(app.probed().await["ok"], true);
    let flushed = app
        .request(reqwest::Method::POST, "/admin/flush")
        .send()
        .await
        .unwrap();
    assert_eq!(flushed.status(), 200);
    let triggered = app
        .request(reqwest::Method::POST, "/trigger-test-event")
        .send()
        .await
        .unwrap();
    let body = crate::helpers::json(triggered).await;
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(app.get("/health/ready").await.status(), 200);
    let metrics = reqwest::get(app.url("/metrics")).await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert_eq!(series(&metrics, "streamgate_probe_failures_total"), 0.0);
}

on_each_backend!(
    streaming_over_the_connection_cap_is_503_with_retry_after = "[limits]\nmax_connections = 1\n",
);

/// SSE and long-polls over `limits.max_connections` (WebSocket: see seed004.rs).
async fn streaming_over_the_connection_cap_is_503_with_retry_after(app: TestApp) {
    let first = crate::helpers::sse::SseClient::open(
        app.request(reqwest::Method::GET, "/api/streams/capped/events"),
    )
    .await;
    assert_eq!(first.status, 200);
    for path in [
        "/api/streams/capped/events",
        "/api/events?stream=capped&group=g",
        "/api/v1/poll?topics=capped&timeout=0",
    ] {
        let refused = app.get(path).await;
        assert_eq!(refused.headers()["retry-after"], "1", "{path}");
        crate::helpers::problem(refused, 503).await;
    }
    // Plain requests are not streaming connections.
    assert_eq!(app.get("/api/streams/capped/groups").await.status(), 404);
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let poll = app.get("/api/v1/poll?topics=capped&timeout=0").await;
        if poll.status() == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const PUBLISHER: &str = r#"
[probe]
interval = "1s"
timeout = "1s"

[[tokens]]
name = "publisher"
token = "publisher-token"
scopes = ["publish"]
"#;

on_each_backend!(triggering_the_probe_needs_the_admin_scope = PUBLISHER);

async fn triggering_the_probe_needs_the_admin_scope(app: TestApp) {
    let client = reqwest::Client::new();
    let url = app.url("/trigger-test-event");
    crate::helpers::problem(client.post(&url).send().await.unwrap(), 401).await;
    let publisher = client
        .post(&url)
        .bearer_auth("publisher-token")
        .send()
        .await
        .unwrap();
    crate::helpers::problem(publisher, 403).await;
}

/// Polls readiness until its status is `want` (within `within`); returns the last body.
async fn readiness_becomes(app: &TestApp, want: u16, within: Duration) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let response = app.get("/health/ready").await;
        let status = response.status().as_u16();
        let body = crate::helpers::json(response).await;
        if status == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness stayed {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_readiness_fails_when_delivery_is_wedged_but_redis_answers() {
    let Some(app) = TestApp::on_redis(PUBLISHER).await else {
        return;
    };
    readiness_becomes(&app, 200, Duration::from_secs(5)).await;
    // Redis still answers PING and takes writes, but blocking reads (every delivery loop's) are
    // refused.
    let _: String = app.redis().cmd(&["ACL", "SETUSER", "default", "-xread"]);
    let problem = readiness_becomes(&app, 503, Duration::from_secs(10)).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("probe"),
        "{problem}"
    );
    assert_eq!(
        app.get("/admin/ping").await.status(),
        200,
        "the backend itself answers"
    );
    let health = app.get("/health").await;
    assert_eq!(health.status(), 503);
    assert_eq!(crate::helpers::json(health).await["probe"]["ok"], false);

    let _: String = app.redis().cmd(&["ACL", "SETUSER", "default", "+xread"]);
    readiness_becomes(&app, 200, Duration::from_secs(20)).await;
}

/// What one publish attempt got: its status, its `Retry-After`, and the id when it was stored.
struct Attempt {
    status: u16,
    retry_after: Option<String>,
    id: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_ten_second_outage_under_load_loses_no_acknowledged_publish() {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    // Every write is on disk before Redis answers it, so a restart keeps what was acknowledged.
    let durable = ["--appendonly", "yes", "--appendfsync", "always"].map(str::to_owned);
    let Some(mut redis) = crate::helpers::RedisServer::start_with(&durable) else {
        return;
    };
    let config =
        "[probe]\ninterval = \"1s\"\ntimeout = \"1s\"\n[consumer]\nvisibility_timeout = \"2s\"\n";
    let app = Arc::new(TestApp::spawn(crate::helpers::Backend::RedisAt(redis.url()), config).await);
    let mut group = app
        .consume("outage", "g", "&consumer=steady&limit=5000")
        .await;
    let mut broadcast = app.subscribe("/api/streams/outage/events", &[]).await;

    let publishing = Arc::new(AtomicBool::new(true));
    let publishers: Vec<_> = (0..2)
        .map(|publisher| {
            let (app, publishing) = (app.clone(), publishing.clone());
            tokio::spawn(async move {
                let mut attempts = Vec::new();
                let mut n = 0;
                while publishing.load(Ordering::Relaxed) {
                    let response = app
                        .request(reqwest::Method::POST, "/api/streams/outage/messages")
                        .json(&json!({ "data": { "publisher": publisher, "n": n } }))
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await
                        .expect("every publish is answered, even during the outage");
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .map(|value| value.to_str().unwrap().to_owned());
                    let body: serde_json::Value = response.json().await.unwrap();
                    let id = (status == 201).then(|| body["id"].as_str().unwrap().to_owned());
                    attempts.push(Attempt {
                        status,
                        retry_after,
                        id,
                    });
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                attempts
            })
        })
        .collect();

    // Group messages are finished as they arrive (a failed finish is redelivered later). Both
    // consumers record what they get until told to stop.
    let consuming = Arc::new(AtomicBool::new(true));
    let group_seen = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let broadcast_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let group_task = {
        let (app, consuming, seen) = (app.clone(), consuming.clone(), group_seen.clone());
        tokio::spawn(async move {
            while consuming.load(Ordering::Relaxed) {
                if let Some(event) = group.next_event(Duration::from_millis(200)).await {
                    let id = event.id.clone().unwrap();
                    app.finish("outage", "g", "steady", &id).await;
                    seen.lock().unwrap().insert(id);
                }
            }
            group.ended()
        })
    };
    let broadcast_task = {
        let (consuming, seen) = (consuming.clone(), broadcast_seen.clone());
        tokio::spawn(async move {
            while consuming.load(Ordering::Relaxed) {
                if let Some(event) = broadcast.next_event(Duration::from_millis(200)).await {
                    seen.lock().unwrap().push(event.id.unwrap());
                }
            }
            broadcast.ended()
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.stop();
    let outage = tokio::time::Instant::now();
    readiness_becomes(&app, 503, Duration::from_secs(2)).await;
    tokio::time::sleep_until(outage + Duration::from_secs(10)).await;
    redis.restart();
    let back = tokio::time::Instant::now();
    readiness_becomes(&app, 200, Duration::from_secs(15)).await;
    let recovered_in = back.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    publishing.store(false, Ordering::Relaxed);

    let mut acknowledged = BTreeSet::new();
    let mut refused = 0;
    for publisher in publishers {
        for attempt in publisher.await.unwrap() {
            match attempt.status {
                201 => {
                    acknowledged.insert(attempt.id.unwrap());
                }
                503 => {
                    assert_eq!(attempt.retry_after.as_deref(), Some("1"));
                    refused += 1;
                }
                other => panic!("publish answered {other}"),
            }
        }
    }
    assert!(refused > 0, "some publishes fell into the outage");
    // Everything acknowledged is stored (some refused ones may be too: their reply was lost).
    let stored: Vec<(String, Vec<(String, String)>)> = redis.cmd(&["XRANGE", "outage", "-", "+"]);
    let stored: BTreeSet<String> = stored.into_iter().map(|(id, _)| id).collect();
    let missing: Vec<_> = acknowledged.difference(&stored).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");

    // Both consumers stay connected and get everything stored (the group's lost deliveries
    // within a visibility timeout or two).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let complete = || {
        let broadcast: BTreeSet<String> = broadcast_seen.lock().unwrap().iter().cloned().collect();
        *group_seen.lock().unwrap() == stored && broadcast == stored
    };
    while !complete() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consuming.store(false, Ordering::Relaxed);
    let (group_ended, broadcast_ended) = (group_task.await.unwrap(), broadcast_task.await.unwrap());
    assert!(
        !group_ended && !broadcast_ended,
        "the SSE streams stayed open"
    );
    assert_eq!(
        *group_seen.lock().unwrap(),
        stored,
        "the group consumer got every stored message"
    );
    let broadcast_seen = broadcast_seen.lock().unwrap().clone();
    let broadcast_set: BTreeSet<String> = broadcast_seen.iter().cloned().collect();
    assert_eq!(
        broadcast_set.len(),
        broadcast_seen.len(),
        "no broadcast duplicates"
    );
    assert_eq!(
        broadcast_set, stored,
        "the subscriber got every stored message"
    );
    eprintln!(
        "outage: {} acknowledged, {refused} refused with 503, readiness back {recovered_in:?} after Redis",
        acknowledged.len()
    );
}

on_each_backend!(a_token_expiry_ends_the_streams_it_opened = JWT_HS256);

/// A JWT's `exp` (plus the 30 s clock-skew leeway) bounds the streams it opened: an SSE stream
/// ends with `event: end` `token_expired`, a WebSocket closes with 1008, a long-poll returns.
async fn a_token_expiry_ends_the_streams_it_opened(app: TestApp) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    // Accepted for about 3 more seconds.
    let token = hs256(json!({
        "sub": "brief", "exp": now_secs() - 27, "aud": "streamgate-tests",
        "iss": "https://issuer.test", "scope": "consume publish",
    }));
    let started = std::time::Instant::now();
    let mut events = crate::helpers::sse::SseClient::open(
        app.client
            .get(app.url("/api/streams/expiring/events"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(events.status, 200);
    let url = format!("ws://{}/ws?token={token}", app.address);
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let poll = app
        .client
        .get(app.url("/api/v1/poll?topics=expiring&timeout=30"))
        .bearer_auth(&token)
        .send();

    let end = events
        .next_event(Duration::from_secs(15))
        .await
        .expect("an end event");
    assert_eq!(end.event.as_deref(), Some("end"));
    assert_eq!(end.json(), json!({ "reason": "token_expired" }));
    assert!(events.ends_within(Duration::from_secs(5)).await);
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(15), socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|frame| frame.code),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(closed, Some(CloseCode::Policy));
    let polled = tokio::time::timeout(Duration::from_secs(15), poll)
        .await
        .expect("the long-poll returned at expiry")
        .unwrap();
    assert_eq!(polled.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
}
