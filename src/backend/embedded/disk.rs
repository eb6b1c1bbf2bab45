//! The embedded engine's storage on disk: one fjall database (an LSM tree with a journal, chosen
//! by measurement, see ARCHITECTURE.md) in `storage.path`, holding every entry and every record
//! the engine needs to come back after a restart.
//!
//! Layout. Keyspace `entries`: key = stream key (8 bytes) ++ entry id (16 bytes), big-endian so
//! that keys sort as ids do; value = the entry's fields. Keyspace `state`, one byte of kind first:
//! - `S` name → the stream's record (its key, ids, counters, expiry);
//! - `G` key name → a group's position; `P` key group id → a pending entry (owner, delivery
//!   count, delivery time); `C` key group consumer → a consumer (last seen);
//! - `Z` key → a deleted life of a stream whose entries are still being removed;
//! - `I` stream 0 key → an idempotency record; `E` expiry key → the same record, by expiry.
//!
//! Stream keys are numbers, one per life of a stream, so deleting a stream is one small write
//! and its entries are removed in the background.
//!
//! Durability. Every commit reaches the operating system before it returns (fjall's default), so
//! a crash of the process loses nothing that was answered. `storage.fsync` decides when it
//! reaches stable storage: `always` makes answers wait for an fsync shared by every commit made
//! before it started (group commit, on a thread of its own); `everysec` fsyncs once a second;
//! `never` leaves it to the operating system.
//!
//! Must not: know about HTTP or transports; hold a lock of the engine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::entries::Entries;
use super::stream::{Changes, Consumer, Group, PendingInfo, StreamState};
use crate::backend::{BackendError, Direction};
use crate::model::{ConsumerName, Entry, EntryId, GroupName, StreamName};

/// The data format this version writes and reads. A directory with a larger number was written
/// by a newer streamgate and is refused.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_FILE: &str = "FORMAT";
const DATABASE_DIR: &str = "db";

/// Each keyspace's write buffer (fjall's default is 64 MiB): recent writes are served from it,
/// and it is what memory holds beyond the cache.
const MEMTABLE_BYTES: u64 = 8 << 20;

/// When an answer waits for stable storage (`storage.fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Every answer waits for an fsync (shared with concurrent writes).
    Always,
    /// An fsync every second: power loss loses at most about a second.
    EverySec,
    /// The operating system writes when it likes.
    Never,
}

impl FsyncPolicy {
    pub fn parse(text: &str) -> Option<FsyncPolicy> {
        match text {
            "always" => Some(FsyncPolicy::Always),
            "everysec" => Some(FsyncPolicy::EverySec),
            "never" => Some(FsyncPolicy::Never),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::EverySec => "everysec",
            FsyncPolicy::Never => "never",
        }
    }
}

/// The streams found in a data directory, with everything they held.
pub type Recovered = Vec<(StreamName, StreamState)>;

/// How to open the store.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    pub path: PathBuf,
    pub fsync: FsyncPolicy,
    /// Bytes of recently read data blocks kept in memory (`storage.cache_size`).
    pub cache_size: u64,
}

/// Why a data directory was not opened. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the data directory {0} is in use by another running streamgate; stop it, or give this one its own --data-dir"
    )]
    InUse(PathBuf),
    #[error(
        "the data directory {path} was written by a newer streamgate (data format {found}; this version reads format {FORMAT_VERSION}); run the newer version"
    )]
    NewerFormat { path: PathBuf, found: u32 },
    #[error(
        "{0} is not a streamgate data directory (it has files but no {FORMAT_FILE} file); choose an empty or new directory"
    )]
    Foreign(PathBuf),
    #[error(
        "the data directory {path} is corrupt and was not opened ({detail}); restore it from a backup, or move it aside to start empty"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot use the data directory {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Key layout (see the module documentation).
mod keys {
    use crate::model::EntryId;

    pub const STREAM: u8 = b'S';
    pub const GROUP: u8 = b'G';
    pub const PENDING: u8 = b'P';
    pub const CONSUMER: u8 = b'C';
    pub const DROPPED: u8 = b'Z';
    pub const IDEMPOTENCY: u8 = b'I';
    pub const EXPIRY: u8 = b'E';

    pub fn id(id: EntryId) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&id.ms.to_be_bytes());
        bytes[8..].copy_from_slice(&id.seq.to_be_bytes());
        bytes
    }

    pub fn parse_id(bytes: &[u8]) -> Option<EntryId> {
        let ms = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let seq = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(EntryId::new(ms, seq))
    }

    pub fn parse_u64(bytes: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
    }

    pub fn entry(key: u64, entry: EntryId) -> [u8; 24] {
        let mut bytes = [0u8; 24];
        bytes[..8].copy_from_slice(&key.to_be_bytes());
        bytes[8..].copy_from_slice(&id(entry));
        bytes
    }

    pub fn stream(name: &str) -> Vec<u8> {
        [&[STREAM], name.as_bytes()].concat()
    }

    pub fn with_key(kind: u8, key: u64) -> [u8; 9] {
        let mut bytes = [kind; 9];
        bytes[1..].copy_from_slice(&key.to_be_bytes());
        bytes
    }

    pub fn group(key: u64, group: &str) -> Vec<u8> {
        [&with_key(GROUP, key)[..], group.as_bytes()].concat()
    }

    /// The prefix of a group's pending entries or consumers: kind, key, group length, group.
    pub fn members(kind: u8, key: u64, group: &str) -> Vec<u8> {
        let length = u16::try_from(group.len()).unwrap_or(u16::MAX).to_be_bytes();
        [&with_key(kind, key)[..], &length, group.as_bytes()].concat()
    }

    /// Splits what follows `kind key` in a member key into the group name and the rest.
    pub fn split_members(rest: &[u8]) -> Option<(&[u8], &[u8])> {
        let length = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let group = rest.get(2..2 + length)?;
        Some((group, &rest[2 + length..]))
    }

    pub fn idempotency(stream: &str, key: &str) -> Vec<u8> {
        [&[IDEMPOTENCY], stream.as_bytes(), &[0], key.as_bytes()].concat()
    }

    pub fn expiry(at_ms: u64, record: &[u8]) -> Vec<u8> {
        [&[EXPIRY], &at_ms.to_be_bytes()[..], record].concat()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StreamRecord {
    key: u64,
    length: u64,
    last_id: [u64; 2],
    entries_added: u64,
    max_deleted_id: [u64; 2],
    expires_at: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct GroupRecord {
    last_delivered: [u64; 2],
}

#[derive(Debug, Serialize, Deserialize)]
struct PendingRecord {
    consumer: String,
    delivered_at: i64,
    deliveries: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ConsumerRecord {
    seen_at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct IdempotencyRecord {
    ids: Vec<[u64; 2]>,
    expires_at: u64,
}

fn pair(id: EntryId) -> [u64; 2] {
    [id.ms, id.seq]
}

fn unpair([ms, seq]: [u64; 2]) -> EntryId {
    EntryId::new(ms, seq)
}

fn encode(record: &impl Serialize) -> Vec<u8> {
    // Serializing these plain records into a vector cannot fail.
    postcard::to_allocvec(record).unwrap_or_default()
}

/// An entry's fields as stored: postcard's encoding of a list of byte-string pairs.
fn encode_fields(fields: &[(Bytes, Bytes)]) -> Vec<u8> {
    /// The fields as byte strings: serde would write a `&[u8]` one byte at a time (a sequence of
    /// `u8`), `serde_bytes` writes it as one block; postcard encodes both the same way.
    struct Stored<'a>(&'a [(Bytes, Bytes)]);
    impl Serialize for Stored<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.iter().map(|(field, value)| {
                (
                    serde_bytes::Bytes::new(field),
                    serde_bytes::Bytes::new(value),
                )
            }))
        }
    }
    let size: usize = fields
        .iter()
        .map(|(field, value)| field.len() + value.len() + 10)
        .sum();
    // Serializing byte strings into a vector cannot fail.
    postcard::to_extend(&Stored(fields), Vec::with_capacity(size + 5)).unwrap_or_default()
}

/// Decodes an entry's fields as slices of the stored value (no copy).
fn decode_fields(value: Bytes) -> Result<Vec<(Bytes, Bytes)>, BackendError> {
    let pairs: Vec<(&[u8], &[u8])> = postcard::from_bytes(&value).map_err(|error| {
        BackendError::Internal(format!("a stored entry is unreadable: {error}"))
    })?;
    Ok(pairs
        .into_iter()
        .map(|(field, data)| (value.slice_ref(field), value.slice_ref(data)))
        .collect())
}

fn storage_error(error: fjall::Error) -> BackendError {
    BackendError::Unavailable(format!("storage: {error}"))
}

#[derive(Default)]
struct Requests {
    count: u64,
    idle: bool,
}

/// What the fsync thread and the writers waiting for it share.
struct SyncState {
    /// Fsyncs asked for by writers (`always`), a counter, and whether the fsync thread is waiting
    /// for one (only then does a writer wake it: a wake-up is a system call).
    requested: Mutex<Requests>,
    wake: Condvar,
    /// The last request covered by a finished fsync; `u64::MAX` once the store has failed.
    synced: watch::Sender<u64>,
    /// Commits so far (`everysec` skips the fsync of a second without any).
    written: AtomicU64,
    stop: AtomicBool,
}

/// The store.
pub struct Disk {
    path: PathBuf,
    db: Database,
    entries: Keyspace,
    state: Keyspace,
    fsync: FsyncPolicy,
    next_key: AtomicU64,
    sync: Arc<SyncState>,
    /// Set when a write or an fsync failed: the store then refuses everything until a restart,
    /// which recovers what was stored.
    failure: Arc<OnceLock<String>>,
    sync_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Disk {
    fn drop(&mut self) {
        {
            // Under the lock the thread waits on, so the wake-up cannot fall between its check
            // and its wait.
            let _requested = self
                .sync
                .requested
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            self.sync.stop.store(true, Ordering::Relaxed);
            self.sync.wake.notify_all();
        }
        let thread = self
            .sync_thread
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        // A clean stop leaves everything on stable storage, whatever the policy; the database
        // (and its lock on the directory) is released when this returns.
        let _ = self.db.persist(PersistMode::SyncAll);
    }
}

/// What a directory holds before it is opened.
enum Found {
    Fresh,
    /// Written before, in a format this version reads.
    Existing,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> OpenError + '_ {
    move |error| OpenError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Reads (or, in a new directory, writes) the format file.
fn check_directory(path: &Path) -> Result<Found, OpenError> {
    let format_path = path.join(FORMAT_FILE);
    match std::fs::read_to_string(&format_path) {
        Ok(text) => {
            let version = text
                .lines()
                .find_map(|line| line.strip_prefix("format "))
                .and_then(|number| number.trim().parse().ok())
                .ok_or_else(|| OpenError::Corrupt {
                    path: path.to_owned(),
                    detail: format!("{FORMAT_FILE} does not say which format the data is in"),
                })?;
            if version > FORMAT_VERSION {
                return Err(OpenError::NewerFormat {
                    path: path.to_owned(),
                    found: version,
                });
            }
            Ok(Found::Existing)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(io(path))?;
            if std::fs::read_dir(path).map_err(io(path))?.next().is_some() {
                return Err(OpenError::Foreign(path.to_owned()));
            }
            let text = format!(
                "streamgate data directory: do not edit; copy it only while streamgate is stopped\nformat {FORMAT_VERSION}\n"
            );
            std::fs::write(&format_path, text).map_err(io(path))?;
            std::fs::File::open(&format_path)
                .and_then(|file| file.sync_all())
                .and_then(|()| std::fs::File::open(path)?.sync_all())
                .map_err(io(path))?;
            Ok(Found::Fresh)
        }
        Err(error) => Err(io(path)(error)),
    }
}

/// Where the written bytes of each journal end: fjall preallocates journal files (zeros), so
/// this is just past the last non-zero byte. Recovery cuts a journal back to its last complete
/// write; if it cuts below this point, a torn write was discarded.
fn journal_data_ends(database: &Path) -> Vec<(PathBuf, u64)> {
    let journals = std::fs::read_dir(database)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jnl"));
    journals
        .filter_map(|path| Some((data_end(&path).ok()?, path)))
        .map(|(end, path)| (path, end))
        .collect()
}

/// The offset just past the last non-zero byte of a file, read backwards in chunks.
fn data_end(path: &Path) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const CHUNK: u64 = 1 << 20;
    let mut file = std::fs::File::open(path)?;
    let mut end = file.metadata()?.len();
    let mut buffer = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buffer[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(last) = chunk.iter().rposition(|byte| *byte != 0) {
            return Ok(start + last as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

impl Disk {
    /// Opens (or creates) the data directory and recovers every stream in it.
    pub fn open(options: &DiskOptions) -> Result<(Arc<Disk>, Recovered), OpenError> {
        // Absolute, so that messages and the banner say where the data is whatever the working
        // directory.
        let path = std::path::absolute(&options.path).unwrap_or_else(|_| options.path.clone());
        let corrupt = |detail: String| OpenError::Corrupt {
            path: path.clone(),
            detail,
        };
        let found = check_directory(&path)?;
        let database = path.join(DATABASE_DIR);
        if matches!(found, Found::Existing) && !database.join("version").exists() {
            if database.exists() {
                return Err(corrupt("the database has no version file".into()));
            }
            tracing::warn!(path = %path.display(), "the data directory has no database yet; starting empty");
        }
        let journals_before = journal_data_ends(&database);
        let opened = std::panic::catch_unwind(|| {
            Database::builder(&database)
                .cache_size(options.cache_size)
                .worker_threads(2)
                .open()
        });
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(fjall::Error::Locked)) => return Err(OpenError::InUse(path)),
            Ok(Err(fjall::Error::Io(error))) if error.kind() != std::io::ErrorKind::InvalidData => {
                return Err(OpenError::Io { path, error });
            }
            Ok(Err(error)) => return Err(corrupt(format!("{error:?}"))),
            Err(_) => return Err(corrupt("the storage engine could not read it".into())),
        };
        for (journal, written) in journals_before {
            let Ok(kept) = std::fs::metadata(&journal).map(|meta| meta.len()) else {
                continue;
            };
            if kept < written {
                tracing::warn!(
                    journal = %journal.display(),
                    discarded_bytes = written - kept,
                    "recovered from an interrupted write: the incomplete tail of the journal was discarded (it was never acknowledged)"
                );
            }
        }
        let keyspace = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
            })
            .map_err(|error| corrupt(format!("keyspace {name}: {error:?}")))
        };
        let (entries, state) = (keyspace("entries")?, keyspace("state")?);
        let (synced, _) = watch::channel(0);
        let disk = Arc::new(Disk {
            path: path.clone(),
            db,
            entries,
            state,
            fsync: options.fsync,
            next_key: AtomicU64::new(1),
            sync: Arc::new(SyncState {
                requested: Mutex::new(Requests::default()),
                wake: Condvar::new(),
                synced,
                written: AtomicU64::new(0),
                stop: AtomicBool::new(false),
            }),
            failure: Arc::new(OnceLock::new()),
            sync_thread: Mutex::new(None),
        });
        let streams = disk.load().map_err(corrupt)?;
        disk.start_sync_thread()
            .map_err(|error| OpenError::Io { path, error })?;
        Ok((disk, streams))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fsync(&self) -> FsyncPolicy {
        self.fsync
    }

    /// Bytes on disk.
    pub fn disk_space(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// A key for a new life of a stream.
    pub fn new_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Fails when an earlier write failed (the store refuses everything until a restart).
    pub fn check(&self) -> Result<(), BackendError> {
        match self.failure.get() {
            Some(failure) => Err(BackendError::Unavailable(format!(
                "storage failed ({failure}); restart streamgate to recover what was stored"
            ))),
            None => Ok(()),
        }
    }

    fn fail(&self, what: &str, error: impl std::fmt::Display) -> BackendError {
        let failure = format!("{what}: {error}");
        tracing::error!(path = %self.path.display(), "{failure}");
        let _ = self.failure.set(failure);
        self.sync.synced.send_replace(u64::MAX);
        self.check()
            .err()
            .unwrap_or_else(|| BackendError::Unavailable(String::new()))
    }

    /// Starts a batch of changes to store together, atomically.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            disk: self,
            batch: self.db.batch(),
        }
    }

    /// Resolves once everything stored so far is on stable storage, when the policy makes
    /// answers wait for that (`always`); at once otherwise.
    pub async fn durable(&self) -> Result<(), BackendError> {
        if self.fsync != FsyncPolicy::Always {
            return Ok(());
        }
        let ticket = {
            let mut requested = self
                .sync
                .requested
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            requested.count += 1;
            if requested.idle {
                self.sync.wake.notify_one();
            }
            requested.count
        };
        let mut synced = self.sync.synced.subscribe();
        let _ = synced.wait_for(|done| *done >= ticket).await;
        self.check()
    }

    /// The fsync thread (`always`, `everysec`); it ends when the store is dropped.
    fn start_sync_thread(&self) -> std::io::Result<()> {
        if self.fsync == FsyncPolicy::Never {
            return Ok(());
        }
        let (db, sync, failure, policy) = (
            self.db.clone(),
            self.sync.clone(),
            self.failure.clone(),
            self.fsync,
        );
        let journal = JournalSync::new(self.path.join(DATABASE_DIR));
        let thread = std::thread::Builder::new()
            .name("streamgate-fsync".into())
            .spawn(move || sync_loop(&db, journal, &sync, &failure, policy))?;
        *self
            .sync_thread
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(thread);
        Ok(())
    }

    // Reads.

    pub fn entry(&self, key: u64, id: EntryId) -> Result<Option<Entry>, BackendError> {
        let value = self
            .entries
            .get(keys::entry(key, id))
            .map_err(storage_error)?;
        value
            .map(|value| {
                Ok(Entry {
                    id,
                    fields: decode_fields(value.into())?,
                })
            })
            .transpose()
    }

    pub fn contains_entry(&self, key: u64, id: EntryId) -> Result<bool, BackendError> {
        self.entries
            .contains_key(keys::entry(key, id))
            .map_err(storage_error)
    }

    pub fn entries(
        &self,
        key: u64,
        start: EntryId,
        end: EntryId,
        count: usize,
        direction: Direction,
    ) -> Result<Vec<Entry>, BackendError> {
        let range = self
            .entries
            .range(keys::entry(key, start)..=keys::entry(key, end));
        let decode = |guard: fjall::Guard| -> Result<Entry, BackendError> {
            let (stored_key, value) = guard.into_inner().map_err(storage_error)?;
            let id = keys::parse_id(&stored_key[8..])
                .ok_or_else(|| BackendError::Internal("a stored entry key is unreadable".into()))?;
            Ok(Entry {
                id,
                fields: decode_fields(value.into())?,
            })
        };
        match direction {
            Direction::Forward => range.take(count).map(decode).collect(),
            Direction::Backward => range.rev().take(count).map(decode).collect(),
        }
    }

    /// Ids of the oldest entries while `wanted(index, id)` holds, at most `limit`.
    pub fn oldest_ids(
        &self,
        key: u64,
        limit: usize,
        wanted: impl Fn(usize, EntryId) -> bool,
    ) -> Result<Vec<EntryId>, BackendError> {
        let mut ids = Vec::new();
        let range = self
            .entries
            .range(keys::entry(key, EntryId::MIN)..=keys::entry(key, EntryId::MAX));
        for guard in range.take(limit) {
            let stored_key = guard.key().map_err(storage_error)?;
            let id = keys::parse_id(&stored_key[8..])
                .ok_or_else(|| BackendError::Internal("a stored entry key is unreadable".into()))?;
            if !wanted(ids.len(), id) {
                break;
            }
            ids.push(id);
        }
        Ok(ids)
    }

    /// How many entries have an id of at least `start`.
    pub fn count_entries(&self, key: u64, start: EntryId) -> Result<u64, BackendError> {
        let mut count = 0;
        for guard in self
            .entries
            .range(keys::entry(key, start)..=keys::entry(key, EntryId::MAX))
        {
            guard.key().map_err(storage_error)?;
            count += 1;
        }
        Ok(count)
    }

    /// The ids of a live idempotency record.
    pub fn idempotency(
        &self,
        stream: &StreamName,
        key: &str,
        now_ms: u64,
    ) -> Result<Option<Vec<EntryId>>, BackendError> {
        let Some(value) = self
            .state
            .get(keys::idempotency(stream.as_str(), key))
            .map_err(storage_error)?
        else {
            return Ok(None);
        };
        let record: IdempotencyRecord = postcard::from_bytes(&value).map_err(|error| {
            BackendError::Internal(format!("an idempotency record is unreadable: {error}"))
        })?;
        Ok((record.expires_at > now_ms).then(|| record.ids.into_iter().map(unpair).collect()))
    }

    // Background work, each step bounded (the sweeper calls these on a blocking thread).

    /// Removes up to `budget` idempotency records that expired by `now_ms`; whether more remain.
    /// The caller holds the engine's idempotency lock, so no append writes a record meanwhile.
    pub fn expire_idempotency(&self, now_ms: u64, budget: usize) -> Result<bool, BackendError> {
        self.check()?;
        let mut batch = self.db.batch();
        let mut removed = 0;
        let (from, to) = (keys::expiry(0, &[]), keys::expiry(now_ms, &[]));
        for guard in self.state.range(from..to).take(budget) {
            let key = guard.key().map_err(storage_error)?;
            let record_key = &key[9..];
            // The record may have been written again since, with a later expiry: keep it then.
            if self
                .idempotency_expiry(record_key)?
                .is_some_and(|at| at <= now_ms)
            {
                batch.remove(&self.state, record_key.to_vec());
            }
            batch.remove(&self.state, key);
            removed += 1;
        }
        self.commit_batch(batch)?;
        Ok(removed == budget)
    }

    fn idempotency_expiry(&self, record_key: &[u8]) -> Result<Option<u64>, BackendError> {
        let value = self.state.get(record_key).map_err(storage_error)?;
        Ok(value
            .and_then(|value| postcard::from_bytes::<IdempotencyRecord>(&value).ok())
            .map(|record| record.expires_at))
    }

    /// Removes every idempotency record (a flush).
    pub fn clear_idempotency(&self) -> Result<(), BackendError> {
        self.check()?;
        for kind in [keys::IDEMPOTENCY, keys::EXPIRY] {
            loop {
                let mut batch = self.db.batch();
                let mut removed = 0;
                for guard in self.state.prefix([kind]).take(10_000) {
                    batch.remove(&self.state, guard.key().map_err(storage_error)?);
                    removed += 1;
                }
                self.commit_batch(batch)?;
                if removed < 10_000 {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Removes up to `budget` entries of deleted streams; whether more remain.
    pub fn clean_dropped(&self, budget: usize) -> Result<bool, BackendError> {
        self.check()?;
        let mut budget = budget;
        let dropped: Vec<u64> = self
            .state
            .prefix([keys::DROPPED])
            .map(|guard| {
                let key = guard.key().map_err(storage_error)?;
                keys::parse_u64(&key[1..]).ok_or_else(|| {
                    BackendError::Internal("a dropped-stream record is unreadable".into())
                })
            })
            .collect::<Result<_, _>>()?;
        for key in dropped {
            let mut batch = self.db.batch();
            let mut removed = 0;
            for guard in self.entries.prefix(key.to_be_bytes()).take(budget) {
                batch.remove(&self.entries, guard.key().map_err(storage_error)?);
                removed += 1;
            }
            if removed < budget {
                batch.remove(&self.state, keys::with_key(keys::DROPPED, key).to_vec());
            }
            self.commit_batch(batch)?;
            budget -= removed;
            if budget == 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn commit_batch(&self, batch: fjall::OwnedWriteBatch) -> Result<(), BackendError> {
        if batch.is_empty() {
            return Ok(());
        }
        match batch.commit() {
            Ok(()) => {
                self.sync.written.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => Err(self.fail("a write failed", error)),
        }
    }

    // Recovery.

    /// Reads every stream's record, groups, pending entries and consumers back.
    fn load(self: &Arc<Disk>) -> Result<Recovered, String> {
        let unreadable = |what: &str| format!("a {what} record is unreadable");
        let mut streams: Vec<(StreamName, StreamState)> = Vec::new();
        let mut by_key: HashMap<u64, usize> = HashMap::new();
        let mut max_key = 0;
        for guard in self.state.prefix([keys::STREAM]) {
            let (key, value) = guard.into_inner().map_err(|error| format!("{error:?}"))?;
            let name = std::str::from_utf8(&key[1..]).map_err(|_| unreadable("stream"))?;
            let record: StreamRecord =
                postcard::from_bytes(&value).map_err(|_| unreadable("stream"))?;
            max_key = max_key.max(record.key);
            let mut state = StreamState::new(Entries::Disk {
                disk: self.clone(),
                key: record.key,
            });
            state.exists = true;
            state.length = record.length;
            state.last_id = unpair(record.last_id);
            state.entries_added = record.entries_added;
            state.max_deleted_id = unpair(record.max_deleted_id);
            state.expires_at = record.expires_at;
            by_key.insert(record.key, streams.len());
            streams.push((StreamName::from_backend(name.to_owned()), state));
        }
        for guard in self.state.prefix([keys::GROUP]) {
            let (key, value) = guard.into_inner().map_err(|error| format!("{error:?}"))?;
            let name = std::str::from_utf8(&key[9..]).map_err(|_| unreadable("group"))?;
            let record: GroupRecord =
                postcard::from_bytes(&value).map_err(|_| unreadable("group"))?;
            stream_of(&mut streams, &by_key, &key, "group")?
                .groups
                .insert(
                    GroupName::from_backend(name.to_owned()),
                    Group {
                        last_delivered: unpair(record.last_delivered),
                        lag: 0,
                        pending: Default::default(),
                        consumers: Default::default(),
                    },
                );
        }
        let member = |key: &[u8], what: &str| -> Result<(GroupName, Vec<u8>), String> {
            let (group, rest) = keys::split_members(&key[9..]).ok_or_else(|| unreadable(what))?;
            let group = std::str::from_utf8(group).map_err(|_| unreadable(what))?;
            Ok((GroupName::from_backend(group.to_owned()), rest.to_vec()))
        };
        for guard in self.state.prefix([keys::CONSUMER]) {
            let (key, value) = guard.into_inner().map_err(|error| format!("{error:?}"))?;
            let (group, consumer) = member(&key, "consumer")?;
            let consumer = String::from_utf8(consumer).map_err(|_| unreadable("consumer"))?;
            let record: ConsumerRecord =
                postcard::from_bytes(&value).map_err(|_| unreadable("consumer"))?;
            let state = stream_of(&mut streams, &by_key, &key, "consumer")?;
            let group = state
                .groups
                .get_mut(&group)
                .ok_or("a consumer record belongs to no group")?;
            group.consumers.insert(
                ConsumerName::from_backend(consumer),
                Consumer {
                    seen_at: record.seen_at,
                    pending: Default::default(),
                },
            );
        }
        for guard in self.state.prefix([keys::PENDING]) {
            let (key, value) = guard.into_inner().map_err(|error| format!("{error:?}"))?;
            let (group, id) = member(&key, "pending")?;
            let id = keys::parse_id(&id).ok_or_else(|| unreadable("pending"))?;
            let record: PendingRecord =
                postcard::from_bytes(&value).map_err(|_| unreadable("pending"))?;
            let state = stream_of(&mut streams, &by_key, &key, "pending")?;
            let group = state
                .groups
                .get_mut(&group)
                .ok_or("a pending record belongs to no group")?;
            let consumer = ConsumerName::from_backend(record.consumer);
            group
                .consumers
                .entry(consumer.clone())
                .or_insert_with(|| Consumer {
                    seen_at: record.delivered_at,
                    pending: Default::default(),
                })
                .pending
                .insert(id);
            group.pending.insert(
                id,
                PendingInfo {
                    consumer,
                    delivered_at: record.delivered_at,
                    deliveries: record.deliveries,
                },
            );
        }
        for guard in self.state.prefix([keys::DROPPED]) {
            let key = guard.key().map_err(|error| format!("{error:?}"))?;
            max_key = max_key.max(keys::parse_u64(&key[1..]).ok_or_else(|| unreadable("dropped"))?);
        }
        self.next_key.store(max_key + 1, Ordering::Relaxed);
        // Each group's lag, counted once here and kept up to date from now on.
        for (_, state) in &mut streams {
            let mut lags = Vec::with_capacity(state.groups.len());
            for group in state.groups.values() {
                lags.push(
                    state
                        .entries
                        .count_after(group.last_delivered)
                        .map_err(|error| error.to_string())?,
                );
            }
            for (group, lag) in state.groups.values_mut().zip(lags) {
                group.lag = lag;
            }
        }
        Ok(streams)
    }
}

/// The stream a group, pending or consumer record (`kind key …`) belongs to.
fn stream_of<'a>(
    streams: &'a mut [(StreamName, StreamState)],
    by_key: &HashMap<u64, usize>,
    key: &[u8],
    what: &str,
) -> Result<&'a mut StreamState, String> {
    let key = keys::parse_u64(&key[1..]).ok_or_else(|| format!("a {what} record is unreadable"))?;
    let index = by_key
        .get(&key)
        .ok_or_else(|| format!("a {what} record belongs to no stream"))?;
    Ok(&mut streams[*index].1)
}

/// Changes of one or more streams, stored together.
pub struct Batch<'a> {
    disk: &'a Disk,
    batch: fjall::OwnedWriteBatch,
}

impl Batch<'_> {
    /// Adds what `changes` says changed in `state` (the stream `name`).
    pub fn stream(
        &mut self,
        name: &StreamName,
        state: &StreamState,
        changes: &Changes,
    ) -> Result<(), BackendError> {
        let (disk, batch) = (self.disk, &mut self.batch);
        // The state has already changed: a failure to store it is a failure of the store.
        let remove_prefix = |batch: &mut fjall::OwnedWriteBatch, prefix: &[u8]| {
            for guard in disk.state.prefix(prefix) {
                let key = guard
                    .key()
                    .map_err(|error| disk.fail("reading records to remove", error))?;
                batch.remove(&disk.state, key);
            }
            Ok::<(), BackendError>(())
        };
        for &dropped in &changes.dropped {
            for kind in [keys::GROUP, keys::PENDING, keys::CONSUMER] {
                remove_prefix(batch, &keys::with_key(kind, dropped))?;
            }
            batch.insert(
                &disk.state,
                keys::with_key(keys::DROPPED, dropped).to_vec(),
                [],
            );
        }
        for change in &changes.entries {
            let key = keys::entry(change.key, change.id);
            match &change.fields {
                Some(fields) => batch.insert(&disk.entries, key, encode_fields(fields)),
                None => batch.remove(&disk.entries, key),
            }
        }
        let key = state.entries.key();
        for group_changes in &changes.groups {
            let name = group_changes.name.as_str();
            let Some(group) = state.groups.get(&group_changes.name) else {
                batch.remove(&disk.state, keys::group(key, name));
                remove_prefix(batch, &keys::members(keys::PENDING, key, name))?;
                remove_prefix(batch, &keys::members(keys::CONSUMER, key, name))?;
                continue;
            };
            if group_changes.record {
                let record = GroupRecord {
                    last_delivered: pair(group.last_delivered),
                };
                batch.insert(&disk.state, keys::group(key, name), encode(&record));
            }
            let pending_prefix = keys::members(keys::PENDING, key, name);
            for id in &group_changes.pending {
                let record_key = [&pending_prefix[..], &keys::id(*id)].concat();
                match group.pending.get(id) {
                    Some(info) => {
                        let record = PendingRecord {
                            consumer: info.consumer.as_str().to_owned(),
                            delivered_at: info.delivered_at,
                            deliveries: info.deliveries,
                        };
                        batch.insert(&disk.state, record_key, encode(&record));
                    }
                    None => batch.remove(&disk.state, record_key),
                }
            }
            let consumer_prefix = keys::members(keys::CONSUMER, key, name);
            for consumer in &group_changes.consumers {
                let record_key = [&consumer_prefix[..], consumer.as_str().as_bytes()].concat();
                match group.consumers.get(consumer) {
                    Some(state) => {
                        let record = ConsumerRecord {
                            seen_at: state.seen_at,
                        };
                        batch.insert(&disk.state, record_key, encode(&record));
                    }
                    None => batch.remove(&disk.state, record_key),
                }
            }
        }
        if changes.meta {
            let record_key = keys::stream(name.as_str());
            if state.exists {
                let record = StreamRecord {
                    key,
                    length: state.length,
                    last_id: pair(state.last_id),
                    entries_added: state.entries_added,
                    max_deleted_id: pair(state.max_deleted_id),
                    expires_at: state.expires_at,
                };
                batch.insert(&disk.state, record_key, encode(&record));
            } else {
                batch.remove(&disk.state, record_key);
            }
        }
        Ok(())
    }

    /// Adds an idempotency record: the ids of an append, remembered until `expires_at` (ms).
    pub fn idempotency(
        &mut self,
        stream: &StreamName,
        key: &str,
        ids: &[EntryId],
        expires_at: u64,
    ) {
        let record_key = keys::idempotency(stream.as_str(), key);
        let record = IdempotencyRecord {
            ids: ids.iter().copied().map(pair).collect(),
            expires_at,
        };
        self.batch
            .insert(&self.disk.state, keys::expiry(expires_at, &record_key), []);
        self.batch
            .insert(&self.disk.state, record_key, encode(&record));
    }

    /// Stores the batch (in the operating system when this returns; see [`Disk::durable`]).
    pub fn commit(self) -> Result<(), BackendError> {
        self.disk.check()?;
        self.disk.commit_batch(self.batch)
    }
}

/// Makes the journal durable without holding fjall's journal lock: fjall's own
/// `persist(SyncData)` holds the lock that every commit takes for as long as the fsync lasts, and
/// every writer (the whole runtime, under load) would stall behind each fsync.
///
/// Every commit reaches the operating system before it returns, so an fsync of the journal file
/// covers every commit made before it started. Only the active journal (the highest-numbered
/// `N.jnl` in the database directory) needs it: fjall fsyncs a journal when it seals it and
/// creates `N+1.jnl` (and fsyncs the directory). When no journal can be found there, fjall's own
/// persist is used instead.
struct JournalSync {
    database: PathBuf,
    /// The active journal as last seen: its number and an open handle.
    active: Option<(u64, std::fs::File)>,
}

impl JournalSync {
    fn new(database: PathBuf) -> JournalSync {
        JournalSync {
            database,
            active: None,
        }
    }

    fn journal_number(path: &Path) -> Option<u64> {
        path.file_name()?
            .to_str()?
            .strip_suffix(".jnl")?
            .parse()
            .ok()
    }

    /// The active journal, looked up again when fjall has moved on: when `N+1.jnl` exists, or
    /// when `N.jnl` is gone (fjall deletes flushed journals oldest first, so a journal that
    /// still exists without a successor is the active one).
    fn active(&mut self) -> Option<&std::fs::File> {
        let journal = |number: u64| self.database.join(format!("{number}.jnl"));
        let moved_on = match &self.active {
            Some((number, _)) => !journal(*number).exists() || journal(number + 1).exists(),
            None => true,
        };
        if moved_on {
            let newest = std::fs::read_dir(&self.database)
                .ok()?
                .flatten()
                .filter_map(|entry| Self::journal_number(&entry.path()))
                .max()?;
            let file = std::fs::File::open(self.database.join(format!("{newest}.jnl"))).ok()?;
            self.active = Some((newest, file));
        }
        self.active.as_ref().map(|(_, file)| file)
    }

    fn sync(&mut self, db: &Database) -> Result<(), String> {
        match self.active() {
            Some(file) => file.sync_data().map_err(|error| error.to_string()),
            None => db
                .persist(PersistMode::SyncData)
                .map_err(|error| format!("{error:?}")),
        }
    }
}

fn sync_loop(
    db: &Database,
    mut journal: JournalSync,
    sync: &SyncState,
    failure: &OnceLock<String>,
    policy: FsyncPolicy,
) {
    let mut synced_writes = 0;
    loop {
        let target = {
            let mut requested = sync
                .requested
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            loop {
                if sync.stop.load(Ordering::Relaxed) {
                    return;
                }
                if policy == FsyncPolicy::Always && requested.count > *sync.synced.borrow() {
                    break;
                }
                let wait = match policy {
                    FsyncPolicy::Always => Duration::from_millis(100),
                    _ => Duration::from_secs(1),
                };
                requested.idle = true;
                let (mut guard, timeout) = sync
                    .wake
                    .wait_timeout(requested, wait)
                    .unwrap_or_else(|poison| poison.into_inner());
                guard.idle = false;
                requested = guard;
                if timeout.timed_out() && policy == FsyncPolicy::EverySec {
                    break;
                }
            }
            requested.count
        };
        let written = sync.written.load(Ordering::Relaxed);
        if policy == FsyncPolicy::EverySec && written == synced_writes {
            continue;
        }
        match journal.sync(db) {
            Ok(()) => {
                synced_writes = written;
                if policy == FsyncPolicy::Always {
                    sync.synced.send_replace(target);
                }
            }
            Err(error) => {
                let failure_text = format!("fsync failed: {error}");
                tracing::error!("{failure_text}");
                let _ = failure.set(failure_text);
                sync.synced.send_replace(u64::MAX);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_survive_encoding_byte_for_byte() {
        let fields = vec![
            (
                Bytes::from_static(b"data"),
                Bytes::from_static(b"{\"a\":1}"),
            ),
            (Bytes::from_static(b""), Bytes::from(vec![0u8, 255, 10, 13])),
        ];
        let stored = Bytes::from(encode_fields(&fields));
        assert_eq!(decode_fields(stored).unwrap(), fields);
        assert!(decode_fields(Bytes::from_static(b"\x05")).is_err());
    }

    #[test]
    fn the_fsync_follows_the_active_journal_as_fjall_rotates_and_deletes_them() {
        let dir = tempfile::tempdir().unwrap();
        let touch = |number: u64| std::fs::write(dir.path().join(format!("{number}.jnl")), b"x");
        let remove = |number: u64| std::fs::remove_file(dir.path().join(format!("{number}.jnl")));
        let mut journal = JournalSync::new(dir.path().to_owned());
        let active = |journal: &mut JournalSync| {
            let _ = journal.active();
            journal.active.as_ref().map(|(number, _)| *number)
        };
        assert_eq!(active(&mut journal), None);
        touch(3).unwrap();
        assert_eq!(active(&mut journal), Some(3));
        touch(4).unwrap();
        assert_eq!(active(&mut journal), Some(4));
        // Sealed and flushed journals are deleted oldest first while writes go on: 4 and 5 are
        // gone by the time the fsync thread looks again, and 6 has no successor yet.
        touch(5).unwrap();
        touch(6).unwrap();
        remove(4).unwrap();
        remove(5).unwrap();
        assert_eq!(active(&mut journal), Some(6));
        remove(3).unwrap();
        assert_eq!(active(&mut journal), Some(6));
    }

    #[test]
    fn entry_keys_sort_as_ids_do() {
        let ids = [
            EntryId::new(0, 1),
            EntryId::new(1, 0),
            EntryId::new(1, u64::MAX),
            EntryId::new(256, 0),
            EntryId::new(u64::MAX, 0),
        ];
        for pair in ids.windows(2) {
            assert!(keys::entry(7, pair[0]) < keys::entry(7, pair[1]));
        }
        assert!(keys::entry(7, EntryId::MAX) < keys::entry(8, EntryId::MIN));
        assert_eq!(keys::parse_id(&keys::id(ids[2])), Some(ids[2]));
        let members = keys::members(keys::PENDING, 3, "g");
        assert_eq!(
            keys::split_members(&members[9..]),
            Some((&b"g"[..], &b""[..]))
        );
    }
}
