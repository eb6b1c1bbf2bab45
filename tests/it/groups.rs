//! Consumer groups over SSE: load balancing, flow control, finish, redelivery, dead letters,
//! at-most-once, and what a disconnect or a vanished group does.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::sse::SseClient;
use crate::helpers::{TOKEN, TestApp, json, problem};

const FAST: &str = "[consumer]\nvisibility_timeout = \"1s\"\n";
const DEAD_LETTERS: &str = "[consumer]\nvisibility_timeout = \"1s\"\nmax_deliveries = 2\n";
const KEEPALIVE: &str = "sse_keepalive_interval_sec = 1\n";
const DELETE_ON_FINISH: &str = "[consumer]\ndelete_on_finish = true\n";

on_each_backend!(
    consumers_share_a_batch_and_each_message_arrives_once,
    history_before_the_group_is_delivered_and_finished,
    finishing_what_is_not_pending_is_404,
    limit_caps_messages_in_flight_until_finished,
    limit_route_changes_live_consumers_and_the_default,
    reconnecting_consumer_gets_its_unfinished_messages_again,
    dead_consumers_messages_are_redelivered_after_the_visibility_timeout = FAST,
    a_hundred_and_fifty_idle_messages_are_all_redelivered = FAST,
    messages_are_dead_lettered_after_max_deliveries = DEAD_LETTERS,
    nack_redelivers_at_once_and_touch_holds_on = FAST,
    at_most_once_leaves_nothing_pending,
    second_connection_with_the_same_name_is_409,
    headers_arrive_before_any_message_and_keepalives_follow = KEEPALIVE,
    batch_finish_reports_counts,
    delete_on_finish_removes_the_entry = DELETE_ON_FINISH,
    expired_messages_are_not_delivered,
    a_deleted_group_ends_its_streams,
    bad_requests_are_refused_before_streaming,
    query_token_is_accepted_on_the_events_route,
    group_administration_routes,
);

impl TestApp {
    /// Opens `/api/events` for a group with the given extra query.
    pub async fn consume(&self, stream: &str, group: &str, extra: &str) -> SseClient {
        let path = format!("/api/events?stream={stream}&group={group}{extra}");
        let client = SseClient::open(self.request(reqwest::Method::GET, &path)).await;
        assert_eq!(client.status, 200, "consume {path}");
        client
    }

    /// Publishes `messages` in one batch; returns their ids.
    pub async fn publish_batch(&self, stream: &str, messages: Vec<Value>) -> Vec<String> {
        let response = self
            .post_json(
                &format!("/api/streams/{stream}/messages/batch"),
                &json!({ "messages": messages }),
            )
            .await;
        assert_eq!(response.status(), 201);
        json(response).await["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_str().unwrap().to_owned())
            .collect()
    }

    /// Finishes through the explicit route; returns the status code.
    pub async fn finish(&self, stream: &str, group: &str, consumer: &str, id: &str) -> u16 {
        let path = format!(
            "/api/streams/{stream}/groups/{group}/consumers/{consumer}/messages/{id}/finish"
        );
        self.request(reqwest::Method::POST, &path)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The group's entry in the stream's statistics.
    pub async fn group_stats(&self, stream: &str, group: &str) -> Value {
        let groups = json(self.get(&format!("/api/streams/{stream}/groups")).await).await;
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|entry| entry["name"] == group)
            .cloned()
            .unwrap_or(Value::Null)
    }
}

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);

fn consumer_of(client: &SseClient) -> String {
    client
        .header("x-consumer")
        .expect("X-Consumer header")
        .to_owned()
}

async fn consumers_share_a_batch_and_each_message_arrives_once(app: TestApp) {
    let app = Arc::new(app);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(app.consume("orders", "workers", "&limit=100").await);
    }
    let names: HashSet<String> = clients.iter().map(consumer_of).collect();
    assert_eq!(names.len(), 3, "each connection is its own consumer");

    // Each consumer finishes as it goes, and stops once the stream has been quiet for a while.
    let workers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let app = app.clone();
            tokio::spawn(async move {
                let consumer = consumer_of(&client);
                let mut received = Vec::new();
                // The first message may take a while on a loaded machine; then the stream ends
                // for this consumer once it has been quiet for 2 s.
                let mut wait = Duration::from_secs(15);
                while let Some(event) = client.next_event(wait).await {
                    wait = Duration::from_secs(2);
                    let message = event.json();
                    assert_eq!(message["consumer"], consumer.as_str());
                    assert_eq!(
                        (message["stream"].as_str(), message["group"].as_str()),
                        (Some("orders"), Some("workers"))
                    );
                    assert_eq!(
                        event.id.as_deref(),
                        message["id"].as_str(),
                        "the SSE id is the entry id"
                    );
                    let id = message["id"].as_str().unwrap().to_owned();
                    assert_eq!(app.finish("orders", "workers", &consumer, &id).await, 200);
                    received.push(message["body"]["n"].as_u64().unwrap());
                }
                received
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.publish_batch("orders", (0..300).map(|n| json!({ "n": n })).collect())
        .await;

    let mut all = Vec::new();
    for worker in workers {
        let received = worker.await.unwrap();
        assert!(!received.is_empty(), "every consumer gets a share");
        all.extend(received);
    }
    all.sort();
    assert_eq!(
        all,
        (0..300).collect::<Vec<u64>>(),
        "every message exactly once"
    );
    let stats = app.group_stats("orders", "workers").await;
    assert_eq!(stats["pending"], 0);
}

async fn history_before_the_group_is_delivered_and_finished(app: TestApp) {
    let id = app.publish("early", json!({ "before": "the group" })).await;
    let mut client = app.consume("early", "late-group", "").await;
    let event = client
        .next_event(WAIT)
        .await
        .expect("the history is delivered");
    let message = event.json();
    assert_eq!(message["id"], id.as_str());
    assert_eq!(message["body"], json!({ "before": "the group" }));
    assert_eq!(message["deliveries"], 1);
    // Seed 000's finish by id alone.
    let response = app
        .request(reqwest::Method::POST, &format!("/api/messages/{id}/finish"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        json(response).await,
        json!({ "status": "ok", "action": "finished" })
    );
    assert_eq!(app.group_stats("early", "late-group").await["pending"], 0);
}

async fn finishing_what_is_not_pending_is_404(app: TestApp) {
    let id = app.publish("finishing", json!(1)).await;
    let mut client = app.consume("finishing", "g", "").await;
    client.next_event(WAIT).await.expect("delivered");
    let consumer = consumer_of(&client);
    for unknown in ["/api/messages/1-1/finish", "/api/messages/not-an-id/finish"] {
        problem(
            app.request(reqwest::Method::POST, unknown)
                .send()
                .await
                .unwrap(),
            404,
        )
        .await;
    }
    assert_eq!(app.finish("finishing", "g", &consumer, "1-1").await, 404);
    assert_eq!(
        app.finish("finishing", "g", &consumer, "garbage").await,
        404
    );
    assert_eq!(app.finish("finishing", "g", &consumer, &id).await, 200);
    assert_eq!(
        app.finish("finishing", "g", &consumer, &id).await,
        404,
        "already finished"
    );
    let seed = app
        .request(reqwest::Method::POST, &format!("/api/messages/{id}/finish"))
        .send()
        .await
        .unwrap();
    problem(seed, 404).await;
}

async fn limit_caps_messages_in_flight_until_finished(app: TestApp) {
    let mut client = app.consume("limited", "g", "&limit=5").await;
    let consumer = consumer_of(&client);
    app.publish_batch("limited", (0..20).map(|n| json!(n)).collect())
        .await;
    let first = client.events(5, WAIT).await;
    assert!(
        client.next_event(QUIET).await.is_none(),
        "exactly 5 until one is finished"
    );
    let status = json(app.get("/api/consumers/limited/g").await).await;
    assert_eq!(
        status,
        json!({ "stream": "limited", "group": "g", "consumers": 1, "messages": 5, "finished": 0 })
    );

    // Finishing something that is not in flight frees nothing.
    assert_eq!(app.finish("limited", "g", &consumer, "1-1").await, 404);
    assert!(client.next_event(QUIET).await.is_none());

    let id = first[0].id.clone().unwrap();
    assert_eq!(app.finish("limited", "g", &consumer, &id).await, 200);
    let next = client.events(1, WAIT).await;
    assert_eq!(next[0].json()["body"], 5);
    assert!(client.next_event(QUIET).await.is_none(), "exactly one more");
    // A repeated finish does not give double credit.
    assert_eq!(app.finish("limited", "g", &consumer, &id).await, 404);
    assert!(client.next_event(QUIET).await.is_none());
    let status = json(app.get("/api/consumers/limited/g").await).await;
    assert_eq!(
        (status["messages"].as_u64(), status["finished"].as_u64()),
        (Some(6), Some(1))
    );
}

async fn limit_route_changes_live_consumers_and_the_default(app: TestApp) {
    // Before anyone connects: 200 with no consumers, and the default is set.
    let response = app
        .post_json("/api/consumers/flow/g/limit", &json!({ "count": 2 }))
        .await;
    assert_eq!(
        json(response).await,
        json!({ "status": "ok", "consumers": 0 })
    );
    problem(app.get("/api/consumers/flow/g").await, 404).await;
    let mut client = app.consume("flow", "g", "").await;
    app.publish_batch("flow", (0..10).map(|n| json!(n)).collect())
        .await;
    client.events(2, WAIT).await;
    assert!(
        client.next_event(QUIET).await.is_none(),
        "the default of 2 applies"
    );
    let response = app
        .post_json("/api/consumers/flow/g/limit", &json!({ "count": 5 }))
        .await;
    assert_eq!(
        json(response).await,
        json!({ "status": "ok", "consumers": 1 })
    );
    client.events(3, WAIT).await;
    assert!(
        client.next_event(QUIET).await.is_none(),
        "the live consumer now has 5 in flight"
    );
    for bad in [
        json!({ "count": 0 }),
        json!({ "count": -3 }),
        json!({ "count": 100001 }),
        json!({ "n": 1 }),
    ] {
        problem(
            app.post_json("/api/consumers/flow/g/limit", &bad).await,
            400,
        )
        .await;
    }
}

async fn reconnecting_consumer_gets_its_unfinished_messages_again(app: TestApp) {
    let ids = app
        .publish_batch("resume", (0..3).map(|n| json!(n)).collect())
        .await;
    let mut first = app.consume("resume", "g", "&consumer=alice").await;
    assert_eq!(consumer_of(&first), "alice");
    let got = first.events(3, WAIT).await;
    assert_eq!(
        app.finish("resume", "g", "alice", got[0].id.as_deref().unwrap())
            .await,
        200
    );
    drop(first);

    // The name is free again within a second of the disconnect.
    let started = Instant::now();
    let mut second = loop {
        let client = SseClient::open(app.request(
            reqwest::Method::GET,
            "/api/events?stream=resume&group=g&consumer=alice",
        ))
        .await;
        if client.status == 200 {
            break client;
        }
        assert_eq!(client.status, 409);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the disconnect was not noticed within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let again = second.events(2, WAIT).await;
    let redelivered: Vec<(String, u64)> = again
        .iter()
        .map(|event| {
            (
                event.json()["id"].as_str().unwrap().to_owned(),
                event.json()["deliveries"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(redelivered, [(ids[1].clone(), 2), (ids[2].clone(), 2)]);
    // New messages follow.
    let id = app.publish("resume", json!("new")).await;
    let next = second.next_event(WAIT).await.unwrap();
    assert_eq!(
        (next.id.as_deref(), next.json()["deliveries"].as_u64()),
        (Some(id.as_str()), Some(1))
    );
}

async fn dead_consumers_messages_are_redelivered_after_the_visibility_timeout(app: TestApp) {
    let id = app.publish("redeliver", json!("work")).await;
    let mut dead = app.consume("redeliver", "g", "").await;
    assert_eq!(
        dead.next_event(WAIT).await.unwrap().id.as_deref(),
        Some(id.as_str())
    );
    drop(dead);
    let started = Instant::now();
    let mut alive = app.consume("redeliver", "g", "").await;
    let event = alive
        .next_event(Duration::from_secs(6))
        .await
        .expect("redelivered");
    let message = event.json();
    assert_eq!(
        (message["id"].as_str(), message["deliveries"].as_u64()),
        (Some(id.as_str()), Some(2))
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before the visibility timeout"
    );
    assert_eq!(
        app.finish("redeliver", "g", &consumer_of(&alive), &id)
            .await,
        200
    );
    assert_eq!(app.group_stats("redeliver", "g").await["pending"], 0);
}

async fn a_hundred_and_fifty_idle_messages_are_all_redelivered(app: TestApp) {
    let ids = app
        .publish_batch("backlog", (0..150).map(|n| json!(n)).collect())
        .await;
    let mut dead = app.consume("backlog", "g", "&limit=150").await;
    dead.events(150, WAIT).await;
    drop(dead);
    let mut alive = app.consume("backlog", "g", "&limit=200").await;
    let events = alive.events(150, Duration::from_secs(8)).await;
    let seen: HashSet<String> = events
        .iter()
        .map(|event| event.id.clone().unwrap())
        .collect();
    assert_eq!(seen, ids.into_iter().collect::<HashSet<_>>());
    assert!(events.iter().all(|event| event.json()["deliveries"] == 2));
}

async fn messages_are_dead_lettered_after_max_deliveries(app: TestApp) {
    let id = app.publish("poison", json!({ "bad": true })).await;
    for delivery in 1..=2 {
        let mut client = app.consume("poison", "g", "").await;
        let event = client
            .next_event(Duration::from_secs(6))
            .await
            .expect("delivered");
        assert_eq!(event.json()["deliveries"], delivery);
    }
    // The third delivery does not happen: the entry moves to the dead-letter stream.
    let mut last = app.consume("poison", "g", "").await;
    let deadline = Instant::now() + Duration::from_secs(8);
    let dead = loop {
        let page = app
            .get(&format!(
                "/api/streams/{}/messages",
                app.dead_letter_of("poison")
            ))
            .await;
        if page.status() == 200 {
            let page = json(page).await;
            if let Some(first) = page["messages"]
                .as_array()
                .and_then(|messages| messages.first())
                .cloned()
            {
                break first;
            }
        }
        assert!(Instant::now() < deadline, "nothing was dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        last.next_event(QUIET).await.is_none(),
        "a dead letter is not delivered again"
    );
    // The dead letter keeps the payload and says where it came from.
    assert_eq!(dead["body"], json!({ "bad": true }));
    let fields = &dead["fields"];
    assert_eq!(fields["original_id"], id.as_str());
    assert_eq!(
        (fields["stream"].as_str(), fields["group"].as_str()),
        (Some("poison"), Some("g"))
    );
    assert_eq!(fields["deliveries"], "2");
    assert_eq!(app.group_stats("poison", "g").await["pending"], 0);
}

async fn nack_redelivers_at_once_and_touch_holds_on(app: TestApp) {
    let ids = app
        .publish_batch("nacks", vec![json!("a"), json!("b")])
        .await;
    let mut first = app.consume("nacks", "g", "&limit=2").await;
    first.events(2, WAIT).await;
    // The consumer with the most free credit gets a nacked message.
    let mut second = app.consume("nacks", "g", "&limit=2").await;
    // Hold `b` past the visibility timeout with touches; give `a` back at once.
    let touch = format!("/api/streams/nacks/groups/g/messages/{}/touch", ids[1]);
    let nack = format!("/api/streams/nacks/groups/g/messages/{}/nack", ids[0]);
    let started = Instant::now();
    assert_eq!(
        json(
            app.request(reqwest::Method::POST, &nack)
                .send()
                .await
                .unwrap()
        )
        .await["action"],
        "nacked"
    );
    let event = second
        .next_event(Duration::from_secs(3))
        .await
        .expect("the nacked message comes back");
    assert_eq!(
        (event.id.as_deref(), event.json()["deliveries"].as_u64()),
        (Some(ids[0].as_str()), Some(2))
    );
    assert_eq!(
        app.finish("nacks", "g", &consumer_of(&second), &ids[0])
            .await,
        200
    );
    for _ in 0..4 {
        let response = app
            .request(reqwest::Method::POST, &touch)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(started.elapsed() > Duration::from_millis(1500));
    assert!(
        second.next_event(QUIET).await.is_none(),
        "a touched message is not redelivered"
    );
    let unknown = "/api/streams/nacks/groups/g/messages/1-1/nack";
    problem(
        app.request(reqwest::Method::POST, unknown)
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
}

async fn at_most_once_leaves_nothing_pending(app: TestApp) {
    let mut client = app
        .consume("fire", "g", "&mode=at-most-once&consumer=once")
        .await;
    app.publish_batch("fire", (0..5).map(|n| json!(n)).collect())
        .await;
    client.events(5, WAIT).await;
    assert_eq!(app.group_stats("fire", "g").await["pending"], 0);
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = app
        .consume("fire", "g", "&mode=at-most-once&consumer=once")
        .await;
    assert!(
        again.next_event(QUIET).await.is_none(),
        "nothing is redelivered"
    );
}

async fn second_connection_with_the_same_name_is_409(app: TestApp) {
    let _first = app.consume("dupes", "g", "&consumer=bob").await;
    let response = app
        .get("/api/events?stream=dupes&group=g&consumer=bob")
        .await;
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "application/problem+json"
    );
    problem(response, 409).await;
    // Another group, or another name, is fine.
    app.consume("dupes", "other", "&consumer=bob").await;
    app.consume("dupes", "g", "&consumer=carol").await;
}

async fn headers_arrive_before_any_message_and_keepalives_follow(app: TestApp) {
    let started = Instant::now();
    let request = app
        .request(reqwest::Method::GET, "/api/events?stream=quiet&group=g")
        .header("accept-encoding", "gzip, br");
    let mut client = tokio::time::timeout(Duration::from_secs(2), SseClient::open(request))
        .await
        .expect("headers at once");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(client.header("content-type"), Some("text/event-stream"));
    assert_eq!(client.header("cache-control"), Some("no-cache"));
    assert_eq!(client.header("x-accel-buffering"), Some("no"));
    assert!(
        client
            .header("x-consumer")
            .is_some_and(|name| !name.is_empty())
    );
    assert!(
        client.header("content-encoding").is_none(),
        "never compressed"
    );
    let comments = client.comments_within(Duration::from_millis(2500)).await;
    assert!(
        comments.iter().any(|comment| comment == "keepalive"),
        "{comments:?}"
    );
    // Neither the opening `retry:` nor a keep-alive ends a block without data: common clients
    // other than browsers would yield it as an empty event.
    assert_eq!(client.retry, Some(1000));
    assert_eq!(client.empty_blocks, 0);
    let health = json(app.get("/health").await).await;
    assert_eq!(health["connections"]["sse"], 1);
}

async fn batch_finish_reports_counts(app: TestApp) {
    let ids = app
        .publish_batch("bulkfinish", (0..3).map(|n| json!(n)).collect())
        .await;
    let mut client = app.consume("bulkfinish", "g", "&consumer=c").await;
    client.events(3, WAIT).await;
    let path = "/api/streams/bulkfinish/groups/g/consumers/c/finish";
    let body = json!({ "message_ids": [ids[0], ids[1], ids[1], "1-1", "nonsense"] });
    let reply = json(app.post_json(path, &body).await).await;
    assert_eq!(
        reply,
        json!({ "status": "ok", "action": "finished", "received": 5, "acked": 2, "not_pending": 1, "invalid": 1 })
    );
    assert_eq!(app.group_stats("bulkfinish", "g").await["pending"], 1);
    problem(app.post_json(path, &json!({ "ids": [] })).await, 400).await;
}

async fn delete_on_finish_removes_the_entry(app: TestApp) {
    let ids = app
        .publish_batch("ephemeral", vec![json!(1), json!(2)])
        .await;
    let mut client = app.consume("ephemeral", "g", "&consumer=c").await;
    client.events(2, WAIT).await;
    assert_eq!(app.finish("ephemeral", "g", "c", &ids[0]).await, 200);
    let page = json(app.get("/api/streams/ephemeral/messages").await).await;
    let left: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, [ids[1].as_str()]);
}

async fn expired_messages_are_not_delivered(app: TestApp) {
    let response = app
        .post_json(
            "/api/streams/ttl/messages",
            &json!({ "data": "short-lived", "ttl": 1 }),
        )
        .await;
    assert_eq!(response.status(), 201);
    let kept = app.publish("ttl", json!("kept")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut client = app.consume("ttl", "g", "").await;
    let event = client.next_event(WAIT).await.unwrap();
    assert_eq!(event.id.as_deref(), Some(kept.as_str()));
    assert!(client.next_event(QUIET).await.is_none());
    assert_eq!(
        app.group_stats("ttl", "g").await["pending"],
        1,
        "the expired one was acknowledged unseen"
    );
}

async fn a_deleted_group_ends_its_streams(app: TestApp) {
    let mut client = app.consume("vanishing", "g", "").await;
    let response = app
        .request(reqwest::Method::DELETE, "/api/streams/vanishing/groups/g")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        client.ends_within(Duration::from_secs(8)).await,
        "the stream ended"
    );
    // A reconnecting client recreates the group.
    let mut again = app.consume("vanishing", "g", "").await;
    let id = app.publish("vanishing", json!(1)).await;
    assert_eq!(again.next_event(WAIT).await.unwrap().id, Some(id));
}

async fn bad_requests_are_refused_before_streaming(app: TestApp) {
    for query in [
        "group=g",
        "stream=s&group=g&limit=0",
        "stream=s&group=g&limit=many",
        "stream=s&group=g&from=yesterday",
        "stream=s&group=g&mode=exactly-once",
        "stream=s&group=g&group=h",
        "stream=s%0A&group=g",
        // Not UTF-8 once decoded: refused, not turned into a stream named U+FFFD.
        "stream=%FF&group=g",
        "stream=s&group=%C3",
        "stream=%FF",
    ] {
        let response = app.get(&format!("/api/events?{query}")).await;
        problem(response, 400).await;
    }
    // Nor through the other ways names arrive in a query.
    problem(app.get("/sse/connect?channel_id=%FF").await, 400).await;
    app.publish("s", json!(1)).await;
    let created = app
        .request(reqwest::Method::PUT, "/api/streams/s/groups/g")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    problem(
        app.get("/api/streams/s/groups/g/pending?consumer=%FF")
            .await,
        400,
    )
    .await;
    assert!(
        json(app.get("/admin/streams").await).await["streams"]
            .as_array()
            .unwrap()
            .iter()
            .all(|name| name != "\u{fffd}"),
        "no stream named U+FFFD"
    );
    let response = reqwest::Client::new()
        .get(app.url("/api/events?stream=s&group=g"))
        .send()
        .await
        .unwrap();
    problem(response, 401).await;
}

async fn query_token_is_accepted_on_the_events_route(app: TestApp) {
    let url = app.url(&format!("/api/events?stream=tokened&group=g&token={TOKEN}"));
    let client = SseClient::open(reqwest::Client::new().get(url)).await;
    assert_eq!(client.status, 200);
    let url = app.url(&format!(
        "/api/events?stream=tokened&group=g&access_token={TOKEN}"
    ));
    assert_eq!(
        SseClient::open(reqwest::Client::new().get(url))
            .await
            .status,
        200
    );
    let url = app.url("/api/events?stream=tokened&group=g&token=wrong");
    assert_eq!(
        SseClient::open(reqwest::Client::new().get(url))
            .await
            .status,
        401
    );
}

async fn group_administration_routes(app: TestApp) {
    let ids = app
        .publish_batch("admin-groups", (0..4).map(|n| json!(n)).collect())
        .await;
    let create = |body: Value| {
        app.request(
            reqwest::Method::PUT,
            "/api/streams/admin-groups/groups/tail",
        )
        .json(&body)
        .send()
    };
    assert_eq!(create(json!({ "from": "$" })).await.unwrap().status(), 201);
    assert_eq!(
        create(json!({ "from": "$" })).await.unwrap().status(),
        200,
        "exists"
    );
    problem(create(json!({ "from": "later" })).await.unwrap(), 400).await;
    assert_eq!(app.group_stats("admin-groups", "tail").await["lag"], 0);

    let mut client = app
        .consume("admin-groups", "readers", "&consumer=r1&limit=3")
        .await;
    client.events(3, WAIT).await;
    let pending = json(
        app.get("/api/streams/admin-groups/groups/readers/pending")
            .await,
    )
    .await;
    let entries = pending["pending"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(
        (entries[0]["id"].as_str(), entries[0]["consumer"].as_str()),
        (Some(ids[0].as_str()), Some("r1"))
    );
    assert_eq!(entries[0]["deliveries"], 1);
    assert!(entries[0]["idle_ms"].is_u64());
    let consumers = json(
        app.get("/api/streams/admin-groups/groups/readers/consumers")
            .await,
    )
    .await;
    assert_eq!(
        (
            consumers["consumers"][0]["name"].as_str(),
            consumers["consumers"][0]["pending"].as_u64()
        ),
        (Some("r1"), Some(3))
    );

    let reposition = app
        .request(
            reqwest::Method::POST,
            "/api/streams/admin-groups/groups/tail/position",
        )
        .json(&json!({ "from": "0" }))
        .send()
        .await
        .unwrap();
    assert_eq!(reposition.status(), 200);
    assert_eq!(
        app.group_stats("admin-groups", "tail").await["last_delivered_id"],
        "0-0"
    );
    let deleted = app
        .request(
            reqwest::Method::DELETE,
            "/api/streams/admin-groups/groups/tail",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let again = app
        .request(
            reqwest::Method::DELETE,
            "/api/streams/admin-groups/groups/tail",
        )
        .send()
        .await
        .unwrap();
    problem(again, 404).await;
    problem(
        app.get("/api/streams/admin-groups/groups/nope/pending")
            .await,
        404,
    )
    .await;

    // Trimming and deleting streams.
    let trim = |body: Value| {
        app.request(reqwest::Method::POST, "/api/streams/admin-groups/trim")
            .json(&body)
            .send()
    };
    assert_eq!(
        json(trim(json!({ "max_len": 2 })).await.unwrap()).await["trimmed"],
        2
    );
    problem(
        trim(json!({ "max_len": 1, "min_id": "0" })).await.unwrap(),
        400,
    )
    .await;
    let missing = app
        .request(reqwest::Method::POST, "/api/streams/nope/trim")
        .json(&json!({ "max_len": 1 }))
        .send()
        .await
        .unwrap();
    problem(missing, 404).await;
    let delete = || {
        app.request(reqwest::Method::DELETE, "/api/streams/admin-groups")
            .send()
    };
    assert_eq!(delete().await.unwrap().status(), 200);
    problem(delete().await.unwrap(), 404).await;
}

// Redis only: what needs two instances on one store, or counting the store's connections.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_another_instance_finishes_after_a_restart() {
    let Some(first) = TestApp::on_redis("").await else {
        return;
    };
    let id = first.publish("survive", json!("job")).await;
    let mut client = first.consume("survive", "g", "&consumer=worker-1").await;
    client
        .next_event(WAIT)
        .await
        .expect("delivered on instance A");
    drop(client);
    // Instance A stops; instance B runs on the same Redis.
    let redis = first.into_redis();
    let second = TestApp::spawn(crate::helpers::Backend::Redis(redis), "").await;
    assert_eq!(second.group_stats("survive", "g").await["pending"], 1);
    assert_eq!(second.finish("survive", "g", "worker-1", &id).await, 200);
    assert_eq!(second.group_stats("survive", "g").await["pending"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_five_hundred_consumers_share_a_fixed_number_of_connections() {
    let Some(app) = TestApp::on_redis("").await else {
        return;
    };
    app.publish("crowd", json!("warm-up")).await;
    let clients_before: u64 = connected_clients(&app);
    let app = Arc::new(app);
    let mut clients = Vec::new();
    for _ in 0..500 {
        clients.push(app.consume("crowd", "many", "&limit=1").await);
    }
    // Let them all settle, idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let commands_before = total_commands(&app);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_commands = total_commands(&app) - commands_before;
    let clients_with_500 = connected_clients(&app);
    println!(
        "redis connected_clients: {clients_before} before, {clients_with_500} with 500 SSE consumers; \
         {idle_commands} commands in 2 s of idleness"
    );
    assert!(
        clients_with_500 <= clients_before + 2,
        "{clients_before} → {clients_with_500}"
    );
    assert!(
        idle_commands < 40,
        "idle consumers cost round trips: {idle_commands} in 2 s"
    );

    // And they all work: 500 messages, each delivered once, to 500 consumers with limit 1.
    app.publish_batch("crowd", (0..499).map(|n| json!(n)).collect())
        .await;
    let mut received: HashMap<String, usize> = HashMap::new();
    for client in &mut clients {
        if let Some(event) = client.next_event(Duration::from_secs(5)).await {
            *received.entry(event.id.unwrap()).or_default() += 1;
        }
    }
    assert_eq!(received.len(), 500);
    assert!(received.values().all(|&n| n == 1));
}

fn info_field(app: &TestApp, section: &str, field: &str) -> u64 {
    let info: String = app.redis().cmd(&["INFO", section]);
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from INFO {section}"))
}

/// Clients connected to the test's redis-server, without the one asking.
fn connected_clients(app: &TestApp) -> u64 {
    info_field(app, "clients", "connected_clients") - 1
}

/// Commands processed so far, without the asking connection's own.
fn total_commands(app: &TestApp) -> u64 {
    info_field(app, "stats", "total_commands_processed")
}
