//! The backend conformance suite: behaviour tests written once against the `Backend` trait and
//! run unchanged on the embedded engine and on a real `redis-server`. Where Redis is approximate
//! (trimming with `~`) the tests assert only what both promise.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use streamgate::backend::redis::{RedisBackend, RedisOptions};

use streamgate::backend::{
    AppendRequest, Backend, BackendError, Direction, GroupCursor, GroupRead, GroupReport,
    GroupStart, IdempotencyKey, Lease, PendingEntry, PendingQuery, RangeQuery, Retention, Trim,
};
use streamgate::model::{ConsumerName, EntryId, GroupName, NewEntry, StreamName, now_ms};

use crate::helpers::{RedisCluster, RedisServer};

/// Runs each listed `async fn<B: Backend>(B)` as `<name>::in_memory`, `<name>::on_disk` (the
/// embedded engine in a temporary data directory), `<name>::redis` and `<name>::cluster` (a Redis
/// Cluster of three masters).
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        $(
            mod $test {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn in_memory() {
                    let backend = streamgate::backend::embedded::EmbeddedBackend::in_memory(Default::default());
                    super::$test(backend).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn on_disk() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let backend = crate::helpers::embedded_on_disk(dir.path());
                    super::$test(backend).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    let Some(server) = crate::helpers::RedisServer::start() else { return };
                    let backend = super::connect(&server).await;
                    super::$test(backend).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cluster() {
                    let Some(cluster) = tokio::task::spawn_blocking(|| crate::helpers::RedisCluster::start(0))
                        .await
                        .expect("start the cluster") else { return };
                    let backend = super::connect_cluster(&cluster).await;
                    super::$test(backend).await;
                }
            }
        )*
    };
}

conformance!(
    appends_are_ordered_and_ranges_follow_ids,
    explicit_ids_follow_the_redis_rules,
    trimming_by_length_and_by_minimum_id,
    retention_on_append_keeps_the_newest,
    idle_streams_expire,
    groups_start_at_the_beginning_the_end_or_an_id,
    new_entries_versus_own_pending_entries,
    at_most_once_reads_leave_nothing_pending,
    acknowledging_removes_from_the_pending_list,
    claiming_walks_more_than_a_hundred_idle_entries,
    entries_deleted_while_pending,
    lag_counts_what_the_group_has_not_seen,
    blocking_reads_wake_on_append_and_time_out,
    pending_lists_and_idle_times,
    consumers_are_listed_and_removed,
    dead_lettering_moves_and_acknowledges,
    idempotent_appends_write_once,
    listing_statistics_deletion_and_flush,
    imports_keep_ids_fields_and_counters,
    restored_pending_entries_keep_owner_count_and_idle_time,
    a_lease_is_held_by_one_connection_at_a_time,
    reports_limits_and_control_messages_reach_every_instance,
);

pub async fn connect(server: &RedisServer) -> RedisBackend {
    let options = RedisOptions {
        pool_size: 2,
        connect_retries: 0,
        response_timeout: Duration::from_secs(5),
        ..RedisOptions::new(server.url(), server.address())
    };
    RedisBackend::connect(&options, CancellationToken::new())
        .await
        .expect("connect to redis")
}

pub async fn connect_cluster(cluster: &RedisCluster) -> RedisBackend {
    let urls = cluster.urls();
    let options = RedisOptions {
        connect_retries: 0,
        response_timeout: Duration::from_secs(5),
        seeds: urls.clone(),
        ..RedisOptions::new(urls[0].clone(), urls[0].trim_start_matches("redis://"))
    };
    let backend = RedisBackend::connect(&options, CancellationToken::new())
        .await
        .expect("connect to the cluster");
    assert!(backend.is_cluster(), "the cluster was not detected");
    backend
}

fn stream(name: &str) -> StreamName {
    StreamName::parse(name).unwrap()
}

fn group(name: &str) -> GroupName {
    GroupName::parse(name).unwrap()
}

fn consumer(name: &str) -> ConsumerName {
    ConsumerName::parse(name).unwrap()
}

pub fn message(text: &str) -> NewEntry {
    NewEntry::new(Bytes::copy_from_slice(text.as_bytes()), None)
}

pub fn request(entries: Vec<NewEntry>) -> AppendRequest {
    AppendRequest {
        entries,
        retention: Retention::default(),
        idempotency: None,
    }
}

/// Appends `n` messages `"0"`, `"1"`, … one by one; returns their ids.
async fn fill<B: Backend>(backend: &B, name: &str, n: usize) -> Vec<EntryId> {
    let mut ids = Vec::with_capacity(n);
    for index in 0..n {
        let outcome = backend
            .append(&stream(name), request(vec![message(&index.to_string())]))
            .await
            .unwrap();
        ids.extend(outcome.ids);
    }
    ids
}

fn all(direction: Direction, count: usize) -> RangeQuery {
    RangeQuery {
        start: EntryId::MIN,
        end: EntryId::MAX,
        count,
        direction,
    }
}

fn new_entries(count: usize) -> GroupRead {
    GroupRead {
        cursor: GroupCursor::New,
        count,
        no_ack: false,
    }
}

fn own_pending(after: EntryId, count: usize) -> GroupRead {
    GroupRead {
        cursor: GroupCursor::PendingAfter(after),
        count,
        no_ack: false,
    }
}

async fn appends_are_ordered_and_ranges_follow_ids<B: Backend>(backend: B) {
    let s = stream("ordered");
    let mut ids = fill(&backend, "ordered", 50).await;
    let batch = (50..100).map(|n| message(&n.to_string())).collect();
    let outcome = backend.append(&s, request(batch)).await.unwrap();
    assert!(!outcome.replayed);
    ids.extend(outcome.ids);
    assert_eq!(ids.len(), 100);
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "ids increase");

    let forward = backend
        .range(&s, all(Direction::Forward, 1000))
        .await
        .unwrap();
    assert_eq!(forward.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert_eq!(forward[7].body_json(), Bytes::from_static(b"7"));
    let backward = backend
        .range(&s, all(Direction::Backward, 3))
        .await
        .unwrap();
    assert_eq!(
        backward.iter().map(|e| e.id).collect::<Vec<_>>(),
        [ids[99], ids[98], ids[97]]
    );
    let window = RangeQuery {
        start: ids[10],
        end: ids[19],
        count: 100,
        direction: Direction::Forward,
    };
    assert_eq!(
        backend.range(&s, window).await.unwrap().len(),
        10,
        "bounds are inclusive"
    );
    let reversed = RangeQuery {
        start: ids[19],
        end: ids[10],
        ..window
    };
    assert!(backend.range(&s, reversed).await.unwrap().is_empty());
    assert!(matches!(
        backend
            .range(&stream("missing"), all(Direction::Forward, 10))
            .await,
        Err(BackendError::StreamNotFound)
    ));
}

async fn explicit_ids_follow_the_redis_rules<B: Backend>(backend: B) {
    let s = stream("explicit");
    let at = |id: EntryId| {
        request(vec![NewEntry {
            id: Some(id),
            ..message("x")
        }])
    };
    assert!(matches!(
        backend.append(&s, at(EntryId::MIN)).await,
        Err(BackendError::InvalidId(_))
    ));
    let far = EntryId::new(now_ms() + 3_600_000, 5);

    assert_eq!(backend.append(&s, at(far)).await.unwrap().ids, [far]);
    for stale in [far, EntryId::new(far.ms, 4), EntryId::new(1, 0)] {
        assert!(
            matches!(
                backend.append(&s, at(stale)).await,
                Err(BackendError::InvalidId(_))
            ),
            "{stale}"
        );
    }
    // Generated ids never go backwards, even behind an id from the future.
    let next = backend
        .append(&s, request(vec![message("y")]))
        .await
        .unwrap()
        .ids[0];
    assert_eq!(next, EntryId::new(far.ms, 6));
    // Explicit ids are for single appends; a refused batch writes nothing.
    let batch = request(vec![
        message("a"),
        NewEntry {
            id: Some(EntryId::new(far.ms + 1, 0)),
            ..message("b")
        },
    ]);
    assert!(matches!(
        backend.append(&s, batch).await,
        Err(BackendError::InvalidId(_))
    ));
    assert_eq!(backend.stream_stats(&s).await.unwrap().length, 2);
}

async fn trimming_by_length_and_by_minimum_id<B: Backend>(backend: B) {
    let s = stream("trimmed");
    let ids = fill(&backend, "trimmed", 10).await;
    assert_eq!(backend.trim(&s, Trim::MaxLen(6)).await.unwrap(), 4);
    let kept = backend
        .range(&s, all(Direction::Forward, 100))
        .await
        .unwrap();
    assert_eq!(kept.iter().map(|e| e.id).collect::<Vec<_>>(), ids[4..]);
    assert_eq!(backend.trim(&s, Trim::MinId(ids[7])).await.unwrap(), 3);
    let kept = backend
        .range(&s, all(Direction::Forward, 100))
        .await
        .unwrap();
    assert_eq!(kept.iter().map(|e| e.id).collect::<Vec<_>>(), ids[7..]);
    assert_eq!(backend.trim(&s, Trim::MaxLen(0)).await.unwrap(), 3);
    // An emptied stream still exists, and its ids continue.
    let info = backend.stream_info(&s).await.unwrap();
    assert_eq!(
        (info.length, info.last_generated_id, info.entries_added),
        (0, ids[9], 10)
    );
    assert!(info.first_entry.is_none());
    let next = fill(&backend, "trimmed", 1).await[0];
    assert!(next > ids[9]);
}

async fn retention_on_append_keeps_the_newest<B: Backend>(backend: B) {
    let s = stream("retained");
    for chunk in 0..10 {
        let batch = (0..100)
            .map(|n| message(&(chunk * 100 + n).to_string()))
            .collect();
        let append = AppendRequest {
            retention: Retention {
                max_len: Some(10),
                ..Retention::default()
            },
            ..request(batch)
        };
        backend.append(&s, append).await.unwrap();
    }
    let length = backend.stream_stats(&s).await.unwrap().length;
    // Approximate, as Redis's `MAXLEN ~`: at least the limit, and far fewer than written.
    assert!((10..=200).contains(&length), "length {length}");
    let newest = backend
        .range(&s, all(Direction::Backward, 1))
        .await
        .unwrap();
    assert_eq!(newest[0].body_json(), Bytes::from_static(b"999"));
}

async fn idle_streams_expire<B: Backend>(backend: B) {
    let s = stream("ephemeral");
    let append = AppendRequest {
        retention: Retention {
            idle_ttl: Some(Duration::from_millis(300)),
            ..Retention::default()
        },
        ..request(vec![message("soon gone")])
    };
    backend.append(&s, append.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    backend.append(&s, append).await.unwrap(); // a write restarts the clock
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backend.stream_stats(&s).await.unwrap().length, 2);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(matches!(
        backend.stream_stats(&s).await,
        Err(BackendError::StreamNotFound)
    ));
    assert!(!backend.list_streams().await.unwrap().contains(&s));
}

async fn groups_start_at_the_beginning_the_end_or_an_id<B: Backend>(backend: B) {
    let s = stream("starts");
    let ids = fill(&backend, "starts", 3).await;
    let reader = consumer("c");
    assert!(
        backend
            .create_group(&s, &group("all"), GroupStart::After(EntryId::MIN))
            .await
            .unwrap()
    );
    assert!(
        !backend
            .create_group(&s, &group("all"), GroupStart::Latest)
            .await
            .unwrap(),
        "exists"
    );
    assert!(
        backend
            .create_group(&s, &group("new"), GroupStart::Latest)
            .await
            .unwrap()
    );
    assert!(
        backend
            .create_group(&s, &group("mid"), GroupStart::After(ids[1]))
            .await
            .unwrap()
    );

    let read = |name: &'static str| {
        let backend = backend.clone();
        let (s, reader) = (s.clone(), reader.clone());
        async move {
            let batch = backend
                .read_group(&s, &group(name), &reader, new_entries(10))
                .await
                .unwrap();
            batch
                .deliveries
                .iter()
                .map(|d| d.entry.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(read("all").await, ids);
    assert_eq!(read("new").await, []);
    assert_eq!(read("mid").await, [ids[2]]);
    let later = fill(&backend, "starts", 1).await[0];
    assert_eq!(read("new").await, [later]);
    assert_eq!(read("all").await, [later]);

    backend
        .set_group_position(&s, &group("all"), GroupStart::After(EntryId::MIN))
        .await
        .unwrap();
    assert_eq!(read("all").await.len(), 4, "repositioned to the beginning");
    assert!(matches!(
        backend
            .set_group_position(&s, &group("nope"), GroupStart::Latest)
            .await,
        Err(BackendError::GroupNotFound)
    ));

    // A group on a missing stream creates the stream.
    let fresh = stream("made-by-group");
    assert!(
        backend
            .create_group(&fresh, &group("g"), GroupStart::Latest)
            .await
            .unwrap()
    );
    assert_eq!(backend.stream_stats(&fresh).await.unwrap().length, 0);

    assert!(backend.destroy_group(&s, &group("mid")).await.unwrap());
    assert!(!backend.destroy_group(&s, &group("mid")).await.unwrap());
    assert!(
        !backend
            .destroy_group(&stream("missing"), &group("mid"))
            .await
            .unwrap()
    );
    for (on, name) in [(&s, "mid"), (&stream("missing"), "g")] {
        let outcome = backend
            .read_group(on, &group(name), &reader, new_entries(1))
            .await;
        assert!(
            matches!(outcome, Err(BackendError::GroupNotFound)),
            "{on}/{name}"
        );
    }
}

async fn new_entries_versus_own_pending_entries<B: Backend>(backend: B) {
    let (s, g) = (stream("pending"), group("g"));
    let ids = fill(&backend, "pending", 4).await;
    backend
        .create_group(&s, &g, GroupStart::After(EntryId::MIN))
        .await
        .unwrap();
    let (alice, bob) = (consumer("alice"), consumer("bob"));
    let first = backend
        .read_group(&s, &g, &alice, new_entries(2))
        .await
        .unwrap();
    assert_eq!(
        first
            .deliveries
            .iter()
            .map(|d| (d.entry.id, d.deliveries))
            .collect::<Vec<_>>(),
        [(ids[0], 1), (ids[1], 1)]
    );
    let second = backend
        .read_group(&s, &g, &bob, new_entries(1))
        .await
        .unwrap();
    assert_eq!(second.deliveries[0].entry.id, ids[2]);

    // Alice's own pending entries come back, counted again; Bob's do not.
    let again = backend
        .read_group(&s, &g, &alice, own_pending(EntryId::MIN, 10))
        .await
        .unwrap();
    assert_eq!(
        again
            .deliveries
            .iter()
            .map(|d| (d.entry.id, d.deliveries))
            .collect::<Vec<_>>(),
        [(ids[0], 2), (ids[1], 2)]
    );
    assert_eq!(
        again.deliveries[1].entry.body_json(),
        Bytes::from_static(b"1")
    );
    let after_first = backend
        .read_group(&s, &g, &alice, own_pending(ids[0], 10))
        .await
        .unwrap();
    assert_eq!(
        after_first
            .deliveries
            .iter()
            .map(|d| d.entry.id)
            .collect::<Vec<_>>(),
        [ids[1]]
    );
    let limited = backend
        .read_group(&s, &g, &alice, own_pending(EntryId::MIN, 1))
        .await
        .unwrap();
    assert_eq!(limited.deliveries.len(), 1);
    assert!(
        backend
            .read_group(&s, &g, &consumer("carol"), own_pending(EntryId::MIN, 10))
            .await
            .unwrap()
            .deliveries
            .is_empty()
    );

    // New entries continue after what the group has seen.
    let rest = backend
        .read_group(&s, &g, &alice, new_entries(10))
        .await
        .unwrap();
    assert_eq!(
        rest.deliveries
            .iter()
            .map(|d| d.entry.id)
            .collect::<Vec<_>>(),
        [ids[3]]
    );
    assert!(
        backend
            .read_group(&s, &g, &alice, new_entries(10))
            .await
            .unwrap()
            .deliveries
            .is_empty()
    );
    let stats = backend.stream_stats(&s).await.unwrap();
    assert_eq!(
        (stats.groups[0].pending, stats.groups[0].last_delivered_id),
        (4, ids[3])
    );
}

async fn at_most_once_reads_leave_nothing_pending<B: Backend>(backend: B) {
    let (s, g) = (stream("noack"), group("g"));
    fill(&backend, "noack", 3).await;
    backend
        .create_group(&s, &g, GroupStart::After(EntryId::MIN))
        .await
        .unwrap();
    let read = GroupRead {
        no_ack: true,
        ..new_entries(10)
    };
    let batch = backend
        .read_group(&s, &g, &consumer("c"), read)
        .await
        .unwrap();
    assert_eq!(batch.deliveries.len(), 3);
    let stats = backend.stream_stats(&s).await.unwrap();
    assert_eq!((stats.groups[0].pending, stats.groups[0].lag), (0, Some(0)));
    assert!(
        backend
            .read_group(&s, &g, &consumer("c"), read)
            .await
            .unwrap()
            .deliveries
            .is_empty()
    );
}

async fn acknowledging_removes_from_the_pending_list<B: Backend>(backend: B) {
    let (s, g, c) = (stream("acks"), group("g"), consumer("c"));
    let ids = fill(&backend, "acks", 3).await;
    backend
        .create_group(&s, &g, GroupStart::After(EntryId::MIN))
        .await
        .unwrap();
    backend
        .read_group(&s, &g, &c, new_entries(3))
        .await
        .unwrap();
    assert_eq!(backend.ack(&s, &g, &[ids[0]], false).await.unwrap(), 1);
    assert_eq!(
        backend.ack(&s, &g, &[ids[0]], false).await.unwrap(),
        0,
        "already acknowledged"
    );
    assert_eq!(
        backend
            .ack(&s, &g, &[EntryId::new(1, 1)], false)
            .await
            .unwrap(),
        0,
        "never pending"
    );
    assert_eq!(
        backend
            .ack(&s, &group("other"), &[ids[1]], false)
            .await
            .unwrap(),
        0,
        "no such group"
    );
    assert_eq!(
        backend
            .ack(&stream("missing"), &g, &[ids[1]], false)
            .await
            .unwrap(),
        0,
        "no such stream"
    );
    let pending = backend
        .pending(&s, &g, PendingQuery::all(10))
        .await
        .unwrap();
    assert_eq!(
        pending.iter().map(|p| p.id).collect::<Vec<_>>(),
        [ids[1], ids[2]]
    );
    // Acknowledged entries stay in the stream, unless deleted on acknowledgement; then only what
    // was pending is deleted (ids[0] was acknowledged before, so another group may need it).
    assert_eq!(backend.stream_stats(&s).await.unwrap().length, 3);
    assert_eq!(
        backend
            .ack(&s, &g, &[ids[0], ids[1], ids[2]], true)
            .await
            .unwrap(),
        2
    );
    let left = backend
        .range(&s, all(Direction::Forward, 10))
        .await
        .unwrap();
    assert_eq!(left.iter().map(|e| e.id).collect::<Vec<_>>(), [ids[0]]);
    assert!(
        backend
            .pending(&s, &g, PendingQuery::all(10))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn claiming_walks_more_than_a_hundred_idle_entries<B: Backend>(backend: B) {
    let (s, g) = (stream("claims"), group("g"));
    let batch = (0..150).map(|n| message(&n.to_string())).collect();
    let ids = backend.append(&s, request(batch)).await.unwrap().ids;
    backend
        .create_group(&s, &g, GroupStart::After(EntryId::MIN))
        .await
        .unwrap();
    let (dead, alive) = (consumer("dead"), consumer("alive"));
    assert_eq!(
        backend
            .read_group(&s, &g, &dead, new_entries(150))
            .await
            .unwrap()
            .deliveries
            .len(),
        150
    );

    // Not idle long enough: nothing moves, but the scan still completes.
    let page = backend
        .claim_idle(&s, &g, &alive, Duration::from_secs(60), EntryId::MIN, 200)
        .await
        .unwrap();
    assert!(page.claimed.is_empty());

    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut cursor = EntryId::MIN;
    let mut claimed = Vec::new();
    let mut steps = 0;
    loop {
        let page = backend
            .claim_idle(&s, &g, &alive, Duration::from_millis(100), cursor, 10)
            .await
            .unwrap();
        assert!(page.claimed.len() <= 10);
        assert!(
            page.claimed.iter().all(|delivery| delivery.deliveries == 2),
            "{page:?}"
        );
        claimed.extend(page.claimed.iter().map(|d| d.entry.id));
        steps += 1;
        match page.next_cursor {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!(claimed, ids, "every idle entry was claimed once, in order");
    assert!(steps >= 15, "the cursor was followed ({steps} steps)");
    let owners = backend
        .pending(
            &s,
            &g,
            PendingQuery {
                consumer: Some(dead.clone()),
                ..PendingQuery::all(1000)
            },
        )
        .await
        .unwrap();
    assert!(owners.is_empty());
    // Claimed entries are fresh again.
    let page = backend
        .claim_idle(
            &s,
            &g,
            &dead,
            Duration::from_millis(100),
            EntryId::MIN,
            1000,
        )
        .await
        .unwrap();
    assert!(page.claimed.is_empty());
}

async fn entries_deleted_while_pending<B: Backend>(backend: B) {
    let (s, g, c) = (stream("vanishing"), group("g"), consumer("c"));
    let ids = fill(&backend, "vanishing", 3).await;
    backend
        .create_group(&s, &g, GroupStart::After(EntryId::MIN))
        .await
        .unwrap();
    backend
        .read_group(&s, &g, &c, new_entries(3))
        .await
        .unwrap();
    assert_eq!(backend.delete_entries(&s, &[ids[1]]).await.unwrap(), 1);
    assert_eq!(backend.delete_entries(&s, &[ids[1]]).await.unwrap(), 0);

    // Re-reading reports the deleted entry; it stays pending until acknowledged or claimed.
    let again = backend
        .read_group(&s, &g, &c, own_pending(EntryId::MIN, 10))
        .await
        .unwrap();
    assert_eq!(
        again
            .deliveries
            .iter()
            .map(|d| d.entry.id)
            .collect::<Vec<_>>(),
        [ids[0], ids[2]]
    );
    assert_eq!(again.deleted, [ids[1]]);
    assert_eq!(
        backend
            .pending(&s, &g, PendingQuery::all(10))
            .await
            .unwrap()
            .len(),
        3
    );

    // Claiming drops it from the pending list and says so.
    let page = backend
        .claim_idle(&s, &g, &consumer("d"), Duration::ZERO, EntryId::MIN, 10)
        .await
        .unwrap();
    assert_eq!(page.deleted, [ids[1]]);
    assert_eq!(
        page.claimed.iter().map(|d| d.entry.id).collect::<Vec<_>>(),
        [ids[0], ids[2]]
    );
    let pending = backend
        .pending(&s, &g, PendingQuery::all(10))
        .await
        .unwrap();
    assert_eq!(
        pending.iter().map(|p| p.id).collect::<Vec<_>>(),
        [ids[0], ids[2]]
    );
}

async fn lag_counts_what_the_group_has_not_seen<B: Backend>(backend: B) {
    let (s, g) = (stream("lagging"), group("g"));
    fill(&backend, "lagging", 5).await;
    backend
        .create_group(&s, &g, GroupStart::After(EntryId::MIN))
        .await
        .unwrap();
    backend
        .create_group(&s, &group("tail"), GroupStart::Latest)
        .await
        .unwrap();
    let lag = |backend: B| async move {
        let stats = backend.stream_stats(&stream("lagging")).await.unwrap();
        stats
            .groups
            .iter()
            .map(|group| (group.name.to_string(), group.lag))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        lag(backend.clone()).await,
        [("g".into(), Some(5)), ("tail".into(), Some(0))]
    );
    backend
        .read_group(&s, &g, &consumer("c"), new_entries(2))
        .await
        .unwrap();
    fill(&backend, "lagging", 1).await;
    assert_eq!(
        lag(backend.clone()).await,
        [("g".into(), Some(4)), ("tail".into(), Some(1))]
    );
    let stats = backend.stream_stats(&s).await.unwrap();
    assert_eq!((stats.groups[0].pending, stats.groups[0].consumers), (2, 1));
}

async fn blocking_reads_wake_on_append_and_time_out<B: Backend>(backend: B) {
    let (s, other) = (stream("blocking"), stream("blocking-other"));
    let start = EntryId::MIN;
    // Without `block`, an empty read returns at once.
    let started = Instant::now();
    let nothing = backend
        .read_after(&[(s.clone(), start)], 10, None, std::future::pending())
        .await
        .unwrap();
    assert!(nothing.is_empty() && started.elapsed() < Duration::from_millis(500));

    // A blocked read on a stream that does not exist yet wakes on the first append.
    let waiter = {
        let backend = backend.clone();
        let cursors = vec![(s.clone(), start), (other.clone(), start)];
        tokio::spawn(async move {
            let started = Instant::now();
            let found = backend
                .read_after(
                    &cursors,
                    10,
                    Some(Duration::from_secs(5)),
                    std::future::pending(),
                )
                .await;
            (found, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let appended = fill(&backend, "blocking-other", 1).await[0];
    let (found, waited) = waiter.await.unwrap();
    let found = found.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].0.clone(), found[0].1[0].id),
        (other.clone(), appended)
    );
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_millis(1500),
        "woke after {waited:?}"
    );

    // Entries already there are returned without waiting.
    let cursors = [(other.clone(), start)];
    let found = backend
        .read_after(
            &cursors,
            10,
            Some(Duration::from_secs(5)),
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(found[0].1.len(), 1);

    // Nothing arrives: the read ends empty after `block`.
    let cursors = [(other.clone(), appended)];
    let started = Instant::now();
    let found = backend
        .read_after(
            &cursors,
            10,
            Some(Duration::from_millis(300)),
            std::future::pending(),
        )
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(found.is_empty());
    assert!(
        waited >= Duration::from_millis(280) && waited < Duration::from_millis(2000),
        "timed out after {waited:?}"
    );

    // An interrupt cuts the wait short, and the backend stays usable.
    let started = Instant::now();
    let interrupt = tokio::time::sleep(Duration::from_millis(100));
    let found = backend
        .read_after(&cursors, 10, Some(Duration::from_secs(10)), interrupt)
        .await
        .unwrap();
    assert!(
        found.is_empty() && started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let next = fill(&backend, "blocking-other", 1).await[0];
    let found = backend
        .read_after(
            &cursors,
            10,
            Some(Duration::from_secs(5)),
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(found[0].1[0].id, next);
}

async fn pending_lists_and_idle_times<B: Backend>(backend: B) {
    let (s, g) = (stream("idle"), group("g"));
    let ids = fill(&backend, "idle", 3).await;
    backend
        .create_group(&s, &g, GroupStart::After(EntryId::MIN))
        .await
        .unwrap();
    backend
        .read_group(&s, &g, &consumer("a"), new_entries(2))
        .await
        .unwrap();
    backend
        .read_group(&s, &g, &consumer("b"), new_entries(1))
        .await
        .unwrap();
    let of_b = PendingQuery {
        consumer: Some(consumer("b")),
        ..PendingQuery::all(10)
    };
    let listed = backend.pending(&s, &g, of_b).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|p| (p.id, p.consumer.to_string(), p.deliveries))
            .collect::<Vec<_>>(),
        [(ids[2], "b".into(), 1)]
    );
    let window = PendingQuery {
        start: ids[1],
        end: ids[2],
        ..PendingQuery::all(10)
    };
    assert_eq!(backend.pending(&s, &g, window).await.unwrap().len(), 2);
    let idle_only = PendingQuery {
        min_idle: Some(Duration::from_secs(60)),
        ..PendingQuery::all(10)
    };
    assert!(
        backend
            .pending(&s, &g, idle_only.clone())
            .await
            .unwrap()
            .is_empty()
    );

    // Making an entry look idle makes it claimable at once, without counting a delivery.
    assert!(
        backend
            .set_pending_idle(&s, &g, ids[0], Duration::from_secs(3600))
            .await
            .unwrap()
    );
    let idle = backend.pending(&s, &g, idle_only).await.unwrap();
    assert_eq!(
        idle.iter()
            .map(|p| (p.id, p.deliveries))
            .collect::<Vec<_>>(),
        [(ids[0], 1)]
    );
    assert!(idle[0].idle >= Duration::from_secs(3600));
    // And back to fresh.
    assert!(
        backend
            .set_pending_idle(&s, &g, ids[0], Duration::ZERO)
            .await
            .unwrap()
    );
    let page = backend
        .claim_idle(
            &s,
            &g,
            &consumer("c"),
            Duration::from_secs(1),
            EntryId::MIN,
            10,
        )
        .await
        .unwrap();
    assert!(page.claimed.is_empty());
    assert!(
        !backend
            .set_pending_idle(&s, &g, EntryId::new(1, 1), Duration::ZERO)
            .await
            .unwrap()
    );
    assert!(matches!(
        backend
            .pending(&s, &group("nope"), PendingQuery::all(1))
            .await,
        Err(BackendError::GroupNotFound)
    ));
}

async fn consumers_are_listed_and_removed<B: Backend>(backend: B) {
    let (s, g) = (stream("members"), group("g"));
    fill(&backend, "members", 4).await;
    backend
        .create_group(&s, &g, GroupStart::After(EntryId::MIN))
        .await
        .unwrap();
    backend
        .read_group(&s, &g, &consumer("a"), new_entries(2))
        .await
        .unwrap();
    backend
        .read_group(&s, &g, &consumer("b"), new_entries(1))
        .await
        .unwrap();
    let consumers = backend.consumers(&s, &g).await.unwrap();
    let summary: Vec<(String, u64)> = consumers
        .iter()
        .map(|c| (c.name.to_string(), c.pending))
        .collect();
    assert_eq!(summary, [("a".into(), 2), ("b".into(), 1)]);
    assert!(consumers.iter().all(|c| c.idle < Duration::from_secs(5)));

    // A consumer that owns entries, or has not been idle long enough, stays.
    let (idle, b) = (consumer("idle"), consumer("b"));
    backend
        .read_group(&s, &g, &idle, own_pending(EntryId::MIN, 1))
        .await
        .unwrap(); // owns nothing
    assert!(
        !backend
            .remove_idle_consumer(&s, &g, &b, Duration::ZERO)
            .await
            .unwrap()
    );
    assert!(
        !backend
            .remove_idle_consumer(&s, &g, &idle, Duration::from_secs(60))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(
        backend
            .remove_idle_consumer(&s, &g, &idle, Duration::from_millis(50))
            .await
            .unwrap()
    );
    assert!(
        !backend
            .remove_idle_consumer(&s, &g, &idle, Duration::ZERO)
            .await
            .unwrap()
    );
    assert!(
        !backend
            .remove_idle_consumer(&s, &g, &consumer("nobody"), Duration::ZERO)
            .await
            .unwrap()
    );
    let names: Vec<String> = backend
        .consumers(&s, &g)
        .await
        .unwrap()
        .iter()
        .map(|c| c.name.to_string())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        backend
            .pending(&s, &g, PendingQuery::all(10))
            .await
            .unwrap()
            .len(),
        3
    );
}

async fn dead_lettering_moves_and_acknowledges<B: Backend>(backend: B) {
    let (s, g) = (stream("jobs"), group("g"));
    let ids = fill(&backend, "jobs", 2).await;
    backend
        .create_group(&s, &g, GroupStart::After(EntryId::MIN))
        .await
        .unwrap();
    backend
        .read_group(&s, &g, &consumer("c"), new_entries(2))
        .await
        .unwrap();
    let fields = vec![
        (Bytes::from_static(b"data"), Bytes::from_static(b"0")),
        (
            Bytes::from_static(b"original_id"),
            Bytes::from(ids[0].to_string()),
        ),
    ];
    let dlq = backend.dead_letter_stream(&s);
    let dead_id = backend
        .dead_letter(&s, &g, ids[0], &dlq, fields.clone())
        .await
        .unwrap();
    let dead = backend
        .range(&dlq, all(Direction::Forward, 10))
        .await
        .unwrap();
    assert_eq!((dead.len(), dead[0].id), (1, dead_id));
    assert_eq!(dead[0].fields, fields);
    let pending = backend
        .pending(&s, &g, PendingQuery::all(10))
        .await
        .unwrap();
    assert_eq!(pending.iter().map(|p| p.id).collect::<Vec<_>>(), [ids[1]]);
}

async fn idempotent_appends_write_once<B: Backend>(backend: B) {
    let s = stream("idempotent");
    let key = IdempotencyKey {
        key: "k1".into(),
        ttl: Duration::from_secs(60),
    };
    let attempt = || AppendRequest {
        idempotency: Some(key.clone()),
        ..request(vec![message("a"), message("b")])
    };
    let backend = Arc::new(backend);
    let racers: Vec<_> = (0..20)
        .map(|_| {
            let (backend, s, request) = (backend.clone(), s.clone(), attempt());
            tokio::spawn(async move { backend.append(&s, request).await.unwrap() })
        })
        .collect();
    let mut outcomes = Vec::new();
    for racer in racers {
        outcomes.push(racer.await.unwrap());
    }
    assert!(
        outcomes
            .iter()
            .all(|outcome| outcome.ids == outcomes[0].ids && outcome.ids.len() == 2)
    );
    assert_eq!(
        outcomes.iter().filter(|outcome| !outcome.replayed).count(),
        1
    );
    assert_eq!(backend.stream_stats(&s).await.unwrap().length, 2);
    // The key is per stream.
    let elsewhere = backend
        .append(&stream("idempotent-2"), attempt())
        .await
        .unwrap();
    assert!(!elsewhere.replayed);
}

async fn listing_statistics_deletion_and_flush<B: Backend>(backend: B) {
    assert!(backend.list_streams().await.unwrap().is_empty());
    fill(&backend, "b-stream", 2).await;
    fill(&backend, "a-stream", 1).await;
    assert_eq!(
        backend.list_streams().await.unwrap(),
        [stream("a-stream"), stream("b-stream")]
    );
    let info = backend.stream_info(&stream("b-stream")).await.unwrap();
    assert_eq!((info.length, info.entries_added), (2, 2));
    assert_eq!(
        info.first_entry.unwrap().body_json(),
        Bytes::from_static(b"0")
    );
    assert_eq!(
        info.last_entry.unwrap().body_json(),
        Bytes::from_static(b"1")
    );
    assert!(matches!(
        backend.stream_info(&stream("none")).await,
        Err(BackendError::StreamNotFound)
    ));
    assert!(backend.delete_stream(&stream("a-stream")).await.unwrap());
    assert!(!backend.delete_stream(&stream("a-stream")).await.unwrap());
    assert_eq!(backend.list_streams().await.unwrap(), [stream("b-stream")]);
    backend.ping().await.unwrap();
    assert!(!backend.server_info().await.unwrap().is_empty());
    backend.flush().await.unwrap();
    assert!(backend.list_streams().await.unwrap().is_empty());
}

fn imported(ms: u64, seq: u64, fields: &[(&str, &str)]) -> streamgate::model::Entry {
    streamgate::model::Entry {
        id: EntryId::new(ms, seq),
        fields: fields
            .iter()
            .map(|(field, value)| {
                (
                    Bytes::copy_from_slice(field.as_bytes()),
                    Bytes::copy_from_slice(value.as_bytes()),
                )
            })
            .collect(),
    }
}

async fn imports_keep_ids_fields_and_counters<B: Backend>(backend: B) {
    let s = stream("imported");
    let entries = vec![
        imported(5, 0, &[("data", "1")]),
        imported(5, 1, &[("a", "x"), ("b", "")]),
        imported(9, 3, &[("data", "{\"k\":[1,2]}"), ("exp", "99")]),
    ];
    backend.import(&s, entries.clone()).await.unwrap();
    assert_eq!(
        backend
            .range(&s, all(Direction::Forward, 10))
            .await
            .unwrap(),
        entries
    );
    for refused in [
        vec![imported(9, 3, &[("data", "again")])],
        vec![
            imported(10, 0, &[("data", "1")]),
            imported(10, 0, &[("data", "2")]),
        ],
    ] {
        assert!(matches!(
            backend.import(&s, refused).await,
            Err(BackendError::InvalidId(_))
        ));
    }

    // The id generator and counters move as a copy's source had them.
    backend
        .set_last_id(&s, EntryId::new(20, 0), 10, EntryId::new(15, 0))
        .await
        .unwrap();
    let info = backend.stream_info(&s).await.unwrap();
    assert_eq!(
        (
            info.length,
            info.last_generated_id,
            info.entries_added,
            info.max_deleted_id
        ),
        (3, EntryId::new(20, 0), 10, EntryId::new(15, 0))
    );
    let behind = AppendRequest {
        entries: vec![NewEntry {
            id: Some(EntryId::new(19, 0)),
            ..message("late")
        }],
        ..request(Vec::new())
    };
    assert!(matches!(
        backend.append(&s, behind).await,
        Err(BackendError::InvalidId(_))
    ));
    assert!(matches!(
        backend
            .set_last_id(&s, EntryId::new(8, 0), 10, EntryId::MIN)
            .await,
        Err(BackendError::InvalidId(_))
    ));
    // On a missing stream it creates an empty one.
    let empty = stream("imported-empty");
    backend
        .set_last_id(&empty, EntryId::new(7, 7), 3, EntryId::MIN)
        .await
        .unwrap();
    let info = backend.stream_info(&empty).await.unwrap();
    assert_eq!(
        (info.length, info.last_generated_id, info.entries_added),
        (0, EntryId::new(7, 7), 3)
    );

    // Deleting by id moves the largest deleted id; trimming does not.
    let t = stream("deleted-ids");
    let ids = fill(&backend, "deleted-ids", 4).await;
    backend.delete_entries(&t, &[ids[2]]).await.unwrap();
    backend.delete_entries(&t, &[ids[1]]).await.unwrap();
    backend.trim(&t, Trim::MaxLen(1)).await.unwrap();
    assert_eq!(
        backend.stream_info(&t).await.unwrap().max_deleted_id,
        ids[2]
    );
}

async fn restored_pending_entries_keep_owner_count_and_idle_time<B: Backend>(backend: B) {
    let (s, g) = (stream("restored"), group("g"));
    let ids = fill(&backend, "restored", 3).await;
    backend
        .create_group(&s, &g, GroupStart::After(ids[1]))
        .await
        .unwrap();
    let entry = |id: EntryId, owner: &str, idle_s: u64, deliveries: u64| PendingEntry {
        id,
        consumer: consumer(owner),
        idle: Duration::from_secs(idle_s),
        deliveries,
    };
    let missing = EntryId::new(ids[2].ms + 1, 0);
    let restored = vec![
        entry(ids[0], "alice", 60, 4),
        entry(ids[1], "bob", 5, 1),
        entry(missing, "bob", 5, 1),
    ];
    for _ in 0..2 {
        // Twice: a re-run of a copy changes nothing.
        assert_eq!(backend.restore_pending(&s, &g, &restored).await.unwrap(), 2);
        let pending = backend
            .pending(&s, &g, PendingQuery::all(10))
            .await
            .unwrap();
        let seen: Vec<(EntryId, String, u64)> = pending
            .iter()
            .map(|p| (p.id, p.consumer.to_string(), p.deliveries))
            .collect();
        assert_eq!(
            seen,
            [(ids[0], "alice".into(), 4), (ids[1], "bob".into(), 1)]
        );
        assert!(pending[0].idle >= Duration::from_secs(60));
        assert!(pending[0].idle < Duration::from_secs(70));
    }
    let consumers = backend.consumers(&s, &g).await.unwrap();
    assert_eq!(
        consumers
            .iter()
            .map(|c| (c.name.to_string(), c.pending))
            .collect::<Vec<_>>(),
        [("alice".into(), 1), ("bob".into(), 1)]
    );
    // Restored entries are claimed like any other once idle.
    let page = backend
        .claim_idle(
            &s,
            &g,
            &consumer("carol"),
            Duration::from_secs(30),
            EntryId::MIN,
            10,
        )
        .await
        .unwrap();
    assert_eq!(
        page.claimed
            .iter()
            .map(|d| (d.entry.id, d.deliveries))
            .collect::<Vec<_>>(),
        [(ids[0], 5)]
    );
    assert!(matches!(
        backend.restore_pending(&s, &group("none"), &restored).await,
        Err(BackendError::GroupNotFound)
    ));
}

fn lease(consumer_name: &str, token: &str) -> Lease {
    Lease {
        stream: stream("leased"),
        group: group("g"),
        consumer: consumer(consumer_name),
        token: token.to_owned(),
    }
}

async fn a_lease_is_held_by_one_connection_at_a_time<B: Backend>(backend: B) {
    let ttl = Duration::from_millis(500);
    assert!(
        backend
            .acquire_lease(&lease("c", "a:1"), ttl)
            .await
            .unwrap()
    );
    assert!(
        !backend
            .acquire_lease(&lease("c", "b:1"), ttl)
            .await
            .unwrap(),
        "held by another instance"
    );
    assert!(
        backend
            .acquire_lease(&lease("d", "b:1"), ttl)
            .await
            .unwrap(),
        "another consumer name is another lease"
    );
    // A new connection of the same instance takes over (the instance knows the old one ended).
    assert!(
        backend
            .acquire_lease(&lease("c", "a:2"), ttl)
            .await
            .unwrap()
    );
    // The ended connection's late release and renewal change nothing.
    backend.release_lease(&lease("c", "a:1")).await.unwrap();
    assert_eq!(
        backend
            .renew_leases(&[lease("c", "a:1"), lease("c", "a:2")], ttl)
            .await
            .unwrap(),
        [false, true]
    );
    assert!(
        !backend
            .acquire_lease(&lease("c", "b:1"), ttl)
            .await
            .unwrap()
    );

    // Not renewed, it lapses: another instance may take it, and the first has lost it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        backend
            .acquire_lease(&lease("c", "b:2"), ttl)
            .await
            .unwrap()
    );
    assert_eq!(
        backend
            .renew_leases(&[lease("c", "a:2"), lease("c", "b:2")], ttl)
            .await
            .unwrap(),
        [false, true]
    );
    // Released, it is free at once.
    backend.release_lease(&lease("c", "b:2")).await.unwrap();
    assert!(
        backend
            .acquire_lease(&lease("c", "a:3"), ttl)
            .await
            .unwrap()
    );
    // Lapsed while nobody took it: its holder takes it back by renewing.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        backend
            .renew_leases(&[lease("c", "a:3")], ttl)
            .await
            .unwrap(),
        [true]
    );
    assert!(
        !backend
            .acquire_lease(&lease("c", "b:3"), ttl)
            .await
            .unwrap()
    );
}

fn report(instance: &str, consumers: u64) -> GroupReport {
    GroupReport {
        stream: stream("reported"),
        group: group("g"),
        instance: instance.to_owned(),
        consumers,
        delivered: 10 * consumers,
        finished: 7 * consumers,
    }
}

async fn reports_limits_and_control_messages_reach_every_instance<B: Backend>(backend: B) {
    backend
        .report_groups(&[report("a", 1)], Duration::from_millis(500))
        .await
        .unwrap();
    backend
        .report_groups(&[report("b", 2)], Duration::from_secs(60))
        .await
        .unwrap();
    backend
        .report_groups(&[report("a", 3)], Duration::from_millis(500))
        .await
        .unwrap();
    let mut reports = backend.group_reports().await.unwrap();
    reports.sort_by(|x, y| x.instance.cmp(&y.instance));
    assert_eq!(
        reports,
        [report("a", 3), report("b", 2)],
        "a report replaces the instance's last"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        backend.group_reports().await.unwrap(),
        [report("b", 2)],
        "an expired one is gone"
    );

    let groups = [
        (stream("limited"), group("g")),
        (stream("limited"), group("h")),
    ];
    backend
        .set_group_limit(&groups[0].0, &groups[0].1, 3)
        .await
        .unwrap();
    backend
        .set_group_limit(&groups[0].0, &groups[0].1, 5)
        .await
        .unwrap();
    assert_eq!(
        backend.group_limits(&groups).await.unwrap(),
        [Some(5), None]
    );

    // Control messages reach every listener, the sender's own included. Listening may take a
    // moment to start: send until one arrives.
    let (mut first, mut second) = (backend.control_messages(), backend.control_messages());
    let deadline = Instant::now() + Duration::from_secs(5);
    let received = loop {
        backend
            .publish_control(Bytes::from_static(b"hello"))
            .await
            .unwrap();
        if let Ok(Ok(message)) =
            tokio::time::timeout(Duration::from_millis(100), first.recv()).await
        {
            break message;
        }
        assert!(Instant::now() < deadline, "no control message arrived");
    };
    assert_eq!(received, Bytes::from_static(b"hello"));
    assert_eq!(second.recv().await.unwrap(), Bytes::from_static(b"hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_of_other_types_are_refused() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = connect(&server).await;
    let _: () = server.cmd(&["SET", "text", "1"]);
    let outcome = backend
        .append(&stream("text"), request(vec![message("x")]))
        .await;
    assert!(
        matches!(outcome, Err(BackendError::WrongType)),
        "{outcome:?}"
    );
    assert!(
        !backend.delete_stream(&stream("text")).await.unwrap(),
        "other types are not deleted"
    );
    assert!(backend.list_streams().await.unwrap().is_empty());
}

/// `total_reads_processed` from the server's `INFO stats`: how many socket reads it served.
fn reads_processed(server: &RedisServer) -> u64 {
    let info: String = server.cmd(&["INFO", "stats"]);
    info.lines()
        .find_map(|line| line.strip_prefix("total_reads_processed:"))
        .and_then(|value| value.trim().parse().ok())
        .expect("total_reads_processed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrent_commands_are_batched_and_keep_their_own_outcomes() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = connect(&server).await;
    let _: () = server.cmd(&["SET", "text", "1"]);
    backend.ping().await.unwrap();
    const N: usize = 200;
    let reads_before = reads_processed(&server);
    let appends: Vec<_> = (0..N)
        .map(|index| {
            let backend = backend.clone();
            // Every tenth goes to the key that is not a stream.
            let name = if index % 10 == 0 {
                "text".to_owned()
            } else {
                format!("s{}", index % 3)
            };
            tokio::spawn(async move {
                let outcome = backend
                    .append(&stream(&name), request(vec![message(&index.to_string())]))
                    .await;
                (name, outcome)
            })
        })
        .collect();
    let mut written = std::collections::HashMap::<String, usize>::new();
    for append in appends {
        let (name, outcome) = append.await.unwrap();
        if name == "text" {
            assert!(
                matches!(outcome, Err(BackendError::WrongType)),
                "{outcome:?}"
            );
        } else {
            assert_eq!(outcome.unwrap().ids.len(), 1);
            *written.entry(name).or_default() += 1;
        }
    }
    // The reads Redis served include the INFO command itself.
    let reads = reads_processed(&server) - reads_before;
    assert!(
        reads < N as u64 / 4,
        "{N} concurrent appends took {reads} reads: not batched"
    );
    for (name, count) in written {
        let length: usize = server.cmd(&["XLEN", &name]);
        assert_eq!(length, count, "{name}");
    }
}
