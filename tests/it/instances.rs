//! Several streamgate instances on one Redis behave as one service: a consumer name is one
//! connection across all of them, finishing by id works on any of them, limits and status span
//! them, and a message published through one reaches a consumer connected to another at once.
//! Where one instance shows the rule too (the embedded engine), it is checked on every backend.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::process::Process;
use crate::helpers::sse::SseClient;
use crate::helpers::{Backend, RedisServer, TOKEN, TestApp, eventually, json, problem};

/// Two more instances on the Redis of `first`.
async fn others(first: &TestApp, extra: &str) -> (TestApp, TestApp) {
    let url = first.redis().url();
    (
        TestApp::spawn(Backend::RedisAt(url.clone()), extra).await,
        TestApp::spawn(Backend::RedisAt(url), extra).await,
    )
}

fn consumer_of(client: &SseClient) -> String {
    client
        .header("x-consumer")
        .expect("X-Consumer header")
        .to_owned()
}

/// The next `n` messages, as JSON.
async fn receive(client: &mut SseClient, n: usize) -> Vec<Value> {
    let mut messages = Vec::with_capacity(n);
    for _ in 0..n {
        let event = client
            .next_event(Duration::from_secs(10))
            .await
            .expect("a message");
        messages.push(event.json());
    }
    messages
}

fn id_of(message: &Value) -> String {
    message["id"].as_str().expect("id").to_owned()
}

async fn finish_by_id(app: &TestApp, id: &str) -> reqwest::Response {
    app.post_json(&format!("/api/messages/{id}/finish"), &json!({}))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_name_is_one_connection_across_instances() {
    let Some(a) = TestApp::on_redis("").await else {
        return;
    };
    let (b, _) = others(&a, "").await;
    let first = a.consume("orders", "workers", "&consumer=w1").await;
    let refused = b
        .request(
            reqwest::Method::GET,
            "/api/events?stream=orders&group=workers&consumer=w1",
        )
        .send()
        .await
        .unwrap();
    let body = problem(refused, 409).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("already connected"),
        "{body}"
    );
    // The same name in another group, or another name, is another consumer.
    b.consume("orders", "auditors", "&consumer=w1").await;
    b.consume("orders", "workers", "&consumer=w2").await;
    // A clean disconnect frees the name at once, everywhere.
    drop(first);
    assert!(
        eventually(Duration::from_secs(2), || async {
            b.request(
                reqwest::Method::GET,
                "/api/events?stream=orders&group=workers&consumer=w1",
            )
            .send()
            .await
            .unwrap()
            .status()
                == 200
        })
        .await,
        "the name is free again after a disconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_consumer_names_are_free_elsewhere_within_15_s() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut killed = Process::spawn(
        &[
            "--redis-url",
            &redis.url(),
            "--bearer-token",
            TOKEN,
            "--http-address",
            "127.0.0.1:0",
        ],
        &[],
    );
    let url = killed.wait_for_url().await;
    let held = SseClient::open(
        reqwest::Client::new()
            .get(format!(
                "{url}/api/events?stream=jobs&group=workers&consumer=w1"
            ))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(held.status, 200);
    let b = TestApp::spawn(Backend::RedisAt(redis.url()), "").await;
    let path = "/api/events?stream=jobs&group=workers&consumer=w1";
    assert_eq!(
        b.request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap()
            .status(),
        409
    );
    killed.signal("KILL");
    let killed_at = Instant::now();
    let free = eventually(Duration::from_secs(20), || async {
        b.request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
    assert!(free, "the name never came free");
    let waited = killed_at.elapsed();
    assert!(waited <= Duration::from_secs(16), "free after {waited:?}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishing_by_id_works_on_any_instance_and_frees_the_consumers_credit() {
    let Some(a) = TestApp::on_redis("").await else {
        return;
    };
    let (b, c) = others(&a, "").await;
    let mut consumer = a.consume("tasks", "workers", "&limit=1").await;
    for n in 0..3 {
        a.publish("tasks", json!({ "n": n })).await;
    }
    // One at a time: each finish, on another instance than the consumer's, lets the next come.
    for (n, finisher) in [&b, &c, &b].into_iter().enumerate() {
        let message = &receive(&mut consumer, 1).await[0];
        assert_eq!(message["body"]["n"], n);
        let response = finish_by_id(finisher, &id_of(message)).await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    let stats = a.group_stats("tasks", "workers").await;
    assert_eq!(stats["pending"], 0);
    let unknown = finish_by_id(&c, "1-1").await;
    problem(unknown, 404).await;
}

on_each_backend!(
    an_id_pending_in_two_groups_is_not_finished_by_its_id_alone,
    a_browser_reconnect_comes_back_as_its_consumer,
);

async fn an_id_pending_in_two_groups_is_not_finished_by_its_id_alone(app: TestApp) {
    let id = app.publish("orders", json!({ "order": 1 })).await;
    let mut billing = app.consume("orders", "billing", "&consumer=b1").await;
    let mut shipping = app.consume("orders", "shipping", "&consumer=s1").await;
    assert_eq!(id_of(&receive(&mut billing, 1).await[0]), id);
    assert_eq!(id_of(&receive(&mut shipping, 1).await[0]), id);

    let refused = problem(finish_by_id(&app, &id).await, 409).await;
    let detail = refused["detail"].as_str().unwrap();
    for route in [
        format!("/api/streams/orders/groups/billing/consumers/b1/messages/{id}/finish"),
        format!("/api/streams/orders/groups/shipping/consumers/s1/messages/{id}/finish"),
    ] {
        assert!(detail.contains(&route), "{detail}");
    }
    for group in ["billing", "shipping"] {
        assert_eq!(
            app.group_stats("orders", group).await["pending"],
            1,
            "nothing was finished in {group}"
        );
    }
    // The explicit routes finish each group's own.
    assert_eq!(app.finish("orders", "billing", "b1", &id).await, 200);
    assert_eq!(app.group_stats("orders", "billing").await["pending"], 0);
    assert_eq!(app.group_stats("orders", "shipping").await["pending"], 1);
    // Pending in one group only now: the id alone is enough again.
    assert_eq!(finish_by_id(&app, &id).await.status(), 200);
    assert_eq!(app.group_stats("orders", "shipping").await["pending"], 0);
}

/// A browser's EventSource reconnecting: same URL (no `consumer=`), `Last-Event-ID` set.
async fn reconnect(app: &TestApp, last_event_id: &str) -> SseClient {
    let client = SseClient::open(
        app.request(
            reqwest::Method::GET,
            "/api/events?stream=inbox&group=ui&limit=3",
        )
        .header("last-event-id", last_event_id),
    )
    .await;
    assert_eq!(client.status, 200);
    client
}

async fn a_browser_reconnect_comes_back_as_its_consumer(app: TestApp) {
    for n in 0..5 {
        app.publish("inbox", json!({ "n": n })).await;
    }
    let mut first = app.consume("inbox", "ui", "&limit=3").await;
    let name = consumer_of(&first);
    let held = receive(&mut first, 3).await;
    drop(first);
    // The browser reconnects after `retry:` (1 s); the server notices the old connection is
    // gone within that: until then a reconnect would be a new consumer.
    let started = Instant::now();
    let mut again = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let client = reconnect(&app, &id_of(&held[2])).await;
        if consumer_of(&client) == name || started.elapsed() > Duration::from_secs(2) {
            break client;
        }
    };
    assert_eq!(consumer_of(&again), name, "the same consumer");
    let redelivered = receive(&mut again, 3).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        redelivered.iter().map(id_of).collect::<Vec<_>>(),
        held.iter().map(id_of).collect::<Vec<_>>()
    );
    assert!(redelivered.iter().all(|message| message["deliveries"] == 2));

    // While that consumer is connected, the same reconnect is a new consumer (no 409).
    let other = reconnect(&app, &id_of(&held[2])).await;
    assert_ne!(consumer_of(&other), name);
    // An id that is not pending names nobody: a new consumer too.
    let unknown = reconnect(&app, "1-1").await;
    assert_ne!(consumer_of(&unknown), name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_reconnect_to_another_instance_gets_its_messages_back() {
    let Some(a) = TestApp::on_redis("").await else {
        return;
    };
    let (b, _) = others(&a, "").await;
    for n in 0..3 {
        a.publish("inbox", json!({ "n": n })).await;
    }
    let mut first = a.consume("inbox", "ui", "&limit=3").await;
    let name = consumer_of(&first);
    let held = receive(&mut first, 3).await;
    drop(first);
    let started = Instant::now();
    // The load balancer sends the reconnect to B; A may not have noticed the disconnect yet.
    let mut again = loop {
        let client = reconnect(&b, &id_of(&held[2])).await;
        if consumer_of(&client) == name || started.elapsed() > Duration::from_secs(2) {
            break client;
        }
    };
    assert_eq!(consumer_of(&again), name);
    let redelivered = receive(&mut again, 3).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        redelivered.iter().map(id_of).collect::<Vec<_>>(),
        held.iter().map(id_of).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_on_one_instance_reaches_a_new_consumer_on_another_at_once() {
    let Some(a) = TestApp::on_redis("").await else {
        return;
    };
    let (b, _) = others(&a, "").await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    // 100 fresh streams, four clients at a time (B's stream watcher is interrupted and restarted
    // all the while), each: a consumer connects on B, then one message is published on A.
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (a, b) = (a.clone(), b.clone());
            tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                let mut consumers = Vec::new();
                for n in 0..25 {
                    let stream = format!("fresh-{client}-{n}");
                    let mut consumer = b.consume(&stream, "g", "").await;
                    let published = Instant::now();
                    a.publish(&stream, json!(n)).await;
                    let message = consumer
                        .next_event(Duration::from_secs(10))
                        .await
                        .expect("delivered");
                    slowest = slowest.max(published.elapsed());
                    assert_eq!(message.json()["body"], n);
                    consumers.push(consumer);
                }
                slowest
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for client in clients {
        slowest = slowest.max(client.await.unwrap());
    }
    assert!(
        slowest <= Duration::from_millis(100),
        "slowest delivery {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_set_on_one_instance_bounds_consumers_on_the_others_within_a_second() {
    let Some(a) = TestApp::on_redis("").await else {
        return;
    };
    let (b, c) = others(&a, "").await;
    let mut on_b = b.consume("flow", "g", "").await;
    let mut on_c = c.consume("flow", "g", "").await;
    // Every instance's consumers are counted.
    let set = a
        .post_json("/api/consumers/flow/g/limit", &json!({ "count": 1 }))
        .await;
    assert_eq!(set.status(), 200);
    assert_eq!(json(set).await["consumers"], 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in 0..6 {
        a.publish("flow", json!(n)).await;
    }
    // Each holds one, unfinished, and gets nothing more.
    for consumer in [&mut on_b, &mut on_c] {
        receive(consumer, 1).await;
        assert!(
            consumer
                .next_event(Duration::from_millis(800))
                .await
                .is_none(),
            "more than the limit"
        );
    }
    // A consumer that connects later, anywhere, gets the limit as its default.
    let mut later = a.consume("flow", "g", "").await;
    receive(&mut later, 1).await;
    assert!(later.next_event(Duration::from_millis(800)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_the_consumers_of_every_instance() {
    let Some(a) = TestApp::on_redis("").await else {
        return;
    };
    let (b, _) = others(&a, "").await;
    let mut on_a = a.consume("counted", "g", "&limit=2").await;
    let mut on_b = b.consume("counted", "g", "&limit=2").await;
    for n in 0..4 {
        a.publish("counted", json!(n)).await;
    }
    let mut delivered = receive(&mut on_a, 2).await;
    delivered.extend(receive(&mut on_b, 2).await);
    let consumer = consumer_of(&on_b);
    assert_eq!(
        b.finish("counted", "g", &consumer, &id_of(&delivered[2]))
            .await,
        200
    );
    // Consumers count at once; the other instance's message counts within its report interval.
    let status = json(a.get("/api/consumers/counted/g").await).await;
    assert_eq!(status["consumers"], 2, "{status}");
    let counted = eventually(Duration::from_secs(7), || async {
        let status = json(a.get("/api/consumers/counted/g").await).await;
        status["consumers"] == 2 && status["messages"] == 4 && status["finished"] == 1
    })
    .await;
    assert!(
        counted,
        "{}",
        json(a.get("/api/consumers/counted/g").await).await
    );
    drop((on_a, on_b));
    assert!(
        eventually(Duration::from_secs(3), || async {
            a.get("/api/consumers/counted/g").await.status() == 404
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_shared_by_two_instances_delivers_each_message_once() {
    let Some(a) = TestApp::on_redis("").await else {
        return;
    };
    let (b, _) = others(&a, "").await;
    shared_group_delivers_each_message_once(a, b).await;
}

/// Four consumers of one group, two on each instance, finishing through either: every message
/// reaches exactly one of them, first time, and is finished.
pub async fn shared_group_delivers_each_message_once(a: TestApp, b: TestApp) {
    let (a, b) = (Arc::new(a), Arc::new(b));
    const MESSAGES: u64 = 200;
    let mut workers = Vec::new();
    for (index, (home, other)) in [(&a, &b), (&a, &b), (&b, &a), (&b, &a)]
        .into_iter()
        .enumerate()
    {
        let consumer = home.consume("shared", "workers", "&limit=5").await;
        let (home, other) = (home.clone(), other.clone());
        workers.push(tokio::spawn(async move {
            let mut consumer = consumer;
            let name = consumer_of(&consumer);
            let mut received = Vec::new();
            let mut wait = Duration::from_secs(15);
            while let Some(event) = consumer.next_event(wait).await {
                wait = Duration::from_secs(2);
                let message = event.json();
                assert_eq!(message["deliveries"], 1, "no redelivery involved");
                // Finished through either instance, as a load balancer would send it.
                let finisher = if received.len() % 2 == index % 2 {
                    &home
                } else {
                    &other
                };
                let id = id_of(&message);
                assert_eq!(finisher.finish("shared", "workers", &name, &id).await, 200);
                received.push(message["body"]["n"].as_u64().unwrap());
            }
            received
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for chunk in 0..MESSAGES / 50 {
        a.publish_batch(
            "shared",
            (chunk * 50..(chunk + 1) * 50)
                .map(|n| json!({ "n": n }))
                .collect(),
        )
        .await;
    }
    let mut all = Vec::new();
    let mut shares = HashMap::new();
    for (index, worker) in workers.into_iter().enumerate() {
        let received = worker.await.unwrap();
        shares.insert(index, received.len());
        all.extend(received);
    }
    let unique: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len() as u64, MESSAGES, "each once: {shares:?}");
    assert_eq!(unique.len() as u64, MESSAGES);
    assert!(shares.values().all(|share| *share > 0), "{shares:?}");
    assert_eq!(a.group_stats("shared", "workers").await["pending"], 0);
}
