//! Micro-benchmark of the storage layer (not a test): appends and group reads per second through
//! the `Backend` trait, on the embedded engine in memory and on disk (a temporary data directory,
//! `storage.fsync = everysec`) and on a private `redis-server`, side by side in one run. Run with
//! `cargo bench --bench backend`. Bounded: fixed operation counts.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use streamgate::backend::embedded::{DiskOptions, EmbeddedBackend, FsyncPolicy};
use streamgate::backend::redis::{RedisBackend, RedisOptions};
use streamgate::backend::{
    AnyBackend, AppendRequest, Backend, GroupCursor, GroupRead, GroupStart, Retention,
};
use streamgate::model::{ConsumerName, EntryId, GroupName, NewEntry, StreamName};

const PAYLOAD: &[u8] =
    br#"{"order":42,"customer":"c-1001","items":[{"sku":"A1","qty":2}],"total":12.5}"#;

fn request(n: usize) -> AppendRequest {
    AppendRequest {
        entries: (0..n)
            .map(|_| NewEntry::new(Bytes::from_static(PAYLOAD), None))
            .collect(),
        retention: Retention::default(),
        idempotency: None,
    }
}

/// `count` single appends from `tasks` concurrent tasks; appends per second.
async fn appends(backend: &AnyBackend, stream: &str, count: usize, tasks: usize) -> f64 {
    let stream = StreamName::parse(stream).unwrap();
    let started = Instant::now();
    let workers: Vec<_> = (0..tasks)
        .map(|_| {
            let (backend, stream) = (backend.clone(), stream.clone());
            tokio::spawn(async move {
                for _ in 0..count / tasks {
                    backend.append(&stream, request(1)).await.unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// `count` entries appended in batches of `batch`; entries per second.
async fn batch_appends(backend: &AnyBackend, stream: &str, count: usize, batch: usize) -> f64 {
    let stream = StreamName::parse(stream).unwrap();
    let started = Instant::now();
    for _ in 0..count / batch {
        backend.append(&stream, request(batch)).await.unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// Reads a stream of `count` entries through a group, `per_read` at a time, acknowledging each
/// batch; entries per second.
async fn group_reads(backend: &AnyBackend, stream: &str, count: usize, per_read: usize) -> f64 {
    let stream = StreamName::parse(stream).unwrap();
    let (group, consumer) = (
        GroupName::parse("bench").unwrap(),
        ConsumerName::parse("c").unwrap(),
    );
    backend
        .create_group(&stream, &group, GroupStart::After(EntryId::MIN))
        .await
        .unwrap();
    let read = GroupRead {
        cursor: GroupCursor::New,
        count: per_read,
        no_ack: false,
    };
    let started = Instant::now();
    let mut seen = 0;
    while seen < count {
        let batch = backend
            .read_group(&stream, &group, &consumer, read)
            .await
            .unwrap();
        let ids: Vec<EntryId> = batch
            .deliveries
            .iter()
            .map(|delivery| delivery.entry.id)
            .collect();
        assert!(!ids.is_empty(), "the stream ran dry at {seen}");
        backend.ack(&stream, &group, &ids, false).await.unwrap();
        seen += ids.len();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// A private redis-server on a free port, killed on drop.
struct RedisServer(std::process::Child, u16);

impl RedisServer {
    fn start() -> Option<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        std::thread::sleep(Duration::from_millis(300));
        Some(RedisServer(child, port))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let memory = AnyBackend::Embedded(EmbeddedBackend::in_memory(CancellationToken::new()));
        let data_dir = tempfile::tempdir().unwrap();
        let options = DiskOptions {
            path: data_dir.path().join("data"),
            fsync: FsyncPolicy::EverySec,
            cache_size: 64 << 20,
        };
        let disk = AnyBackend::Embedded(
            EmbeddedBackend::open(&options, CancellationToken::new()).unwrap(),
        );
        let server = RedisServer::start();
        let redis = match &server {
            Some(server) => {
                let options = RedisOptions {
                    connect_retries: 5,
                    ..RedisOptions::new(
                        format!("redis://127.0.0.1:{}", server.1),
                        format!("127.0.0.1:{}", server.1),
                    )
                };
                let backend = RedisBackend::connect(&options, CancellationToken::new())
                    .await
                    .unwrap();
                Some(AnyBackend::Redis(backend))
            }
            None => {
                eprintln!("redis-server not found: measuring the embedded engine only");
                None
            }
        };

        println!(
            "{:<46} {:>12} {:>12} {:>12} {:>11}",
            "operation", "memory /s", "disk /s", "redis /s", "disk/redis"
        );
        let scenarios: [(&str, usize); 5] = [
            ("append, 1 task, one entry per call", 20_000),
            ("append, 50 tasks, one entry per call", 100_000),
            ("append, batches of 100", 200_000),
            ("group read 1 + ack, 1 consumer", 20_000),
            ("group read 100 + ack, 1 consumer", 200_000),
        ];
        for (index, (name, count)) in scenarios.iter().enumerate() {
            let mut figures = Vec::new();
            for backend in [&memory, &disk].into_iter().chain(redis.as_ref()) {
                let stream = format!("bench-{index}");
                let figure = match index {
                    0 => appends(backend, &stream, *count, 1).await,
                    1 => appends(backend, &stream, *count, 50).await,
                    2 => batch_appends(backend, &stream, *count, 100).await,
                    3 | 4 => {
                        batch_appends(backend, &stream, *count, 100).await;
                        group_reads(backend, &stream, *count, if index == 3 { 1 } else { 100 })
                            .await
                    }
                    _ => unreachable!(),
                };
                figures.push(figure);
            }
            let redis_figure = figures.get(2).copied();
            println!(
                "{:<46} {:>12.0} {:>12.0} {:>12} {:>11}",
                name,
                figures[0],
                figures[1],
                redis_figure.map_or("-".into(), |figure| format!("{figure:.0}")),
                redis_figure.map_or("-".into(), |figure| format!("{:.2}x", figures[1] / figure)),
            );
        }
    });
}
