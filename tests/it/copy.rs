//! `streamgate copy` as a user graduating to Redis runs it: the real binary between a data
//! directory written by a real gateway and a real `redis-server`, and back into a new directory.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::RedisServer;
use crate::helpers::gateway::{Gateway, id_of, receive};
use crate::helpers::process;
use crate::helpers::sse::SseClient;

fn copy(cwd: &Path, from: &str, to: &str, extra: &[&str]) -> Output {
    let mut args = vec!["copy", "--from", from, "--to", to];
    args.extend_from_slice(extra);
    process::run_in(cwd, &args, &[])
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The table row of `stream` in copy's report, split into columns.
fn row(output: &Output, stream: &str) -> Vec<String> {
    stdout(output)
        .lines()
        .find(|line| line.split_whitespace().next() == Some(stream))
        .unwrap_or_else(|| panic!("no row for {stream}: {}", stdout(output)))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// What a user would compare: every stream's entries, and each group's position and pending
/// entries (owner and delivery count).
async fn snapshot(gateway: &Gateway) -> Value {
    let mut streams = serde_json::Map::new();
    for stream in ["orders", "audit"] {
        let (status, info) = gateway.get(&format!("/api/streams/{stream}")).await;
        if status == 404 {
            continue;
        }
        let mut groups = Vec::new();
        for group in info["groups"].as_array().expect("groups") {
            let name = group["name"].as_str().expect("name");
            let (_, pending) = gateway
                .get(&format!("/api/streams/{stream}/groups/{name}/pending"))
                .await;
            let pending: Vec<Value> = pending["pending"]
                .as_array()
                .expect("pending")
                .iter()
                .map(|entry| json!([entry["id"], entry["consumer"], entry["deliveries"]]))
                .collect();
            groups.push(json!({
                "name": name,
                "last_delivered_id": group["last_delivered_id"],
                "pending": pending,
            }));
        }
        let history = gateway.history(stream).await;
        streams.insert(
            stream.to_owned(),
            json!({
                "entries": history.iter().map(|(id, body)| json!([id, body])).collect::<Vec<_>>(),
                "last_generated_id": info["last_generated_id"],
                "entries_added": info["entries_added"],
                "groups": groups,
            }),
        );
    }
    Value::Object(streams)
}

/// A data directory a real gateway wrote: two streams, a group with pending entries held by two
/// consumers (one delivered twice), and the probe's own stream.
async fn written(cwd: &Path, data_dir: &Path) -> Value {
    let gateway = Gateway::start(
        cwd,
        data_dir,
        &[("STREAMGATE_CONSUMER__MAX_DELIVERIES", "2")],
    )
    .await;
    for n in 0..30 {
        gateway
            .publish("orders", json!({ "n": n, "text": "ünïcødé \"quoted\"" }))
            .await;
    }
    let batch = gateway
        .post("/api/streams/audit/messages/batch")
        .json(&json!({ "messages": [1, "two", {"three": 3.0}, null] }))
        .send()
        .await
        .expect("batch");
    assert_eq!(batch.status(), 201);
    let mut first =
        SseClient::open(gateway.consume("stream=orders&group=workers&consumer=alice&limit=3"))
            .await;
    let ids: Vec<String> = receive(&mut first, 3).await.iter().map(id_of).collect();
    gateway.finish("orders", "workers", "alice", &ids[0]).await;
    receive(&mut first, 1).await; // the fourth, in the slot the finish freed
    drop(first);
    let nacked = gateway
        .post(&format!(
            "/api/streams/orders/groups/workers/messages/{}/nack",
            ids[1]
        ))
        .send()
        .await
        .expect("nack");
    assert_eq!(nacked.status(), 200);
    // Bob finishes new entries until, at a claim, the nacked one comes (its second delivery).
    let mut second =
        SseClient::open(gateway.consume("stream=orders&group=workers&consumer=bob&limit=2")).await;
    let mut redelivered = false;
    for _ in 0..40 {
        let event = second
            .next_event(Duration::from_secs(10))
            .await
            .expect("delivery");
        let message = event.json();
        if message["deliveries"] == 2 {
            redelivered = true;
            break;
        }
        gateway
            .finish("orders", "workers", "bob", &id_of(&message))
            .await;
    }
    assert!(redelivered, "the nacked entry came back");
    drop(second);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let expected = snapshot(&gateway).await;
    let pending = expected["orders"]["groups"][0]["pending"]
        .as_array()
        .expect("pending entries");
    let holds = |test: &dyn Fn(&Value) -> bool| pending.iter().any(test);
    assert!(
        holds(&|entry| entry[2] == 2)
            && holds(&|entry| entry[1] == "alice")
            && holds(&|entry| entry[1] == "bob"),
        "the fixture holds what the test needs: {pending:?}"
    );
    gateway.stop().await;
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_round_trips_through_redis_into_a_new_data_directory() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cwd = tempfile::tempdir().expect("tempdir");
    let (first_dir, second_dir) = (cwd.path().join("first"), cwd.path().join("second"));
    let expected = written(cwd.path(), &first_dir).await;
    let first = first_dir.to_str().unwrap();

    let output = copy(cwd.path(), first, &redis.url(), &[]);
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    let pending = expected["orders"]["groups"][0]["pending"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        row(&output, "orders")[1..6],
        ["30", "0", "1", &pending.to_string(), "copied"]
    );
    assert_eq!(row(&output, "audit")[1..6], ["4", "0", "0", "0", "copied"]);
    assert!(
        !stdout(&output).contains("streamgate:"),
        "streamgate's own streams stay behind"
    );
    // In Redis itself, as any Redis client sees it.
    let length: u64 = redis.cmd(&["XLEN", "orders"]);
    assert_eq!(length, 30);
    let in_redis: Vec<redis::Value> =
        redis.cmd(&["XPENDING", "orders", "workers", "-", "+", "100"]);
    assert_eq!(in_redis.len(), pending);

    // Re-running copies nothing twice.
    let again = copy(cwd.path(), first, &redis.url(), &[]);
    assert!(again.status.success(), "{}", stdout(&again));
    assert_eq!(row(&again, "orders")[1..3], ["0", "30"]);
    let length: u64 = redis.cmd(&["XLEN", "orders"]);
    assert_eq!(length, 30);

    // And back, into a new data directory: the same streams, groups and pending entries.
    let output = copy(cwd.path(), &redis.url(), second_dir.to_str().unwrap(), &[]);
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    let gateway = Gateway::start(cwd.path(), &second_dir, &[]).await;
    assert_eq!(snapshot(&gateway).await, expected);
    // Ids continue after the copied ones.
    let last = expected["orders"]["last_generated_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let next = gateway.publish("orders", json!("after the move")).await;
    assert!(
        next.parse::<streamgate::model::EntryId>().unwrap() > last.parse().unwrap(),
        "{next} after {last}"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_continues_after_what_was_copied_and_other_streams_are_refused() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cwd = tempfile::tempdir().expect("tempdir");
    let data_dir = cwd.path().join("data");
    let gateway = Gateway::start(cwd.path(), &data_dir, &[]).await;
    for n in 0..5 {
        gateway.publish("orders", json!(n)).await;
        gateway.publish("audit", json!(n)).await;
    }
    let mut consumer =
        SseClient::open(gateway.consume("stream=orders&group=workers&consumer=c&limit=3")).await;
    let held: Vec<String> = receive(&mut consumer, 3).await.iter().map(id_of).collect();
    drop(consumer);
    gateway.stop().await;
    let source = data_dir.to_str().unwrap();
    let output = copy(cwd.path(), source, &redis.url(), &["--streams", "ord*"]);
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(
        !stdout(&output).contains("audit"),
        "only the matching streams"
    );
    assert_eq!(row(&output, "orders")[1..6], ["5", "0", "1", "3", "copied"]);

    // Since then, the source got more entries (as after an interrupted copy: only they are
    // copied), a pending entry was finished (so it is finished in the target too) and a new
    // stream appeared.
    let gateway = Gateway::start(cwd.path(), &data_dir, &[]).await;
    for n in 5..8 {
        gateway.publish("orders", json!(n)).await;
    }
    gateway.finish("orders", "workers", "c", &held[0]).await;
    gateway.publish("fresh", json!("new")).await;
    gateway.stop().await;
    // In the target: a stream of the same name with other content, and an empty stream with
    // groups of its own.
    let _: String = redis.cmd(&["XADD", "audit", "1-1", "data", "\"not from the source\""]);
    let _: String = redis.cmd(&["XGROUP", "CREATE", "fresh", "theirs", "$", "MKSTREAM"]);
    let output = copy(cwd.path(), source, &redis.url(), &[]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert_eq!(row(&output, "orders")[1..6], ["3", "5", "1", "2", "copied"]);
    for refused in ["audit", "fresh"] {
        assert!(
            row(&output, refused).join(" ").contains("refused"),
            "{}",
            stdout(&output)
        );
    }
    let audit: u64 = redis.cmd(&["XLEN", "audit"]);
    assert_eq!(audit, 1, "the refused stream is untouched");
    let orders: Vec<redis::Value> = redis.cmd(&["XRANGE", "orders", "-", "+"]);
    assert_eq!(orders.len(), 8);
    let pending: Vec<redis::Value> = redis.cmd(&["XPENDING", "orders", "workers", "-", "+", "10"]);
    assert_eq!(
        pending.len(),
        2,
        "finished in the source, finished in the target"
    );

    let output = copy(cwd.path(), source, &redis.url(), &["--overwrite"]);
    assert!(output.status.success(), "{}", stdout(&output));
    let audit: u64 = redis.cmd(&["XLEN", "audit"]);
    assert_eq!(audit, 5, "replaced with --overwrite");
    let groups: Vec<redis::Value> = redis.cmd(&["XINFO", "GROUPS", "fresh"]);
    assert!(
        groups.is_empty(),
        "replaced: the target's own group is gone"
    );
}

#[test]
fn copy_explains_what_it_cannot_do() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let missing = cwd.path().join("nowhere");
    let output = copy(
        cwd.path(),
        missing.to_str().unwrap(),
        "redis://127.0.0.1:1",
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("there is no data directory at"), "{stderr}");
    assert!(!missing.exists());

    // A directory that is not a data directory is not made one.
    let empty = cwd.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let output = copy(cwd.path(), "empty", "redis://127.0.0.1:1", &[]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not a streamgate data directory"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);

    for (from, to) in [("a", "a"), ("empty", "./empty")] {
        let output = copy(cwd.path(), from, to, &[]);
        assert_eq!(output.status.code(), Some(2), "{from} {to}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("name the same directory"), "{stderr}");
    }
    let output = copy(cwd.path(), "redis://", "b", &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--from"));
}
