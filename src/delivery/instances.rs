//! What the instances sharing a backend share about consumer groups, and the two tasks that keep
//! it true on this instance:
//! - the keeper renews the lease of every consumer connected here (one call for all of them; a
//!   consumer whose lease another connection took meanwhile is disconnected), reports each group
//!   served here (its consumers and their counts, for the status and limit routes, and as a place
//!   where finishing by id looks; a group stays reported for a visibility timeout after its last
//!   consumer left), and applies group limits changed in the backend;
//! - the listener applies control messages from other instances: a finish or nack there frees
//!   the credit of the consumer here that held the message, a limit set there applies here at
//!   once.
//!
//! Control messages are not stored: a missed one is made good by the safety nets (the keeper's
//! limit check, the dispatcher's reconciliation of in-flight messages and its claim timer).
//! Must not: add backend calls per message; the keeper's work follows connections and groups.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::groups::{GroupKey, Shared, lock};
use crate::backend::{Backend, BackendError, GroupReport};
use crate::model::{ConsumerName, EntryId, GroupName, StreamName};

/// How long a consumer's lease lasts without renewal: a crashed instance's consumer names are
/// free again within this.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often the keeper renews leases, reports groups and looks for limit changes.
const KEEP_EVERY: Duration = Duration::from_secs(5);
/// How long a report counts: a stopped instance's consumers leave the counts within this.
const REPORT_TTL: Duration = Duration::from_secs(15);
/// Connections come and go in bursts: the keeper reports once per burst.
const REPORT_DEBOUNCE: Duration = Duration::from_millis(20);

/// A message to every instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Finished (acknowledged) messages: whoever holds them frees the credit.
    Finished {
        stream: StreamName,
        group: GroupName,
        consumer: Option<ConsumerName>,
        ids: Vec<EntryId>,
    },
    /// Messages given back: whoever holds them frees the credit and claims them again.
    Nacked {
        stream: StreamName,
        group: GroupName,
        ids: Vec<EntryId>,
    },
    /// A group's new consumer limit.
    Limit {
        stream: StreamName,
        group: GroupName,
        limit: u32,
    },
}

/// A control message as it travels: JSON, with the sending instance.
#[derive(Serialize, Deserialize)]
struct Wire {
    from: String,
    kind: String,
    stream: String,
    group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    consumer: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limit: Option<u32>,
}

fn encode(from: &str, control: &Control) -> Bytes {
    let (kind, stream, group) = match control {
        Control::Finished { stream, group, .. } => ("finished", stream, group),
        Control::Nacked { stream, group, .. } => ("nacked", stream, group),
        Control::Limit { stream, group, .. } => ("limit", stream, group),
    };
    let ids = match control {
        Control::Finished { ids, .. } | Control::Nacked { ids, .. } => {
            ids.iter().map(EntryId::to_string).collect()
        }
        Control::Limit { .. } => Vec::new(),
    };
    let wire = Wire {
        from: from.to_owned(),
        kind: kind.to_owned(),
        stream: stream.to_string(),
        group: group.to_string(),
        consumer: match control {
            Control::Finished { consumer, .. } => consumer.as_ref().map(ConsumerName::to_string),
            _ => None,
        },
        ids,
        limit: match control {
            Control::Limit { limit, .. } => Some(*limit),
            _ => None,
        },
    };
    // Serializing strings and numbers cannot fail.
    Bytes::from(serde_json::to_vec(&wire).unwrap_or_default())
}

/// The sender and the message; `None` for anything unreadable (another version's, say).
fn decode(payload: &[u8]) -> Option<(String, Control)> {
    let wire: Wire = serde_json::from_slice(payload).ok()?;
    let stream = StreamName::from_backend(wire.stream);
    let group = GroupName::from_backend(wire.group);
    let ids = || -> Option<Vec<EntryId>> { wire.ids.iter().map(|id| id.parse().ok()).collect() };
    let control = match wire.kind.as_str() {
        "finished" => Control::Finished {
            consumer: wire.consumer.clone().map(ConsumerName::from_backend),
            ids: ids()?,
            stream,
            group,
        },
        "nacked" => Control::Nacked {
            ids: ids()?,
            stream,
            group,
        },
        "limit" => Control::Limit {
            limit: wire.limit?,
            stream,
            group,
        },
        _ => return None,
    };
    Some((wire.from, control))
}

/// Tells every instance (a failure is logged: the safety nets make up for it).
pub(super) async fn announce(shared: &Shared, control: Control) {
    let payload = encode(&shared.instance, &control);
    if let Err(error) = shared.backend.publish_control(payload).await {
        tracing::warn!(%error, ?control, "a control message could not be sent");
    }
}

/// The groups with consumers (or recent ones) on any instance: where a finish by id looks.
pub(super) async fn served_groups(shared: &Shared) -> Result<Vec<GroupKey>, BackendError> {
    let mut groups: HashSet<GroupKey> = lock(&shared.dispatches).keys().cloned().collect();
    groups.extend(lock(&shared.recent).keys().cloned());
    for report in shared.backend.group_reports().await? {
        groups.insert((report.stream, report.group));
    }
    Ok(groups.into_iter().collect())
}

/// Starts the keeper and the listener; they end at `shutdown` or when the groups are dropped.
pub(super) fn start(shared: &Arc<Shared>, shutdown: CancellationToken) {
    let control = shared.backend.control_messages();
    tokio::spawn(listen(Arc::downgrade(shared), control, shutdown.clone()));
    tokio::spawn(keep(Arc::downgrade(shared), shutdown));
}

async fn listen(
    shared: Weak<Shared>,
    mut control: tokio::sync::broadcast::Receiver<Bytes>,
    shutdown: CancellationToken,
) {
    loop {
        let payload = tokio::select! {
            _ = shutdown.cancelled() => return,
            payload = control.recv() => payload,
        };
        let payload = match payload {
            Ok(payload) => payload,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "control messages were missed; the safety nets catch up"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match decode(&payload) {
            // Its own messages were applied when they were sent.
            Some((from, _)) if from == shared.instance => {}
            Some((_, control)) => apply(&shared, control),
            None => tracing::debug!("an unreadable control message was ignored"),
        }
    }
}

fn apply(shared: &Shared, control: Control) {
    match control {
        Control::Finished {
            stream,
            group,
            consumer,
            ids,
        } => shared.release(&(stream, group), consumer.as_ref(), &ids, true),
        Control::Nacked { stream, group, ids } => shared.nacked(&(stream, group), &ids),
        Control::Limit {
            stream,
            group,
            limit,
        } => shared.apply_limit(&(stream, group), limit),
    }
}

async fn keep(shared: Weak<Shared>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(KEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let full = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => true,
            _ = strong.keeper.notified() => false,
        };
        if !full {
            tokio::time::sleep(REPORT_DEBOUNCE).await;
        }
        let kept = async {
            if full {
                renew_leases(&strong).await?;
                follow_limits(&strong).await?;
            }
            report(&strong).await
        };
        if let Err(error) = kept.await {
            tracing::warn!(%error, "keeping consumer leases and group reports failed; retrying");
        }
    }
}

/// Renews every lease held here; disconnects a consumer whose name another connection took (its
/// lease lapsed while this instance could not reach the backend).
async fn renew_leases(shared: &Shared) -> Result<(), BackendError> {
    let dispatches: Vec<_> = lock(&shared.dispatches).values().cloned().collect();
    let consumers: Vec<_> = dispatches
        .iter()
        .flat_map(|dispatch| {
            let consumers = dispatch.state().consumers.clone();
            consumers
                .into_iter()
                .map(|consumer| (dispatch.clone(), consumer))
        })
        .collect();
    let leases: Vec<_> = consumers
        .iter()
        .map(|(_, consumer)| consumer.lease.clone())
        .collect();
    let held = shared.backend.renew_leases(&leases, LEASE_TTL).await?;
    for ((dispatch, consumer), held) in consumers.into_iter().zip(held) {
        if !held {
            tracing::warn!(stream = %dispatch.key.0, group = %dispatch.key.1, consumer = %consumer.name, "another connection holds this consumer's name now; disconnecting it here");
            // Dropping it here drops its sender: its subscription ends.
            dispatch
                .state()
                .consumers
                .retain(|local| !Arc::ptr_eq(local, &consumer));
        }
    }
    Ok(())
}

/// Applies limits that changed in the backend since this instance last looked (a control message
/// may have been missed).
async fn follow_limits(shared: &Shared) -> Result<(), BackendError> {
    let keys: Vec<GroupKey> = lock(&shared.dispatches).keys().cloned().collect();
    let limits = shared.backend.group_limits(&keys).await?;
    for (key, limit) in keys.iter().zip(limits) {
        let Some(limit) = limit else { continue };
        let changed = shared
            .dispatch(key)
            .is_some_and(|dispatch| *lock(&dispatch.stored_limit) != Some(limit));
        if changed {
            shared.apply_limit(key, limit);
        }
    }
    Ok(())
}

/// Reports one group served here now (a consumer just connected: other instances count it and
/// look for its messages from the moment its connection is confirmed).
pub(super) async fn report_now(shared: &Shared, key: &GroupKey) -> Result<(), BackendError> {
    let Some(dispatch) = shared.dispatch(key) else {
        return Ok(());
    };
    let report = group_report(shared, &dispatch);
    shared.backend.report_groups(&[report], REPORT_TTL).await
}

fn group_report(shared: &Shared, dispatch: &super::groups::Dispatch) -> GroupReport {
    let state = dispatch.state();
    let mut report = GroupReport {
        stream: dispatch.key.0.clone(),
        group: dispatch.key.1.clone(),
        instance: shared.instance.clone(),
        consumers: state.consumers.len() as u64,
        delivered: 0,
        finished: 0,
    };
    for consumer in &state.consumers {
        report.delivered += consumer.delivered.load(Ordering::Relaxed);
        report.finished += consumer.finished.load(Ordering::Relaxed);
    }
    report
}

/// Reports the groups served here, and those whose last consumer here left within a visibility
/// timeout.
async fn report(shared: &Shared) -> Result<(), BackendError> {
    let horizon = shared.settings.visibility_timeout;
    let recent: Vec<GroupKey> = {
        let mut recent = lock(&shared.recent);
        recent.retain(|_, left| left.elapsed() < horizon);
        recent.keys().cloned().collect()
    };
    let mut reports = Vec::new();
    let dispatches: Vec<_> = lock(&shared.dispatches).values().cloned().collect();
    for dispatch in dispatches {
        reports.push(group_report(shared, &dispatch));
    }
    let reported: HashSet<GroupKey> = reports
        .iter()
        .map(|report| (report.stream.clone(), report.group.clone()))
        .collect();
    for (stream, group) in recent {
        if !reported.contains(&(stream.clone(), group.clone())) {
            reports.push(GroupReport {
                stream,
                group,
                instance: shared.instance.clone(),
                consumers: 0,
                delivered: 0,
                finished: 0,
            });
        }
    }
    shared.backend.report_groups(&reports, REPORT_TTL).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip() {
        let stream = StreamName::parse("s").unwrap();
        let group = GroupName::parse("g").unwrap();
        for control in [
            Control::Finished {
                stream: stream.clone(),
                group: group.clone(),
                consumer: Some(ConsumerName::parse("c").unwrap()),
                ids: vec![EntryId::new(1, 2), EntryId::new(3, 0)],
            },
            Control::Finished {
                stream: stream.clone(),
                group: group.clone(),
                consumer: None,
                ids: vec![EntryId::new(1, 2)],
            },
            Control::Nacked {
                stream: stream.clone(),
                group: group.clone(),
                ids: vec![EntryId::new(9, 9)],
            },
            Control::Limit {
                stream: stream.clone(),
                group: group.clone(),
                limit: 7,
            },
        ] {
            assert_eq!(
                decode(&encode("me", &control)),
                Some(("me".into(), control))
            );
        }
        assert_eq!(decode(b"{\"kind\":\"other\"}"), None);
        assert_eq!(decode(b"not json"), None);
    }
}
