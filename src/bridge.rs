//! The Redis Pub/Sub bridge (seed 002): messages published on channels matching
//! `pubsub.patterns` are appended to the stream `{pubsub.stream_prefix}{channel}`, so they reach
//! broadcast subscribers with replay.
//!
//! Exactly one instance writes: the holder of a lease in Redis (renewed while it lives), so N
//! instances never store a message N times. On one Redis server each batch is written by a Lua
//! script that first checks the lease, so even a writer that stalled past its lease cannot write
//! twice. On a cluster the lease and the streams live in different hash slots: the lease is
//! checked right before each batch, and each stream's part of the batch is one script in its
//! slot (a writer stalled past its lease between the two could store a batch twice). Messages
//! are written in batches (up to 100, or what arrived within 10 ms), in arrival order, so order
//! per channel is kept. After a disconnect (a Redis restart) the bridge reconnects with backoff,
//! takes the lease again and subscribes again.
//!
//! Pub/Sub keeps nothing: messages published while no instance holds the lease (a leader's
//! crash, up to one lease time) are not stored.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::RedisError;
use tokio_util::sync::CancellationToken;

use crate::backend::redis::RedisBackend;
use crate::backend::{BackendError, backoff_delay};
use crate::config::PubSubConfig;
use crate::metrics::Metrics;
use crate::model::StreamName;

/// The lease key; a string, so it never shows among streams.
const LEASE_KEY: &str = "streamgate:pubsub-bridge:lease";
/// How long a lease lasts without renewal, and how often the holder renews it.
const LEASE: Duration = Duration::from_secs(10);
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// A batch is written when it holds this many messages or its first message is this old.
const BATCH_MESSAGES: usize = 100;
const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Takes or renews the lease. KEYS: lease. ARGV: instance id, lease ms. Returns 1 when held.
const TAKE_LEASE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Appends a batch if this instance holds the lease. KEYS: lease, then the streams. ARGV:
/// instance id, max_len, idle ttl ms, then per message: the index of its stream in KEYS and its
/// payload. Returns how many were written (0 without the lease).
const WRITE_BATCH: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local written = 0
for i = 4, #ARGV, 2 do
  redis.call('XADD', KEYS[tonumber(ARGV[i])], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[i + 1])
  written = written + 1
end
for k = 2, #KEYS do redis.call('PEXPIRE', KEYS[k], ARGV[3]) end
return written
"#;

/// Appends messages to one stream (a cluster's batch, per stream). KEYS: stream. ARGV: max_len,
/// idle ttl ms, then the payloads. Returns how many were written.
const WRITE_STREAM: &str = r#"
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return #ARGV - 2
"#;

/// Why leading stopped: Redis failed (reconnect with backoff) or the subscription did.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Subscription(#[from] RedisError),
}

/// The scripts, compiled once.
struct Scripts {
    take_lease: redis::Script,
    write_batch: redis::Script,
    write_stream: redis::Script,
}

/// Starts the bridge on `backend`'s Redis; it runs until `shutdown`.
pub fn start(
    backend: &RedisBackend,
    settings: PubSubConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let backend = backend.clone();
    let instance = hex::encode(rand::random::<[u8; 12]>());
    tracing::info!(patterns = ?settings.patterns, prefix = %settings.stream_prefix, "Pub/Sub bridge enabled");
    let scripts = Scripts {
        take_lease: redis::Script::new(TAKE_LEASE),
        write_batch: redis::Script::new(WRITE_BATCH),
        write_stream: redis::Script::new(WRITE_STREAM),
    };
    tokio::spawn(async move {
        let mut failures = 0u32;
        let mut turn = 0usize;
        while !shutdown.is_cancelled() {
            // Subscribe on the nodes in turn (on a cluster any node hears every PUBLISH).
            let subscribers = backend.subscribers();
            let client = &subscribers[turn % subscribers.len().max(1)];
            turn += 1;
            let bridge = Bridge {
                backend: &backend,
                scripts: &scripts,
                instance: &instance,
                settings: &settings,
                metrics: &metrics,
            };
            match bridge.lead(client, &shutdown).await {
                Ok(()) => failures = 0,
                Err(error) => {
                    let delay = backoff_delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(%error, ?delay, "Pub/Sub bridge: connection lost, reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
            }
        }
    });
}

/// One instance's bridge: what leading needs.
struct Bridge<'a> {
    backend: &'a RedisBackend,
    scripts: &'a Scripts,
    instance: &'a str,
    settings: &'a PubSubConfig,
    metrics: &'a Metrics,
}

impl Bridge<'_> {
    /// Takes or renews the lease; true when this instance holds it.
    async fn take_lease(&self) -> Result<bool, BackendError> {
        let mut invocation = self.scripts.take_lease.key(LEASE_KEY);
        invocation.arg(self.instance).arg(LEASE.as_millis() as u64);
        let held: i64 = self.backend.run_script(&invocation).await?;
        Ok(held == 1)
    }

    /// Waits for the lease, then subscribes on `client` and writes until the lease is lost, the
    /// connection fails or shutdown. `Ok` when it stepped down; `Err` when Redis failed.
    async fn lead(
        &self,
        client: &redis::Client,
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        // Follower: try for the lease now and then.
        while !self.take_lease().await? {
            tokio::select! {
                _ = tokio::time::sleep(RENEW_EVERY) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
        tracing::info!("Pub/Sub bridge: this instance holds the lease and writes");

        let mut pubsub = client.get_async_pubsub().await?;
        for pattern in &self.settings.patterns {
            pubsub.psubscribe(pattern).await?;
        }
        let (mut sink, mut messages) = pubsub.split();
        let mut renew = tokio::time::interval(RENEW_EVERY);
        renew.tick().await;
        let mut batch: Vec<(StreamName, Vec<u8>)> = Vec::with_capacity(BATCH_MESSAGES);
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let flush_at = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.write(&mut batch).await?;
                    return Ok(());
                }
                _ = renew.tick() => {
                    // A dead subscription connection shows here too.
                    sink.ping::<String>().await?;
                    if !self.take_lease().await? {
                        tracing::warn!("Pub/Sub bridge: lease lost; another instance writes now");
                        return Ok(());
                    }
                }
                _ = flush_at => {
                    self.write(&mut batch).await?;
                    deadline = None;
                }
                message = messages.next() => {
                    let Some(message) = message else {
                        return Err(RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "subscription closed",
                        )).into());
                    };
                    let channel = message.get_channel_name();
                    match StreamName::parse(format!("{}{channel}", self.settings.stream_prefix)) {
                        Ok(stream) => batch.push((stream, message.get_payload_bytes().to_vec())),
                        Err(error) => tracing::warn!(%error, channel, "Pub/Sub bridge: channel name cannot be a stream; dropped"),
                    }
                    if batch.len() >= BATCH_MESSAGES {
                        self.write(&mut batch).await?;
                        deadline = None;
                    } else if deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + BATCH_WINDOW);
                    }
                }
            }
        }
    }

    /// Writes and empties the batch: on one server one script (the lease check and every append
    /// together); on a cluster the lease check, then one script per stream.
    async fn write(&self, batch: &mut Vec<(StreamName, Vec<u8>)>) -> Result<(), BackendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let written = match self.backend.is_cluster() {
            false => self.write_batch(batch).await?,
            true if self.take_lease().await? => self.write_streams(batch).await?,
            true => 0,
        };
        self.metrics
            .received(crate::metrics::source::PUBSUB, written);
        if written == 0 {
            tracing::warn!(
                messages = batch.len(),
                "Pub/Sub bridge: lease lost before writing a batch; not written"
            );
        }
        batch.clear();
        Ok(())
    }

    async fn write_batch(&self, batch: &[(StreamName, Vec<u8>)]) -> Result<u64, BackendError> {
        let mut streams: Vec<&StreamName> = Vec::new();
        let mut invocation = self.scripts.write_batch.key(LEASE_KEY);
        invocation
            .arg(self.instance)
            .arg(self.settings.max_len)
            .arg(self.settings.idle_ttl.as_millis() as u64);
        for (stream, payload) in batch {
            let index = match streams.iter().position(|known| *known == stream) {
                Some(index) => index,
                None => {
                    streams.push(stream);
                    invocation.key(stream.as_str());
                    streams.len() - 1
                }
            };
            // KEYS is 1-based in Lua and starts with the lease.
            invocation.arg(index + 2).arg(payload.as_slice());
        }
        let written: i64 = self.backend.run_script(&invocation).await?;
        Ok(written.max(0) as u64)
    }

    /// Each stream's messages, in order, by one script in its slot; the streams concurrently.
    async fn write_streams(&self, batch: &[(StreamName, Vec<u8>)]) -> Result<u64, BackendError> {
        let mut streams: Vec<(&StreamName, Vec<&[u8]>)> = Vec::new();
        for (stream, payload) in batch {
            match streams.iter_mut().find(|(known, _)| *known == stream) {
                Some((_, payloads)) => payloads.push(payload),
                None => streams.push((stream, vec![payload])),
            }
        }
        let writes = streams.into_iter().map(|(stream, payloads)| async move {
            let mut invocation = self.scripts.write_stream.key(stream.as_str());
            invocation
                .arg(self.settings.max_len)
                .arg(self.settings.idle_ttl.as_millis() as u64);
            for payload in payloads {
                invocation.arg(payload);
            }
            self.backend.run_script::<i64>(&invocation).await
        });
        let written = futures_util::future::try_join_all(writes).await?;
        Ok(written.into_iter().map(|n| n.max(0) as u64).sum())
    }
}
