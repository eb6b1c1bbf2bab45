//! Coordination on the embedded engine. One process serves a data directory, so consumer leases,
//! group reports, limits and control messages are in-memory structures here, with the same rules
//! as on Redis (times to live, compare-and-set by token), so the delivery layer behaves the same
//! on both. Nothing here is stored on disk: it describes connections, which a restart ends.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::backend::{GroupReport, Lease};
use crate::model::{ConsumerName, GroupName, StreamName};

/// Most group limits remembered (as on Redis): clients cannot grow the map without end; past
/// it, the remembered limits are forgotten and set again as they are used.
pub const MAX_LIMITS: usize = 10_000;

type LeaseKey = (StreamName, GroupName, ConsumerName);
type ReportKey = (StreamName, GroupName, String);

pub struct Coordination {
    leases: Mutex<HashMap<LeaseKey, (String, Instant)>>,
    reports: Mutex<HashMap<ReportKey, (GroupReport, Instant)>>,
    limits: Mutex<HashMap<(StreamName, GroupName), u32>>,
    control: broadcast::Sender<Bytes>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Never held across an await; a poisoned map is still sound.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn lease_key(lease: &Lease) -> LeaseKey {
    (
        lease.stream.clone(),
        lease.group.clone(),
        lease.consumer.clone(),
    )
}

impl Coordination {
    pub fn new() -> Coordination {
        Coordination {
            leases: Mutex::new(HashMap::new()),
            reports: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            control: broadcast::Sender::new(1024),
        }
    }

    pub fn acquire_lease(&self, lease: &Lease, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut leases = lock(&self.leases);
        let free = match leases.get(&lease_key(lease)) {
            None => true,
            Some((holder, expires_at)) => {
                *expires_at <= now
                    || *holder == lease.token
                    || holder.starts_with(lease.instance_prefix())
            }
        };
        if free {
            leases.insert(lease_key(lease), (lease.token.clone(), now + ttl));
        }
        free
    }

    pub fn renew_leases(&self, renewed: &[Lease], ttl: Duration) -> Vec<bool> {
        let now = Instant::now();
        let mut leases = lock(&self.leases);
        renewed
            .iter()
            .map(|lease| {
                let held = match leases.get(&lease_key(lease)) {
                    None => true,
                    Some((holder, expires_at)) => *holder == lease.token || *expires_at <= now,
                };
                if held {
                    leases.insert(lease_key(lease), (lease.token.clone(), now + ttl));
                }
                held
            })
            .collect()
    }

    pub fn release_lease(&self, lease: &Lease) {
        let mut leases = lock(&self.leases);
        let key = lease_key(lease);
        if leases
            .get(&key)
            .is_some_and(|(holder, _)| *holder == lease.token)
        {
            leases.remove(&key);
        }
    }

    pub fn report_groups(&self, reports: &[GroupReport], ttl: Duration) {
        let expires_at = Instant::now() + ttl;
        let mut stored = lock(&self.reports);
        for report in reports {
            let key = (
                report.stream.clone(),
                report.group.clone(),
                report.instance.clone(),
            );
            stored.insert(key, (report.clone(), expires_at));
        }
    }

    pub fn group_reports(&self) -> Vec<GroupReport> {
        let now = Instant::now();
        let mut stored = lock(&self.reports);
        stored.retain(|_, (_, expires_at)| *expires_at > now);
        stored.values().map(|(report, _)| report.clone()).collect()
    }

    pub fn set_group_limit(&self, stream: &StreamName, group: &GroupName, limit: u32) {
        let mut limits = lock(&self.limits);
        let key = (stream.clone(), group.clone());
        if limits.len() >= MAX_LIMITS && !limits.contains_key(&key) {
            limits.clear();
        }
        limits.insert(key, limit);
    }

    pub fn group_limits(&self, groups: &[(StreamName, GroupName)]) -> Vec<Option<u32>> {
        let limits = lock(&self.limits);
        groups.iter().map(|key| limits.get(key).copied()).collect()
    }

    pub fn publish_control(&self, payload: Bytes) {
        // Nobody listening is not a failure: nothing is stored either way.
        let _ = self.control.send(payload);
    }

    pub fn control_messages(&self) -> broadcast::Receiver<Bytes> {
        self.control.subscribe()
    }

    /// Forgets leases and reports whose time has passed.
    pub fn sweep(&self) {
        let now = Instant::now();
        lock(&self.leases).retain(|_, (_, expires_at)| *expires_at > now);
        lock(&self.reports).retain(|_, (_, expires_at)| *expires_at > now);
    }
}
