//! The embedded backend: an in-process stream engine with Redis Streams semantics, the default
//! when no Redis is configured. Data lives in memory and is lost on exit.
//!
//! Concurrency: a map from stream name to a cell, each cell with its own mutex, so writers to
//! different streams never wait for each other; the map's lock is taken briefly to find or create
//! a cell. Locks are `std::sync` and never held across `.await`. Lock order: idempotency records,
//! then the map, then cells (two cells in name order).
//!
//! Blocking reads subscribe to their streams' append signal before looking at the data, so an
//! append between the look and the wait cannot be missed; appends wake them at once (no polling).

mod stream;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::stream::{Fields, Now, StreamState};
use super::{
    AppendOutcome, AppendRequest, Backend, BackendError, ClaimPage, ConsumerInfo, GroupBatch,
    GroupRead, GroupStart, PendingEntry, PendingQuery, RangeQuery, StreamInfo, StreamStats, Trim,
};
use crate::model::{ConsumerName, Entry, EntryId, GroupName, NewEntry, StreamName, now_ms};

/// How often expired streams, unused cells and old idempotency records are swept away.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// One stream's place in the engine.
struct Cell {
    state: Mutex<StreamState>,
    /// Bumped after every append; blocked readers wait on it.
    appended: watch::Sender<()>,
}

impl Cell {
    fn new() -> Cell {
        Cell {
            state: Mutex::new(StreamState::default()),
            appended: watch::Sender::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

struct IdempotencyRecord {
    ids: Vec<EntryId>,
    expires_at: Instant,
}

struct Engine {
    started: Instant,
    streams: RwLock<HashMap<StreamName, Arc<Cell>>>,
    idempotency: Mutex<HashMap<(StreamName, String), IdempotencyRecord>>,
}

/// The embedded backend. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedBackend {
    engine: Arc<Engine>,
}

impl Engine {
    fn now(&self) -> Now {
        Now {
            wall_ms: now_ms(),
            mono_ms: self.started.elapsed().as_millis() as i64,
        }
    }

    fn mono_ms(&self) -> i64 {
        self.now().mono_ms
    }

    /// The stream's cell, created (as a stream that does not exist yet) when missing.
    fn cell(&self, stream: &StreamName) -> Arc<Cell> {
        if let Some(cell) = self
            .streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream)
        {
            return cell.clone();
        }
        let mut streams = self.streams.write().unwrap_or_else(|p| p.into_inner());
        streams
            .entry(stream.clone())
            .or_insert_with(|| Arc::new(Cell::new()))
            .clone()
    }

    /// The cell and a subscription to its appends, taken together under the map's lock so the
    /// sweeper cannot remove the cell in between.
    fn subscribe(&self, stream: &StreamName) -> (Arc<Cell>, watch::Receiver<()>) {
        {
            let streams = self.streams.read().unwrap_or_else(|p| p.into_inner());
            if let Some(cell) = streams.get(stream) {
                return (cell.clone(), cell.appended.subscribe());
            }
        }
        let mut streams = self.streams.write().unwrap_or_else(|p| p.into_inner());
        let cell = streams
            .entry(stream.clone())
            .or_insert_with(|| Arc::new(Cell::new()))
            .clone();
        let receiver = cell.appended.subscribe();
        (cell, receiver)
    }

    /// Runs `f` on the state of an existing stream; `None` when the stream does not exist.
    fn read<T>(&self, stream: &StreamName, f: impl FnOnce(&mut StreamState) -> T) -> Option<T> {
        let cell = self
            .streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream)
            .cloned()?;
        let mut state = cell.lock();
        state.expire(Instant::now());
        state.exists.then(|| f(&mut state))
    }

    /// Runs `f` on the stream's state, creating the cell if needed (`f` decides whether the
    /// stream comes to exist).
    fn write<T>(&self, stream: &StreamName, f: impl FnOnce(&mut StreamState) -> T) -> T {
        let cell = self.cell(stream);
        let mut state = cell.lock();
        state.expire(Instant::now());
        f(&mut state)
    }

    /// Appends every entry or none, applies the retention, and wakes blocked readers.
    fn append(
        &self,
        stream: &StreamName,
        request: &AppendRequest,
    ) -> Result<Vec<EntryId>, BackendError> {
        let cell = self.cell(stream);
        let ids = {
            let mut state = cell.lock();
            let now = self.now();
            state.expire(Instant::now());
            let entries = request
                .entries
                .iter()
                .map(|entry| (entry.id, stored_fields(entry)));
            let ids = state.append_all(entries, now)?;
            let retention = request.retention;
            if let Some(max_len) = retention.max_len {
                state.trim(Trim::MaxLen(max_len));
            }
            if let Some(max_age) = retention.max_age {
                let min_ms = now.wall_ms.saturating_sub(max_age.as_millis() as u64);
                state.trim(Trim::MinId(EntryId::new(min_ms, 0)));
            }
            state.expires_at = retention.idle_ttl.map(|ttl| Instant::now() + ttl);
            ids
        };
        cell.appended.send_replace(());
        Ok(ids)
    }

    /// Removes what has expired and what nobody uses.
    fn sweep(&self) {
        let now = Instant::now();
        let mut streams = self.streams.write().unwrap_or_else(|p| p.into_inner());
        streams.retain(|_, cell| {
            let mut state = cell.lock();
            state.expire(now);
            // Only the map holds an unused cell, and nobody can take it while the map is locked.
            state.exists || Arc::strong_count(cell) > 1 || cell.appended.receiver_count() > 0
        });
        drop(streams);
        let mut records = self.idempotency.lock().unwrap_or_else(|p| p.into_inner());
        records.retain(|_, record| record.expires_at > now);
    }
}

/// An entry's fields as the engine stores them: its own compact copy, since a slice of the
/// request body would keep the whole body alive for as long as the entry.
fn stored_fields(entry: &NewEntry) -> Fields {
    entry
        .fields()
        .into_iter()
        .map(|(field, value)| {
            (
                Bytes::copy_from_slice(&field),
                Bytes::copy_from_slice(&value),
            )
        })
        .collect::<Vec<_>>()
        .into()
}

impl EmbeddedBackend {
    /// A new, empty engine whose sweeper runs until `shutdown`.
    pub fn start(shutdown: CancellationToken) -> EmbeddedBackend {
        let engine = Arc::new(Engine {
            started: Instant::now(),
            streams: RwLock::new(HashMap::new()),
            idempotency: Mutex::new(HashMap::new()),
        });
        tokio::spawn(sweep_until(Arc::downgrade(&engine), shutdown));
        EmbeddedBackend { engine }
    }
}

async fn sweep_until(engine: Weak<Engine>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let Some(engine) = engine.upgrade() else {
            return;
        };
        engine.sweep();
    }
}

fn missing_group<T>() -> Result<T, BackendError> {
    Err(BackendError::GroupNotFound)
}

impl Backend for EmbeddedBackend {
    async fn ping(&self) -> Result<(), BackendError> {
        Ok(())
    }

    async fn server_info(&self) -> Result<String, BackendError> {
        let streams = self.list_streams().await?;
        let (mut entries, mut groups) = (0u64, 0usize);
        for stream in &streams {
            if let Some(stats) = self.engine.read(stream, |state| state.stats()) {
                entries += stats.length;
                groups += stats.groups.len();
            }
        }
        Ok(format!(
            "# streamgate embedded engine\r\nengine_version:{}\r\nstorage:memory\r\nuptime_in_seconds:{}\r\nstreams:{}\r\nentries:{entries}\r\ngroups:{groups}\r\n",
            env!("CARGO_PKG_VERSION"),
            self.engine.started.elapsed().as_secs(),
            streams.len(),
        ))
    }

    async fn append(
        &self,
        stream: &StreamName,
        request: AppendRequest,
    ) -> Result<AppendOutcome, BackendError> {
        request.check_ids()?;

        let Some(key) = &request.idempotency else {
            let ids = self.engine.append(stream, &request)?;
            return Ok(AppendOutcome {
                ids,
                replayed: false,
            });
        };
        // The records' lock is held across the (synchronous) append, so racing requests with one
        // key are served one after another: the first writes, the others see its record.
        let mut records = self
            .engine
            .idempotency
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let record_key = (stream.clone(), key.key.clone());
        let now = Instant::now();
        if let Some(record) = records
            .get(&record_key)
            .filter(|record| record.expires_at > now)
        {
            return Ok(AppendOutcome {
                ids: record.ids.clone(),
                replayed: true,
            });
        }
        let ids = self.engine.append(stream, &request)?;
        records.insert(
            record_key,
            IdempotencyRecord {
                ids: ids.clone(),
                expires_at: now + key.ttl,
            },
        );
        Ok(AppendOutcome {
            ids,
            replayed: false,
        })
    }

    async fn range(
        &self,
        stream: &StreamName,
        query: RangeQuery,
    ) -> Result<Vec<Entry>, BackendError> {
        self.engine
            .read(stream, |state| state.range(query))
            .ok_or(BackendError::StreamNotFound)
    }

    async fn list_streams(&self) -> Result<Vec<StreamName>, BackendError> {
        let cells: Vec<(StreamName, Arc<Cell>)> = {
            let streams = self
                .engine
                .streams
                .read()
                .unwrap_or_else(|p| p.into_inner());
            streams
                .iter()
                .map(|(name, cell)| (name.clone(), cell.clone()))
                .collect()
        };
        let now = Instant::now();
        let mut names: Vec<StreamName> = cells
            .into_iter()
            .filter(|(_, cell)| {
                let mut state = cell.lock();
                state.expire(now);
                state.exists
            })
            .map(|(name, _)| name)
            .collect();
        names.sort();
        Ok(names)
    }

    async fn stream_stats(&self, stream: &StreamName) -> Result<StreamStats, BackendError> {
        self.engine
            .read(stream, |state| state.stats())
            .ok_or(BackendError::StreamNotFound)
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo, BackendError> {
        self.engine
            .read(stream, |state| state.info())
            .ok_or(BackendError::StreamNotFound)
    }

    async fn flush(&self) -> Result<(), BackendError> {
        let mut records = self
            .engine
            .idempotency
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        records.clear();
        let streams = self
            .engine
            .streams
            .read()
            .unwrap_or_else(|p| p.into_inner());
        for cell in streams.values() {
            cell.lock().clear();
        }
        Ok(())
    }

    async fn read_after(
        &self,
        cursors: &[(StreamName, EntryId)],
        count: usize,
        block: Option<Duration>,
        interrupt: impl Future<Output = ()> + Send,
    ) -> Result<Vec<(StreamName, Vec<Entry>)>, BackendError> {
        let deadline = block.map(|block| tokio::time::Instant::now() + block);
        let mut interrupt = std::pin::pin!(interrupt);
        loop {
            let mut receivers = Vec::with_capacity(cursors.len());
            let mut found = Vec::new();
            for (stream, after) in cursors {
                let (cell, receiver) = self.engine.subscribe(stream);
                receivers.push(receiver);
                let mut state = cell.lock();
                state.expire(Instant::now());
                if state.exists {
                    let entries = state.after(*after, count);
                    if !entries.is_empty() {
                        found.push((stream.clone(), entries));
                    }
                }
            }
            let Some(deadline) = deadline.filter(|_| found.is_empty()) else {
                return Ok(found);
            };
            let appended = futures_util::future::select_all(
                receivers
                    .iter_mut()
                    .map(|receiver| Box::pin(receiver.changed())),
            );
            tokio::select! {
                _ = appended => continue,
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
                _ = &mut interrupt => return Ok(Vec::new()),
            }
        }
    }

    async fn delete_entries(
        &self,
        stream: &StreamName,
        ids: &[EntryId],
    ) -> Result<u64, BackendError> {
        Ok(self
            .engine
            .read(stream, |state| state.delete(ids))
            .unwrap_or(0))
    }

    async fn trim(&self, stream: &StreamName, trim: Trim) -> Result<u64, BackendError> {
        Ok(self
            .engine
            .read(stream, |state| state.trim(trim))
            .unwrap_or(0))
    }

    async fn delete_stream(&self, stream: &StreamName) -> Result<bool, BackendError> {
        Ok(self.engine.read(stream, |state| state.clear()).is_some())
    }

    async fn create_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        start: GroupStart,
    ) -> Result<bool, BackendError> {
        Ok(self
            .engine
            .write(stream, |state| state.create_group(group, start)))
    }

    async fn destroy_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<bool, BackendError> {
        Ok(self
            .engine
            .read(stream, |state| state.destroy_group(group))
            .unwrap_or(false))
    }

    async fn set_group_position(
        &self,
        stream: &StreamName,
        group: &GroupName,
        start: GroupStart,
    ) -> Result<(), BackendError> {
        self.engine
            .read(stream, |state| state.set_group_position(group, start))
            .unwrap_or_else(missing_group)
    }

    async fn read_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        read: GroupRead,
    ) -> Result<GroupBatch, BackendError> {
        let now = self.engine.mono_ms();
        self.engine
            .read(stream, |state| {
                let read = GroupRead {
                    count: read.count.max(1),
                    ..read
                };
                state.read_group(group, consumer, read, now)
            })
            .unwrap_or_else(missing_group)
    }

    async fn ack(
        &self,
        stream: &StreamName,
        group: &GroupName,
        ids: &[EntryId],
        delete: bool,
    ) -> Result<u64, BackendError> {
        Ok(self
            .engine
            .read(stream, |state| state.ack(group, ids, delete))
            .unwrap_or(0))
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
        let now = self.engine.mono_ms();
        self.engine
            .read(stream, |state| {
                state.claim_idle(group, consumer, min_idle, cursor, count.max(1), now)
            })
            .unwrap_or_else(missing_group)
    }

    async fn set_pending_idle(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
        idle: Duration,
    ) -> Result<bool, BackendError> {
        let now = self.engine.mono_ms();
        self.engine
            .read(stream, |state| state.set_pending_idle(group, id, idle, now))
            .unwrap_or_else(missing_group)
    }

    async fn pending(
        &self,
        stream: &StreamName,
        group: &GroupName,
        query: PendingQuery,
    ) -> Result<Vec<PendingEntry>, BackendError> {
        let now = self.engine.mono_ms();
        self.engine
            .read(stream, |state| state.pending(group, &query, now))
            .unwrap_or_else(missing_group)
    }

    async fn consumers(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Vec<ConsumerInfo>, BackendError> {
        let now = self.engine.mono_ms();
        self.engine
            .read(stream, |state| state.consumers(group, now))
            .unwrap_or_else(missing_group)
    }

    async fn remove_idle_consumer(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        min_idle: Duration,
    ) -> Result<bool, BackendError> {
        let now = self.engine.mono_ms();
        self.engine
            .read(stream, |state| {
                state.remove_idle_consumer(group, consumer, min_idle, now)
            })
            .unwrap_or_else(missing_group)
    }

    async fn dead_letter(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
        dead_letter: &StreamName,
        fields: Vec<(Bytes, Bytes)>,
    ) -> Result<EntryId, BackendError> {
        if stream == dead_letter {
            return Err(BackendError::Internal(
                "a stream cannot be its own dead-letter stream".into(),
            ));
        }
        let (source, target) = (self.engine.cell(stream), self.engine.cell(dead_letter));
        let dead_id = {
            // Two cells, locked in name order (the engine-wide rule that rules out deadlocks).
            let (mut source_state, mut target_state) = if stream <= dead_letter {
                let source_state = source.lock();
                (source_state, target.lock())
            } else {
                let target_state = target.lock();
                (source.lock(), target_state)
            };
            let now = self.engine.now();
            source_state.expire(Instant::now());
            if !source_state.exists {
                return missing_group();
            }
            target_state.expire(Instant::now());
            let dead_id = target_state.append(None, fields.into(), now)?;
            source_state.ack(group, &[id], false);
            dead_id
        };
        target.appended.send_replace(());
        Ok(dead_id)
    }
}
