//! The Redis Pub/Sub bridge (seed 002): messages published on channels matching
//! `pubsub.patterns` are appended to the stream `{pubsub.stream_prefix}{channel}`, so they reach
//! broadcast subscribers with replay.
//!
//! Exactly one instance writes: the holder of a lease in Redis (renewed while it lives), so N
//! instances never store a message N times. Each batch is written by a Lua script that first
//! checks the lease, so even a writer that stalled past its lease cannot write twice. Messages
//! are written in batches (up to 100, or what arrived within 10 ms), in arrival order, so order
//! per channel is kept. After a disconnect (a Redis restart) the bridge reconnects with backoff,
//! takes the lease again and subscribes again.
//!
//! Pub/Sub keeps nothing: messages published while no instance holds the lease (a leader's
//! crash, up to one lease time) are not stored.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};
use tokio_util::sync::CancellationToken;

use crate::backend::backoff_delay;
use crate::backend::redis::RedisOptions;
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

/// Starts the bridge; it runs until `shutdown`.
pub fn start(
    redis: &RedisOptions,
    settings: PubSubConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), RedisError> {
    let client = redis.client()?;
    let instance = hex::encode(rand::random::<[u8; 12]>());
    tracing::info!(patterns = ?settings.patterns, prefix = %settings.stream_prefix, "Pub/Sub bridge enabled");
    tokio::spawn(async move {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            match lead(&client, &instance, &settings, &metrics, &shutdown).await {
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
    Ok(())
}

/// Waits for the lease, then subscribes and writes until the lease is lost, the connection
/// fails or shutdown. `Ok` when it stepped down; `Err` when Redis failed.
async fn lead(
    client: &Client,
    instance: &str,
    settings: &PubSubConfig,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(), RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    let mut commands = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let take_lease = redis::Script::new(TAKE_LEASE);
    let write_batch = redis::Script::new(WRITE_BATCH);
    let lease_ms = LEASE.as_millis() as u64;
    // Follower: try for the lease now and then.
    loop {
        let held: i64 = take_lease
            .key(LEASE_KEY)
            .arg(instance)
            .arg(lease_ms)
            .invoke_async(&mut commands)
            .await?;
        if held == 1 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(RENEW_EVERY) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    tracing::info!("Pub/Sub bridge: this instance holds the lease and writes");

    let mut pubsub = client.get_async_pubsub().await?;
    for pattern in &settings.patterns {
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
                write(metrics, &mut commands, &write_batch, instance, settings, &mut batch).await?;
                return Ok(());
            }
            _ = renew.tick() => {
                // A dead subscription connection shows here too.
                sink.ping::<String>().await?;
                let held: i64 = take_lease.key(LEASE_KEY).arg(instance).arg(lease_ms).invoke_async(&mut commands).await?;
                if held == 0 {
                    tracing::warn!("Pub/Sub bridge: lease lost; another instance writes now");
                    return Ok(());
                }
            }
            _ = flush_at => {
                write(metrics, &mut commands, &write_batch, instance, settings, &mut batch).await?;
                deadline = None;
            }
            message = messages.next() => {
                let Some(message) = message else {
                    return Err(RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "subscription closed")));
                };
                let channel = message.get_channel_name();
                match StreamName::parse(format!("{}{channel}", settings.stream_prefix)) {
                    Ok(stream) => batch.push((stream, message.get_payload_bytes().to_vec())),
                    Err(error) => tracing::warn!(%error, channel, "Pub/Sub bridge: channel name cannot be a stream; dropped"),
                }
                if batch.len() >= BATCH_MESSAGES {
                    write(metrics, &mut commands, &write_batch, instance, settings, &mut batch).await?;
                    deadline = None;
                } else if deadline.is_none() {
                    deadline = Some(tokio::time::Instant::now() + BATCH_WINDOW);
                }
            }
        }
    }
}

/// Writes and empties the batch (one script: the lease check and every append together).
async fn write(
    metrics: &Metrics,
    commands: &mut MultiplexedConnection,
    script: &redis::Script,
    instance: &str,
    settings: &PubSubConfig,
    batch: &mut Vec<(StreamName, Vec<u8>)>,
) -> Result<(), RedisError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut streams: Vec<&StreamName> = Vec::new();
    let mut invocation = script.key(LEASE_KEY);
    invocation
        .arg(instance)
        .arg(settings.max_len)
        .arg(settings.idle_ttl.as_millis() as u64);
    for (stream, payload) in batch.iter() {
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
    let written: i64 = invocation.invoke_async(commands).await?;
    metrics.received(crate::metrics::source::PUBSUB, written.max(0) as u64);
    if written == 0 {
        tracing::warn!(
            messages = batch.len(),
            "Pub/Sub bridge: lease lost before writing a batch; not written"
        );
    }
    batch.clear();
    Ok(())
}
