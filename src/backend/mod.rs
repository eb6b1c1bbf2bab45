//! The storage contract (`Backend`) and its implementations. A backend stores streams of entries
//! with Redis Streams semantics; it knows nothing about HTTP, JSON bodies or transports.
//!
//! Implementations are wrapped in the [`AnyBackend`] enum rather than boxed behind `dyn`, so the
//! trait can use plain `async` methods and the conformance suite can run against each one.

pub mod redis;

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

use crate::model::{Entry, EntryId, GroupName, NewEntry, StreamName};

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
    /// The key exists but holds something other than a stream.
    #[error("the key holds a value that is not a stream")]
    WrongType,
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

/// One append: entries for one stream, written together.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub entries: Vec<NewEntry>,
    pub retention: Retention,
    pub idempotency: Option<IdempotencyKey>,
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

/// A consumer group as seen by the administration routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    pub name: GroupName,
    /// Consumers known to the group (live or not).
    pub consumers: u64,
    /// Entries delivered to the group and not yet acknowledged.
    pub pending: u64,
    /// The id of the last entry delivered to the group.
    pub last_delivered_id: EntryId,
    /// Entries in the stream not yet delivered to the group; `None` when the backend cannot tell
    /// (Redis after some deletions).
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
    pub groups: Vec<GroupInfo>,
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
}

/// The configured backend.
#[derive(Clone)]
pub enum AnyBackend {
    Redis(redis::RedisBackend),
}

/// Calls the same method on whichever backend is configured.
macro_rules! dispatch {
    ($self:ident, $backend:ident => $call:expr) => {
        match $self {
            AnyBackend::Redis($backend) => $call,
        }
    };
}

impl AnyBackend {
    /// `"redis"` or `"embedded"`.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyBackend::Redis(_) => "redis",
        }
    }

    /// Where the data lives, for banners and health output (never contains credentials).
    pub fn address(&self) -> String {
        match self {
            AnyBackend::Redis(backend) => backend.address().to_owned(),
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
}
