//! The embedded backend: an in-process stream engine with Redis Streams semantics, the default
//! when no Redis is configured. It keeps its data on disk (`disk.rs`, in `storage.path`) or, with
//! `--in-memory`, only in memory.
//!
//! Every operation runs through one place, [`Engine::change`]: it locks the stream, applies the
//! operation to its state (`stream.rs`), and stores what the operation recorded as changed before
//! the lock is released, so the disk sees each stream's changes in the order they happened. The
//! answer then waits for stable storage when `storage.fsync = always`.
//!
//! Concurrency: a map from stream name to a cell, each cell with its own mutex, so writers to
//! different streams never wait for each other; the map's lock is taken briefly to find or create
//! a cell. Locks are `std::sync` and never held across `.await`. Lock order: idempotency records,
//! then the map, then cells (two cells in name order).
//!
//! Blocking reads subscribe to their streams' append signal before looking at the data, so an
//! append between the look and the wait cannot be missed; appends wake them at once (no polling).

mod coordination;
mod disk;
mod entries;
mod stream;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::coordination::Coordination;
use self::disk::Disk;
pub use self::disk::{DiskOptions, FsyncPolicy, OpenError};
use self::entries::Entries;
use self::stream::{Changes, ClaimScan, Fields, Now, Remember, StreamState, TrimRule};
use super::{
    AppendOutcome, AppendRequest, Backend, BackendError, ClaimPage, ConsumerInfo, GroupBatch,
    GroupRead, GroupReport, GroupStart, Lease, PendingEntry, PendingQuery, RangeQuery, StreamInfo,
    StreamStats, Trim,
};
use crate::model::{ConsumerName, Entry, EntryId, GroupName, NewEntry, StreamName, now_ms};

/// How often expired streams, unused cells, old idempotency records and deleted streams' entries
/// are swept away.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Records removed from disk in one step of a sweep: expired idempotency records are removed
/// while holding the lock idempotent appends take, so a step is short.
const SWEEP_STEP: usize = 1_000;

/// Longest a sweep keeps removing records from disk before leaving the rest to the next one.
const SWEEP_BUDGET: Duration = Duration::from_millis(200);

/// Most entries one step of a trim removes while holding the stream's lock.
const TRIM_STEP: usize = 10_000;

/// One stream's place in the engine.
struct Cell {
    state: Mutex<StreamState>,
    /// Bumped after every append; blocked readers wait on it.
    appended: watch::Sender<()>,
}

impl Cell {
    fn new(state: StreamState) -> Cell {
        Cell {
            state: Mutex::new(state),
            appended: watch::Sender::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Idempotency records kept in memory (`--in-memory`; on disk they are in the store): the ids
/// of the first append and when the record expires (ms).
type MemoryRecords = HashMap<(StreamName, String), (Vec<EntryId>, u64)>;

struct Engine {
    streams: RwLock<HashMap<StreamName, Arc<Cell>>>,
    /// Held across an idempotent append (a synchronous section), so that racing requests with
    /// one key are served one after another: the first writes, the others see its record.
    idempotency: Mutex<MemoryRecords>,
    /// The store on disk; `None` in memory.
    disk: Option<Arc<Disk>>,
    /// Leases, group reports, limits and control messages (in memory: one process).
    coordination: Coordination,
}

/// The embedded backend. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedBackend {
    engine: Arc<Engine>,
}

fn now() -> Now {
    Now { ms: now_ms() }
}

/// A stream's state and the changes made to it, as the engine stores them.
type Changed<'a> = (&'a StreamName, &'a mut StreamState, &'a Changes);

impl Engine {
    /// A state for a stream that does not exist yet.
    fn new_state(&self) -> StreamState {
        StreamState::new(match &self.disk {
            Some(disk) => Entries::disk(disk),
            None => Entries::memory(),
        })
    }

    fn check(&self) -> Result<(), BackendError> {
        self.disk.as_ref().map_or(Ok(()), |disk| disk.check())
    }

    /// Resolves once every change stored so far is durable under the fsync policy.
    async fn durable(&self) -> Result<(), BackendError> {
        match &self.disk {
            Some(disk) => disk.durable().await,
            None => Ok(()),
        }
    }

    fn existing_cell(&self, stream: &StreamName) -> Option<Arc<Cell>> {
        self.streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream)
            .cloned()
    }

    /// The stream's cell, created (as a stream that does not exist yet) when missing.
    fn cell(&self, stream: &StreamName) -> Arc<Cell> {
        if let Some(cell) = self.existing_cell(stream) {
            return cell;
        }
        let mut streams = self.streams.write().unwrap_or_else(|p| p.into_inner());
        streams
            .entry(stream.clone())
            .or_insert_with(|| Arc::new(Cell::new(self.new_state())))
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
            .or_insert_with(|| Arc::new(Cell::new(self.new_state())))
            .clone();
        let receiver = cell.appended.subscribe();
        (cell, receiver)
    }

    /// Stores what changed in one or more streams, together: on disk in one atomic batch, in
    /// memory by applying the entries written or removed.
    fn store(&self, changed: &mut [Changed<'_>]) -> Result<(), BackendError> {
        let Some(disk) = &self.disk else {
            for (_, state, changes) in changed.iter_mut() {
                state.entries.apply(changes);
            }
            return Ok(());
        };
        if changed.iter().all(|(_, _, changes)| changes.is_empty()) {
            return Ok(());
        }
        let mut batch = disk.batch();
        for (name, state, changes) in changed.iter() {
            batch.stream(name, state, changes)?;
            if let Some(remember) = &changes.remember {
                batch.idempotency(name, &remember.key, &remember.ids, remember.expires_at);
            }
        }
        batch.commit()
    }

    /// Runs `op` on a stream's state under its lock, after expiring the stream if its time has
    /// come, and stores what changed. Without `create`, a stream that does not exist is not
    /// touched and the answer is `None`.
    fn change<T>(
        &self,
        stream: &StreamName,
        create: bool,
        op: impl FnOnce(&mut StreamState, &mut Changes) -> Result<T, BackendError>,
    ) -> Result<Option<T>, BackendError> {
        self.check()?;
        let cell = match create {
            true => self.cell(stream),
            false => match self.existing_cell(stream) {
                Some(cell) => cell,
                None => return Ok(None),
            },
        };
        let mut state = cell.lock();
        let mut changes = Changes::new(self.disk.is_some());
        state.expire(now(), &mut changes);
        let result = (create || state.exists).then(|| op(&mut state, &mut changes));
        // Stored even when the operation failed half-way: the disk follows the state.
        self.store(&mut [(stream, &mut state, &changes)])?;
        drop(state);
        if changes.entries.iter().any(|change| change.fields.is_some()) {
            cell.appended.send_replace(());
        }
        result.transpose()
    }

    /// Appends the request's entries (and remembers their ids under `remember`'s key).
    fn append(
        &self,
        stream: &StreamName,
        request: &AppendRequest,
        remember: Option<(&str, u64)>,
    ) -> Result<Vec<EntryId>, BackendError> {
        let now = now();
        let fields = |entry: &NewEntry| -> Fields {
            match self.disk {
                // Encoded (copied) when stored.
                Some(_) => entry.fields().into(),
                // The engine's own compact copy: a slice of the request body would keep the
                // whole body alive for as long as the entry.
                None => compact(entry.fields()),
            }
        };
        let retention = request.retention;
        let trim = TrimRule {
            max_len: retention.max_len,
            min_id: retention
                .max_age
                .map(|max_age| EntryId::new(now.ms.saturating_sub(max_age.as_millis() as u64), 0)),
        };
        let ids = self.change(stream, true, |state, changes| {
            let entries = request
                .entries
                .iter()
                .map(|entry| (entry.id, fields(entry)));
            let ids = state.append_all(entries, trim, now, changes)?;
            state.expires_at = retention
                .idle_ttl
                .map(|ttl| now.ms.saturating_add(ttl.as_millis() as u64));
            changes.remember = remember.map(|(key, expires_at)| Remember {
                key: key.to_owned(),
                ids: ids.clone(),
                expires_at,
            });
            Ok(ids)
        })?;
        Ok(ids.unwrap_or_default())
    }

    /// Appends with an idempotency key: at most once per key (and stream) while it is
    /// remembered.
    fn append_once(
        &self,
        stream: &StreamName,
        request: &AppendRequest,
        key: &str,
        ttl: Duration,
    ) -> Result<AppendOutcome, BackendError> {
        let mut records = self.idempotency.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        let remembered = match &self.disk {
            Some(disk) => disk.idempotency(stream, key, now)?,
            None => records
                .get(&(stream.clone(), key.to_owned()))
                .filter(|(_, expires_at)| *expires_at > now)
                .map(|(ids, _)| ids.clone()),
        };
        if let Some(ids) = remembered {
            return Ok(AppendOutcome {
                ids,
                replayed: true,
            });
        }
        let expires_at = now.saturating_add(ttl.as_millis() as u64);
        let ids = self.append(stream, request, Some((key, expires_at)))?;
        if self.disk.is_none() {
            records.insert((stream.clone(), key.to_owned()), (ids.clone(), expires_at));
        }
        Ok(AppendOutcome {
            ids,
            replayed: false,
        })
    }

    /// Expires what has expired; returns the cells that exist.
    fn settle_all(&self) -> Result<Vec<(StreamName, Arc<Cell>)>, BackendError> {
        let cells: Vec<(StreamName, Arc<Cell>)> = self
            .streams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, cell)| (name.clone(), cell.clone()))
            .collect();
        let mut existing = Vec::with_capacity(cells.len());
        for (name, cell) in cells {
            if self.change(&name, false, |_, _| Ok(()))?.is_some() {
                existing.push((name, cell));
            }
        }
        Ok(existing)
    }

    /// Removes what has expired and what nobody uses.
    fn sweep(&self) -> Result<(), BackendError> {
        self.settle_all()?;
        let mut streams = self.streams.write().unwrap_or_else(|p| p.into_inner());
        streams.retain(|_, cell| {
            // Only the map holds an unused cell, and nobody can take it while the map is locked.
            // A cell locked by an operation is in use: the map is not held waiting for it.
            let exists = cell.state.try_lock().map_or(true, |state| state.exists);
            exists || Arc::strong_count(cell) > 1 || cell.appended.receiver_count() > 0
        });
        drop(streams);
        let now = now_ms();
        self.idempotency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, expires_at)| *expires_at > now);
        self.coordination.sweep();
        Ok(())
    }
}

impl Engine {
    /// Removes expired idempotency records and deleted streams' entries from disk, in steps,
    /// for at most [`SWEEP_BUDGET`]. Blocking: runs on a blocking thread.
    fn sweep_disk(&self) -> Result<(), BackendError> {
        let Some(disk) = &self.disk else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let mut more = true;
        while more && started.elapsed() < SWEEP_BUDGET {
            // Under the lock idempotent appends take: none writes a record this step removes.
            let _records = self.idempotency.lock().unwrap_or_else(|p| p.into_inner());
            more = disk.expire_idempotency(now_ms(), SWEEP_STEP)?;
        }
        more = true;
        while more && started.elapsed() < SWEEP_BUDGET {
            more = disk.clean_dropped(SWEEP_STEP * 10)?;
        }
        Ok(())
    }
}

/// An entry's fields as the in-memory engine stores them: its own compact copy.
fn compact(fields: Vec<(Bytes, Bytes)>) -> Fields {
    fields
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
    /// A new, empty engine in memory whose sweeper runs until `shutdown`.
    pub fn in_memory(shutdown: CancellationToken) -> EmbeddedBackend {
        EmbeddedBackend::start(None, Vec::new(), shutdown)
    }

    /// The engine on the data directory `options.path`, with everything stored there; its
    /// sweeper runs until `shutdown`. Needs a Tokio runtime.
    pub fn open(
        options: &DiskOptions,
        shutdown: CancellationToken,
    ) -> Result<EmbeddedBackend, OpenError> {
        let (disk, streams) = Disk::open(options)?;
        tracing::info!(
            path = %disk.path().display(),
            fsync = options.fsync.as_str(),
            streams = streams.len(),
            "embedded engine opened"
        );
        Ok(EmbeddedBackend::start(Some(disk), streams, shutdown))
    }

    fn start(
        disk: Option<Arc<Disk>>,
        streams: Vec<(StreamName, StreamState)>,
        shutdown: CancellationToken,
    ) -> EmbeddedBackend {
        let engine = Arc::new(Engine {
            streams: RwLock::new(
                streams
                    .into_iter()
                    .map(|(name, state)| (name, Arc::new(Cell::new(state))))
                    .collect(),
            ),
            idempotency: Mutex::new(HashMap::new()),
            disk,
            coordination: Coordination::new(),
        });
        tokio::spawn(sweep_until(Arc::downgrade(&engine), shutdown));
        EmbeddedBackend { engine }
    }

    /// The data directory and fsync policy, or `None` in memory.
    pub fn storage(&self) -> Option<(&Path, FsyncPolicy)> {
        self.engine
            .disk
            .as_ref()
            .map(|disk| (disk.path(), disk.fsync()))
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
        if let Err(error) = engine.sweep() {
            tracing::warn!(%error, "embedded engine: sweeping expired streams failed");
        }
        if engine.disk.is_none() {
            continue;
        }
        // Bounded steps on disk, away from the runtime's threads.
        let swept = tokio::task::spawn_blocking(move || engine.sweep_disk()).await;
        if let Ok(Err(error)) = swept {
            tracing::warn!(%error, "embedded engine: removing expired records failed");
        }
    }
}

fn missing_group<T>() -> Result<T, BackendError> {
    Err(BackendError::GroupNotFound)
}

impl Backend for EmbeddedBackend {
    async fn ping(&self) -> Result<(), BackendError> {
        self.engine.check()
    }

    async fn server_info(&self) -> Result<String, BackendError> {
        let cells = self.engine.settle_all()?;
        let (mut entries, mut groups) = (0u64, 0usize);
        for (_, cell) in &cells {
            let state = cell.lock();
            entries += state.length;
            groups += state.groups.len();
        }
        let storage = match &self.engine.disk {
            Some(disk) => format!(
                "storage:disk\r\ndata_dir:{}\r\nfsync:{}\r\ndisk_bytes:{}\r\n",
                disk.path().display(),
                disk.fsync().as_str(),
                disk.disk_space()
            ),
            None => "storage:memory\r\n".to_owned(),
        };
        Ok(format!(
            "# streamgate embedded engine\r\nengine_version:{}\r\n{storage}streams:{}\r\nentries:{entries}\r\ngroups:{groups}\r\n",
            env!("CARGO_PKG_VERSION"),
            cells.len(),
        ))
    }

    async fn append(
        &self,
        stream: &StreamName,
        request: AppendRequest,
    ) -> Result<AppendOutcome, BackendError> {
        request.check_ids()?;
        let outcome = match &request.idempotency {
            Some(key) => self
                .engine
                .append_once(stream, &request, &key.key, key.ttl)?,
            None => AppendOutcome {
                ids: self.engine.append(stream, &request, None)?,
                replayed: false,
            },
        };
        self.engine.durable().await?;
        Ok(outcome)
    }

    async fn range(
        &self,
        stream: &StreamName,
        query: RangeQuery,
    ) -> Result<Vec<Entry>, BackendError> {
        self.engine
            .change(stream, false, |state, _| state.range(query))?
            .ok_or(BackendError::StreamNotFound)
    }

    async fn list_streams(&self) -> Result<Vec<StreamName>, BackendError> {
        let mut names: Vec<StreamName> = self
            .engine
            .settle_all()?
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        names.sort();
        Ok(names)
    }

    async fn stream_stats(&self, stream: &StreamName) -> Result<StreamStats, BackendError> {
        self.engine
            .change(stream, false, |state, _| Ok(state.stats()))?
            .ok_or(BackendError::StreamNotFound)
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo, BackendError> {
        self.engine
            .change(stream, false, |state, _| state.info())?
            .ok_or(BackendError::StreamNotFound)
    }

    async fn flush(&self) -> Result<(), BackendError> {
        {
            let mut records = self
                .engine
                .idempotency
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            records.clear();
            if let Some(disk) = &self.engine.disk {
                disk.clear_idempotency()?;
            }
        }
        for (name, _) in self.engine.settle_all()? {
            self.engine.change(&name, false, |state, changes| {
                state.clear(changes);
                Ok(())
            })?;
        }
        self.engine.durable().await
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
                let (_cell, receiver) = self.engine.subscribe(stream);
                receivers.push(receiver);
                let entries = self
                    .engine
                    .change(stream, false, |state, _| state.after(*after, count))?;
                if let Some(entries) = entries.filter(|entries| !entries.is_empty()) {
                    found.push((stream.clone(), entries));
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
        let deleted = self
            .engine
            .change(stream, false, |state, changes| state.delete(ids, changes))?;
        self.engine.durable().await?;
        Ok(deleted.unwrap_or(0))
    }

    async fn trim(&self, stream: &StreamName, trim: Trim) -> Result<u64, BackendError> {
        // In steps, so that a large trim never holds the stream (or a batch) for long.
        let mut removed = 0;
        loop {
            let step = self.engine.change(stream, false, |state, changes| {
                state.trim(trim, TRIM_STEP, changes)
            })?;
            let Some((count, more)) = step else { break };
            removed += count;
            if !more {
                break;
            }
        }
        self.engine.durable().await?;
        Ok(removed)
    }

    async fn delete_stream(&self, stream: &StreamName) -> Result<bool, BackendError> {
        let deleted = self.engine.change(stream, false, |state, changes| {
            state.clear(changes);
            Ok(())
        })?;
        self.engine.durable().await?;
        Ok(deleted.is_some())
    }

    async fn create_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        start: GroupStart,
    ) -> Result<bool, BackendError> {
        let created = self.engine.change(stream, true, |state, changes| {
            state.create_group(group, start, changes)
        })?;
        self.engine.durable().await?;
        Ok(created.unwrap_or(false))
    }

    async fn destroy_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<bool, BackendError> {
        let destroyed = self.engine.change(stream, false, |state, changes| {
            Ok(state.destroy_group(group, changes))
        })?;
        self.engine.durable().await?;
        Ok(destroyed.unwrap_or(false))
    }

    async fn set_group_position(
        &self,
        stream: &StreamName,
        group: &GroupName,
        start: GroupStart,
    ) -> Result<(), BackendError> {
        self.engine
            .change(stream, false, |state, changes| {
                state.set_group_position(group, start, changes)
            })?
            .map_or_else(missing_group, Ok)?;
        self.engine.durable().await
    }

    async fn read_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        read: GroupRead,
    ) -> Result<GroupBatch, BackendError> {
        // Delivery bookkeeping does not wait for an fsync: if it were lost, the entries would
        // only be delivered again.
        let now = now();
        let read = GroupRead {
            count: read.count.max(1),
            ..read
        };
        self.engine
            .change(stream, false, |state, changes| {
                state.read_group(group, consumer, read, now, changes)
            })?
            .map_or_else(missing_group, Ok)
    }

    async fn ack(
        &self,
        stream: &StreamName,
        group: &GroupName,
        ids: &[EntryId],
        delete: bool,
    ) -> Result<u64, BackendError> {
        let acked = self.engine.change(stream, false, |state, changes| {
            state.ack(group, ids, delete, changes)
        })?;
        self.engine.durable().await?;
        Ok(acked.unwrap_or(0))
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
        let now = now();
        self.engine
            .change(stream, false, |state, changes| {
                let scan = ClaimScan {
                    min_idle,
                    cursor,
                    count: count.max(1),
                };
                state.claim_idle(group, consumer, scan, now, changes)
            })?
            .map_or_else(missing_group, Ok)
    }

    async fn set_pending_idle(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
        idle: Duration,
    ) -> Result<bool, BackendError> {
        let now = now();
        let set = self
            .engine
            .change(stream, false, |state, changes| {
                state.set_pending_idle(group, id, idle, now, changes)
            })?
            .map_or_else(missing_group, Ok)?;
        self.engine.durable().await?;
        Ok(set)
    }

    async fn pending(
        &self,
        stream: &StreamName,
        group: &GroupName,
        query: PendingQuery,
    ) -> Result<Vec<PendingEntry>, BackendError> {
        let now = now();
        self.engine
            .change(stream, false, |state, _| state.pending(group, &query, now))?
            .map_or_else(missing_group, Ok)
    }

    async fn consumers(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Vec<ConsumerInfo>, BackendError> {
        let now = now();
        self.engine
            .change(stream, false, |state, _| state.consumers(group, now))?
            .map_or_else(missing_group, Ok)
    }

    async fn remove_idle_consumer(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        min_idle: Duration,
    ) -> Result<bool, BackendError> {
        let now = now();
        self.engine
            .change(stream, false, |state, changes| {
                state.remove_idle_consumer(group, consumer, min_idle, now, changes)
            })?
            .map_or_else(missing_group, Ok)
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
        self.engine.check()?;
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
            let now = now();
            let records = self.engine.disk.is_some();
            let (mut source_changes, mut target_changes) =
                (Changes::new(records), Changes::new(records));
            source_state.expire(now, &mut source_changes);
            target_state.expire(now, &mut target_changes);
            let moved = if source_state.exists {
                target_state
                    .append_all(
                        [(None, compact(fields))],
                        TrimRule::default(),
                        now,
                        &mut target_changes,
                    )
                    .and_then(|ids| {
                        source_state.ack(group, &[id], false, &mut source_changes)?;
                        Ok(ids[0])
                    })
            } else {
                missing_group()
            };
            self.engine.store(&mut [
                (stream, &mut source_state, &source_changes),
                (dead_letter, &mut target_state, &target_changes),
            ])?;
            moved?
        };
        target.appended.send_replace(());
        self.engine.durable().await?;
        Ok(dead_id)
    }

    async fn import(&self, stream: &StreamName, entries: Vec<Entry>) -> Result<(), BackendError> {
        let now = now();
        self.engine.change(stream, true, |state, changes| {
            let entries = entries
                .into_iter()
                .map(|entry| (Some(entry.id), compact(entry.fields)));
            state.append_all(entries, TrimRule::default(), now, changes)
        })?;
        self.engine.durable().await
    }

    async fn set_last_id(
        &self,
        stream: &StreamName,
        last_id: EntryId,
        entries_added: u64,
        max_deleted_id: EntryId,
    ) -> Result<(), BackendError> {
        self.engine.change(stream, true, |state, changes| {
            state.set_id(last_id, entries_added, max_deleted_id, changes)
        })?;
        self.engine.durable().await
    }

    async fn restore_pending(
        &self,
        stream: &StreamName,
        group: &GroupName,
        pending: &[PendingEntry],
    ) -> Result<u64, BackendError> {
        let now = now();
        let restored = self
            .engine
            .change(stream, false, |state, changes| {
                state.restore_pending(group, pending, now, changes)
            })?
            .map_or_else(missing_group, Ok)?;
        self.engine.durable().await?;
        Ok(restored)
    }

    async fn acquire_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, BackendError> {
        Ok(self.engine.coordination.acquire_lease(lease, ttl))
    }

    async fn renew_leases(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> Result<Vec<bool>, BackendError> {
        Ok(self.engine.coordination.renew_leases(leases, ttl))
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), BackendError> {
        self.engine.coordination.release_lease(lease);
        Ok(())
    }

    async fn report_groups(
        &self,
        reports: &[GroupReport],
        ttl: Duration,
    ) -> Result<(), BackendError> {
        self.engine.coordination.report_groups(reports, ttl);
        Ok(())
    }

    async fn group_reports(&self) -> Result<Vec<GroupReport>, BackendError> {
        Ok(self.engine.coordination.group_reports())
    }

    async fn set_group_limit(
        &self,
        stream: &StreamName,
        group: &GroupName,
        limit: u32,
    ) -> Result<(), BackendError> {
        self.engine
            .coordination
            .set_group_limit(stream, group, limit);
        Ok(())
    }

    async fn group_limits(
        &self,
        groups: &[(StreamName, GroupName)],
    ) -> Result<Vec<Option<u32>>, BackendError> {
        Ok(self.engine.coordination.group_limits(groups))
    }

    async fn publish_control(&self, payload: Bytes) -> Result<(), BackendError> {
        self.engine.coordination.publish_control(payload);
        Ok(())
    }

    fn control_messages(&self) -> tokio::sync::broadcast::Receiver<Bytes> {
        self.engine.coordination.control_messages()
    }
}
