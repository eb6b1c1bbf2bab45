//! Seed 004's client API: WebSocket and long-polling on the same delivery core, opaque
//! `message_id`s that acknowledge from any instance, and what garbage gets.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::process::Process;
use crate::helpers::{RedisServer, TOKEN, TestApp, json, problem};

const WAIT: Duration = Duration::from_secs(5);
const FAST: &str = "[consumer]\nvisibility_timeout = \"1s\"\n";
/// Long enough for the server to notice a closed WebSocket before its messages become claimable.
const REDELIVERY: &str = "[consumer]\nvisibility_timeout = \"3s\"\n";

on_each_backend!(
    websocket_group_consumers_ack_and_get_redeliveries = REDELIVERY,
    websocket_subscribes_to_several_topics,
    websocket_resubscribing_replaces_the_subscription,
    websocket_broadcast_resumes_from_an_id,
    websocket_publishes_pings_and_unsubscribes,
    websocket_garbage_gets_errors_and_the_socket_stays_usable,
    websocket_authentication,
    long_poll_group_flow = FAST,
    long_poll_answers_on_publish_and_is_empty_at_its_timeout,
    long_poll_broadcast_continues_from_its_cursor,
    garbled_message_ids_are_400_and_ack_nothing,
    websocket_over_the_connection_limit_closes_with_1013 = "[limits]\nmax_connections = 1\n",
    fields_beside_the_body_reach_every_transport = "[consumer]\nmax_deliveries = 1\n",
);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client speaking the JSON protocol.
struct Ws(Socket);

impl Ws {
    async fn connect(app: &TestApp) -> Ws {
        let mut request = format!("ws://{}/ws", app.address)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        let (socket, response) = tokio_tungstenite::connect_async(request)
            .await
            .expect("upgrade");
        assert_eq!(response.status(), 101);
        Ws(socket)
    }

    async fn send(&mut self, frame: Value) {
        self.0
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }

    /// The next JSON text frame within `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<Value> {
        loop {
            let frame = tokio::time::timeout(timeout, self.0.next())
                .await
                .ok()??
                .ok()?;
            match frame {
                Message::Text(text) => {
                    return Some(serde_json::from_str(&text).expect("JSON frame"));
                }
                Message::Close(frame) => panic!("closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    async fn expect(&mut self) -> Value {
        self.next(WAIT).await.expect("a frame")
    }

    /// Sends `frame` and returns the reply.
    async fn call(&mut self, frame: Value) -> Value {
        self.send(frame).await;
        self.expect().await
    }
}

/// Waits until `group` of `stream` has no consumer connected (the server has seen them go).
async fn until_no_consumers(app: &TestApp, stream: &str, group: &str) {
    let path = format!("/api/consumers/{stream}/{group}");
    for _ in 0..500 {
        if app.get(&path).await.status() == 404 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{group} of {stream} still has consumers after 5 s");
}

async fn websocket_group_consumers_ack_and_get_redeliveries(app: TestApp) {
    app.publish("jobs", json!({ "job": 1 })).await;
    let mut ws = Ws::connect(&app).await;
    let subscribed = ws
        .call(json!({ "type": "subscribe", "topics": ["jobs"], "group": "workers", "client_id": "w1", "ref": 7 }))
        .await;
    assert_eq!(
        subscribed,
        json!({ "type": "subscribed", "topics": ["jobs"], "group": "workers", "client_id": "w1", "ref": 7 })
    );
    let message = ws.expect().await;
    assert_eq!(
        (message["type"].as_str(), message["topic"].as_str()),
        (Some("message"), Some("jobs"))
    );
    assert_eq!(
        (message["payload"].clone(), message["deliveries"].clone()),
        (json!({ "job": 1 }), json!(1))
    );
    let ack = ws
        .call(json!({ "type": "ack", "message_id": message["message_id"], "ref": "a" }))
        .await;
    assert_eq!(ack, json!({ "type": "ack", "acked": 1, "ref": "a" }));
    let again = ws
        .call(json!({ "type": "ack", "message_ids": [message["message_id"]] }))
        .await;
    assert_eq!(again["acked"], 0, "already acknowledged");
    drop(ws);
    // Once the server has seen that socket go: a message published before would be delivered
    // to it (and redelivered to the next w1, one delivery more than this test counts).
    until_no_consumers(&app, "jobs", "workers").await;

    // Acknowledged: not redelivered. Unacknowledged: redelivered after the visibility timeout.
    app.publish("jobs", json!({ "job": 2 })).await;
    let mut first = Ws::connect(&app).await;
    first.call(json!({ "type": "subscribe", "topics": ["jobs"], "group": "workers", "client_id": "w1" })).await;
    let second_job = first.expect().await;
    assert_eq!(second_job["payload"], json!({ "job": 2 }));
    drop(first);
    // Once the server has seen w1 go, the claim can only go to w2: its second delivery.
    until_no_consumers(&app, "jobs", "workers").await;
    let mut other = Ws::connect(&app).await;
    other.call(json!({ "type": "subscribe", "topics": ["jobs"], "group": "workers", "client_id": "w2" })).await;
    let redelivered = other
        .next(Duration::from_secs(10))
        .await
        .expect("redelivered");
    assert_eq!(
        (
            redelivered["payload"].clone(),
            redelivered["deliveries"].clone()
        ),
        (json!({ "job": 2 }), json!(2))
    );
    assert_eq!(
        redelivered["message_id"], second_job["message_id"],
        "the same message, the same id"
    );
    other
        .call(json!({ "type": "ack", "message_id": redelivered["message_id"] }))
        .await;
    assert!(
        other.next(Duration::from_millis(1500)).await.is_none(),
        "nothing more"
    );
    assert_eq!(app.group_stats("jobs", "workers").await["pending"], 0);
}

async fn websocket_subscribes_to_several_topics(app: TestApp) {
    let mut ws = Ws::connect(&app).await;
    let subscribed = ws
        .call(json!({ "type": "subscribe", "topics": ["notifications", "alerts"] }))
        .await;
    assert_eq!(subscribed["topics"], json!(["notifications", "alerts"]));
    app.publish("alerts", json!("a")).await;
    app.publish("notifications", json!("n")).await;
    let mut got: Vec<(String, Value)> = Vec::new();
    for _ in 0..2 {
        let message = ws.expect().await;
        assert!(
            message.get("deliveries").is_none(),
            "broadcast messages have no delivery count"
        );
        got.push((
            message["topic"].as_str().unwrap().to_owned(),
            message["payload"].clone(),
        ));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            ("alerts".into(), json!("a")),
            ("notifications".into(), json!("n"))
        ]
    );
}

/// The README's rule: subscribing to a topic again replaces the earlier subscription, also for
/// a named group consumer (whose name the earlier subscription held).
async fn websocket_resubscribing_replaces_the_subscription(app: TestApp) {
    let mut ws = Ws::connect(&app).await;
    let subscribe =
        json!({ "type": "subscribe", "topics": ["tasks"], "group": "g", "client_id": "w1" });
    assert_eq!(ws.call(subscribe.clone()).await["type"], "subscribed");
    let again = ws.call(subscribe).await;
    assert_eq!(
        (again["type"].as_str(), again["client_id"].as_str()),
        (Some("subscribed"), Some("w1")),
        "{again}"
    );
    // One subscription: each message arrives once.
    app.publish("tasks", json!(1)).await;
    let message = ws.expect().await;
    assert_eq!(
        (message["payload"].clone(), message["deliveries"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(
        ws.next(Duration::from_millis(500)).await,
        None,
        "delivered once"
    );
}

async fn websocket_broadcast_resumes_from_an_id(app: TestApp) {
    let ids = app
        .publish_batch("ticker", (0..3).map(|n| json!(n)).collect())
        .await;
    let mut ws = Ws::connect(&app).await;
    ws.call(json!({ "type": "subscribe", "topics": ["ticker"], "from": ids[0] }))
        .await;
    assert_eq!(ws.expect().await["payload"], 1);
    assert_eq!(ws.expect().await["payload"], 2);
    let mut everything = Ws::connect(&app).await;
    everything
        .call(json!({ "type": "subscribe", "topics": ["ticker"], "from": "0" }))
        .await;
    assert_eq!(everything.expect().await["payload"], 0);
    let mut bad = Ws::connect(&app).await;
    let error = bad
        .call(json!({ "type": "subscribe", "topics": ["ticker"], "from": "tomorrow" }))
        .await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
}

async fn websocket_publishes_pings_and_unsubscribes(app: TestApp) {
    let mut ws = Ws::connect(&app).await;
    assert_eq!(
        ws.call(json!({ "type": "ping", "ref": [1, "x"] })).await,
        json!({ "type": "pong", "ref": [1, "x"] })
    );
    ws.call(json!({ "type": "subscribe", "topics": ["chat"] }))
        .await;
    let published = ws
        .call(json!({ "type": "publish", "topic": "chat", "payload": { "text": "hi", "n": 12345678901234567890u64 }, "ref": 1 }))
        .await;
    assert_eq!(
        (
            published["type"].as_str(),
            published["topic"].as_str(),
            published["ref"].as_i64()
        ),
        (Some("published"), Some("chat"), Some(1))
    );
    // Our own message comes back on the subscription, byte for byte.
    let message = ws.expect().await;
    assert_eq!(message["message_id"], published["message_id"]);
    assert_eq!(message["payload"]["text"], "hi");
    let raw = app
        .get("/api/streams/chat/messages")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        raw.contains(r#""body":{"text":"hi","n":12345678901234567890}"#),
        "{raw}"
    );
    let unsubscribed = ws
        .call(json!({ "type": "unsubscribe", "topics": ["chat", "never"] }))
        .await;
    assert_eq!(
        unsubscribed,
        json!({ "type": "unsubscribed", "topics": ["chat"] })
    );
    app.publish("chat", json!("after")).await;
    assert!(
        ws.next(Duration::from_millis(500)).await.is_none(),
        "no longer subscribed"
    );
    let reserved = ws
        .call(json!({ "type": "publish", "topic": "streamgate:x", "payload": 1 }))
        .await;
    assert_eq!(reserved["code"], "forbidden");
}

async fn websocket_garbage_gets_errors_and_the_socket_stays_usable(app: TestApp) {
    let mut ws = Ws::connect(&app).await;
    for (frame, code) in [
        ("not json", "invalid_frame"),
        (r#"{"no":"type"}"#, "invalid_frame"),
        (r#"{"type":"warp"}"#, "unknown_type"),
        (r#"{"type":"subscribe"}"#, "invalid_frame"),
        (r#"{"type":"subscribe","topics":[]}"#, "bad_request"),
        (
            r#"{"type":"subscribe","topics":["bad\u0000name"]}"#,
            "bad_request",
        ),
        (
            r#"{"type":"subscribe","topics":["t"],"mode":"maybe"}"#,
            "bad_request",
        ),
        (
            r#"{"type":"ack","message_id":"m1.forged.token"}"#,
            "invalid_message_id",
        ),
        (r#"{"type":"ack"}"#, "bad_request"),
        (r#"{"type":"publish","topic":"t"}"#, "invalid_frame"),
    ] {
        ws.0.send(Message::text(frame)).await.unwrap();
        let reply = ws.expect().await;
        assert_eq!(
            (reply["type"].as_str(), reply["code"].as_str()),
            (Some("error"), Some(code)),
            "{frame}: {reply}"
        );
        assert!(reply["message"].is_string());
    }
    // A field a frame does not know is refused by name, not ignored: `grop` would otherwise make
    // a group consumer a broadcast subscriber, `tll` a message that never expires.
    for (frame, unknown) in [
        (r#"{"type":"subscribe","topics":["t"],"grop":"g"}"#, "grop"),
        (
            r#"{"type":"subscribe","topics":["t"],"group":"g","clientId":"c"}"#,
            "clientId",
        ),
        (
            r#"{"type":"publish","topic":"t","payload":1,"tll":5,"ref":1}"#,
            "tll",
        ),
        (
            r#"{"type":"ack","message_id":"x","messageId":"y"}"#,
            "messageId",
        ),
        (
            r#"{"type":"unsubscribe","topics":["t"],"topic":"t"}"#,
            "topic",
        ),
        (r#"{"type":"ping","pong":true}"#, "pong"),
    ] {
        ws.0.send(Message::text(frame)).await.unwrap();
        let reply = ws.expect().await;
        assert_eq!(reply["code"], "invalid_frame", "{frame}: {reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("unknown field `{unknown}`")),
            "{message}"
        );
    }
    // Refused frames changed nothing: no subscription (this message reaches no one here), and
    // the stream holds only it.
    app.publish("t", json!("after")).await;
    assert_eq!(ws.next(Duration::from_millis(300)).await, None);
    let history = json(app.get("/api/streams/t/messages").await).await;
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        1,
        "{history}"
    );
    ws.0.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(ws.expect().await["code"], "unsupported");
    assert_eq!(
        ws.call(json!({ "type": "ping" })).await,
        json!({ "type": "pong" })
    );
}

async fn websocket_authentication(app: TestApp) {
    let url = format!("ws://{}/ws?token={TOKEN}", app.address);
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("query token");
    socket
        .send(Message::text(r#"{"type":"ping"}"#))
        .await
        .unwrap();
    assert!(matches!(socket.next().await, Some(Ok(Message::Text(_)))));
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/ws", app.address)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }
    // A plain GET is not an upgrade.
    problem(app.get("/ws").await, 400).await;
}

async fn long_poll_group_flow(app: TestApp) {
    app.publish("tasks", json!({ "task": 1 })).await;
    let poll = |query: &'static str| {
        let path = format!("/api/v1/poll?topics=tasks&group=g&{query}");
        let app = &app;
        async move { app.get(&path).await }
    };
    let reply = json(poll("client_id=p1&timeout=5").await).await;
    let messages = reply["messages"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 1);
    assert_eq!(
        (
            messages[0]["topic"].as_str(),
            messages[0]["payload"].clone()
        ),
        (Some("tasks"), json!({ "task": 1 }))
    );
    assert!(messages[0]["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(reply["cursor"], Value::Null);
    // Unacknowledged, it comes back to the same client at once.
    let again = json(poll("client_id=p1&timeout=5").await).await;
    assert_eq!(
        again["messages"][0]["message_id"],
        messages[0]["message_id"]
    );
    let acked = json(
        app.post_json(
            "/api/v1/ack",
            &json!({ "message_ids": [messages[0]["message_id"]] }),
        )
        .await,
    )
    .await;
    assert_eq!(acked, json!({ "acked": 1 }));
    let empty = json(poll("client_id=p1&timeout=1").await).await;
    assert_eq!(empty["messages"], json!([]), "no redelivery after the ack");

    // A poll without client_id leaves its message to the visibility timeout.
    app.publish("tasks", json!({ "task": 2 })).await;
    let taken = json(poll("timeout=5").await).await;
    assert_eq!(taken["messages"][0]["payload"], json!({ "task": 2 }));
    let redelivered = json(poll("client_id=p2&timeout=5").await).await;
    assert_eq!(
        redelivered["messages"][0]["payload"],
        json!({ "task": 2 }),
        "redelivered after the timeout"
    );
    assert_eq!(
        redelivered["messages"][0]["message_id"],
        taken["messages"][0]["message_id"]
    );
}

async fn long_poll_answers_on_publish_and_is_empty_at_its_timeout(app: TestApp) {
    let app = std::sync::Arc::new(app);
    let waiting = {
        let app = app.clone();
        tokio::spawn(async move {
            let response = app.get("/api/v1/poll?topics=live&timeout=10").await;
            (Instant::now(), json(response).await)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.publish("live", json!("now")).await;
    let published = Instant::now();
    let (answered, reply) = waiting.await.unwrap();
    assert_eq!(reply["messages"][0]["payload"], "now");
    let delay = answered.saturating_duration_since(published);
    assert!(
        delay < Duration::from_millis(500),
        "answered {delay:?} after the publish"
    );

    let started = Instant::now();
    let reply = json(app.get("/api/v1/poll?topics=live&timeout=1").await).await;
    let waited = started.elapsed();
    assert_eq!(reply["messages"], json!([]));
    assert!(reply["cursor"].as_str().unwrap().starts_with("c1."));
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    for bad in [
        "",
        "?topics=live&timeout=soon",
        "?topics=live&max=0",
        "?topics=live&cursor=junk",
    ] {
        problem(app.get(&format!("/api/v1/poll{bad}")).await, 400).await;
    }
}

async fn long_poll_broadcast_continues_from_its_cursor(app: TestApp) {
    let start = json(app.get("/api/v1/poll?topics=a,b&timeout=0").await).await;
    let cursor = start["cursor"].as_str().unwrap().to_owned();
    app.publish("a", json!(1)).await;
    app.publish("b", json!(2)).await;
    app.publish("a", json!(3)).await;
    let reply = json(
        app.get(&format!(
            "/api/v1/poll?topics=a,b&timeout=5&cursor={cursor}"
        ))
        .await,
    )
    .await;
    let mut payloads: Vec<Value> = reply["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].clone())
        .collect();
    let mut next = reply["cursor"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        if payloads.len() >= 3 {
            break;
        }
        // The rest arrives on the next polls (each answers with what is there once one message
        // is; on a cluster, streams in other hash slots are read by reads of their own).
        let more = json(
            app.get(&format!("/api/v1/poll?topics=a,b&timeout=5&cursor={next}"))
                .await,
        )
        .await;
        payloads.extend(
            more["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["payload"].clone()),
        );
        next = more["cursor"].as_str().unwrap().to_owned();
    }
    payloads.sort_by_key(|payload| payload.as_u64());
    assert_eq!(payloads, [json!(1), json!(2), json!(3)]);
    let limited = json(
        app.get(&format!(
            "/api/v1/poll?topics=a,b&timeout=5&max=1&cursor={cursor}"
        ))
        .await,
    )
    .await;
    assert_eq!(limited["messages"].as_array().unwrap().len(), 1);
    // Broadcast message ids need no ack: acknowledging them acknowledges nothing.
    let acked = json(
        app.post_json(
            "/api/v1/ack",
            &json!({ "message_ids": [limited["messages"][0]["message_id"]] }),
        )
        .await,
    )
    .await;
    assert_eq!(acked, json!({ "acked": 0 }));
}

async fn garbled_message_ids_are_400_and_ack_nothing(app: TestApp) {
    app.publish("careful", json!(1)).await;
    let reply = json(
        app.get("/api/v1/poll?topics=careful&group=g&client_id=c&timeout=5")
            .await,
    )
    .await;
    let token = reply["messages"][0]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut garbled = token.clone().into_bytes();
    let middle = garbled.len() / 2;
    garbled[middle] = if garbled[middle] == b'x' { b'y' } else { b'x' };
    let garbled = String::from_utf8(garbled).unwrap();
    for ids in [
        json!([garbled]),
        json!([token, "1700000000000-0"]),
        json!(["m1..."]),
        json!([""]),
    ] {
        problem(
            app.post_json("/api/v1/ack", &json!({ "message_ids": ids }))
                .await,
            400,
        )
        .await;
    }
    problem(
        app.post_json("/api/v1/ack", &json!({ "ids": [] })).await,
        400,
    )
    .await;
    // A well-formed token spliced from two others names a real message: still refused.
    app.publish("careful", json!(2)).await;
    let reply = json(
        app.get("/api/v1/poll?topics=careful&group=g&client_id=d&timeout=5")
            .await,
    )
    .await;
    let other = reply["messages"][0]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (payload, _) = other.rsplit_once('.').unwrap();
    let (_, checksum) = token.rsplit_once('.').unwrap();
    let spliced = format!("{payload}.{checksum}");
    assert_ne!(spliced, other);
    problem(
        app.post_json("/api/v1/ack", &json!({ "message_ids": [spliced] }))
            .await,
        400,
    )
    .await;
    assert_eq!(
        app.group_stats("careful", "g").await["pending"],
        2,
        "nothing was acknowledged"
    );
}

async fn websocket_over_the_connection_limit_closes_with_1013(app: TestApp) {
    let _first = Ws::connect(&app).await;
    // A browser sees only close codes, so the socket opens and closes with "try again later".
    let mut second = Ws::connect(&app).await;
    let close = tokio::time::timeout(Duration::from_secs(5), second.0.next())
        .await
        .expect("closed within 5 s");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1013);
            assert!(frame.reason.contains("capacity"), "{}", frame.reason);
        }
        other => panic!("expected close 1013, got {other:?}"),
    }
    // SSE and long-polls count against the same limit.
    let refused = app.get("/api/streams/s/events").await;
    assert_eq!(refused.headers()["retry-after"], "1");
    problem(refused, 503).await;
    let refused = app.get("/api/v1/poll?topics=s&timeout=1").await;
    assert_eq!(refused.headers()["retry-after"], "1");
    problem(refused, 503).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_second_instance_acknowledges() {
    let Some(first) = TestApp::on_redis("").await else {
        return;
    };
    let second = TestApp::spawn(crate::helpers::Backend::RedisAt(first.redis().url()), "").await;
    first.publish("shared-jobs", json!("x")).await;
    let reply = json(
        first
            .get("/api/v1/poll?topics=shared-jobs&group=g&client_id=c&timeout=5")
            .await,
    )
    .await;
    let token = reply["messages"][0]["message_id"].clone();
    let acked = json(
        second
            .post_json("/api/v1/ack", &json!({ "message_ids": [token] }))
            .await,
    )
    .await;
    assert_eq!(acked, json!({ "acked": 1 }));
    assert_eq!(first.group_stats("shared-jobs", "g").await["pending"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_websockets_with_1012() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let redis_url = redis.url();
    let mut process = Process::spawn(
        &[
            "--redis-url",
            &redis_url,
            "--bearer-token",
            TOKEN,
            "--http-address",
            "127.0.0.1:0",
        ],
        &[],
    );
    let url = process.wait_for_url().await;
    let ws_url = format!("{}/ws?token={TOKEN}", url.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("upgrade");
    socket
        .send(Message::text(r#"{"type":"subscribe","topics":["t"]}"#))
        .await
        .unwrap();
    let _subscribed = socket.next().await;
    process.signal("TERM");
    let close = tokio::time::timeout(WAIT, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("closed within 5 s");
    assert_eq!(close.map(|frame| u16::from(frame.code)), Some(1012));
    let status = process.wait(Duration::from_secs(10)).await.expect("exited");
    assert!(status.success());
}

/// An entry with fields beside `data` (here a dead letter, which carries its origin; on Redis
/// also one written by another client) is delivered with them under `fields` by every transport,
/// as history shows it.
async fn fields_beside_the_body_reach_every_transport(app: TestApp) {
    // Dead-lettered at once: delivered once, given back, and over `max_deliveries`.
    let id = app.publish("origin", json!({ "order": 7 })).await;
    let mut consumer = app.consume("origin", "g", "").await;
    let delivered = consumer.events(1, WAIT).await;
    let nack = app
        .request(
            reqwest::Method::POST,
            &format!("/api/streams/origin/groups/g/messages/{id}/nack"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(nack.status(), 200);
    let dlq = app.dead_letter_of("origin");
    let deadline = Instant::now() + WAIT;
    let history = loop {
        let page = app.get(&format!("/api/streams/{dlq}/messages")).await;
        if page.status() == 200 {
            let page = json(page).await;
            if page["messages"][0].is_object() {
                break page;
            }
        }
        assert!(Instant::now() < deadline, "nothing was dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let fields = history["messages"][0]["fields"].clone();
    assert_eq!(fields["original_id"], id.as_str(), "{history}");
    assert_eq!(fields["stream"], "origin");

    // SSE, as a group consumer and as a broadcast subscriber.
    let mut group = app.consume(&dlq, "readers", "").await;
    assert_eq!(group.events(1, WAIT).await[0].json()["fields"], fields);
    let mut broadcast = app
        .subscribe(&format!("/api/streams/{dlq}/events?from=0"), &[])
        .await;
    assert_eq!(broadcast.events(1, WAIT).await[0].json()["fields"], fields);
    // WebSocket, both ways.
    let mut ws = Ws::connect(&app).await;
    for subscribe in [
        json!({ "type": "subscribe", "topics": [&dlq], "group": "ws", "from": "0" }),
        json!({ "type": "subscribe", "topics": [&dlq], "from": "0" }),
    ] {
        assert_eq!(ws.call(subscribe).await["type"], "subscribed");
        let message = ws.expect().await;
        assert_eq!(message["fields"], fields, "{message}");
        assert_eq!(message["payload"], json!({ "order": 7 }));
    }
    // Long-poll (a broadcast poll starts at new messages: see the Redis test below).
    let reply = json(
        app.get(&format!("/api/v1/poll?topics={dlq}&group=polls&timeout=5"))
            .await,
    )
    .await;
    assert_eq!(reply["messages"][0]["fields"], fields, "{reply}");
    // Messages published through streamgate have no `fields`.
    assert!(delivered[0].json().get("fields").is_none());
}

/// On Redis, an entry another client wrote with fields beside `data` shows them everywhere too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_another_clients_fields_reach_every_transport() {
    let Some(app) = TestApp::on_redis("").await else {
        return;
    };
    let start = json(app.get("/api/v1/poll?topics=legacy&timeout=0").await).await;
    let cursor = start["cursor"].as_str().unwrap().to_owned();
    app.redis().cmd::<String>(&[
        "XADD",
        "legacy",
        "*",
        "data",
        "{\"n\":1}",
        "source",
        "billing",
    ]);
    let expected = json!({ "source": "billing" });
    let mut broadcast = app
        .subscribe("/api/streams/legacy/events?from=0", &[])
        .await;
    let event = broadcast.events(1, WAIT).await[0].json();
    assert_eq!(
        (&event["body"], &event["fields"]),
        (&json!({ "n": 1 }), &expected)
    );
    let mut group = app.consume("legacy", "g", "").await;
    assert_eq!(group.events(1, WAIT).await[0].json()["fields"], expected);
    let mut ws = Ws::connect(&app).await;
    let subscribe = json!({ "type": "subscribe", "topics": ["legacy"], "from": "0" });
    assert_eq!(ws.call(subscribe).await["type"], "subscribed");
    assert_eq!(ws.expect().await["fields"], expected);
    for query in ["group=p".to_owned(), format!("cursor={cursor}")] {
        let reply = json(
            app.get(&format!("/api/v1/poll?topics=legacy&{query}&timeout=5"))
                .await,
        )
        .await;
        assert_eq!(reply["messages"][0]["fields"], expected, "{reply}");
    }
}
