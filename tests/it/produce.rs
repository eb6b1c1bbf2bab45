//! Publishing: the seed shapes, byte-exact payloads, validation, limits, idempotency, retention.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::helpers::{TestApp, json, problem};

on_each_backend!(
    publish_returns_the_seed_shape,
    payload_is_stored_byte_identical,
    batch_returns_count_and_ids,
    v1_routes_publish_to_topics,
    malformed_input_is_400_and_writes_nothing,
    oversize_input_is_413_and_writes_nothing =
        "[limits]\nmax_message_bytes = 100\nmax_body_bytes = 1000\nmax_batch_messages = 5\n",
    idempotent_publish_writes_once_under_concurrent_retries,
    integers_are_whole_numbers_within_64_bits,
    maxlen_and_retention_rules_trim = "[[retention]]\npattern = \"logs.*\"\nmax_len = 20\n",
);

/// The ids and bodies of a stream's history, through the browse route.
async fn history(app: &TestApp, stream: &str) -> Vec<(String, Value)> {
    let response = app
        .get(&format!("/api/streams/{stream}/messages?count=1000"))
        .await;
    assert_eq!(response.status(), 200, "browse {stream}");
    json(response).await["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|message| {
            (
                message["id"].as_str().unwrap().to_owned(),
                message["body"].clone(),
            )
        })
        .collect()
}

/// Asserts that a stream was never created.
async fn assert_absent(app: &TestApp, stream: &str) {
    let response = app.get(&format!("/admin/{stream}")).await;
    assert_eq!(response.status(), 404, "stream {stream} should not exist");
}

/// The entry id inside a v1 `message_id` token (which names the topic, no group, and the id).
pub fn entry_id_of(message_id: &Value) -> String {
    let token = message_id.as_str().expect("a message_id");
    let reference =
        streamgate::http::message_id::MessageRef::decode(token).expect("a message_id token");
    assert_eq!(reference.group, None);
    reference.id.to_string()
}

fn is_entry_id(text: &str) -> bool {
    text.split_once('-')
        .is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok())
}

async fn publish_returns_the_seed_shape(app: TestApp) {
    let response = app
        .post_json(
            "/api/streams/test-stream/messages",
            &json!({ "data": { "hello": "world" } }),
        )
        .await;
    assert_eq!(response.status(), 201);
    let body = json(response).await;
    assert_eq!(body["status"], "ok");
    assert_eq!(body["stream"], "test-stream");
    let id = body["id"].as_str().expect("id");
    assert!(is_entry_id(id), "{id}");
    assert_eq!(body.as_object().unwrap().len(), 3, "{body}");
    assert_eq!(
        history(&app, "test-stream").await,
        vec![(id.to_owned(), json!({ "hello": "world" }))]
    );
}

async fn payload_is_stored_byte_identical(app: TestApp) {
    let data = r#"{"zebra": 12345678901234567890, "apple": [1.50, -0.0, 2e308], "é": "\u00e9\n", "nested": {"b": 1, "a": null}}"#;
    let response = app
        .post_raw(
            "/api/streams/exact/messages",
            format!(r#"{{"data": {data}}}"#),
        )
        .await;
    assert_eq!(response.status(), 201);
    let raw = app
        .get("/api/streams/exact/messages")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        raw.contains(&format!(r#""body":{data}"#)),
        "body re-encoded: {raw}"
    );
    // Scalars and strings too.
    for data in [
        "12345678901234567890",
        r#""text""#,
        "true",
        "null",
        "[ 1 ,2 ]",
    ] {
        let response = app
            .post_raw(
                "/api/streams/scalars/messages",
                format!(r#"{{"data":{data}}}"#),
            )
            .await;
        assert_eq!(response.status(), 201, "{data}");
        let raw = app
            .get("/api/streams/scalars/messages?reverse=true&count=1")
            .await
            .text()
            .await
            .unwrap();
        assert!(
            raw.contains(&format!(r#""body":{data}}}"#)),
            "{data} became {raw}"
        );
    }
}

async fn batch_returns_count_and_ids(app: TestApp) {
    let response = app
        .post_json(
            "/api/streams/batched/messages/batch",
            &json!({ "messages": ["message 1", { "n": 2 }, [3]] }),
        )
        .await;
    assert_eq!(response.status(), 201);
    let body = json(response).await;
    assert_eq!(body["status"], "ok");
    assert_eq!(body["stream"], "batched");
    assert_eq!(body["count"], 3);
    let ids: Vec<String> = body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3);
    let stored = history(&app, "batched").await;
    assert_eq!(
        stored,
        vec![
            (ids[0].clone(), json!("message 1")),
            (ids[1].clone(), json!({ "n": 2 })),
            (ids[2].clone(), json!([3])),
        ]
    );
}

async fn v1_routes_publish_to_topics(app: TestApp) {
    let response = app
        .post_json(
            "/api/v1/messages",
            &json!({ "topic": "notifications", "payload": { "user_id": 123 }, "ttl": 3600 }),
        )
        .await;
    assert_eq!(response.status(), 201);
    let body = json(response).await;
    assert_eq!(body["topic"], "notifications");
    let first = entry_id_of(&body["message_id"]);

    let response = app
        .post_json(
            "/api/v1/messages/bulk",
            &json!({ "messages": [
                { "topic": "alerts", "payload": "a1" },
                { "topic": "notifications", "payload": "n2" },
                { "topic": "alerts", "payload": "a2" },
            ] }),
        )
        .await;
    assert_eq!(response.status(), 201);
    let results = json(response).await["results"].as_array().unwrap().clone();
    let topics: Vec<&str> = results
        .iter()
        .map(|result| result["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics, ["alerts", "notifications", "alerts"]);
    let id = |index: usize| entry_id_of(&results[index]["message_id"]);
    assert_eq!(
        history(&app, "alerts").await,
        vec![(id(0), json!("a1")), (id(2), json!("a2"))]
    );
    assert_eq!(
        history(&app, "notifications").await,
        vec![(first, json!({ "user_id": 123 })), (id(1), json!("n2"))]
    );
}

async fn malformed_input_is_400_and_writes_nothing(app: TestApp) {
    let cases: &[(&str, &str, &str)] = &[
        (
            "/api/streams/s/messages",
            r#"{"message": 1}"#,
            "unknown field",
        ),
        ("/api/streams/s/messages", r#"{}"#, "missing field `data`"),
        ("/api/streams/s/messages", r#"{"data": "#, "invalid JSON"),
        (
            "/api/streams/s/messages",
            r#"{"data": 1} trailing"#,
            "trailing",
        ),
        ("/api/streams/s/messages", "", "empty"),
        ("/api/streams/s/messages", "[1]", "is an array"),
        (
            "/api/streams/s/messages",
            r#"{"data": 1, "maxlen": 0}"#,
            "maxlen",
        ),
        ("/api/streams/s/messages", r#"{"data": 1, "ttl": 0}"#, "ttl"),
        (
            "/api/streams/s/messages",
            r#"{"data": 1, "ttl": -5}"#,
            "invalid JSON",
        ),
        (
            "/api/streams/s/messages/batch",
            r#"{"messages": []}"#,
            "must not be empty",
        ),
        (
            "/api/streams/s/messages/batch",
            r#"{"messages": "x"}"#,
            "invalid JSON",
        ),
        (
            "/api/streams/bad%0Aname/messages",
            r#"{"data": 1}"#,
            "control characters",
        ),
        (
            "/api/v1/messages",
            r#"{"payload": 1}"#,
            "missing field `topic`",
        ),
        (
            "/api/v1/messages",
            r#"{"topic": "", "payload": 1}"#,
            "must not be empty",
        ),
        (
            "/api/v1/messages/bulk",
            r#"{"messages": [{"topic": "s", "payload": 1}, {"topic": "s"}]}"#,
            "payload",
        ),
    ];
    for (path, body, expected) in cases {
        let response = app.post_raw(path, body.to_string()).await;
        let problem = problem(response, 400).await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(expected), "{path} {body}: {detail}");
    }
    let long_name = "x".repeat(257);
    let response = app
        .post_raw(
            &format!("/api/streams/{long_name}/messages"),
            r#"{"data":1}"#,
        )
        .await;
    problem(response, 400).await;
    let response = app
        .request(reqwest::Method::POST, "/api/streams/s/messages")
        .header("idempotency-key", "has space")
        .json(&json!({ "data": 1 }))
        .send()
        .await
        .unwrap();
    problem(response, 400).await;
    assert_absent(&app, "s").await;
    // 256 bytes is still a valid name.
    let longest = "y".repeat(256);
    app.publish(&longest, json!(1)).await;
}

async fn oversize_input_is_413_and_writes_nothing(app: TestApp) {
    let big = format!("\"{}\"", "x".repeat(99)); // 101 bytes of JSON text
    let response = app
        .post_raw("/api/streams/big/messages", format!(r#"{{"data":{big}}}"#))
        .await;
    let detail = problem(response, 413).await["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        detail.contains("101 bytes") && detail.contains("100"),
        "{detail}"
    );
    let fits = format!("\"{}\"", "x".repeat(98));
    let response = app
        .post_raw(
            "/api/streams/big/messages/batch",
            format!(r#"{{"messages":[1, {fits}, {big}]}}"#),
        )
        .await;
    let detail = problem(response, 413).await["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(detail.contains("message 2"), "{detail}");
    let response = app
        .post_raw(
            "/api/streams/big/messages/batch",
            format!(
                r#"{{"messages":[1,2,3,4,5,6], "x": "{}"}}"#,
                "y".repeat(1000)
            ),
        )
        .await;
    problem(response, 413).await;
    let response = app
        .post_raw(
            "/api/streams/big/messages/batch",
            r#"{"messages":[1,2,3,4,5,6]}"#,
        )
        .await;
    problem(response, 413).await;
    // A body over the limit without a Content-Length (chunked) is refused too.
    let chunks: Vec<Result<String, std::io::Error>> =
        (0..20).map(|_| Ok("x".repeat(100))).collect();
    let response = app
        .post_raw(
            "/api/streams/big/messages",
            reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)),
        )
        .await;
    // Answered before the rest of the body was read: the connection closes, and says so, or a
    // client reusing it for its next request (the next lines) would see that one fail.
    assert_eq!(response.headers()["connection"], "close");
    problem(response, 413).await;
    assert_absent(&app, "big").await;
    let response = app
        .post_raw("/api/streams/big/messages", format!(r#"{{"data":{fits}}}"#))
        .await;
    assert_eq!(response.status(), 201);
}

async fn idempotent_publish_writes_once_under_concurrent_retries(app: TestApp) {
    let app = std::sync::Arc::new(app);
    let attempts = (0..20).map(|_| {
        let app = app.clone();
        tokio::spawn(async move {
            let response = app
                .request(reqwest::Method::POST, "/api/streams/payments/messages")
                .header("idempotency-key", "order-42")
                .json(&json!({ "data": { "amount": 10 } }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
            let replayed = response.headers().contains_key("idempotent-replayed");
            (
                json(response).await["id"].as_str().unwrap().to_owned(),
                replayed,
            )
        })
    });
    let mut ids = HashSet::new();
    let mut n_replayed = 0;
    for attempt in attempts {
        let (id, replayed) = attempt.await.unwrap();
        ids.insert(id);
        n_replayed += usize::from(replayed);
    }
    assert_eq!(ids.len(), 1, "every retry gets the first id: {ids:?}");
    assert_eq!(n_replayed, 19);
    assert_eq!(
        history(&app, "payments").await.len(),
        1,
        "exactly one entry stored"
    );

    // Another key writes again; the v1 route shares the single-message keys.
    let other = app.publish("payments", json!({ "amount": 11 })).await;
    assert!(!ids.contains(&other));
    let v1 = app
        .request(reqwest::Method::POST, "/api/v1/messages")
        .header("idempotency-key", "order-42")
        .json(&json!({ "topic": "payments", "payload": { "amount": 10 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        Some(entry_id_of(&json(v1).await["message_id"])),
        ids.iter().next().cloned()
    );

    // A batch replays its whole answer.
    let batch = || {
        app.request(
            reqwest::Method::POST,
            "/api/streams/payments/messages/batch",
        )
        .header("idempotency-key", "import-7")
        .json(&json!({ "messages": [1, 2, 3] }))
        .send()
    };
    let first = json(batch().await.unwrap()).await;
    let second = json(batch().await.unwrap()).await;
    assert_eq!(first, second);
    assert_eq!(first["count"], 3);
    assert_eq!(history(&app, "payments").await.len(), 5);
}

async fn maxlen_and_retention_rules_trim(app: TestApp) {
    // Trimming is approximate (as Redis's `MAXLEN ~`): at least the limit is kept, and far fewer
    // than were written.
    for stream in ["plain", "logs.app"] {
        let messages: Vec<Value> = (0..500).map(|n| json!(n)).collect();
        let body = if stream == "plain" {
            json!({ "messages": messages, "maxlen": 20 })
        } else {
            json!({ "messages": messages })
        };
        for _ in 0..2 {
            let response = app
                .post_json(&format!("/api/streams/{stream}/messages/batch"), &body)
                .await;
            assert_eq!(response.status(), 201);
        }
        let length = json(app.get(&format!("/admin/{stream}")).await).await["length"]
            .as_u64()
            .unwrap();
        assert!((20..=200).contains(&length), "{stream}: length {length}");
        let kept = history(&app, stream).await;
        assert_eq!(
            kept.last().unwrap().1,
            json!(499),
            "the newest entries are kept"
        );
    }
    // No rule for this one: nothing is trimmed.
    let messages: Vec<Value> = (0..500).map(|n| json!(n)).collect();
    app.post_json(
        "/api/streams/other/messages/batch",
        &json!({ "messages": messages }),
    )
    .await;
    assert_eq!(json(app.get("/admin/other").await).await["length"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stores_data_and_expiry_fields() {
    let Some(app) = TestApp::on_redis("").await else {
        return;
    };
    let response = app
        .post_raw(
            "/api/streams/fields/messages",
            r#"{"data": {"b":1,"a":2}, "ttl": 60}"#,
        )
        .await;
    assert_eq!(response.status(), 201);
    let entries: Vec<(String, Vec<(String, String)>)> = {
        let value: redis::Value = app.redis().cmd(&["XRANGE", "fields", "-", "+"]);
        redis::FromRedisValue::from_redis_value(value).unwrap()
    };
    let fields = &entries[0].1;
    assert_eq!(
        fields[0],
        ("data".to_owned(), r#"{"b":1,"a":2}"#.to_owned())
    );
    assert_eq!(fields[1].0, "exp");
    let expiry: u64 = fields[1].1.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        (now + 55_000..=now + 61_000).contains(&expiry),
        "expiry {expiry} vs now {now}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_key_of_another_type_is_409() {
    let Some(app) = TestApp::on_redis("").await else {
        return;
    };
    let _: () = app.redis().cmd(&["SET", "plain-string", "1"]);
    let response = app
        .post_json("/api/streams/plain-string/messages", &json!({ "data": 1 }))
        .await;
    problem(response, 409).await;
    let response = app.get("/api/streams/plain-string/messages").await;
    problem(response, 409).await;
}

/// JSON Schema's integers: `5.0` is 5; fractions, and values Redis cannot take, are a 400.
async fn integers_are_whole_numbers_within_64_bits(app: TestApp) {
    let response = app
        .post_raw(
            "/api/streams/whole/messages",
            r#"{"data":1,"maxlen":5.0,"ttl":60.0}"#,
        )
        .await;
    assert_eq!(response.status(), 201);
    for body in [
        r#"{"data":1,"ttl":1.5}"#,
        r#"{"data":1,"maxlen":9223372036854775808}"#,
        r#"{"data":1,"maxlen":1e300}"#,
        r#"{"data":1,"maxlen":-1}"#,
        // serde would read an array into the fields in order.
        r#"[1, 5]"#,
    ] {
        let response = app.post_raw("/api/streams/whole/messages", body).await;
        problem(response, 400).await;
    }
    assert_eq!(history(&app, "whole").await.len(), 1);

    let pending = app
        .get("/api/streams/whole/groups/g/pending?min_idle_ms=9223372036854775808")
        .await;
    problem(pending, 400).await;
    let created = app
        .request(reqwest::Method::PUT, "/api/streams/whole/groups/g")
        .header("content-type", "application/json")
        .body("null")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "a null body is the default position");
}
