//! The synthetic probe (seed 003's scheduled test event). Every `probe.interval` (every second
//! while it fails) it appends a message to this instance's service stream and waits, at most
//! `probe.timeout`, for it to come back through the delivery core twice: to a broadcast
//! subscription (the hub's reader) and to a group consumer (the stream watcher and a group
//! dispatcher). Readiness reports the last result, so an instance whose backend answers PING but
//! whose delivery loops are wedged says it is not ready.
//!
//! The stream, `streamgate:probe:{instance}`, is per instance so that instances sharing a Redis
//! never take each other's probes; it keeps a few entries and expires a while after its instance
//! stops writing to it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backend::{AnyBackend, AppendRequest, Backend, GroupStart, Retention};
use crate::config::ProbeConfig;
use crate::delivery::Delivery;
use crate::delivery::groups::{self, ConsumerSpec, Groups, Mode};
use crate::delivery::hub::{self, Hub, HubEvent, Start};
use crate::metrics::Metrics;
use crate::model::{EntryId, GroupName, NewEntry, StreamName, now_ms};

/// How soon a failed probe is repeated, so readiness recovers quickly.
const RETRY: Duration = Duration::from_secs(1);
/// Entries the probe stream keeps.
const KEEP: u64 = 16;
/// Shortest time the stream of a stopped instance is kept.
const MIN_EXPIRY: Duration = Duration::from_secs(60);
/// Manual probes (`POST /trigger-test-event`) allowed per this period.
const TRIGGER_PERIOD: Duration = Duration::from_secs(1);

/// The result of one probe.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Outcome {
    pub ok: bool,
    /// When it finished (Unix milliseconds).
    pub at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round_trip_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    finished: Instant,
}

/// Why a manual probe was not run.
#[derive(Debug)]
pub struct TooSoon {
    pub retry_after: Duration,
}

/// The instance's probe. Cheap to clone.
#[derive(Clone)]
pub struct Probe {
    shared: Arc<Shared>,
}

struct Shared {
    backend: AnyBackend,
    hub: Hub,
    groups: Groups,
    metrics: Arc<Metrics>,
    settings: ProbeConfig,
    stream: StreamName,
    group: GroupName,
    started: Instant,
    /// Kept between rounds (and rebuilt after a failure); the lock also runs one round at a time.
    listeners: tokio::sync::Mutex<Option<Listeners>>,
    last: Mutex<Option<Outcome>>,
    last_trigger: Mutex<Option<Instant>>,
}

/// The two ways the probe message must come back.
struct Listeners {
    broadcast: hub::Subscription,
    group: groups::Subscription,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Probe {
    /// Starts probing at once and then every interval, until `shutdown`.
    pub fn start(
        backend: AnyBackend,
        delivery: &Delivery,
        metrics: Arc<Metrics>,
        settings: ProbeConfig,
        shutdown: CancellationToken,
    ) -> Probe {
        let instance = hex::encode(rand::random::<[u8; 8]>());
        let stream = StreamName::parse(format!("streamgate:probe:{instance}"))
            .unwrap_or_else(|_| unreachable!("the probe stream name is valid"));
        let group = GroupName::parse("streamgate-probe")
            .unwrap_or_else(|_| unreachable!("the probe group name is valid"));
        let probe = Probe {
            shared: Arc::new(Shared {
                backend,
                hub: delivery.hub.clone(),
                groups: delivery.groups.clone(),
                metrics,
                settings,
                stream,
                group,
                started: Instant::now(),
                listeners: tokio::sync::Mutex::new(None),
                last: Mutex::new(None),
                last_trigger: Mutex::new(None),
            }),
        };
        tokio::spawn(probe.clone().schedule(shutdown));
        probe
    }

    async fn schedule(self, shutdown: CancellationToken) {
        loop {
            let outcome = self.run().await;
            let pause = if outcome.ok {
                self.shared.settings.interval
            } else {
                RETRY
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        // Leave nothing behind after a clean stop (the stream would expire anyway).
        let shared = &self.shared;
        let _ = tokio::time::timeout(RETRY, shared.backend.delete_stream(&shared.stream)).await;
    }

    /// Fires one probe on demand, at most once per second.
    pub async fn trigger(&self) -> Result<Outcome, TooSoon> {
        {
            let mut last = lock(&self.shared.last_trigger);
            let now = Instant::now();
            if let Some(previous) = *last {
                let since = now.duration_since(previous);
                if since < TRIGGER_PERIOD {
                    return Err(TooSoon {
                        retry_after: TRIGGER_PERIOD - since,
                    });
                }
            }
            *last = Some(now);
        }
        Ok(self.run().await)
    }

    /// The latest result, if a probe has finished.
    pub fn last(&self) -> Option<Outcome> {
        lock(&self.shared.last).clone()
    }

    /// Whether delivery works as far as the probe knows: `Err` with the reason when the last
    /// probe failed or no probe has finished for longer than a round may take.
    pub fn check(&self) -> Result<(), String> {
        let settings = &self.shared.settings;
        let overdue = settings.interval + settings.timeout * 2;
        match self.last() {
            Some(outcome) if !outcome.ok => Err(format!(
                "the delivery probe failed: {}",
                outcome.error.unwrap_or_default()
            )),
            Some(outcome) if outcome.finished.elapsed() > overdue => Err(format!(
                "no delivery probe has finished for {}s",
                outcome.finished.elapsed().as_secs()
            )),
            None if self.shared.started.elapsed() > overdue => {
                Err("no delivery probe has finished since start-up".to_owned())
            }
            _ => Ok(()),
        }
    }

    /// Runs one probe (after any probe already running) and records its outcome.
    async fn run(&self) -> Outcome {
        let shared = &self.shared;
        let result = self.round().await;
        let outcome = Outcome {
            ok: result.is_ok(),
            at_ms: now_ms(),
            round_trip_ms: result
                .as_ref()
                .ok()
                .map(|elapsed| crate::model::millis(*elapsed)),
            error: result.as_ref().err().cloned(),
            finished: Instant::now(),
        };
        match &result {
            Ok(elapsed) => shared
                .metrics
                .probe_round_trip
                .observe(elapsed.as_secs_f64()),
            Err(error) => {
                shared.metrics.probe_failures.inc();
                tracing::warn!(%error, stream = %shared.stream, "delivery probe failed");
            }
        }
        *lock(&shared.last) = Some(outcome.clone());
        outcome
    }

    /// Publishes a probe message and waits until both listeners have it: the round trip.
    async fn round(&self) -> Result<Duration, String> {
        let shared = &self.shared;
        let mut listeners = shared.listeners.lock().await;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + shared.settings.timeout;
        let result = tokio::time::timeout_at(deadline, async {
            // A listener also ends when an admin deletes the probe's stream or group (a flush):
            // that is not a delivery failure, so listen afresh once before failing.
            let mut retried = false;
            loop {
                if listeners.is_none() {
                    *listeners = Some(self.listen().await?);
                }
                let id = self.publish().await?;
                let listening = listeners
                    .as_mut()
                    .unwrap_or_else(|| unreachable!("set above"));
                match tokio::try_join!(
                    broadcast_reaches(&mut listening.broadcast, id),
                    group_reaches(&mut listening.group, id)
                ) {
                    Ok(_) => return Ok(started.elapsed()),
                    Err(ended) if retried => return Err(ended),
                    Err(_) => {
                        *listeners = None;
                        retried = true;
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the probe message did not come back through delivery within {:?}",
                shared.settings.timeout
            ))
        });
        if result.is_err() {
            // Start afresh next time: a listener may be what failed.
            *listeners = None;
        }
        result
    }

    async fn listen(&self) -> Result<Listeners, String> {
        let shared = &self.shared;
        let broadcast = shared
            .hub
            .subscribe(&shared.stream, Start::Latest)
            .await
            .map_err(|error| format!("subscribing: {error}"))?;
        let spec = ConsumerSpec {
            stream: shared.stream.clone(),
            group: shared.group.clone(),
            consumer: None,
            limit: Some(KEEP as u32),
            start: GroupStart::Latest,
            mode: Mode::AtMostOnce,
        };
        let group = shared
            .groups
            .connect(spec)
            .await
            .map_err(|error| format!("joining the probe group: {error}"))?;
        Ok(Listeners { broadcast, group })
    }

    async fn publish(&self) -> Result<EntryId, String> {
        let shared = &self.shared;
        let body = format!(r#"{{"probe":true,"at_ms":{}}}"#, now_ms());
        let request = AppendRequest {
            entries: vec![NewEntry::new(Bytes::from(body), None)],
            retention: Retention {
                max_len: Some(KEEP),
                max_age: None,
                idle_ttl: Some(MIN_EXPIRY.max(shared.settings.interval * 3)),
            },
            idempotency: None,
        };
        let outcome = shared
            .backend
            .append(&shared.stream, request)
            .await
            .map_err(|error| format!("publishing: {error}"))?;
        outcome
            .ids
            .first()
            .copied()
            .ok_or_else(|| "publishing returned no id".to_owned())
    }
}

/// Waits until the broadcast subscription delivers `id` (skipping older probes).
async fn broadcast_reaches(
    subscription: &mut hub::Subscription,
    id: EntryId,
) -> Result<(), String> {
    loop {
        match subscription.next().await {
            Some(HubEvent::Message(frame)) if frame.id() >= id => return Ok(()),
            Some(_) => {}
            None => return Err("the broadcast subscription ended".to_owned()),
        }
    }
}

/// Waits until the group consumer receives `id` (skipping older probes).
async fn group_reaches(subscription: &mut groups::Subscription, id: EntryId) -> Result<(), String> {
    loop {
        match subscription.next().await {
            Some(message) if message.entry.id >= id => return Ok(()),
            Some(_) => {}
            None => return Err("the group subscription ended".to_owned()),
        }
    }
}
