//! The embedded engine on disk, as a user runs it: the real binary on a data directory, killed
//! with SIGKILL and started again on the same directory. What was acknowledged must be there,
//! with its ids; what cannot be served whole must be refused at start with a clear message.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use streamgate::backend::embedded::{DiskOptions, EmbeddedBackend, FsyncPolicy};
use streamgate::backend::{AppendRequest, Backend, Retention};
use streamgate::model::{EntryId, NewEntry, StreamName, now_ms};

use crate::helpers::gateway::{Gateway, TOKEN, args, id_of, receive};
use crate::helpers::process;
use crate::helpers::sse::SseClient;

fn parse(id: &str) -> EntryId {
    id.parse().expect("entry id")
}

/// Publishers that keep publishing (singly and in batches) until the gateway goes away, and
/// remember what was acknowledged.
async fn publish_until_killed(gateway: Gateway, stream: &str) -> Vec<(String, Value)> {
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let (client, url) = (gateway.client.clone(), gateway.url.clone());
    let publishers: Vec<_> = (0..8)
        .map(|publisher| {
            let (client, url, acknowledged) = (client.clone(), url.clone(), acknowledged.clone());
            let stream = stream.to_owned();
            tokio::spawn(async move {
                for n in 0u64.. {
                    let batch = n % 5 == 4;
                    let bodies: Vec<Value> = (0..if batch { 10 } else { 1 })
                        .map(|k| json!({ "publisher": publisher, "n": n, "k": k }))
                        .collect();
                    let (path, body) = if batch {
                        ("messages/batch", json!({ "messages": bodies }))
                    } else {
                        ("messages", json!({ "data": bodies[0] }))
                    };
                    let sent = client
                        .post(format!("{url}/api/streams/{stream}/{path}"))
                        .bearer_auth(TOKEN)
                        .json(&body)
                        .send()
                        .await;
                    let Ok(response) = sent else { return };
                    if response.status() != 201 {
                        return;
                    }
                    let Ok(reply) = response.json::<Value>().await else {
                        return;
                    };
                    let ids: Vec<String> = match reply.get("ids") {
                        Some(ids) => ids
                            .as_array()
                            .expect("ids")
                            .iter()
                            .map(|id| id.as_str().expect("id").to_owned())
                            .collect(),
                        None => vec![reply["id"].as_str().expect("id").to_owned()],
                    };
                    acknowledged
                        .lock()
                        .unwrap()
                        .extend(ids.into_iter().zip(bodies));
                }
            })
        })
        .collect();
    // Kill while the publishers are busy, once a fair amount was acknowledged.
    for _ in 0..200 {
        if acknowledged.lock().unwrap().len() >= 600 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.kill().await;
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 600,
        "{} acknowledged",
        acknowledged.len()
    );
    acknowledged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_publishes_survive_sigkill_under_every_fsync_policy() {
    for policy in ["always", "everysec", "never"] {
        let cwd = tempfile::tempdir().expect("tempdir");
        let data_dir = cwd.path().join("data");
        let env = [("STREAMGATE_STORAGE__FSYNC", policy)];
        let gateway = Gateway::start(cwd.path(), &data_dir, &env).await;
        assert!(
            gateway
                .process
                .stdout()
                .contains(&format!("(fsync {policy})")),
            "the banner names the policy: {}",
            gateway.process.stdout()
        );
        let acknowledged = publish_until_killed(gateway, "durable").await;

        let gateway = Gateway::start(cwd.path(), &data_dir, &env).await;
        let history = gateway.history("durable").await;
        let stored: std::collections::HashMap<&str, &Value> = history
            .iter()
            .map(|(id, body)| (id.as_str(), body))
            .collect();
        for (id, body) in &acknowledged {
            assert_eq!(
                stored.get(id.as_str()).copied(),
                Some(body),
                "{policy}: acknowledged entry {id} is back with its body"
            );
        }
        let ids: Vec<EntryId> = history.iter().map(|(id, _)| parse(id)).collect();
        assert!(
            ids.windows(2).all(|pair| pair[0] < pair[1]),
            "{policy}: ids in order"
        );
        let newest = *ids.last().expect("entries");
        let after = parse(&gateway.publish("durable", json!("after the restart")).await);
        assert!(
            after > newest,
            "{policy}: ids continue after {newest}: {after}"
        );
        gateway.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_state_survives_sigkill_and_a_returning_consumer_gets_its_pending_first() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let data_dir = cwd.path().join("data");
    let gateway = Gateway::start(cwd.path(), &data_dir, &[]).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(gateway.publish("jobs", json!({ "n": n })).await);
        }
        ids
    };
    let mut consumer =
        SseClient::open(gateway.consume("stream=jobs&group=workers&consumer=c1&limit=3")).await;
    assert_eq!(consumer.status, 200);
    let delivered: Vec<String> = receive(&mut consumer, 3).await.iter().map(id_of).collect();
    assert_eq!(delivered, ids[..3]);
    gateway.finish("jobs", "workers", "c1", &ids[0]).await;
    // The finish freed a slot: the fourth entry comes.
    assert_eq!(id_of(&receive(&mut consumer, 1).await[0]), ids[3]);
    drop(consumer);
    tokio::time::sleep(Duration::from_millis(600)).await;
    gateway.kill().await;

    let gateway = Gateway::start(cwd.path(), &data_dir, &[]).await;
    let (status, pending) = gateway
        .get("/api/streams/jobs/groups/workers/pending")
        .await;
    assert_eq!(status, 200, "{pending}");
    let pending = pending["pending"].as_array().expect("pending").clone();
    let held: Vec<(&str, &str, u64)> = pending
        .iter()
        .map(|entry| {
            (
                entry["id"].as_str().unwrap(),
                entry["consumer"].as_str().unwrap(),
                entry["deliveries"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        held,
        [
            (ids[1].as_str(), "c1", 1),
            (ids[2].as_str(), "c1", 1),
            (ids[3].as_str(), "c1", 1)
        ],
        "pending entries keep owner and delivery count"
    );
    assert!(
        pending
            .iter()
            .all(|entry| entry["idle_ms"].as_u64().unwrap() >= 600),
        "idle times continue across the restart: {pending:?}"
    );
    let (_, groups) = gateway.get("/api/streams/jobs/groups").await;
    let group = &groups["groups"][0];
    assert_eq!(
        (
            group["name"].as_str(),
            group["last_delivered_id"].as_str(),
            group["pending"].as_u64(),
            group["lag"].as_u64()
        ),
        (Some("workers"), Some(ids[3].as_str()), Some(3), Some(1)),
        "{groups}"
    );

    // The consumer comes back: its own pending entries first, then the rest of the stream.
    let mut consumer =
        SseClient::open(gateway.consume("stream=jobs&group=workers&consumer=c1&limit=10")).await;
    let received: Vec<(String, u64)> = receive(&mut consumer, 4)
        .await
        .iter()
        .map(|message| (id_of(message), message["deliveries"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        received,
        [
            (ids[1].clone(), 2),
            (ids[2].clone(), 2),
            (ids[3].clone(), 2),
            (ids[4].clone(), 1)
        ]
    );
    drop(consumer);
    gateway.stop().await;
}

fn disk_options(data_dir: &Path) -> DiskOptions {
    DiskOptions {
        path: data_dir.to_owned(),
        fsync: FsyncPolicy::EverySec,
        cache_size: 8 << 20,
    }
}

fn single(data: &str, id: Option<EntryId>) -> AppendRequest {
    AppendRequest {
        entries: vec![NewEntry {
            id,
            ..NewEntry::new(Bytes::copy_from_slice(data.as_bytes()), None)
        }],
        retention: Retention::default(),
        idempotency: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_continue_after_a_restart_even_when_the_newest_entries_were_deleted() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let data_dir = cwd.path().join("data");
    let stream = StreamName::parse("ahead").unwrap();
    // An entry an hour ahead of the clock, then deleted: the clock alone would reuse its id.
    let ahead = EntryId::new(now_ms() + 3_600_000, 7);
    {
        let backend = EmbeddedBackend::open(&disk_options(&data_dir), CancellationToken::new())
            .expect("open");
        backend.append(&stream, single("1", None)).await.unwrap();
        backend
            .append(&stream, single("2", Some(ahead)))
            .await
            .unwrap();
        assert_eq!(backend.delete_entries(&stream, &[ahead]).await.unwrap(), 1);
    }
    // Reopened in this process: the directory was released when the engine was dropped.
    {
        let backend = EmbeddedBackend::open(&disk_options(&data_dir), CancellationToken::new())
            .expect("reopen");
        let info = backend.stream_info(&stream).await.unwrap();
        assert_eq!((info.length, info.entries_added), (1, 2));
        assert_eq!(
            (info.last_generated_id, info.max_deleted_id),
            (ahead, ahead)
        );
    }
    let gateway = Gateway::start(cwd.path(), &data_dir, &[]).await;
    let next = parse(&gateway.publish("ahead", json!(3)).await);
    assert!(next > ahead, "{next} follows the deleted {ahead}");
    gateway.kill().await;
    let gateway = Gateway::start(cwd.path(), &data_dir, &[]).await;
    let again = parse(&gateway.publish("ahead", json!(4)).await);
    assert!(again > next, "{again} follows {next}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_and_retention_keep_working_after_a_restart() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let data_dir = cwd.path().join("data");
    let config = cwd.path().join("streamgate.toml");
    std::fs::write(
        &config,
        "[[retention]]\npattern = \"capped.*\"\nmax_len = 5\n\n[[retention]]\npattern = \"brief.*\"\nidle_ttl = \"3s\"\n",
    )
    .unwrap();
    let env = [("STREAMGATE_CONFIG", config.to_str().unwrap())];
    let publish_once = |gateway: &Gateway| {
        gateway
            .post("/api/streams/orders/messages")
            .header("idempotency-key", "order-42")
            .json(&json!({ "data": { "order": 42 } }))
            .send()
    };
    let gateway = Gateway::start(cwd.path(), &data_dir, &env).await;
    let first: Value = publish_once(&gateway).await.unwrap().json().await.unwrap();
    for n in 0..8 {
        gateway.publish("capped.a", json!(n)).await;
    }
    gateway.publish("brief.a", json!("soon gone")).await;
    gateway.kill().await;

    let gateway = Gateway::start(cwd.path(), &data_dir, &env).await;
    let retry = publish_once(&gateway).await.unwrap();
    assert_eq!(retry.status(), 201);
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry["id"], first["id"], "the retry gets the first answer");
    assert_eq!(
        gateway.history("orders").await.len(),
        1,
        "and writes nothing"
    );
    for n in 8..12 {
        gateway.publish("capped.a", json!(n)).await;
    }
    let capped = gateway.history("capped.a").await;
    let kept: Vec<&Value> = capped.iter().map(|(_, body)| body).collect();
    assert_eq!(
        kept,
        [&json!(7), &json!(8), &json!(9), &json!(10), &json!(11)]
    );
    // The idle time to live set before the restart still runs out.
    assert_eq!(gateway.get("/api/streams/brief.a").await.0, 200);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(gateway.get("/api/streams/brief.a").await.0, 404);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_directory_is_refused() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let data_dir = cwd.path().join("data");
    let gateway = Gateway::start(cwd.path(), &data_dir, &[]).await;
    gateway.publish("s", json!(1)).await;
    let args = args(&data_dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = process::run_in(cwd.path(), &args, &[]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is in use by another running streamgate"),
        "{stderr}"
    );
    // The first one is undisturbed.
    assert_eq!(gateway.history("s").await.len(), 1);
    gateway.stop().await;
}

/// Starts the binary on `data_dir` expecting it to refuse: exit code 1 and `message`.
fn assert_refused(cwd: &Path, data_dir: &Path, message: &str) {
    let args = args(data_dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = process::run_in(cwd, &args, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(message), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A data directory with a few entries in it, written by a process that stopped cleanly.
async fn written_directory(cwd: &Path) -> PathBuf {
    let data_dir = cwd.join("data");
    let gateway = Gateway::start(cwd, &data_dir, &[]).await;
    for n in 0..20 {
        gateway.publish("s", json!(n)).await;
    }
    gateway.stop().await;
    data_dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_foreign_and_newer_directories_are_refused_with_a_clear_message() {
    let cwd = tempfile::tempdir().expect("tempdir");

    let data_dir = written_directory(cwd.path()).await;
    std::fs::write(data_dir.join("db/version"), b"garbage").unwrap();
    assert_refused(cwd.path(), &data_dir, "is corrupt and was not opened");

    let second = cwd.path().join("second");
    std::fs::create_dir_all(&second).unwrap();
    let data_dir = written_directory(&second).await;
    let format = data_dir.join("FORMAT");
    let text = std::fs::read_to_string(&format).unwrap();
    std::fs::write(&format, text.replace("format 1", "format 2")).unwrap();
    assert_refused(cwd.path(), &data_dir, "was written by a newer streamgate");

    std::fs::write(&format, "not a format\n").unwrap();
    assert_refused(cwd.path(), &data_dir, "is corrupt and was not opened");

    let foreign = cwd.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    assert_refused(cwd.path(), &foreign, "is not a streamgate data directory");
    assert!(!foreign.join("db").exists(), "nothing was written into it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_off_and_every_earlier_entry_comes_back() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let data_dir = cwd.path().join("data");
    let env: [(&str, &str); 0] = [];
    let gateway = Gateway::start(cwd.path(), &data_dir, &env).await;
    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(gateway.publish("torn", json!({ "n": n })).await);
    }
    gateway.kill().await;
    // A crash in the middle of the last publish's write: its bytes, and whatever the journal got
    // after them, never reached the file.
    let journal = std::fs::read_dir(data_dir.join("db"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jnl"))
        .max_by_key(|path| std::fs::metadata(path).unwrap().len())
        .expect("a journal file");
    let bytes = std::fs::read(&journal).unwrap();
    let last = br#"{"n":49}"#;
    let at = bytes
        .windows(last.len())
        .rposition(|window| window == last)
        .expect("the last publish is in the journal");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap();
    file.set_len(at as u64 + 3).unwrap();
    drop(file);

    let gateway = Gateway::start(cwd.path(), &data_dir, &env).await;
    let history = gateway.history("torn").await;
    let stored: Vec<&str> = history.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(stored, ids[..49], "every entry before the torn one");
    assert!(
        gateway
            .process
            .stderr()
            .contains("the incomplete tail of the journal was discarded"),
        "the recovery is logged: {}",
        gateway.process.stderr()
    );
    // It keeps going from there.
    let next = parse(&gateway.publish("torn", json!("next")).await);
    assert!(next > parse(&ids[48]));
    gateway.kill().await;
    // A kill that tears nothing is not reported as a torn write, nor is a clean stop.
    let gateway = Gateway::start(cwd.path(), &data_dir, &env).await;
    assert_eq!(gateway.history("torn").await.len(), 50);
    let log = gateway.stop().await;
    assert!(!log.contains("incomplete tail"), "after a kill: {log}");
    let gateway = Gateway::start(cwd.path(), &data_dir, &env).await;
    let log = gateway.stop().await;
    assert!(
        !log.contains("incomplete tail"),
        "after a clean stop: {log}"
    );
}
