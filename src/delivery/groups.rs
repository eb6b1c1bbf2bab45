//! Consumer groups on this instance: competing consumers with flow control, acknowledgement,
//! redelivery and dead letters. Transport-agnostic: SSE, WebSocket and long-polling each hold a
//! [`Subscription`] and forward what it yields.
//!
//! Each connection is its own consumer of the backend's group. One dispatcher task per
//! (stream, group) with live consumers here reads *on behalf of* the consumers that have free
//! credit (limit minus messages in flight), in rounds of one chunk each, read together; it reads
//! new entries only when the stream watcher says the stream grew, when credit frees up, or on its
//! claim timer. So the number of backend round trips follows the messages, not the number of
//! consumers, and an idle consumer costs nothing.
//!
//! Every `visibility_timeout / 4` the dispatcher also claims entries idle for
//! `visibility_timeout` (walking the whole pending list with the claim cursor) for its consumers
//! with credit, dead-letters entries over `max_deliveries`, and frees credit held by messages that
//! have since been claimed elsewhere.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::EndReason;
use super::instances::{self, Control};
use super::watcher::{TailWatch, Watcher};
use crate::backend::{
    AnyBackend, Backend, BackendError, Delivery, GroupBatch, GroupCursor, GroupRead, GroupStart,
    Lease, PendingQuery, backoff_delay,
};
use crate::metrics::Metrics;
use crate::model::{ConsumerName, Entry, EntryId, GroupName, StreamName, now_ms};

/// The highest flow-control limit a consumer may have.
pub const MAX_LIMIT: u32 = 10_000;

/// Most entries read for one consumer in one round, so a backlog is spread over consumers.
const CHUNK: usize = 128;

/// Most entries claimed in one claim step.
const CLAIM_STEP: usize = 100;

/// How consumer groups behave (from the `[consumer]` configuration).
#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub default_limit: u32,
    pub visibility_timeout: Duration,
    pub max_deliveries: u32,
    pub delete_on_finish: bool,
    /// A consumer with nothing pending is removed from the group after this long idle.
    pub cleanup_after: Duration,
}

impl GroupSettings {
    /// How often each dispatcher looks for idle entries to claim.
    fn claim_interval(&self) -> Duration {
        (self.visibility_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}

/// A consumer's delivery guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Messages stay pending until finished; unfinished ones are redelivered.
    AtLeastOnce,
    /// Messages are delivered once and never pending (`NOACK`).
    AtMostOnce,
}

/// What a client asks for when it connects as a group consumer.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: StreamName,
    pub group: GroupName,
    /// The consumer's name; generated (unique across instances and restarts) when absent.
    pub consumer: Option<ConsumerName>,
    /// Most messages in flight; the group's default when absent.
    pub limit: Option<u32>,
    /// Where the group starts if this connection creates it.
    pub start: GroupStart,
    pub mode: Mode,
}

/// One message for one consumer.
#[derive(Debug, Clone)]
pub struct GroupMessage {
    pub entry: Entry,
    /// How often it has been delivered, this time included.
    pub deliveries: u64,
}

/// Why a consumer could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Another connection, on this instance or another, holds the consumer's lease.
    #[error("consumer `{0}` is already connected to this group")]
    Duplicate(ConsumerName),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// The status of a group's consumers on every instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub consumers: u64,
    /// Messages delivered to the current consumers since each connected.
    pub messages: u64,
    /// Of those, how many were finished.
    pub finished: u64,
}

/// What finishing a message by its id alone did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishedById {
    /// It was pending in this group (for this consumer), and is finished.
    Finished(StreamName, GroupName, ConsumerName),
    /// It is pending in no group with consumers (or recent ones) that the caller may see.
    NotPending,
    /// It is pending in several groups: nothing was finished.
    Ambiguous(Vec<(StreamName, GroupName, ConsumerName)>),
}

pub(super) type GroupKey = (StreamName, GroupName);

/// A map by entry id: every delivered and every finished message goes through one or two of these,
/// so with a fast (yet randomly seeded) hash rather than SipHash.
type IdMap<V> = HashMap<EntryId, V, foldhash::fast::RandomState>;

/// One connected consumer.
pub(super) struct LocalConsumer {
    pub(super) name: ConsumerName,
    /// Its lease on the name, across instances.
    pub(super) lease: Lease,
    mode: Mode,
    pub(super) limit: AtomicU32,
    /// Messages delivered and not yet finished (at-least-once only), with when they were sent.
    in_flight: Mutex<IdMap<Instant>>,
    pub(super) delivered: AtomicU64,
    pub(super) finished: AtomicU64,
    sender: mpsc::Sender<GroupMessage>,
    /// While set, the consumer's own pending entries after this id are delivered first (a
    /// reconnecting consumer gets back what it had not finished).
    replay_from: Mutex<Option<EntryId>>,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No lock here is held across an await or while calling out; a poisoned one is still sound.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl LocalConsumer {
    /// How many more messages it may receive now.
    fn credit(&self) -> usize {
        if self.sender.is_closed() {
            // Disconnecting: whatever it read now would only wait for the visibility timeout.
            return 0;
        }
        let limit = self.limit.load(Ordering::Relaxed) as usize;
        let used = match self.mode {
            Mode::AtLeastOnce => lock(&self.in_flight).len(),
            // Nothing is in flight; what waits in the channel is the bound.
            Mode::AtMostOnce => self.sender.max_capacity() - self.sender.capacity(),
        };
        limit.saturating_sub(used)
    }
}

/// What a dispatcher does next for a consumer.
enum Work {
    Replay(EntryId, usize),
    New(usize),
}

#[derive(Default)]
pub(super) struct DispatchState {
    pub(super) consumers: Vec<Arc<LocalConsumer>>,
    /// Round-robin position.
    next: usize,
    /// The last read of new entries came back short: wait for the stream to grow.
    drained: bool,
}

/// The dispatcher of one (stream, group) on this instance.
pub(super) struct Dispatch {
    pub(super) key: GroupKey,
    state: Mutex<DispatchState>,
    pub(super) wake: Notify,
    pub(super) claim_requested: AtomicBool,
    /// The group limit last seen in the backend: a change there applies to every consumer here.
    pub(super) stored_limit: Mutex<Option<u32>>,
    /// Cancelled when the dispatcher ends (no consumers left, the group is gone, shutdown).
    stop: CancellationToken,
    /// Why its consumers were ended, when the group or its stream went away.
    ended: OnceLock<EndReason>,
}

impl Dispatch {
    pub(super) fn state(&self) -> MutexGuard<'_, DispatchState> {
        lock(&self.state)
    }

    /// One piece of work for every consumer with credit and something to do, starting one
    /// further along each round (whoever comes first gets a short backlog first).
    fn round(&self) -> Vec<(Arc<LocalConsumer>, Work)> {
        let mut state = self.state();
        let n = state.consumers.len();
        let mut works = Vec::new();
        for offset in 0..n {
            let consumer = &state.consumers[(state.next + offset) % n];
            let credit = consumer.credit();
            if credit == 0 {
                continue;
            }
            let work = match *lock(&consumer.replay_from) {
                Some(after) => Work::Replay(after, credit.min(CHUNK)),
                None if !state.drained => Work::New(credit.min(CHUNK)),
                None => continue,
            };
            works.push((consumer.clone(), work));
        }
        state.next = state.next.wrapping_add(1);
        works
    }

    /// The at-least-once consumer with the most credit, to claim idle entries for.
    fn claimer(&self) -> Option<Arc<LocalConsumer>> {
        self.state()
            .consumers
            .iter()
            .filter(|consumer| consumer.mode == Mode::AtLeastOnce)
            .map(|consumer| (consumer.credit(), consumer))
            .filter(|(credit, _)| *credit > 0)
            .max_by_key(|(credit, _)| *credit)
            .map(|(_, consumer)| consumer.clone())
    }

    /// Takes `id` out of every local consumer's in-flight set except `keep`'s; returns whether
    /// any credit was freed.
    fn release_elsewhere(&self, id: EntryId, keep: Option<&ConsumerName>) -> bool {
        let mut freed = false;
        for consumer in &self.state().consumers {
            if Some(&consumer.name) != keep && lock(&consumer.in_flight).remove(&id).is_some() {
                freed = true;
            }
        }
        freed
    }
}

pub(super) struct Shared {
    pub(super) backend: AnyBackend,
    watcher: Watcher,
    pub(super) settings: GroupSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// This instance, as leases and reports name it (random: unique across restarts).
    pub(super) instance: String,
    /// Numbers this instance's connections (a lease's token is `<instance>:<number>`).
    connections: AtomicU64,
    pub(super) dispatches: Mutex<HashMap<GroupKey, Arc<Dispatch>>>,
    /// Consumer names in use here (connected, or connecting): one connection each.
    names: Mutex<HashSet<(GroupKey, ConsumerName)>>,
    /// Groups whose last consumer here left recently, and when: their messages may still be
    /// finished by id, so this instance keeps reporting them for a visibility timeout.
    pub(super) recent: Mutex<HashMap<GroupKey, Instant>>,
    /// Wakes the keeper (a consumer came or went: report it now).
    pub(super) keeper: Notify,
}

/// Consumer groups on this instance. Cheap to clone.
#[derive(Clone)]
pub struct Groups {
    shared: Arc<Shared>,
}

/// A connected consumer: yields its messages until it is dropped (which disconnects it), the
/// group disappears, or shutdown begins.
pub struct Subscription {
    pub stream: StreamName,
    pub group: GroupName,
    pub consumer: ConsumerName,
    receiver: mpsc::Receiver<GroupMessage>,
    registration: Registration,
}

impl Subscription {
    /// The next message; `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<GroupMessage> {
        self.receiver.recv().await
    }

    /// Why the subscription ended, once [`Subscription::next`] has said it did: the group or its
    /// stream was deleted (`None`: shutdown, or the subscription is still live).
    pub fn end_reason(&self) -> Option<EndReason> {
        self.registration.dispatch.ended.get().copied()
    }
}

/// Unregisters a consumer when its subscription is dropped.
struct Registration {
    shared: Weak<Shared>,
    dispatch: Arc<Dispatch>,
    consumer: ConsumerName,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.unregister(&self.dispatch, &self.consumer);
        }
    }
}

/// A consumer name taken here while a connection is being set up: given back if it fails.
struct NameReservation<'a> {
    shared: &'a Shared,
    name: Option<(GroupKey, ConsumerName)>,
}

impl NameReservation<'_> {
    /// The connection is registered: its registration gives the name back.
    fn keep(mut self) {
        self.name = None;
    }
}

impl Drop for NameReservation<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            lock(&self.shared.names).remove(&name);
        }
    }
}

/// A consumer name no other connection has had: random, so unique across instances and
/// restarts.
fn generated_name() -> ConsumerName {
    let name = format!("sg-{}", hex::encode(rand::random::<[u8; 8]>()));
    ConsumerName::parse(name).unwrap_or_else(|_| unreachable!("generated names are valid"))
}

impl Groups {
    pub fn start(
        backend: AnyBackend,
        watcher: Watcher,
        settings: GroupSettings,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Groups {
        let shared = Arc::new(Shared {
            backend,
            watcher,
            settings,
            metrics,
            shutdown: shutdown.clone(),
            instance: hex::encode(rand::random::<[u8; 8]>()),
            connections: AtomicU64::new(0),
            dispatches: Mutex::new(HashMap::new()),
            names: Mutex::new(HashSet::new()),
            recent: Mutex::new(HashMap::new()),
            keeper: Notify::new(),
        });
        instances::start(&shared, shutdown);
        Groups { shared }
    }

    /// Connects a consumer: creates the group if needed, takes the consumer's lease (across
    /// instances) and registers it here. The stream is watched before this returns, so a
    /// message published anywhere once the caller has confirmed the connection is not missed.
    pub async fn connect(&self, spec: ConsumerSpec) -> Result<Subscription, ConnectError> {
        let shared = &self.shared;
        shared
            .backend
            .create_group(&spec.stream, &spec.group, spec.start)
            .await?;
        let key = (spec.stream.clone(), spec.group.clone());
        // A named consumer may have pending entries from an earlier connection: deliver those
        // first. A generated name is new, so it has none.
        let replay_from =
            (spec.mode == Mode::AtLeastOnce && spec.consumer.is_some()).then_some(EntryId::MIN);
        let name = spec.consumer.unwrap_or_else(generated_name);
        let reservation = shared.reserve(&key, &name)?;
        let lease = Lease {
            stream: spec.stream.clone(),
            group: spec.group.clone(),
            consumer: name.clone(),
            token: format!(
                "{}:{}",
                shared.instance,
                shared.connections.fetch_add(1, Ordering::Relaxed)
            ),
        };
        if !shared
            .backend
            .acquire_lease(&lease, instances::LEASE_TTL)
            .await?
        {
            return Err(ConnectError::Duplicate(name));
        }
        let stored_limit = match shared
            .backend
            .group_limits(std::slice::from_ref(&key))
            .await
        {
            Ok(limits) => limits.into_iter().next().flatten(),
            Err(error) => {
                tracing::warn!(%error, "reading the group's limit failed; using the default");
                None
            }
        };
        let limit = spec
            .limit
            .or(stored_limit)
            .unwrap_or(shared.settings.default_limit)
            .clamp(1, MAX_LIMIT);
        let (sender, receiver) = mpsc::channel(MAX_LIMIT as usize);
        let consumer = Arc::new(LocalConsumer {
            name: name.clone(),
            lease,
            mode: spec.mode,
            limit: AtomicU32::new(limit),
            in_flight: Mutex::new(IdMap::default()),
            delivered: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            sender,
            replay_from: Mutex::new(replay_from),
        });
        let dispatch = {
            let mut dispatches = lock(&shared.dispatches);
            let dispatch = dispatches
                .entry(key.clone())
                .or_insert_with(|| {
                    let dispatch = Arc::new(Dispatch {
                        key: key.clone(),
                        state: Mutex::new(DispatchState::default()),
                        wake: Notify::new(),
                        claim_requested: AtomicBool::new(false),
                        stored_limit: Mutex::new(stored_limit),
                        stop: shared.shutdown.child_token(),
                        ended: OnceLock::new(),
                    });
                    // Watched now, not when the dispatcher task first runs: the watcher learns
                    // of the stream before the connection is confirmed.
                    let tail = shared.watcher.watch(&key.0);
                    tokio::spawn(run(Arc::downgrade(shared), dispatch.clone(), tail));
                    dispatch
                })
                .clone();
            dispatch.state().consumers.push(consumer);
            dispatch
        };
        reservation.keep();
        lock(&shared.recent).remove(&key);
        dispatch.wake.notify_one();
        let subscription = Subscription {
            stream: spec.stream,
            group: spec.group,
            consumer: name.clone(),
            receiver,
            registration: Registration {
                shared: Arc::downgrade(shared),
                dispatch,
                consumer: name,
            },
        };
        // Counted by every instance, and its messages found by a finish by id anywhere, before
        // the connection is confirmed. (A failure here only delays that to the keeper's report.)
        if let Err(error) = instances::report_now(shared, &key).await {
            tracing::warn!(%error, "reporting a new consumer failed; the keeper reports it later");
        }
        Ok(subscription)
    }

    /// The consumer a pending message is held by, if it is pending in the group.
    pub async fn owner_of(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
    ) -> Result<Option<ConsumerName>, BackendError> {
        let query = PendingQuery {
            start: id,
            end: id,
            ..PendingQuery::all(1)
        };
        match self.shared.backend.pending(stream, group, query).await {
            Ok(pending) => Ok(pending.into_iter().next().map(|entry| entry.consumer)),
            Err(BackendError::GroupNotFound | BackendError::StreamNotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Acknowledges messages (from any instance) and frees the credit of those that were in
    /// flight for `consumer` here. Returns how many were pending.
    pub async fn finish(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: Option<&ConsumerName>,
        ids: &[EntryId],
    ) -> Result<u64, BackendError> {
        let shared = &self.shared;
        let acked = shared
            .backend
            .ack(stream, group, ids, shared.settings.delete_on_finish)
            .await?;
        let key = (stream.clone(), group.clone());
        shared.release(&key, consumer, ids, true);
        let here = consumer.is_some_and(|name| lock(&shared.names).contains(&(key, name.clone())));
        if acked > 0 && !here {
            // The consumer is elsewhere (or unknown): its instance frees the credit.
            instances::announce(
                shared,
                Control::Finished {
                    stream: stream.clone(),
                    group: group.clone(),
                    consumer: consumer.cloned(),
                    ids: ids.to_vec(),
                },
            )
            .await;
        }
        Ok(acked)
    }

    /// Seed 000's finish by id alone: finds the group the message is pending in, among the groups
    /// with consumers (or recent ones) on any instance that `visible` allows, and finishes it
    /// there. Several such groups: nothing is finished.
    pub async fn finish_by_id(
        &self,
        id: EntryId,
        visible: impl Fn(&StreamName) -> bool,
    ) -> Result<FinishedById, BackendError> {
        let candidates: Vec<GroupKey> = instances::served_groups(&self.shared)
            .await?
            .into_iter()
            .filter(|(stream, _)| visible(stream))
            .collect();
        let owners = futures_util::future::join_all(
            candidates
                .iter()
                .map(|(stream, group)| self.owner_of(stream, group, id)),
        )
        .await;
        let mut holders = Vec::new();
        for ((stream, group), owner) in candidates.into_iter().zip(owners) {
            if let Some(consumer) = owner? {
                holders.push((stream, group, consumer));
            }
        }
        match holders.len() {
            0 => Ok(FinishedById::NotPending),
            1 => {
                let (stream, group, consumer) = holders.remove(0);
                match self.finish(&stream, &group, Some(&consumer), &[id]).await? {
                    0 => Ok(FinishedById::NotPending),
                    _ => Ok(FinishedById::Finished(stream, group, consumer)),
                }
            }
            _ => Ok(FinishedById::Ambiguous(holders)),
        }
    }

    /// Makes an in-flight message claimable at once (it is redelivered by the next claim).
    /// Returns whether it was pending.
    pub async fn nack(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
    ) -> Result<bool, BackendError> {
        let shared = &self.shared;
        let idle = shared.settings.visibility_timeout + Duration::from_secs(1);
        let pending = shared
            .backend
            .set_pending_idle(stream, group, id, idle)
            .await?;
        if pending {
            let key = (stream.clone(), group.clone());
            shared.nacked(&key, &[id]);
            // Whichever instance holds it frees the credit, and every one claims it again.
            instances::announce(
                shared,
                Control::Nacked {
                    stream: stream.clone(),
                    group: group.clone(),
                    ids: vec![id],
                },
            )
            .await;
        }
        Ok(pending)
    }

    /// Restarts an in-flight message's visibility timeout. Returns whether it was pending.
    pub async fn touch(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
    ) -> Result<bool, BackendError> {
        let shared = &self.shared;
        let pending = shared
            .backend
            .set_pending_idle(stream, group, id, Duration::ZERO)
            .await?;
        if pending && let Some(dispatch) = shared.dispatch(&(stream.clone(), group.clone())) {
            for consumer in &dispatch.state().consumers {
                if let Some(sent) = lock(&consumer.in_flight).get_mut(&id) {
                    *sent = Instant::now();
                }
            }
        }
        Ok(pending)
    }

    /// Sets the limit of every consumer of the group, on every instance, and the default for
    /// later ones. Returns how many consumers it applies to now.
    pub async fn set_limit(
        &self,
        stream: &StreamName,
        group: &GroupName,
        limit: u32,
    ) -> Result<u64, BackendError> {
        let shared = &self.shared;
        let limit = limit.clamp(1, MAX_LIMIT);
        shared.backend.set_group_limit(stream, group, limit).await?;
        let key = (stream.clone(), group.clone());
        shared.apply_limit(&key, limit);
        instances::announce(
            shared,
            Control::Limit {
                stream: stream.clone(),
                group: group.clone(),
                limit,
            },
        )
        .await;
        Ok(self
            .status(stream, group)
            .await?
            .map_or(0, |status| status.consumers))
    }

    /// The group's consumers on every instance (this one counted as it is now, the others as
    /// they last reported); `None` when there are none.
    pub async fn status(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Option<GroupStatus>, BackendError> {
        let shared = &self.shared;
        let key = (stream.clone(), group.clone());
        let mut status = GroupStatus {
            consumers: 0,
            messages: 0,
            finished: 0,
        };
        if let Some(dispatch) = shared.dispatch(&key) {
            for consumer in &dispatch.state().consumers {
                status.consumers += 1;
                status.messages += consumer.delivered.load(Ordering::Relaxed);
                status.finished += consumer.finished.load(Ordering::Relaxed);
            }
        }
        for report in shared.backend.group_reports().await? {
            if report.instance != shared.instance
                && report.stream == *stream
                && report.group == *group
            {
                status.consumers += report.consumers;
                status.messages += report.delivered;
                status.finished += report.finished;
            }
        }
        Ok((status.consumers > 0).then_some(status))
    }
}

impl Shared {
    pub(super) fn dispatch(&self, key: &GroupKey) -> Option<Arc<Dispatch>> {
        lock(&self.dispatches).get(key).cloned()
    }

    /// Takes a consumer name here for a connection being set up; refused when a connection here
    /// has it already (another instance's is found by the lease).
    fn reserve(
        &self,
        key: &GroupKey,
        name: &ConsumerName,
    ) -> Result<NameReservation<'_>, ConnectError> {
        let entry = (key.clone(), name.clone());
        if !lock(&self.names).insert(entry.clone()) {
            return Err(ConnectError::Duplicate(name.clone()));
        }
        Ok(NameReservation {
            shared: self,
            name: Some(entry),
        })
    }

    fn unregister(&self, dispatch: &Arc<Dispatch>, name: &ConsumerName) {
        let removed = {
            let mut dispatches = lock(&self.dispatches);
            let mut state = dispatch.state();
            let position = state
                .consumers
                .iter()
                .position(|consumer| consumer.name == *name);
            let removed = position.map(|position| state.consumers.remove(position));
            let current = dispatches
                .get(&dispatch.key)
                .is_some_and(|live| Arc::ptr_eq(live, dispatch));
            if state.consumers.is_empty() && current {
                dispatches.remove(&dispatch.key);
                dispatch.stop.cancel();
                // Its messages may still be finished by id here for a while.
                lock(&self.recent).insert(dispatch.key.clone(), Instant::now());
            }
            removed
        };
        lock(&self.names).remove(&(dispatch.key.clone(), name.clone()));
        self.keeper.notify_one();
        // What it had in flight stays pending in the group (redelivered after the visibility
        // timeout). The name is free here at once; its lease, as soon as the backend answers
        // (a new connection of this instance may take it over meanwhile).
        if let (Some(consumer), Ok(runtime)) = (removed, tokio::runtime::Handle::try_current()) {
            let backend = self.backend.clone();
            runtime.spawn(async move {
                if let Err(error) = backend.release_lease(&consumer.lease).await {
                    tracing::debug!(%error, consumer = %consumer.name, "releasing a lease failed; it lapses");
                }
            });
        }
    }

    /// Applies a limit to every consumer of the group here.
    pub(super) fn apply_limit(&self, key: &GroupKey, limit: u32) {
        let Some(dispatch) = self.dispatch(key) else {
            return;
        };
        *lock(&dispatch.stored_limit) = Some(limit);
        for consumer in &dispatch.state().consumers {
            consumer.limit.store(limit, Ordering::Relaxed);
        }
        dispatch.wake.notify_one();
    }

    /// Frees the credit of nacked messages held here and claims them again soon.
    pub(super) fn nacked(&self, key: &GroupKey, ids: &[EntryId]) {
        self.release(key, None, ids, false);
        if let Some(dispatch) = self.dispatch(key) {
            dispatch.claim_requested.store(true, Ordering::Relaxed);
            dispatch.wake.notify_one();
        }
    }

    /// Frees the credit of `ids` held here (by `consumer`, or by anyone when `None`).
    pub(super) fn release(
        &self,
        key: &GroupKey,
        consumer: Option<&ConsumerName>,
        ids: &[EntryId],
        finished: bool,
    ) {
        let Some(dispatch) = self.dispatch(key) else {
            return;
        };
        let mut freed = false;
        for local in &dispatch.state().consumers {
            if consumer.is_some_and(|name| *name != local.name) {
                continue;
            }
            let mut in_flight = lock(&local.in_flight);
            for id in ids {
                if in_flight.remove(id).is_some() {
                    freed = true;
                    if finished {
                        local.finished.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if freed {
            dispatch.wake.notify_one();
        }
    }

    /// Hands read entries to `consumer`, except those over `max_deliveries` (dead-lettered) and
    /// those whose `ttl` has passed (acknowledged unseen).
    async fn deliver(
        &self,
        dispatch: &Dispatch,
        consumer: &LocalConsumer,
        deliveries: Vec<Delivery>,
    ) -> Result<(), BackendError> {
        let (stream, group) = &dispatch.key;
        let now = now_ms();
        let at_least_once = consumer.mode == Mode::AtLeastOnce;
        let max_deliveries = u64::from(self.settings.max_deliveries);
        let mut expired = Vec::new();
        let mut ready = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            if at_least_once && max_deliveries > 0 && delivery.deliveries > max_deliveries {
                self.dead_letter(dispatch, &delivery).await?;
            } else if delivery.entry.is_expired(now) {
                expired.push(delivery.entry.id);
            } else {
                ready.push(delivery);
            }
        }
        if at_least_once {
            // In flight before it is sent: a finish may come back at once.
            let ids: Vec<EntryId> = ready.iter().map(|delivery| delivery.entry.id).collect();
            let sent_at = Instant::now();
            lock(&consumer.in_flight).extend(ids.iter().map(|id| (*id, sent_at)));
        }
        for delivery in ready {
            let id = delivery.entry.id;
            let message = GroupMessage {
                entry: delivery.entry,
                deliveries: delivery.deliveries,
            };
            let redelivery = message.deliveries > 1;
            if consumer.sender.try_send(message).is_ok() {
                consumer.delivered.fetch_add(1, Ordering::Relaxed);
                if redelivery {
                    self.metrics.redeliveries.inc();
                }
            } else {
                // Disconnected meanwhile: the entry stays pending for it and comes back later.
                lock(&consumer.in_flight).remove(&id);
            }
        }
        if at_least_once && !expired.is_empty() {
            self.backend.ack(stream, group, &expired, false).await?;
        }
        Ok(())
    }

    /// Moves an entry to `{stream}:dlq` with where it came from, acknowledging it, atomically.
    async fn dead_letter(
        &self,
        dispatch: &Dispatch,
        delivery: &Delivery,
    ) -> Result<(), BackendError> {
        let (stream, group) = &dispatch.key;
        let id = delivery.entry.id;
        let mut fields = delivery.entry.fields.clone();
        let extra: [(&str, String); 4] = [
            ("original_id", id.to_string()),
            ("stream", stream.to_string()),
            ("group", group.to_string()),
            ("deliveries", (delivery.deliveries - 1).to_string()),
        ];
        fields.extend(
            extra
                .into_iter()
                .map(|(field, value)| (Bytes::from_static(field.as_bytes()), Bytes::from(value))),
        );
        let dead_letter_stream = self.backend.dead_letter_stream(stream);
        self.backend
            .dead_letter(stream, group, id, &dead_letter_stream, fields)
            .await?;
        self.metrics.dead_lettered.inc();
        tracing::warn!(%stream, %group, %id, deliveries = delivery.deliveries - 1, "moved to the dead-letter stream");
        self.release(&dispatch.key, None, &[id], false);
        Ok(())
    }

    /// Reads for consumers with credit until none has anything to do. Each round reads for all
    /// of them at once (the reads share one round trip, see the Redis batcher) and delivers every
    /// read that succeeded before reporting a failed one: what was read is pending for its
    /// consumer (or, without acknowledgement, read only once), so it must not be dropped.
    async fn serve(&self, dispatch: &Dispatch) -> Result<(), BackendError> {
        loop {
            let works = dispatch.round();
            if works.is_empty() {
                return Ok(());
            }
            let reads = works
                .iter()
                .map(|(consumer, work)| self.read(dispatch, consumer, work));
            let batches = futures_util::future::join_all(reads).await;
            let mut failure = None;
            for ((consumer, work), batch) in works.into_iter().zip(batches) {
                let taken = match batch {
                    Ok(batch) => self.take(dispatch, &consumer, work, batch).await,
                    Err(error) => Err(error),
                };
                if let Err(error) = taken {
                    failure.get_or_insert(error);
                }
            }
            if let Some(error) = failure {
                return Err(error);
            }
        }
    }

    /// One consumer's read of a round.
    async fn read(
        &self,
        dispatch: &Dispatch,
        consumer: &LocalConsumer,
        work: &Work,
    ) -> Result<GroupBatch, BackendError> {
        let (stream, group) = &dispatch.key;
        let read = match *work {
            Work::Replay(after, count) => GroupRead {
                cursor: GroupCursor::PendingAfter(after),
                count,
                no_ack: false,
            },
            Work::New(count) => GroupRead {
                cursor: GroupCursor::New,
                count,
                no_ack: consumer.mode == Mode::AtMostOnce,
            },
        };
        self.backend
            .read_group(stream, group, &consumer.name, read)
            .await
    }

    /// Delivers what one consumer's read returned, and notes where its reading goes on.
    async fn take(
        &self,
        dispatch: &Dispatch,
        consumer: &LocalConsumer,
        work: Work,
        batch: GroupBatch,
    ) -> Result<(), BackendError> {
        let (stream, group) = &dispatch.key;
        let returned = batch.deliveries.len() + batch.deleted.len();
        match work {
            Work::Replay(_, count) => {
                let last = batch
                    .deliveries
                    .iter()
                    .map(|d| d.entry.id)
                    .chain(batch.deleted.iter().copied())
                    .max();
                *lock(&consumer.replay_from) = last.filter(|_| returned >= count);
            }
            Work::New(count) if returned < count => dispatch.state().drained = true,
            Work::New(_) => {}
        }
        self.deliver(dispatch, consumer, batch.deliveries).await?;
        if !batch.deleted.is_empty() {
            // Gone from the stream while pending: nothing to deliver, nothing to wait for.
            self.backend
                .ack(stream, group, &batch.deleted, false)
                .await?;
        }
        Ok(())
    }

    /// Claims entries idle for the visibility timeout, walking the whole pending list.
    async fn claim(&self, dispatch: &Dispatch) -> Result<(), BackendError> {
        let (stream, group) = &dispatch.key;
        let mut cursor = EntryId::MIN;
        while let Some(consumer) = dispatch.claimer() {
            let count = consumer.credit().min(CLAIM_STEP);
            let page = self
                .backend
                .claim_idle(
                    stream,
                    group,
                    &consumer.name,
                    self.settings.visibility_timeout,
                    cursor,
                    count,
                )
                .await?;
            if !page.deleted.is_empty() {
                self.release(&dispatch.key, None, &page.deleted, false);
            }
            for delivery in &page.claimed {
                dispatch.release_elsewhere(delivery.entry.id, Some(&consumer.name));
            }
            self.deliver(dispatch, &consumer, page.claimed).await?;
            match page.next_cursor {
                Some(next) => cursor = next,
                None => break,
            }
        }
        self.reconcile(dispatch).await
    }

    /// Frees credit held by messages sent longer than a visibility timeout ago that the consumer
    /// no longer owns (claimed by another instance, dead-lettered, acknowledged elsewhere).
    async fn reconcile(&self, dispatch: &Dispatch) -> Result<(), BackendError> {
        let (stream, group) = &dispatch.key;
        let consumers = dispatch.state().consumers.clone();
        for consumer in consumers {
            let stale: Vec<EntryId> = lock(&consumer.in_flight)
                .iter()
                .filter(|(_, sent)| sent.elapsed() >= self.settings.visibility_timeout)
                .map(|(id, _)| *id)
                .collect();
            let (Some(first), Some(last)) = (stale.iter().min(), stale.iter().max()) else {
                continue;
            };
            let query = PendingQuery {
                start: *first,
                end: *last,
                count: lock(&consumer.in_flight).len() + 1,
                consumer: Some(consumer.name.clone()),
                min_idle: None,
            };
            let owned: std::collections::HashSet<EntryId> = self
                .backend
                .pending(stream, group, query)
                .await?
                .into_iter()
                .map(|entry| entry.id)
                .collect();
            let lost: Vec<EntryId> = stale.into_iter().filter(|id| !owned.contains(id)).collect();
            if !lost.is_empty() {
                self.release(&dispatch.key, Some(&consumer.name), &lost, false);
            }
        }
        Ok(())
    }

    /// Removes consumers of the group that own nothing and have been idle for `cleanup_after`
    /// (every connection with a generated name leaves one behind).
    async fn clean_up(&self, dispatch: &Dispatch) -> Result<(), BackendError> {
        let (stream, group) = &dispatch.key;
        let local: Vec<ConsumerName> = dispatch
            .state()
            .consumers
            .iter()
            .map(|c| c.name.clone())
            .collect();
        for consumer in self.backend.consumers(stream, group).await? {
            if consumer.pending == 0
                && consumer.idle >= self.settings.cleanup_after
                && !local.contains(&consumer.name)
            {
                self.backend
                    .remove_idle_consumer(
                        stream,
                        group,
                        &consumer.name,
                        self.settings.cleanup_after,
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Ends every subscription of a group that no longer exists.
    fn close(&self, dispatch: &Arc<Dispatch>) {
        let mut dispatches = lock(&self.dispatches);
        if dispatches
            .get(&dispatch.key)
            .is_some_and(|live| Arc::ptr_eq(live, dispatch))
        {
            dispatches.remove(&dispatch.key);
        }
        // Dropping the consumers drops their senders, which ends their subscriptions.
        dispatch.state().consumers.clear();
        dispatch.stop.cancel();
    }
}

/// The dispatcher of one group: serves, then waits for the stream to grow, credit to free up,
/// or its claim timer.
async fn run(shared: Weak<Shared>, dispatch: Arc<Dispatch>, mut tail: TailWatch) {
    let Some(strong) = shared.upgrade() else {
        return;
    };
    let settings = strong.settings.clone();
    drop(strong);
    let mut claim_timer = tokio::time::interval(settings.claim_interval());
    claim_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cleanup_every =
        (settings.cleanup_after.as_millis() / 4 / settings.claim_interval().as_millis().max(1))
            .max(1);
    let mut ticks: u128 = 0;
    let mut failures = 0u32;
    let mut claim = false;
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // Whatever woke this loop, a tail that moved since the last look means new entries: if
        // the change were only marked seen here, a wake-up by another branch just after it would
        // swallow it, and the entries would wait for the claim timer.
        if tail.receiver.has_changed().unwrap_or(false) {
            dispatch.state().drained = false;
        }
        tail.receiver.borrow_and_update();
        let mut outcome = shared.serve(&dispatch).await;
        if outcome.is_ok() && (claim || dispatch.claim_requested.swap(false, Ordering::Relaxed)) {
            outcome = shared.claim(&dispatch).await;
            ticks += 1;
            if outcome.is_ok() && ticks.is_multiple_of(cleanup_every) {
                outcome = shared.clean_up(&dispatch).await;
            }
        }
        claim = false;
        match outcome {
            Ok(()) => failures = 0,
            Err(BackendError::GroupNotFound | BackendError::WrongType) => {
                tracing::info!(stream = %dispatch.key.0, group = %dispatch.key.1, "the group is gone; ending its consumers");
                let reason = match shared.backend.stream_info(&dispatch.key.0).await {
                    Err(BackendError::StreamNotFound | BackendError::WrongType) => {
                        EndReason::StreamDeleted
                    }
                    _ => EndReason::GroupDeleted,
                };
                let _ = dispatch.ended.set(reason);
                shared.close(&dispatch);
                return;
            }
            Err(error) => {
                // Consumers stay connected; reading resumes when the backend answers again.
                let delay = backoff_delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(%error, ?delay, stream = %dispatch.key.0, group = %dispatch.key.1, "group dispatch failed");
                drop(shared);
                tokio::select! {
                    _ = dispatch.stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                dispatch.state().drained = false;
                continue;
            }
        }
        drop(shared);
        tokio::select! {
            _ = dispatch.stop.cancelled() => return,
            changed = tail.receiver.changed() => {
                if changed.is_err() {
                    return;
                }
                dispatch.state().drained = false;
            }
            _ = dispatch.wake.notified() => {}
            _ = claim_timer.tick() => {
                claim = true;
                // A safety net: look for new entries too, whatever the watcher said.
                dispatch.state().drained = false;
            }
        }
    }
}
