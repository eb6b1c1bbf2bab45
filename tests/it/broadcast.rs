//! Broadcast SSE: replay then live with no gap or duplicate at the seam, gaps after trimming,
//! multi-stream cursors, slow subscribers, the Pub/Sub bridge, and a real browser reconnecting.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::process::Process;
use crate::helpers::scripts::ScriptRun;
use crate::helpers::sse::{Event, SseClient};
use crate::helpers::{RedisServer, TOKEN, TestApp, eventually, json, problem};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);

on_each_backend!(
    replay_then_live_survives_reconnects_at_random_moments,
    a_trimmed_resume_point_is_announced_as_a_gap,
    a_resume_before_the_first_entry_of_an_untouched_stream_is_no_gap,
    an_entry_deleted_after_the_resume_point_is_a_gap = "[consumer]\ndelete_on_finish = true\n",
    bad_or_future_resume_points_are_400,
    a_cursor_resumes_each_of_several_streams,
    subscriptions_start_at_new_messages_by_default,
    the_header_beats_the_parameter_beats_from,
    channel_ids_map_to_prefixed_streams,
    expired_messages_are_skipped_on_replay_and_live,
    every_subscriber_gets_every_message,
    a_reader_that_falls_behind_retention_is_told_so =
        "[[retention]]\npattern = \"torrent\"\nmax_len = 100\n",
);

impl TestApp {
    /// Opens a broadcast stream at `path`, with extra headers.
    pub async fn subscribe(&self, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let mut request = self.request(reqwest::Method::GET, path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let client = SseClient::open(request).await;
        assert_eq!(client.status, 200, "subscribe {path}");
        client
    }
}

fn bodies(events: &[Event]) -> Vec<Value> {
    events
        .iter()
        .map(|event| event.json()["body"].clone())
        .collect()
}

async fn replay_then_live_survives_reconnects_at_random_moments(app: TestApp) {
    const TOTAL: u64 = 5000;
    const SUBSCRIBERS: usize = 20;
    let app = Arc::new(app);
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|index| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut seen: Vec<u64> = Vec::new();
                let mut last_id: Option<String> = None;
                let mut reconnects = 0;
                let started = Instant::now();
                while (seen.len() as u64) < TOTAL {
                    assert!(
                        started.elapsed() < Duration::from_secs(120),
                        "subscriber {index} is stuck at {} of {TOTAL}: {:?}",
                        seen.len(),
                        seen.windows(2).find(|pair| pair[1] != pair[0] + 1)
                    );
                    let path = "/api/streams/seam/events?from=0";
                    let headers: Vec<(&str, &str)> = last_id
                        .iter()
                        .map(|id| ("last-event-id", id.as_str()))
                        .collect();
                    let mut client = app.subscribe(path, &headers).await;
                    // Read a random number of messages, then drop the connection.
                    let quota = rand::random_range(50..600) + index;
                    for _ in 0..quota {
                        let Some(event) = client.next_event(Duration::from_secs(10)).await else {
                            break;
                        };
                        seen.push(event.json()["body"].as_u64().unwrap());
                        last_id = event.id;
                        if seen.len() as u64 == TOTAL {
                            break;
                        }
                    }
                    reconnects += 1;
                }
                (seen, reconnects)
            })
        })
        .collect();
    // The publisher writes while the subscribers come and go.
    let publisher = {
        let app = app.clone();
        tokio::spawn(async move {
            for n in 0..TOTAL {
                let response = app
                    .post_json("/api/streams/seam/messages", &json!({ "data": n }))
                    .await;
                assert_eq!(response.status(), 201);
            }
        })
    };
    publisher.await.unwrap();
    for subscriber in subscribers {
        let (seen, reconnects) = subscriber.await.unwrap();
        assert_eq!(
            seen,
            (0..TOTAL).collect::<Vec<_>>(),
            "all {TOTAL}, in order, once"
        );
        assert!(reconnects >= 5, "{reconnects} reconnects");
    }
}

async fn a_trimmed_resume_point_is_announced_as_a_gap(app: TestApp) {
    let ids = app
        .publish_batch("trimmed", (0..30).map(|n| json!(n)).collect())
        .await;
    let response = app
        .post_json("/api/streams/trimmed/trim", &json!({ "max_len": 10 }))
        .await;
    assert_eq!(json(response).await["trimmed"], 20);
    let mut client = app
        .subscribe(
            "/api/streams/trimmed/events",
            &[("last-event-id", ids[4].as_str())],
        )
        .await;
    let gap = client.next_event(WAIT).await.unwrap();
    assert_eq!(gap.event.as_deref(), Some("gap"));
    assert_eq!(
        gap.json(),
        json!({ "stream": "trimmed", "requested": ids[4], "resumed_from": ids[20] })
    );
    let rest = client.events(10, WAIT).await;
    assert_eq!(
        bodies(&rest),
        (20..30).map(|n| json!(n)).collect::<Vec<_>>()
    );
    assert_eq!(rest[0].id.as_deref(), Some(ids[20].as_str()));
    // A resume point still retained is no gap.
    let mut client = app
        .subscribe(
            "/api/streams/trimmed/events",
            &[("last-event-id", ids[25].as_str())],
        )
        .await;
    let next = client.next_event(WAIT).await.unwrap();
    assert_eq!(
        (next.event.clone(), next.json()["body"].clone()),
        (None, json!(26))
    );
}

/// SPEC 3.3: a gap only when entries after the requested id were removed. From `0` (or a
/// `Last-Event-ID` of `0-0`) on a stream that never lost an entry, nothing was missed.
async fn a_resume_before_the_first_entry_of_an_untouched_stream_is_no_gap(app: TestApp) {
    app.publish_batch("untouched", (0..3).map(|n| json!(n)).collect())
        .await;
    for (path, headers) in [
        ("/api/streams/untouched/events?from=0", vec![]),
        (
            "/api/streams/untouched/events",
            vec![("last-event-id", "0-0")],
        ),
    ] {
        let mut client = app.subscribe(path, &headers).await;
        let events = client.events(3, WAIT).await;
        assert!(
            events.iter().all(|event| event.event.is_none()),
            "{path}: {:?}",
            events
                .iter()
                .map(|event| event.event.clone())
                .collect::<Vec<_>>()
        );
        assert_eq!(bodies(&events), [json!(0), json!(1), json!(2)]);
    }
}

/// SPEC 3.3: an entry deleted by id after the resume point (here by a group's finish with
/// `delete_on_finish`) is a gap even though older entries are still there; one deleted at or
/// before the resume point is none.
async fn an_entry_deleted_after_the_resume_point_is_a_gap(app: TestApp) {
    let ids = app
        .publish_batch("holey", (0..4).map(|n| json!(n)).collect())
        .await;
    let mut consumer = app.consume("holey", "g", "&consumer=c").await;
    consumer.events(4, WAIT).await;
    assert_eq!(app.finish("holey", "g", "c", &ids[2]).await, 200);
    let mut client = app
        .subscribe(
            "/api/streams/holey/events",
            &[("last-event-id", ids[0].as_str())],
        )
        .await;
    let gap = client.next_event(WAIT).await.unwrap();
    assert_eq!(gap.event.as_deref(), Some("gap"));
    assert_eq!(
        gap.json(),
        json!({ "stream": "holey", "requested": ids[0], "resumed_from": ids[1] })
    );
    assert_eq!(bodies(&client.events(2, WAIT).await), [json!(1), json!(3)]);
    for resumed in [&ids[2], &ids[3]] {
        let mut client = app
            .subscribe(
                "/api/streams/holey/events?from=0",
                &[("last-event-id", resumed.as_str())],
            )
            .await;
        app.publish("holey", json!("next")).await;
        let next = client.next_event(WAIT).await.unwrap();
        assert_eq!(next.event, None, "resumed after {resumed}: {next:?}");
    }
}

async fn bad_or_future_resume_points_are_400(app: TestApp) {
    let id = app.publish("resumable", json!(1)).await;
    let (ms, _) = id.split_once('-').unwrap();
    let future = format!("{}-0", ms.parse::<u64>().unwrap() + 60_000);
    for (header, query) in [
        (Some("yesterday"), ""),
        (Some(future.as_str()), ""),
        (Some("c1.!!!"), ""),
        (None, "?lastEventId=12-x"),
        (None, "?from=soon"),
    ] {
        let mut request = app.request(
            reqwest::Method::GET,
            &format!("/api/streams/resumable/events{query}"),
        );
        if let Some(header) = header {
            request = request.header("last-event-id", header);
        }
        problem(request.send().await.unwrap(), 400).await;
    }
    // Several streams take only 0 or $ as `from`.
    problem(
        app.get(&format!("/api/events?streams=a,b&from={id}")).await,
        400,
    )
    .await;
}

async fn a_cursor_resumes_each_of_several_streams(app: TestApp) {
    let mut client = app.subscribe("/api/events?streams=alpha,beta", &[]).await;
    app.publish("alpha", json!("a1")).await;
    app.publish("beta", json!("b1")).await;
    app.publish("alpha", json!("a2")).await;
    let first = client.events(3, WAIT).await;
    // In order within each stream; streams interleave as they are read.
    let of = |stream: &str| -> Vec<Value> {
        first
            .iter()
            .filter(|event| event.json()["stream"] == stream)
            .map(|event| event.json()["body"].clone())
            .collect()
    };
    assert_eq!(
        (of("alpha"), of("beta")),
        (vec![json!("a1"), json!("a2")], vec![json!("b1")])
    );
    let cursor = first[2].id.clone().unwrap();
    assert!(cursor.starts_with("c1."), "{cursor}");
    drop(client);
    app.publish("beta", json!("b2")).await;
    app.publish("alpha", json!("a3")).await;
    // The repeated-parameter form, resuming from the cursor.
    let mut client = app
        .subscribe(
            "/api/events?stream=alpha&stream=beta",
            &[("last-event-id", cursor.as_str())],
        )
        .await;
    let resumed = client.events(2, WAIT).await;
    let mut got: Vec<(String, Value)> = resumed
        .iter()
        .map(|event| {
            (
                event.json()["stream"].as_str().unwrap().to_owned(),
                event.json()["body"].clone(),
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [("alpha".into(), json!("a3")), ("beta".into(), json!("b2"))]
    );
    assert!(client.next_event(QUIET).await.is_none(), "nothing twice");
    // The cursor also works on a one-stream subscription.
    let mut single = app
        .subscribe(
            "/api/streams/beta/events",
            &[("last-event-id", cursor.as_str())],
        )
        .await;
    assert_eq!(single.next_event(WAIT).await.unwrap().json()["body"], "b2");
}

async fn subscriptions_start_at_new_messages_by_default(app: TestApp) {
    app.publish("news", json!("old")).await;
    let mut client = app.subscribe("/api/streams/news/events", &[]).await;
    assert!(client.next_event(QUIET).await.is_none());
    app.publish("news", json!("new")).await;
    assert_eq!(client.next_event(WAIT).await.unwrap().json()["body"], "new");
    let mut everything = app.subscribe("/api/streams/news/events?from=0", &[]).await;
    assert_eq!(
        bodies(&everything.events(2, WAIT).await),
        [json!("old"), json!("new")]
    );
}

async fn the_header_beats_the_parameter_beats_from(app: TestApp) {
    let ids = app
        .publish_batch("precedence", (0..4).map(|n| json!(n)).collect())
        .await;
    let path = format!(
        "/api/streams/precedence/events?from=0&lastEventId={}",
        ids[1]
    );
    let mut by_header = app
        .subscribe(&path, &[("last-event-id", ids[2].as_str())])
        .await;
    assert_eq!(by_header.next_event(WAIT).await.unwrap().json()["body"], 3);
    let mut by_parameter = app.subscribe(&path, &[]).await;
    assert_eq!(
        by_parameter.next_event(WAIT).await.unwrap().json()["body"],
        2
    );
    let mut by_from = app
        .subscribe(
            &format!("/api/streams/precedence/events?from={}", ids[0]),
            &[],
        )
        .await;
    assert_eq!(by_from.next_event(WAIT).await.unwrap().json()["body"], 1);
}

async fn channel_ids_map_to_prefixed_streams(app: TestApp) {
    let mut client = app.subscribe("/sse/connect?channel_id=user123", &[]).await;
    app.publish("sse:stream:user123", json!({ "text": "Hello!" }))
        .await;
    let event = client.next_event(WAIT).await.unwrap();
    assert_eq!(event.json()["body"], json!({ "text": "Hello!" }));
    assert_eq!(event.json()["stream"], "sse:stream:user123");
    problem(app.get("/sse/connect").await, 400).await;
    // Browsers pass the token in the query.
    let url = app.url(&format!("/sse/connect?channel_id=user123&token={TOKEN}"));
    assert_eq!(
        SseClient::open(reqwest::Client::new().get(url))
            .await
            .status,
        200
    );
}

async fn expired_messages_are_skipped_on_replay_and_live(app: TestApp) {
    let mut live = app.subscribe("/api/streams/fleeting/events", &[]).await;
    app.post_json(
        "/api/streams/fleeting/messages",
        &json!({ "data": "short", "ttl": 1 }),
    )
    .await;
    app.publish("fleeting", json!("kept")).await;
    assert_eq!(
        bodies(&live.events(2, WAIT).await),
        [json!("short"), json!("kept")]
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut replay = app
        .subscribe("/api/streams/fleeting/events?from=0", &[])
        .await;
    assert_eq!(
        replay.next_event(WAIT).await.unwrap().json()["body"],
        "kept"
    );
    assert!(replay.next_event(QUIET).await.is_none());
}

async fn every_subscriber_gets_every_message(app: TestApp) {
    let mut clients = Vec::new();
    for _ in 0..25 {
        clients.push(app.subscribe("/api/streams/fanout/events", &[]).await);
    }
    app.publish_batch("fanout", (0..100).map(|n| json!(n)).collect())
        .await;
    for client in &mut clients {
        let events = client.events(100, WAIT).await;
        assert_eq!(
            bodies(&events),
            (0..100).map(|n| json!(n)).collect::<Vec<_>>()
        );
    }
    let health = json(app.get("/health").await).await;
    assert_eq!(health["connections"]["sse"], 25);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// One subscriber never reads while 50,000 messages of 1 KiB go to ten others.
async fn slow_subscriber_costs_only_itself(args: &[&str]) {
    let config = tempfile::NamedTempFile::new().unwrap();
    // Retention bounds what the engine itself keeps (so memory measures buffering, not storage),
    // with room for a reader starved of CPU to catch up by its own cursor.
    std::fs::write(
        config.path(),
        "[[retention]]\npattern = \"firehose\"\nmax_len = 20000\n",
    )
    .unwrap();
    let config_path = config.path().display().to_string();
    let mut all_args = vec![
        "--bearer-token",
        TOKEN,
        "--http-address",
        "127.0.0.1:0",
        "--config",
        &config_path,
    ];
    all_args.extend_from_slice(args);
    let mut process = Process::spawn(&all_args, &[]);
    let url = process.wait_for_url().await;
    let address = url.trim_start_matches("http://").to_owned();
    let http = reqwest::Client::new();

    // The stalled subscriber: sends its request and never reads a byte.
    let stalled = {
        use tokio::io::AsyncWriteExt;
        let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
        let request = format!(
            "GET /api/streams/firehose/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        socket
    };
    let mut readers = Vec::new();
    for _ in 0..10 {
        let request = http
            .get(format!("{url}/api/streams/firehose/events"))
            .bearer_auth(TOKEN);
        let client = SseClient::open(request).await;
        assert_eq!(client.status, 200);
        readers.push(client);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(process.pid());

    const TOTAL: usize = 50_000;
    let started = Instant::now();
    let payload = "x".repeat(1000);
    let readers: Vec<_> = readers
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut count = 0;
                while count < TOTAL {
                    match client.next_event(Duration::from_secs(20)).await {
                        Some(event) => {
                            assert_eq!(
                                event.event, None,
                                "a reader fell behind retention: {}",
                                event.data
                            );
                            count += 1;
                        }
                        None => break,
                    }
                }
                count
            })
        })
        .collect();
    let mut peak = rss_before;
    for _ in 0..(TOTAL / 250) {
        let messages: Vec<Value> = (0..250).map(|_| json!(payload)).collect();
        let response = http
            .post(format!("{url}/api/streams/firehose/messages/batch"))
            .bearer_auth(TOKEN)
            .json(&json!({ "messages": messages }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        peak = peak.max(rss_kib(process.pid()));
    }
    for reader in readers {
        assert_eq!(
            reader.await.unwrap(),
            TOTAL,
            "a reading subscriber missed messages"
        );
        peak = peak.max(rss_kib(process.pid()));
    }
    let elapsed = started.elapsed();
    let rss_after = rss_kib(process.pid());
    println!(
        "slow subscriber ({}): 10 readers got {TOTAL} x 1 KiB in {elapsed:?}; server RSS {} MiB before, \
         {} MiB peak, {} MiB after",
        if args.is_empty() { "embedded" } else { "redis" },
        rss_before / 1024,
        peak / 1024,
        rss_after / 1024
    );
    assert!(
        elapsed < Duration::from_secs(60),
        "the readers were held up: {elapsed:?}"
    );
    assert!(
        peak < rss_before + 150 * 1024,
        "server memory grew from {rss_before} KiB to {peak} KiB"
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_costs_only_itself_embedded() {
    slow_subscriber_costs_only_itself(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_costs_only_itself_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    slow_subscriber_costs_only_itself(&["--redis-url", &redis.url()]).await;
}

// The Pub/Sub bridge exists only with Redis.

const BRIDGE: &str = "[pubsub]\npatterns = [\"*\"]\n";

/// Publishes on a channel until some subscriber receives it (the bridge subscribes shortly
/// after start); returns how many publishes that took.
fn publish_until_heard(redis: &RedisServer, channel: &str, payload: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let receivers: i64 = redis.cmd(&["PUBLISH", channel, payload]);
        if receivers > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no bridge subscribed to {channel}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pubsub_messages_reach_channel_subscribers() {
    let Some(app) = TestApp::on_redis(BRIDGE).await else {
        return;
    };
    let mut client = app.subscribe("/sse/connect?channel_id=user123", &[]).await;
    publish_until_heard(app.redis(), "user123", r#"{"text": "Hello!"}"#);
    let event = client.next_event(WAIT).await.expect("bridged");
    assert_eq!(event.json()["body"], json!({ "text": "Hello!" }));
    let _: i64 = app
        .redis()
        .cmd(&["PUBLISH", "user123", "Simple text message"]);
    assert_eq!(
        client.next_event(WAIT).await.unwrap().json()["body"],
        "Simple text message"
    );
    // Stored with the bridge's retention: a time to live on the stream.
    let ttl: i64 = app.redis().cmd(&["PTTL", "sse:stream:user123"]);
    assert!(ttl > 3_500_000 && ttl <= 3_600_000, "ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_bridges_store_each_message_once_in_order() {
    let Some(first) = TestApp::on_redis(BRIDGE).await else {
        return;
    };
    let redis_url = first.redis().url();
    let second = TestApp::spawn(crate::helpers::Backend::RedisAt(redis_url), BRIDGE).await;
    publish_until_heard(first.redis(), "warmup", "0");
    for n in 0..50 {
        let _: i64 = first.redis().cmd(&["PUBLISH", "orders", &n.to_string()]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let page = json(first.get("/api/streams/sse:stream:orders/messages").await).await;
    let stored: Vec<Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].clone())
        .collect();
    assert_eq!(
        stored,
        (0..50).map(|n| json!(n)).collect::<Vec<_>>(),
        "each message once, in order"
    );
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_bridge_resubscribes_after_a_redis_restart() {
    let Some(mut app) = TestApp::on_redis(BRIDGE).await else {
        return;
    };
    let mut client = app.subscribe("/sse/connect?channel_id=alerts", &[]).await;
    publish_until_heard(app.redis(), "alerts", "before");
    assert_eq!(
        client.next_event(WAIT).await.unwrap().json()["body"],
        "before"
    );
    app.redis_mut().restart();
    publish_until_heard(app.redis(), "alerts", "after");
    let event = client
        .next_event(Duration::from_secs(15))
        .await
        .expect("delivered after the restart");
    assert_eq!(event.json()["body"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_browser_resumes_by_itself_across_a_restart() {
    if !crate::helpers::scripts::available() {
        return;
    }
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let args = [
        "--redis-url",
        &redis.url(),
        "--bearer-token",
        TOKEN,
        "--http-address",
        &address,
    ];
    let mut server = Process::spawn(&args, &[]);
    let origin = server.wait_for_url().await;

    const TOTAL: usize = 60;
    let path = format!("/api/streams/browser/events?from=0&token={TOKEN}");
    let total = TOTAL.to_string();
    let mut browser = ScriptRun::start("eventsource.mjs", &[&origin, &path, &total, "40000"]);
    browser.ready(Duration::from_secs(60)).await;

    // Messages go straight into Redis, so publishing goes on while streamgate is down.
    let mut restarted = false;
    for n in 0..TOTAL {
        let data = json!({ "n": n }).to_string();
        let _: String = redis.cmd(&["XADD", "browser", "*", "data", &data]);
        tokio::time::sleep(Duration::from_millis(60)).await;
        if n == TOTAL / 2 {
            server.signal("TERM");
            server.wait(Duration::from_secs(10)).await.expect("stopped");
            tokio::time::sleep(Duration::from_millis(500)).await;
            server = Process::spawn(&args, &[]);
            server.wait_for_url().await;
            restarted = true;
        }
    }
    assert!(restarted);
    let report = browser.report(Duration::from_secs(90)).await;
    let received: Vec<u64> = report["received"]
        .as_array()
        .unwrap()
        .iter()
        .map(|message| {
            serde_json::from_str::<Value>(message["data"].as_str().unwrap()).unwrap()["body"]["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        received,
        (0..TOTAL as u64).collect::<Vec<_>>(),
        "every message once, in order"
    );
    assert!(
        report["opens"].as_u64().unwrap() >= 2,
        "the browser reconnected: {report}"
    );
    let counts: HashMap<u64, usize> = received.iter().fold(HashMap::new(), |mut counts, n| {
        *counts.entry(*n).or_default() += 1;
        counts
    });
    assert!(counts.values().all(|&count| count == 1));
}

/// Calls of `command` the test's redis-server has served.
fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let info: String = redis.cmd(&["INFO", "commandstats"]);
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_each_stream_is_read_once_and_recent_resumes_need_no_read() {
    let Some(app) = TestApp::on_redis("").await else {
        return;
    };
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(app.subscribe("/api/streams/shared/events", &[]).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let redis = app.redis();
    let reads = |redis: &RedisServer| {
        ["xread", "xrange", "xrevrange", "xinfo|stream"]
            .map(|command| command_calls(redis, command))
    };
    let before = reads(redis);
    for n in 0..50 {
        app.publish("shared", json!(n)).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for client in &mut clients {
        assert_eq!(client.events(50, WAIT).await.len(), 50);
    }
    let after = reads(redis);
    // One blocking read per wake-up of the hub, for all 20 subscribers; no per-subscriber reads.
    assert!(
        after[0] - before[0] <= 60,
        "XREAD {} → {}",
        before[0],
        after[0]
    );
    assert_eq!(after[1..], before[1..], "no range or info reads while live");

    // A reconnect with a recent id is served from memory.
    let last = clients[0].events(0, WAIT).await;
    assert!(last.is_empty());
    drop(clients);
    let page = json(
        app.get("/api/streams/shared/messages?reverse=true&count=5")
            .await,
    )
    .await;
    let recent = page["messages"][4]["id"].as_str().unwrap().to_owned();
    let before = reads(redis);
    let mut client = app
        .subscribe(
            "/api/streams/shared/events",
            &[("last-event-id", recent.as_str())],
        )
        .await;
    assert_eq!(
        bodies(&client.events(4, WAIT).await),
        [json!(46), json!(47), json!(48), json!(49)]
    );
    let after = reads(redis);
    assert_eq!(after[1..], before[1..], "the resume needed no backend read");
}

/// Clients blocked in Redis right now (`INFO clients`).
fn blocked_clients(redis: &RedisServer) -> u64 {
    let info: String = redis.cmd(&["INFO", "clients"]);
    info.lines()
        .find_map(|line| line.strip_prefix("blocked_clients:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("blocked_clients in INFO clients")
}

/// A group consumer and broadcast subscribers, on a stream they share and on one of their own:
/// the instance's one tail reader follows them all with a single blocking read, and each gets
/// what it should.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_groups_and_subscribers_share_one_blocking_read() {
    let Some(app) = TestApp::on_redis("").await else {
        return;
    };
    let mut consumer = app.consume("jobs", "workers", "").await;
    let mut jobs = app.subscribe("/api/streams/jobs/events", &[]).await;
    let mut news = app.subscribe("/api/streams/news/events", &[]).await;
    let redis = app.redis();
    assert!(
        eventually(WAIT, || async { blocked_clients(redis) == 1 }).await,
        "{} clients blocked in Redis",
        blocked_clients(redis)
    );
    for n in 0..3 {
        app.publish("jobs", json!(format!("job {n}"))).await;
        app.publish("news", json!(format!("news {n}"))).await;
    }
    let expected = |kind: &str| {
        (0..3)
            .map(|n| json!(format!("{kind} {n}")))
            .collect::<Vec<_>>()
    };
    assert_eq!(bodies(&consumer.events(3, WAIT).await), expected("job"));
    assert_eq!(bodies(&jobs.events(3, WAIT).await), expected("job"));
    assert_eq!(bodies(&news.events(3, WAIT).await), expected("news"));
    assert!(
        eventually(WAIT, || async { blocked_clients(redis) == 1 }).await,
        "{} clients blocked in Redis",
        blocked_clients(redis)
    );
}

async fn a_reader_that_falls_behind_retention_is_told_so(app: TestApp) {
    let mut stalled = app.subscribe("/api/streams/torrent/events", &[]).await;
    // Far more than the socket buffers and the live channel hold, in a stream kept to ~100.
    let payload = "z".repeat(8000);
    let mut last = 0;
    for batch in 0..40 {
        let messages: Vec<Value> = (0..100)
            .map(|n| json!({ "n": batch * 100 + n, "pad": payload }))
            .collect();
        app.publish_batch("torrent", messages).await;
        last = batch * 100 + 99;
    }
    let mut gap = None;
    let mut previous = None;
    let mut final_n = None;
    while let Some(event) = stalled.next_event(Duration::from_secs(3)).await {
        if event.event.as_deref() == Some("gap") {
            gap = Some(event.json());
            continue;
        }
        let n = event.json()["body"]["n"].as_u64().unwrap();
        if let Some(previous) = previous {
            assert!(n > previous, "in order");
            assert!(
                n == previous + 1 || gap.is_some(),
                "skipped from {previous} to {n} without a gap event"
            );
        }
        previous = Some(n);
        final_n = Some(n);
    }
    let gap = gap.expect("a gap event");
    assert!(
        gap["requested"].is_string() && gap["resumed_from"].is_string(),
        "{gap}"
    );
    assert_eq!(final_n, Some(last), "it caught up to the newest message");
}
