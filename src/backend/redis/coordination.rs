//! Coordination of the instances sharing a Redis: consumer leases (one key each, in the stream's
//! hash slot, compare-and-set by connection token in Lua), the instances' group reports and the
//! group limits (one hash each), and the control channel (Pub/Sub, one subscription per
//! instance, resubscribed after a reconnect).
//!
//! Must not: add commands per message; open connections per consumer or per lease.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::{Client, Value};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::connections::slot_of;
use super::{RedisBackend, group_error};
use crate::backend::{BackendError, GroupReport, Lease, backoff_delay};
use crate::model::{GroupName, StreamName, now_ms};

/// The hash of every instance's group reports: field `stream \0 group \0 instance`, value
/// `consumers delivered finished expires_ms`.
const REPORTS_KEY: &str = "streamgate:group-reports";
/// The hash of group limits: field `stream \0 group`, value the limit.
const LIMITS_KEY: &str = "streamgate:group-limits";
/// The control channel. Classic `PUBLISH` reaches every subscriber, on a cluster too.
const CONTROL_CHANNEL: &str = "streamgate:control";
/// Most group limits remembered (as on the embedded engine).
const MAX_LIMITS: usize = 10_000;
/// How often an idle control subscription is pinged (a dead connection shows then).
const CONTROL_PING: Duration = Duration::from_secs(15);

/// Takes a lease that is free or held by the same instance. KEYS: lease. ARGV: token, instance
/// prefix, ttl ms. Returns 1 when taken.
const ACQUIRE_LEASE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] or string.sub(holder, 1, string.len(ARGV[2])) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
"#;

/// Renews leases. KEYS: the leases. ARGV: ttl ms, then one token per lease. Returns one 1 or 0
/// per lease (0: another connection holds it).
const RENEW_LEASES: &str = r#"
local held = {}
for i = 1, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    held[i] = 1
  elseif holder == false then
    redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ARGV[1])
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
"#;

/// Deletes a lease its token still holds. KEYS: lease. ARGV: token.
const RELEASE_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Sets a limit, forgetting the others when too many are remembered. KEYS: limits. ARGV: field,
/// limit, most fields.
const SET_LIMIT: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 0
"#;

/// The scripts, and the control channel once somebody listens.
pub(super) struct Coordination {
    acquire_lease: redis::Script,
    renew_leases: redis::Script,
    release_lease: redis::Script,
    set_limit: redis::Script,
    /// Nodes the control channel may subscribe on, tried in turn (one server: itself; a
    /// cluster: every node, since PUBLISH reaches them all).
    subscribers: Vec<Client>,
    shutdown: CancellationToken,
    control: OnceLock<broadcast::Sender<Bytes>>,
}

impl Coordination {
    pub(super) fn subscribers(&self) -> Vec<Client> {
        self.subscribers.clone()
    }

    pub(super) fn new(subscribers: Vec<Client>, shutdown: CancellationToken) -> Coordination {
        Coordination {
            acquire_lease: redis::Script::new(ACQUIRE_LEASE),
            renew_leases: redis::Script::new(RENEW_LEASES),
            release_lease: redis::Script::new(RELEASE_LEASE),
            set_limit: redis::Script::new(SET_LIMIT),
            subscribers,
            shutdown,
            control: OnceLock::new(),
        }
    }
}

/// The hash tag Redis Cluster hashes a key by: what lies between the first `{` and the next `}`
/// when that is not empty, else the whole key.
pub(super) fn slot_tag(key: &str) -> &str {
    let Some(open) = key.find('{') else {
        return key;
    };
    match key[open + 1..].find('}') {
        Some(length) if length > 0 => &key[open + 1..open + 1 + length],
        _ => key,
    }
}

/// A `{…}` hash tag that puts a key in `key`'s slot: `key`'s own tag when it can be written
/// between braces (it has no `}`), else a short tag found for that slot.
pub(super) fn hash_tag_for(key: &str) -> std::borrow::Cow<'_, str> {
    let tag = slot_tag(key);
    if !tag.contains('}') {
        return std::borrow::Cow::Borrowed(tag);
    }
    std::borrow::Cow::Owned(tag_of_slot(slot_of(key.as_bytes())).to_owned())
}

/// For each of the 16384 slots, a short alphanumeric string that hashes to it (found once).
pub(super) fn tag_of_slot(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut tags = vec![String::new(); 16384];
        let mut missing = tags.len();
        let mut candidate = vec![0usize];
        while missing > 0 {
            let text: String = candidate.iter().map(|&i| ALPHABET[i] as char).collect();
            let slot = usize::from(slot_of(text.as_bytes()));
            if tags[slot].is_empty() {
                tags[slot] = text;
                missing -= 1;
            }
            // The next string: count up in base 62, growing by a digit when all are used.
            let mut position = candidate.len();
            loop {
                if position == 0 {
                    candidate.insert(0, 0);
                    break;
                }
                position -= 1;
                candidate[position] += 1;
                if candidate[position] < ALPHABET.len() {
                    break;
                }
                candidate[position] = 0;
            }
        }
        tags
    });
    &tags[usize::from(slot)]
}

/// A key streamgate derives from `stream`, in the stream's hash slot (so it can take part in a
/// script or transaction with the stream on a cluster): `streamgate:{tag}:kind:` and a digest of
/// the stream and `parts` (any names fit, and none can be confused with another).
pub(super) fn derived_key(stream: &StreamName, kind: &str, parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(stream.as_str().as_bytes());
    for part in parts {
        hasher.update([0]);
        hasher.update(part.as_bytes());
    }
    format!(
        "streamgate:{{{}}}:{kind}:{}",
        hash_tag_for(stream.as_str()),
        hex::encode(&hasher.finalize()[..16])
    )
}

fn lease_key(lease: &Lease) -> String {
    derived_key(
        &lease.stream,
        "lease",
        &[lease.group.as_str(), lease.consumer.as_str()],
    )
}

fn field(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

fn ms(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

fn unexpected(what: &str) -> BackendError {
    BackendError::Internal(format!("an unreadable {what} in Redis"))
}

/// One report out of its hash field and value; `None` when it has expired.
fn report(name: &[u8], value: &[u8], now: u64) -> Result<Option<GroupReport>, BackendError> {
    let name = std::str::from_utf8(name).map_err(|_| unexpected("group report"))?;
    let value = std::str::from_utf8(value).map_err(|_| unexpected("group report"))?;
    let mut names = name.split('\0');
    let mut numbers = value.split(' ').map(str::parse::<u64>);
    let (Some(stream), Some(group), Some(instance), None) =
        (names.next(), names.next(), names.next(), names.next())
    else {
        return Err(unexpected("group report"));
    };
    let (Some(Ok(consumers)), Some(Ok(delivered)), Some(Ok(finished)), Some(Ok(expires_at))) = (
        numbers.next(),
        numbers.next(),
        numbers.next(),
        numbers.next(),
    ) else {
        return Err(unexpected("group report"));
    };
    Ok((expires_at > now).then(|| GroupReport {
        stream: StreamName::from_backend(stream.to_owned()),
        group: GroupName::from_backend(group.to_owned()),
        instance: instance.to_owned(),
        consumers,
        delivered,
        finished,
    }))
}

impl RedisBackend {
    fn coordination(&self) -> &Coordination {
        &self.inner.coordination
    }

    pub(super) async fn acquire_lease_now(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        let mut invocation = self.coordination().acquire_lease.key(lease_key(lease));
        invocation
            .arg(&lease.token)
            .arg(lease.instance_prefix())
            .arg(ms(ttl));
        let taken: i64 = self.script(&invocation).await?;
        Ok(taken == 1)
    }

    pub(super) async fn renew_leases_now(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> Result<Vec<bool>, BackendError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        // One script per hash slot (on one server: one for all).
        let keyed: Vec<(usize, String)> = leases
            .iter()
            .enumerate()
            .map(|(index, lease)| (index, lease_key(lease)))
            .collect();
        let groups = self
            .inner
            .connections
            .by_slot(keyed, |(_, key)| key.as_bytes());
        let mut held = vec![false; leases.len()];
        for group in groups {
            let mut invocation = self.coordination().renew_leases.prepare_invoke();
            invocation.arg(ms(ttl));
            for (index, key) in &group {
                invocation.key(key).arg(&leases[*index].token);
            }
            let replies: Vec<i64> = self.script(&invocation).await?;
            for ((index, _), reply) in group.iter().zip(replies) {
                held[*index] = reply == 1;
            }
        }
        Ok(held)
    }

    pub(super) async fn release_lease_now(&self, lease: &Lease) -> Result<(), BackendError> {
        let mut invocation = self.coordination().release_lease.key(lease_key(lease));
        invocation.arg(&lease.token);
        let _: Value = self.script(&invocation).await?;
        Ok(())
    }

    pub(super) async fn report_groups_now(
        &self,
        reports: &[GroupReport],
        ttl: Duration,
    ) -> Result<(), BackendError> {
        if reports.is_empty() {
            return Ok(());
        }
        let expires_at = now_ms() + ms(ttl);
        let mut command = redis::cmd("HSET");
        command.arg(REPORTS_KEY);
        for report in reports {
            command
                .arg(field(&[
                    report.stream.as_str(),
                    report.group.as_str(),
                    &report.instance,
                ]))
                .arg(format!(
                    "{} {} {} {expires_at}",
                    report.consumers, report.delivered, report.finished
                ));
        }
        let _: Value = self.query(command).await?;
        Ok(())
    }

    pub(super) async fn group_reports_now(&self) -> Result<Vec<GroupReport>, BackendError> {
        let mut command = redis::cmd("HGETALL");
        command.arg(REPORTS_KEY);
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = self.query(command).await?;
        let now = now_ms();
        let mut reports = Vec::with_capacity(pairs.len());
        let mut expired = Vec::new();
        for (name, value) in pairs {
            match report(&name, &value, now)? {
                Some(report) => reports.push(report),
                None => expired.push(name),
            }
        }
        if !expired.is_empty() {
            // Reports of instances that stopped reporting: removed by whoever reads them.
            let mut command = redis::cmd("HDEL");
            command.arg(REPORTS_KEY).arg(expired);
            let _: Value = self.query(command).await?;
        }
        Ok(reports)
    }

    pub(super) async fn set_group_limit_now(
        &self,
        stream: &StreamName,
        group: &GroupName,
        limit: u32,
    ) -> Result<(), BackendError> {
        let mut invocation = self.coordination().set_limit.key(LIMITS_KEY);
        invocation
            .arg(field(&[stream.as_str(), group.as_str()]))
            .arg(limit)
            .arg(MAX_LIMITS);
        let _: Value = self.script(&invocation).await?;
        Ok(())
    }

    pub(super) async fn group_limits_now(
        &self,
        groups: &[(StreamName, GroupName)],
    ) -> Result<Vec<Option<u32>>, BackendError> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let mut command = redis::cmd("HMGET");
        command.arg(LIMITS_KEY);
        for (stream, group) in groups {
            command.arg(field(&[stream.as_str(), group.as_str()]));
        }
        let limits: Vec<Option<u32>> = self.query(command).await.map_err(group_error)?;
        Ok(limits)
    }

    pub(super) async fn publish_control_now(&self, payload: Bytes) -> Result<(), BackendError> {
        let mut command = redis::cmd("PUBLISH");
        command.arg(CONTROL_CHANNEL).arg(payload.as_ref());
        let _: Value = self.query(command).await?;
        Ok(())
    }

    /// Subscribes to the control channel on first use (one connection for the instance).
    pub(super) fn control_messages_now(&self) -> broadcast::Receiver<Bytes> {
        let coordination = self.coordination();
        coordination
            .control
            .get_or_init(|| {
                let sender = broadcast::Sender::new(1024);
                tokio::spawn(listen(
                    coordination.subscribers.clone(),
                    sender.clone(),
                    coordination.shutdown.clone(),
                ));
                sender
            })
            .subscribe()
    }
}

/// Forwards the control channel's messages until shutdown, resubscribing after a lost connection
/// (messages published meanwhile are missed: the delivery layer has safety nets for each kind).
async fn listen(
    subscribers: Vec<Client>,
    sender: broadcast::Sender<Bytes>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    let mut turn = 0usize;
    while !shutdown.is_cancelled() {
        let client = &subscribers[turn % subscribers.len().max(1)];
        turn += 1;
        let listened = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CONTROL_CHANNEL).await?;
            let (mut sink, mut messages) = pubsub.split();
            failures = 0;
            let mut ping = tokio::time::interval(CONTROL_PING);
            ping.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = ping.tick() => {
                        let _: Value = sink.ping().await?;
                    }
                    message = messages.next() => {
                        let Some(message) = message else {
                            return Err(redis::RedisError::from(std::io::Error::new(
                                std::io::ErrorKind::ConnectionReset,
                                "the control subscription closed",
                            )));
                        };
                        let _ = sender.send(Bytes::copy_from_slice(message.get_payload_bytes()));
                    }
                }
            }
        };
        if let Err(error) = listened.await {
            let delay = backoff_delay(failures);
            failures = failures.saturating_add(1);
            tracing::warn!(%error, ?delay, "control channel: subscription lost, resubscribing");
            if !turn.is_multiple_of(subscribers.len().max(1)) {
                // Another node may answer at once.
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_share_the_stream_hash_slot() {
        assert_eq!(slot_tag("orders"), "orders");
        assert_eq!(slot_tag("a{b}c"), "b");
        assert_eq!(slot_tag("a{}c{d}"), "a{}c{d}");
        assert_eq!(slot_tag("{{b}"), "{b");
        assert_eq!(slot_tag("x{y"), "x{y");
        let stream = StreamName::parse("a{b}c").unwrap();
        let key = derived_key(&stream, "lease", &["g", "c"]);
        assert!(key.starts_with("streamgate:{b}:lease:"), "{key}");
        assert_eq!(slot_tag(&key), "b");
        assert_ne!(key, derived_key(&stream, "lease", &["g\0c", ""]));
        let plain = StreamName::parse("orders").unwrap();
        assert_eq!(slot_tag(&derived_key(&plain, "lease", &["g"])), "orders");
    }
}
