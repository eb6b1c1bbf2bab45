//! The storage contract (`Backend`) and its implementations. A backend stores streams of entries
//! with Redis Streams semantics; it knows nothing about HTTP, JSON bodies or transports.
//!
//! Implementations are wrapped in the [`AnyBackend`] enum rather than boxed behind `dyn`, so the
//! trait can use plain `async` methods and the conformance suite can run against each one.

pub mod embedded;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

use crate::model::{ConsumerName, Entry, EntryId, GroupName, NewEntry, StreamName};

/// Reconnect delays: the first retry waits up to `BACKOFF_MIN`, doubling to at most `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Capped exponential backoff with jitter: a random delay between half and all of the cap for this
/// attempt, so instances losing the backend together do not retry in lockstep.
pub fn backoff_delay(attempt: u32) -> Duration {
    let cap = BACKOFF_MIN
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(BACKOFF_MAX);
    cap.mul_f64(rand::random_range(0.5..=1.0))
}

/// What went wrong in a backend call. Callers branch on these variants; everything they cannot
/// act on is `Internal`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The store cannot be reached or cannot serve now (connection down, loading, out of memory).
    /// Retrying later may succeed.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The stream does not exist.
    #[error("no such stream")]
    StreamNotFound,
    /// The consumer group (or its stream) does not exist.
    #[error("no such consumer group")]
    GroupNotFound,
    /// The key exists but holds something other than a stream.
    #[error("the key holds a value that is not a stream")]
    WrongType,
    /// An explicit entry id that cannot be used: `0-0`, not greater than the stream's last id, or
    /// in a batch of several entries.

    #[error("invalid entry id: {0}")]
    InvalidId(String),
    /// Anything else: a bug, a protocol surprise, a misconfiguration. Logged, never shown.
    #[error("backend failure: {0}")]
    Internal(String),
}

/// Retention applied when appending (from the request and the configured retention rules).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Trim approximately to at most this many entries (at least this many are kept).
    pub max_len: Option<u64>,
    /// Trim entries older than this (by the time in their id), approximately.
    pub max_age: Option<Duration>,
    /// Delete the whole stream after this long without a write.
    pub idle_ttl: Option<Duration>,
}

/// Makes an append happen at most once per key: a repeat of a key within its time to live writes
/// nothing and returns the ids of the first append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The client's key, already qualified by the kind of request it came with.
    pub key: String,
    /// How long the first result is remembered.
    pub ttl: Duration,
}

/// One append: entries for one stream, written together. An explicit entry id is accepted only
/// when appending a single entry (Redis cannot undo the rest of a batch when one id is refused).

#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub entries: Vec<NewEntry>,
    pub retention: Retention,
    pub idempotency: Option<IdempotencyKey>,
}

impl AppendRequest {
    /// Refuses explicit ids in batches (see the type's documentation).
    pub fn check_ids(&self) -> Result<(), BackendError> {
        if self.entries.len() > 1 && self.entries.iter().any(|entry| entry.id.is_some()) {
            return Err(BackendError::InvalidId(
                "explicit ids are only accepted for single appends".into(),
            ));
        }
        Ok(())
    }
}

/// The result of an append.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The ids of the entries, in request order.
    pub ids: Vec<EntryId>,
    /// True when an idempotency key matched an earlier append and nothing was written.
    pub replayed: bool,
}

/// Which way a range read walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// A read of a stream's history between two inclusive ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeQuery {
    pub start: EntryId,
    pub end: EntryId,
    pub count: usize,
    pub direction: Direction,
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupStart {
    /// After this id; `EntryId::MIN` delivers the whole history.
    After(EntryId),
    /// After the stream's last entry: only entries appended from now on.
    Latest,
}

/// What a group read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupCursor {
    /// Entries never delivered to the group (`>`), which become pending for the consumer.
    New,
    /// The consumer's own pending entries after this id, delivered again.
    PendingAfter(EntryId),
}

/// A read on behalf of one consumer of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupRead {
    pub cursor: GroupCursor,
    pub count: usize,
    /// At-most-once: delivered entries are not added to the pending list.
    pub no_ack: bool,
}

/// An entry delivered to a group consumer, with how often it has been delivered (this time
/// included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub entry: Entry,
    pub deliveries: u64,
}

/// The result of a group read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupBatch {
    pub deliveries: Vec<Delivery>,
    /// Pending entries that were deleted from the stream (only from `PendingAfter` reads); they
    /// stay pending until acknowledged.
    pub deleted: Vec<EntryId>,
}

/// One step of claiming idle pending entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimPage {
    /// Where the next step continues; `None` once the whole pending list has been scanned.
    pub next_cursor: Option<EntryId>,
    /// Entries now owned by the claiming consumer, their delivery count incremented.
    pub claimed: Vec<Delivery>,
    /// Pending entries whose stream entry was deleted; they were removed from the pending list.
    pub deleted: Vec<EntryId>,
}

/// One entry of a group's pending list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PendingEntry {
    pub id: EntryId,
    pub consumer: ConsumerName,
    /// Time since it was last delivered (or touched).
    #[serde(rename = "idle_ms", serialize_with = "as_millis")]
    #[schema(value_type = u64)]
    pub idle: Duration,
    pub deliveries: u64,
}

/// Which pending entries to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingQuery {
    pub start: EntryId,
    pub end: EntryId,
    pub count: usize,
    pub consumer: Option<ConsumerName>,
    pub min_idle: Option<Duration>,
}

impl PendingQuery {
    /// Everything, up to `count` entries.
    pub fn all(count: usize) -> PendingQuery {
        PendingQuery {
            start: EntryId::MIN,
            end: EntryId::MAX,
            count,
            consumer: None,
            min_idle: None,
        }
    }
}

/// A consumer of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ConsumerInfo {
    pub name: ConsumerName,
    pub pending: u64,
    /// Time since the consumer last read or claimed.
    #[serde(rename = "idle_ms", serialize_with = "as_millis")]
    #[schema(value_type = u64)]
    pub idle: Duration,
}

fn as_millis<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(duration.as_millis() as u64)
}

/// How to trim a stream exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trim {
    /// Keep at most this many of the newest entries.
    MaxLen(u64),
    /// Remove entries with smaller ids.
    MinId(EntryId),
}

/// A consumer group as seen by the administration routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct GroupInfo {
    pub name: GroupName,
    /// Consumers known to the group (live or not).
    pub consumers: u64,
    /// Entries delivered to the group and not yet acknowledged.
    pub pending: u64,
    /// The id of the last entry delivered to the group.
    pub last_delivered_id: EntryId,
    /// Entries in the stream not yet delivered to the group; `None` when the backend cannot tell
    /// (Redis, after deletions or for a group placed at an arbitrary id, until it reads).
    pub lag: Option<u64>,
}

/// Length and groups of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStats {
    pub length: u64,
    pub groups: Vec<GroupInfo>,
}

/// Everything the administration routes show about one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub length: u64,
    pub first_entry: Option<Entry>,
    pub last_entry: Option<Entry>,
    pub last_generated_id: EntryId,
    /// Entries ever added to the stream (including deleted or trimmed ones).
    pub entries_added: u64,
    /// The largest id ever deleted by id (`XDEL`; trimming does not count), or `0-0`.
    pub max_deleted_id: EntryId,
    pub groups: Vec<GroupInfo>,
}

/// A claim on one consumer name of a group: at most one connection holds it at a time, across
/// every instance sharing the backend. It lapses after its time to live unless renewed, so the
/// leases of an instance that died free themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub stream: StreamName,
    pub group: GroupName,
    pub consumer: ConsumerName,
    /// The holding connection, `<instance>:<connection>`.
    pub token: String,
}

impl Lease {
    /// The instance part of the token, with its separator (`<instance>:`).
    pub fn instance_prefix(&self) -> &str {
        match self.token.find(':') {
            Some(at) => &self.token[..=at],
            None => &self.token,
        }
    }
}

/// What one instance says about one consumer group it serves: its consumers there now, and the
/// messages delivered to and finished by them since they connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReport {
    pub stream: StreamName,
    pub group: GroupName,
    pub instance: String,
    pub consumers: u64,
    pub delivered: u64,
    pub finished: u64,
}

/// The storage contract every backend fulfils identically (checked by one conformance suite).
///
/// Semantics follow Redis Streams:
/// - Entry ids are `ms-seq`, strictly increasing within a stream, and never reused, even after the
///   entry is deleted or trimmed or when the wall clock goes backwards.
/// - Appends of several entries are atomic: either all are visible to readers or none is.
/// - A stream exists from its first append until it is deleted, flushed or expires after
///   `idle_ttl`; trimming it to zero entries does not delete it.
/// - Every method may fail with [`BackendError::Unavailable`] when the store cannot be reached;
///   nothing is then known to have been written, except that an append may have happened and its
///   reply was lost.
/// - Nothing here blocks for longer than one round trip unless its documentation says so.
/// - Consumer groups: each group has a last-delivered id and a pending list (entry id → owning
///   consumer, delivery count, time of last delivery). Reading new entries advances the
///   last-delivered id and (unless `no_ack`) adds them to the pending list; acknowledging removes
///   them; claiming moves idle ones to another consumer. Consumers are created by their first read
///   or claim.
pub trait Backend: Clone + Send + Sync + 'static {
    /// One round trip to the store.
    fn ping(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// A human-readable description of the store and its state (Redis `INFO` for Redis).
    fn server_info(&self) -> impl Future<Output = Result<String, BackendError>> + Send;

    /// Appends entries to a stream (creating it), applies the retention, and returns their ids.
    /// With an idempotency key, exactly one of any number of concurrent or repeated appends with
    /// that key (on that stream) writes; the others wait for it and return its ids.
    fn append(
        &self,
        stream: &StreamName,
        request: AppendRequest,
    ) -> impl Future<Output = Result<AppendOutcome, BackendError>> + Send;

    /// Entries between two inclusive ids, at most `count`, in the requested direction.
    /// [`BackendError::StreamNotFound`] when the stream does not exist.
    fn range(
        &self,
        stream: &StreamName,
        query: RangeQuery,
    ) -> impl Future<Output = Result<Vec<Entry>, BackendError>> + Send;

    /// The names of all streams, sorted, including streamgate's own.
    fn list_streams(&self) -> impl Future<Output = Result<Vec<StreamName>, BackendError>> + Send;

    /// Length and groups of a stream; [`BackendError::StreamNotFound`] when it does not exist.
    fn stream_stats(
        &self,
        stream: &StreamName,
    ) -> impl Future<Output = Result<StreamStats, BackendError>> + Send;

    /// Full information on a stream; [`BackendError::StreamNotFound`] when it does not exist.
    fn stream_info(
        &self,
        stream: &StreamName,
    ) -> impl Future<Output = Result<StreamInfo, BackendError>> + Send;

    /// Deletes every stream and every record streamgate keeps in the store.
    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Entries after each cursor, oldest first, at most `count` per stream, for the streams that
    /// have any. When none has, waits up to `block` (if given) for an append to one of them, and
    /// returns early (possibly empty) when `interrupt` resolves. Missing streams are waited on as
    /// empty ones. This is the only method that blocks.
    fn read_after(
        &self,
        cursors: &[(StreamName, EntryId)],
        count: usize,
        block: Option<Duration>,
        interrupt: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = Result<Vec<(StreamName, Vec<Entry>)>, BackendError>> + Send;

    /// Removes entries by id; returns how many existed.
    fn delete_entries(
        &self,
        stream: &StreamName,
        ids: &[EntryId],
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Trims exactly; returns how many entries were removed.
    fn trim(
        &self,
        stream: &StreamName,
        trim: Trim,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Deletes the stream with its groups; returns whether it existed.
    fn delete_stream(
        &self,
        stream: &StreamName,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Creates a group (and the stream, if missing); `false` when the group already existed.
    fn create_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        start: GroupStart,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Deletes a group with its pending list; returns whether it existed.
    fn destroy_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Moves a group's last-delivered id (its pending list is kept).
    fn set_group_position(
        &self,
        stream: &StreamName,
        group: &GroupName,
        start: GroupStart,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Reads for `consumer`; never blocks. [`BackendError::GroupNotFound`] without the group.
    fn read_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        read: GroupRead,
    ) -> impl Future<Output = Result<GroupBatch, BackendError>> + Send;

    /// Acknowledges entries (removing them from the pending list), and with `delete` also removes
    /// from the stream, atomically, those that were pending (an entry not pending for this group
    /// may still be needed by another); returns how many were pending.
    fn ack(
        &self,
        stream: &StreamName,
        group: &GroupName,
        ids: &[EntryId],
        delete: bool,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Scans the pending list from `cursor` and gives entries idle for at least `min_idle` to
    /// `consumer`, at most `count` of them (see [`ClaimPage`]).
    fn claim_idle(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        min_idle: Duration,
        cursor: EntryId,
        count: usize,
    ) -> impl Future<Output = Result<ClaimPage, BackendError>> + Send;

    /// Sets how long a pending entry counts as idle, keeping its owner and delivery count
    /// (0 restarts its visibility timeout; a large value makes it claimable at once). Returns
    /// whether the entry was pending.
    fn set_pending_idle(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
        idle: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Pending entries, oldest first.
    fn pending(
        &self,
        stream: &StreamName,
        group: &GroupName,
        query: PendingQuery,
    ) -> impl Future<Output = Result<Vec<PendingEntry>, BackendError>> + Send;

    /// The group's consumers.
    fn consumers(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> impl Future<Output = Result<Vec<ConsumerInfo>, BackendError>> + Send;

    /// Removes a consumer, atomically checking that it has no pending entries and has been idle
    /// for at least `min_idle` (so no entry is ever dropped from the pending list). Returns
    /// whether it was removed.
    fn remove_idle_consumer(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        min_idle: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// The name of `stream`'s dead-letter stream: `{stream}:dlq`. On a Redis Cluster a name in
    /// the stream's hash slot, so that dead-lettering stays atomic: `{stream}:dlq` with the name
    /// between braces, unless the name has a hash tag of its own (then `{stream}:dlq` as is).
    fn dead_letter_stream(&self, stream: &StreamName) -> StreamName {
        stream.dead_letter()
    }

    /// Atomically appends `fields` to `dead_letter` and acknowledges `id` in the group.
    fn dead_letter(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
        dead_letter: &StreamName,
        fields: Vec<(bytes::Bytes, bytes::Bytes)>,
    ) -> impl Future<Output = Result<EntryId, BackendError>> + Send;

    /// Appends entries exactly as given, ids and fields (a copy from another store): the ids
    /// must be increasing and follow the stream's last id ([`BackendError::InvalidId`]
    /// otherwise). Readers see all of them or none; when some ids are refused, the embedded
    /// engine writes none, Redis (`MULTI`/`EXEC`, not undone) the ones after them.
    fn import(
        &self,
        stream: &StreamName,
        entries: Vec<Entry>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Sets the stream's id generator and counters (`XSETID`), creating an empty stream if
    /// needed: later appends get ids after `last_id`, which may not be below the newest entry.
    fn set_last_id(
        &self,
        stream: &StreamName,
        last_id: EntryId,
        entries_added: u64,
        max_deleted_id: EntryId,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Puts entries in a group's pending list with the given owner, delivery count and idle time
    /// (`XCLAIM … FORCE`), replacing what was there; entries missing from the stream are left
    /// out. Returns how many were restored.
    fn restore_pending(
        &self,
        stream: &StreamName,
        group: &GroupName,
        pending: &[PendingEntry],
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;

    // Coordination of the instances that share the backend. None of these grows with the number
    // of messages: they follow connections, groups and instances.

    /// Takes a consumer lease for `ttl` when nobody holds it, or when a connection of the same
    /// instance (the token's `<instance>:` prefix) does: the caller knows that connection has
    /// ended. `false` when another instance's connection holds it.
    fn acquire_lease(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Extends leases for `ttl`, taking back any that lapsed while nobody else took it; `false`
    /// for each that another connection holds now.
    fn renew_leases(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<bool>, BackendError>> + Send;

    /// Gives a lease up, if its token still holds it.
    fn release_lease(&self, lease: &Lease)
    -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Publishes one instance's reports on the groups it serves, each valid for `ttl` (a report
    /// replaces the instance's earlier one for the same group).
    fn report_groups(
        &self,
        reports: &[GroupReport],
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Every instance's reports that are still valid.
    fn group_reports(&self) -> impl Future<Output = Result<Vec<GroupReport>, BackendError>> + Send;

    /// Sets a group's consumer limit for every instance.
    fn set_group_limit(
        &self,
        stream: &StreamName,
        group: &GroupName,
        limit: u32,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// The limits set for these groups, in order (`None` where none was set).
    fn group_limits(
        &self,
        groups: &[(StreamName, GroupName)],
    ) -> impl Future<Output = Result<Vec<Option<u32>>, BackendError>> + Send;

    /// Sends a control message to every instance sharing the backend, this one included, if
    /// they are listening now (nothing is stored: a missed message is not sent again).
    fn publish_control(
        &self,
        payload: bytes::Bytes,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Control messages from now on. A receiver that falls behind skips messages (it is told).
    fn control_messages(&self) -> tokio::sync::broadcast::Receiver<bytes::Bytes>;
}

/// The configured backend.
#[derive(Clone)]
pub enum AnyBackend {
    Redis(redis::RedisBackend),
    Embedded(embedded::EmbeddedBackend),
}

/// Calls the same method on whichever backend is configured.
macro_rules! dispatch {
    ($self:ident, $backend:ident => $call:expr) => {
        match $self {
            AnyBackend::Redis($backend) => $call,
            AnyBackend::Embedded($backend) => $call,
        }
    };
}

impl AnyBackend {
    /// `"redis"` or `"embedded"`.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyBackend::Redis(_) => "redis",
            AnyBackend::Embedded(_) => "embedded",
        }
    }

    /// Where the data lives, for banners and health output (never contains credentials).
    pub fn address(&self) -> String {
        match self {
            AnyBackend::Redis(backend) => backend.address().to_owned(),
            AnyBackend::Embedded(backend) => match backend.storage() {
                Some((path, _)) => path.display().to_string(),
                None => "in memory".to_owned(),
            },
        }
    }
}

impl Backend for AnyBackend {
    async fn ping(&self) -> Result<(), BackendError> {
        dispatch!(self, backend => backend.ping().await)
    }

    async fn server_info(&self) -> Result<String, BackendError> {
        dispatch!(self, backend => backend.server_info().await)
    }

    async fn append(
        &self,
        stream: &StreamName,
        request: AppendRequest,
    ) -> Result<AppendOutcome, BackendError> {
        dispatch!(self, backend => backend.append(stream, request).await)
    }

    async fn range(
        &self,
        stream: &StreamName,
        query: RangeQuery,
    ) -> Result<Vec<Entry>, BackendError> {
        dispatch!(self, backend => backend.range(stream, query).await)
    }

    async fn list_streams(&self) -> Result<Vec<StreamName>, BackendError> {
        dispatch!(self, backend => backend.list_streams().await)
    }

    async fn stream_stats(&self, stream: &StreamName) -> Result<StreamStats, BackendError> {
        dispatch!(self, backend => backend.stream_stats(stream).await)
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo, BackendError> {
        dispatch!(self, backend => backend.stream_info(stream).await)
    }

    async fn flush(&self) -> Result<(), BackendError> {
        dispatch!(self, backend => backend.flush().await)
    }

    async fn read_after(
        &self,
        cursors: &[(StreamName, EntryId)],
        count: usize,
        block: Option<Duration>,
        interrupt: impl Future<Output = ()> + Send,
    ) -> Result<Vec<(StreamName, Vec<Entry>)>, BackendError> {
        dispatch!(self, backend => backend.read_after(cursors, count, block, interrupt).await)
    }

    async fn delete_entries(
        &self,
        stream: &StreamName,
        ids: &[EntryId],
    ) -> Result<u64, BackendError> {
        dispatch!(self, backend => backend.delete_entries(stream, ids).await)
    }

    async fn trim(&self, stream: &StreamName, trim: Trim) -> Result<u64, BackendError> {
        dispatch!(self, backend => backend.trim(stream, trim).await)
    }

    async fn delete_stream(&self, stream: &StreamName) -> Result<bool, BackendError> {
        dispatch!(self, backend => backend.delete_stream(stream).await)
    }

    async fn create_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        start: GroupStart,
    ) -> Result<bool, BackendError> {
        dispatch!(self, backend => backend.create_group(stream, group, start).await)
    }

    async fn destroy_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<bool, BackendError> {
        dispatch!(self, backend => backend.destroy_group(stream, group).await)
    }

    async fn set_group_position(
        &self,
        stream: &StreamName,
        group: &GroupName,
        start: GroupStart,
    ) -> Result<(), BackendError> {
        dispatch!(self, backend => backend.set_group_position(stream, group, start).await)
    }

    async fn read_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        read: GroupRead,
    ) -> Result<GroupBatch, BackendError> {
        dispatch!(self, backend => backend.read_group(stream, group, consumer, read).await)
    }

    async fn ack(
        &self,
        stream: &StreamName,
        group: &GroupName,
        ids: &[EntryId],
        delete: bool,
    ) -> Result<u64, BackendError> {
        dispatch!(self, backend => backend.ack(stream, group, ids, delete).await)
    }

    async fn claim_idle(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        min_idle: Duration,
        cursor: EntryId,
        count: usize,
    ) -> Result<ClaimPage, BackendError> {
        dispatch!(self, backend => backend.claim_idle(stream, group, consumer, min_idle, cursor, count).await)
    }

    async fn set_pending_idle(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
        idle: Duration,
    ) -> Result<bool, BackendError> {
        dispatch!(self, backend => backend.set_pending_idle(stream, group, id, idle).await)
    }

    async fn pending(
        &self,
        stream: &StreamName,
        group: &GroupName,
        query: PendingQuery,
    ) -> Result<Vec<PendingEntry>, BackendError> {
        dispatch!(self, backend => backend.pending(stream, group, query).await)
    }

    async fn consumers(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Vec<ConsumerInfo>, BackendError> {
        dispatch!(self, backend => backend.consumers(stream, group).await)
    }

    async fn remove_idle_consumer(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        min_idle: Duration,
    ) -> Result<bool, BackendError> {
        dispatch!(self, backend => backend.remove_idle_consumer(stream, group, consumer, min_idle).await)
    }

    fn dead_letter_stream(&self, stream: &StreamName) -> StreamName {
        dispatch!(self, backend => backend.dead_letter_stream(stream))
    }

    async fn dead_letter(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
        dead_letter: &StreamName,
        fields: Vec<(bytes::Bytes, bytes::Bytes)>,
    ) -> Result<EntryId, BackendError> {
        dispatch!(self, backend => backend.dead_letter(stream, group, id, dead_letter, fields).await)
    }

    async fn import(&self, stream: &StreamName, entries: Vec<Entry>) -> Result<(), BackendError> {
        dispatch!(self, backend => backend.import(stream, entries).await)
    }

    async fn set_last_id(
        &self,
        stream: &StreamName,
        last_id: EntryId,
        entries_added: u64,
        max_deleted_id: EntryId,
    ) -> Result<(), BackendError> {
        dispatch!(self, backend => backend.set_last_id(stream, last_id, entries_added, max_deleted_id).await)
    }

    async fn restore_pending(
        &self,
        stream: &StreamName,
        group: &GroupName,
        pending: &[PendingEntry],
    ) -> Result<u64, BackendError> {
        dispatch!(self, backend => backend.restore_pending(stream, group, pending).await)
    }

    async fn acquire_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, BackendError> {
        dispatch!(self, backend => backend.acquire_lease(lease, ttl).await)
    }

    async fn renew_leases(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> Result<Vec<bool>, BackendError> {
        dispatch!(self, backend => backend.renew_leases(leases, ttl).await)
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), BackendError> {
        dispatch!(self, backend => backend.release_lease(lease).await)
    }

    async fn report_groups(
        &self,
        reports: &[GroupReport],
        ttl: Duration,
    ) -> Result<(), BackendError> {
        dispatch!(self, backend => backend.report_groups(reports, ttl).await)
    }

    async fn group_reports(&self) -> Result<Vec<GroupReport>, BackendError> {
        dispatch!(self, backend => backend.group_reports().await)
    }

    async fn set_group_limit(
        &self,
        stream: &StreamName,
        group: &GroupName,
        limit: u32,
    ) -> Result<(), BackendError> {
        dispatch!(self, backend => backend.set_group_limit(stream, group, limit).await)
    }

    async fn group_limits(
        &self,
        groups: &[(StreamName, GroupName)],
    ) -> Result<Vec<Option<u32>>, BackendError> {
        dispatch!(self, backend => backend.group_limits(groups).await)
    }

    async fn publish_control(&self, payload: bytes::Bytes) -> Result<(), BackendError> {
        dispatch!(self, backend => backend.publish_control(payload).await)
    }

    fn control_messages(&self) -> tokio::sync::broadcast::Receiver<bytes::Bytes> {
        dispatch!(self, backend => backend.control_messages())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..40 {
            let delay = backoff_delay(attempt);
            let cap = BACKOFF_MIN
                .saturating_mul(2u32.saturating_pow(attempt.min(16)))
                .min(BACKOFF_MAX);
            assert!(
                delay <= cap && delay >= cap / 2,
                "attempt {attempt}: {delay:?}"
            );
        }
        assert!(backoff_delay(30) <= BACKOFF_MAX);
    }
}
