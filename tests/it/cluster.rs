//! streamgate on a Redis Cluster: keys derived from a stream share its hash slot (CLUSTER KEYSLOT
//! is the oracle), streams spread over every master, two instances share a group, and a master
//! failover loses nothing acknowledged. The other suites (conformance, groups, broadcast, admin,
//! long-poll, WebSocket) run on a cluster too, as their `::cluster` variants.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use streamgate::backend::{AppendRequest, Backend as _, IdempotencyKey};
use streamgate::model::StreamName;

use crate::conformance::connect_cluster;
use crate::helpers::{Backend, RedisCluster, TestApp, json};
use crate::instances::shared_group_delivers_each_message_once;

async fn start_cluster(replicas: usize) -> Option<RedisCluster> {
    tokio::task::spawn_blocking(move || RedisCluster::start(replicas))
        .await
        .expect("start the cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_derived_from_a_stream_share_its_hash_slot() {
    let Some(cluster) = start_cluster(0).await else {
        return;
    };
    let backend = connect_cluster(&cluster).await;
    for name in ["orders", "{tenant-7}.orders", "x{y", "a{}c{d}", "a{b}}c"] {
        let stream = StreamName::parse(name).unwrap();
        let slot = cluster.keyslot(name);
        let dead_letter = backend.dead_letter_stream(&stream);
        assert_eq!(
            cluster.keyslot(dead_letter.as_str()),
            slot,
            "{name}: its dead-letter stream {dead_letter}"
        );
        assert!(dead_letter.as_str().ends_with(":dlq"));
        // An idempotent publish writes its record in the stream's slot (one script: a
        // CROSSSLOT error otherwise), and a retry is answered from it.
        let request = || AppendRequest {
            idempotency: Some(IdempotencyKey {
                key: "k".into(),
                ttl: Duration::from_secs(60),
            }),
            ..crate::conformance::request(vec![crate::conformance::message("1")])
        };
        let first = backend.append(&stream, request()).await.unwrap();
        let again = backend.append(&stream, request()).await.unwrap();
        assert_eq!((first.ids, again.replayed), (again.ids, true), "{name}");
    }
    assert_eq!(
        StreamName::parse("orders")
            .map(|stream| backend.dead_letter_stream(&stream).to_string())
            .unwrap(),
        "{orders}:dlq"
    );
    assert_eq!(
        StreamName::parse("{tenant-7}.orders")
            .map(|stream| backend.dead_letter_stream(&stream).to_string())
            .unwrap(),
        "{tenant-7}.orders:dlq"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_spread_over_every_master_are_listed_counted_and_flushed() {
    let Some(app) = TestApp::on_cluster("").await else {
        return;
    };
    let names: Vec<String> = (0..24).map(|n| format!("spread-{n}")).collect();
    for name in &names {
        app.publish(name, json!({ "stream": name })).await;
    }
    app.publish("{tenant-7}.orders", json!(1)).await;
    let masters = app.cluster().masters();
    assert_eq!(masters.len(), 3);
    for master in masters {
        let held: Vec<String> = app
            .cluster()
            .node_cmd(master, &["KEYS", "spread-*"])
            .expect("KEYS");
        assert!(
            !held.is_empty(),
            "the master on {master} holds none of the streams"
        );
    }

    let listed = json(app.get("/admin/streams").await).await;
    let listed: HashSet<String> = listed["streams"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|name| name.as_str().unwrap().to_owned())
        .collect();
    for name in names
        .iter()
        .map(String::as_str)
        .chain(["{tenant-7}.orders"])
    {
        assert!(listed.contains(name), "{name} is listed: {listed:?}");
    }
    let info = app.get("/admin/info").await;
    assert_eq!(info.status(), 200);
    let info = info.text().await.unwrap();
    assert_eq!(info.matches("# Node ").count(), 3, "INFO of every master");

    let flushed = app
        .request(reqwest::Method::POST, "/admin/flush")
        .send()
        .await
        .unwrap();
    assert!(flushed.status().is_success(), "{}", flushed.status());
    let listed = json(app.get("/admin/streams").await).await;
    assert_eq!(listed["streams"], json!([]), "flushed on every master");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_a_cluster_share_a_group() {
    let Some(a) = TestApp::on_cluster("").await else {
        return;
    };
    let b = TestApp::spawn(Backend::ClusterAt(a.cluster().urls()), "").await;
    shared_group_delivers_each_message_once(a, b).await;
}

/// Publishes `{"n": n}` to `stream` until `stop`, recording each answer and how long it took.
fn publisher(
    app: Arc<TestApp>,
    stream: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(u16, Duration, Option<String>)>> {
    tokio::spawn(async move {
        let mut answers = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) && answers.len() < 20_000 {
            let started = Instant::now();
            let response = app
                .request(
                    reqwest::Method::POST,
                    &format!("/api/streams/{stream}/messages"),
                )
                .timeout(Duration::from_secs(30))
                .json(&json!({ "data": { "n": n } }))
                .send()
                .await
                .expect("an answer");
            let status = response.status().as_u16();
            let id = match status {
                201 => json(response).await["id"].as_str().map(str::to_owned),
                _ => None,
            };
            answers.push((status, started.elapsed(), id));
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        answers
    })
}

const FAILOVER_TOML: &str = "redis.response_timeout = \"2s\"\nredis.wait_replicas = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_and_consumers_carry_on_through_a_master_failover() {
    let Some(mut app) = TestApp::on_cluster_with_replicas(1, FAILOVER_TOML).await else {
        return;
    };
    let victim = app.cluster().master_of("failover");
    let mut consumer = app.consume("failover", "workers", "&consumer=c1").await;
    // Publishers go through a second instance, the consumer's finishes through the first.
    let other =
        Arc::new(TestApp::spawn(Backend::ClusterAt(app.cluster().urls()), FAILOVER_TOML).await);
    let stop = Arc::new(AtomicBool::new(false));
    let streams = ["failover", "elsewhere-1", "elsewhere-2"];
    let publishers: Vec<_> = streams
        .iter()
        .map(|stream| publisher(other.clone(), stream.to_string(), stop.clone()))
        .collect();
    // Readiness, watched on the publishers' instance throughout.
    let readiness = {
        let (other, stop) = (other.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let status = other.get("/health/ready").await.status().as_u16();
                if seen.last() != Some(&status) {
                    seen.push(status);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cluster = app.cluster_mut();
    tokio::task::block_in_place(|| cluster.fail_over(victim));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The promoted replica has no replica of its own: with wait_replicas = 1 its writes answer
    // 503 until the old master comes back (as its replica).
    let cluster = app.cluster_mut();
    tokio::task::block_in_place(|| cluster.restart(victim));
    // Until the shard acknowledges writes again (its new replica has synced), then a little more.
    let deadline = Instant::now() + Duration::from_secs(30);
    while other
        .post_json(
            "/api/streams/failover/messages",
            &json!({ "data": "probe" }),
        )
        .await
        .status()
        != 201
    {
        assert!(
            Instant::now() < deadline,
            "the shard never acknowledged again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);

    let mut acknowledged = Vec::new();
    let mut unavailable = 0;
    for (stream, publisher) in streams.iter().zip(publishers) {
        let answers = publisher.await.unwrap();
        for (status, took, _) in &answers {
            assert!(
                *status == 201 || *status == 503,
                "a publish to {stream} answered {status}"
            );
            assert!(
                *took < Duration::from_secs(5),
                "a publish to {stream} took {took:?} (redis.response_timeout is 2 s)"
            );
        }
        unavailable += answers.iter().filter(|(status, ..)| *status == 503).count();
        let last = answers.last().expect("publishes");
        assert_eq!(
            last.0, 201,
            "publishing to {stream} works again after the failover"
        );
        if *stream == "failover" {
            acknowledged.extend(answers.into_iter().filter_map(|(_, _, id)| id));
        }
    }
    eprintln!("failover: {unavailable} publishes answered 503 meanwhile");
    let readiness = readiness.await.unwrap();
    assert!(
        readiness.contains(&503) && readiness.last() == Some(&200),
        "readiness went {readiness:?}: not ready during the failover, ready after"
    );

    // With redis.wait_replicas = 1, every acknowledged publish survived the failover.
    let kept: HashSet<String> = app
        .cluster()
        .cmd::<Vec<(String, Vec<(String, String)>)>>(&["XRANGE", "failover", "-", "+"])
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !kept.contains(*id))
        .collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    let newest = acknowledged.last().expect("acknowledged publishes").clone();

    // The consumer carries on: it gets up to the newest message, finishing as it goes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "the consumer did not reach {newest}"
        );
        let Some(event) = consumer.next_event(Duration::from_secs(10)).await else {
            panic!("the consumer stopped before {newest}");
        };
        let message: Value = event.json();
        let id = message["id"].as_str().unwrap().to_owned();
        let status = app.finish("failover", "workers", "c1", &id).await;
        assert!(status == 200 || status == 503, "finish answered {status}");
        if id == newest {
            break;
        }
    }
}

/// Publishes `data` to `frozen` until it is acknowledged (the replica caught up), within 10 s.
async fn publish_once_replicated(app: &TestApp, data: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while app
        .post_json("/api/streams/frozen/messages", &json!({ "data": data }))
        .await
        .status()
        != 201
    {
        assert!(Instant::now() < deadline, "the replica never acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes 4 to `frozen` with the idempotency key `once`.
async fn idempotent_publish(app: &TestApp) -> reqwest::Response {
    app.request(reqwest::Method::POST, "/api/streams/frozen/messages")
        .header("Idempotency-Key", "once")
        .json(&json!({ "data": 4 }))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_frozen_replica_a_publish_answers_503_within_the_wait_timeout() {
    let Some(app) = TestApp::on_cluster_with_replicas(
        1,
        "redis.wait_replicas = 1\nredis.wait_timeout = \"500ms\"\n",
    )
    .await
    else {
        return;
    };
    // Under load a replica can take a moment to acknowledge its first writes.
    publish_once_replicated(&app, 0).await;
    let replica = app.cluster().replica_of(app.cluster().master_of("frozen"));
    app.cluster().freeze(replica, true);
    let started = Instant::now();
    let response = app
        .post_json("/api/streams/frozen/messages", &json!({ "data": 1 }))
        .await;
    let took = started.elapsed();
    // A batch (a transaction) and an idempotent publish (a script) wait the same way.
    let batch = app
        .post_json(
            "/api/streams/frozen/messages/batch",
            &json!({ "messages": [2, 3] }),
        )
        .await;
    let idempotent = idempotent_publish(&app).await;
    app.cluster().freeze(replica, false);
    crate::helpers::problem(response, 503).await;
    crate::helpers::problem(batch, 503).await;
    crate::helpers::problem(idempotent, 503).await;
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "answered after {took:?} (redis.wait_timeout is 500 ms)"
    );
    // Replicated again, every kind of publish is acknowledged (the idempotent retry answers
    // with the id its first attempt stored).
    publish_once_replicated(&app, 5).await;
    let batch = app
        .post_json(
            "/api/streams/frozen/messages/batch",
            &json!({ "messages": [6, 7] }),
        )
        .await;
    assert_eq!(batch.status(), 201);
    let retried = idempotent_publish(&app).await;
    assert_eq!(retried.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pubsub_bridge_stores_each_message_once_on_a_cluster() {
    const BRIDGE: &str = "[pubsub]\npatterns = [\"*\"]\n";
    let Some(first) = TestApp::on_cluster(BRIDGE).await else {
        return;
    };
    let second = TestApp::spawn(Backend::ClusterAt(first.cluster().urls()), BRIDGE).await;
    let mut client = first.subscribe("/sse/connect?channel_id=warmup", &[]).await;
    // PUBLISH on one node reaches subscribers on every node.
    let node = first.cluster().masters()[0];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _: Option<i64> = first.cluster().node_cmd(node, &["PUBLISH", "warmup", "0"]);
        if client
            .next_event(Duration::from_millis(200))
            .await
            .is_some()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bridge never stored a message"
        );
    }
    // Channels whose streams live on different masters, interleaved.
    let channels = ["orders", "invoices", "alerts", "users"];
    for n in 0..40 {
        let channel = channels[n % channels.len()];
        let _: Option<i64> = first
            .cluster()
            .node_cmd(node, &["PUBLISH", channel, &n.to_string()]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (index, channel) in channels.iter().enumerate() {
        let page = json(
            first
                .get(&format!("/api/streams/sse:stream:{channel}/messages"))
                .await,
        )
        .await;
        let stored: Vec<Value> = page["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("sse:stream:{channel}: {page}"))
            .iter()
            .map(|message| message["body"].clone())
            .collect();
        let expected: Vec<Value> = (0..40)
            .filter(|n| n % channels.len() == index)
            .map(|n| json!(n))
            .collect();
        assert_eq!(stored, expected, "{channel}: each message once, in order");
    }
    let holding = first
        .cluster()
        .masters()
        .into_iter()
        .filter(|master| {
            first
                .cluster()
                .node_cmd::<Vec<String>>(*master, &["KEYS", "sse:stream:*"])
                .is_some_and(|keys| !keys.is_empty())
        })
        .count();
    assert!(
        holding >= 2,
        "the streams are spread over {holding} master(s)"
    );
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_works_on_one_redis_server_with_a_replica() {
    let Some(master) = crate::helpers::RedisServer::start() else {
        return;
    };
    let port = master.port.to_string();
    let Some(mut replica) =
        crate::helpers::RedisServer::start_with(&["--replicaof".into(), "127.0.0.1".into(), port])
    else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !master
        .cmd::<String>(&["INFO", "replication"])
        .contains("state=online")
    {
        assert!(Instant::now() < deadline, "the replica did not sync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let app = TestApp::spawn(
        Backend::RedisAt(master.url()),
        "redis.wait_replicas = 1\nredis.wait_timeout = \"500ms\"\n",
    )
    .await;
    // A single publish (batched with WAIT) and a batch (a transaction, then WAIT); under load the
    // replica can take a moment to acknowledge its first write.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app
        .post_json("/api/streams/replicated/messages", &json!({ "data": 1 }))
        .await
        .status()
        != 201
    {
        assert!(Instant::now() < deadline, "the replica never acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let batch = app
        .post_json(
            "/api/streams/replicated/messages/batch",
            &json!({ "messages": [2, 3] }),
        )
        .await;
    assert_eq!(batch.status(), 201);
    let on_replica: i64 = replica.cmd(&["XLEN", "replicated"]);
    assert!(
        on_replica >= 3,
        "acknowledged means the replica has it: {on_replica}"
    );

    replica.stop();
    let started = Instant::now();
    let response = app
        .post_json("/api/streams/replicated/messages", &json!({ "data": 4 }))
        .await;
    crate::helpers::problem(response, 503).await;
    assert!(started.elapsed() >= Duration::from_millis(450));
}
