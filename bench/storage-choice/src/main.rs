//! Compares the two embedded storage candidates for streamgate's embedded engine, fjall (an LSM
//! tree with a journal) and redb (a copy-on-write B-tree), on the engine's own patterns:
//!
//! - appends: one entry (24-byte key: stream number, then the entry id, big-endian; 200-byte value)
//!   plus the stream's metadata record, committed together, under each `storage.fsync` policy, with
//!   one writer and with 50 concurrent writers (group commit where the policy needs an fsync);
//! - reads on a stream of 1,000,000 entries: the newest 10 (a live consumer), 100 from a random
//!   position (catch-up), and a whole scan.
//!
//! Every variant keeps the rule that a process crash loses nothing acknowledged: an append is
//! acknowledged only once it has reached the operating system (fjall's default commit) or stable
//! storage. redb's `Durability::None` keeps commits in its own memory, so it is shown for
//! reference only. Run with `cargo run --release`; the figures go to ARCHITECTURE.md.

use redb::ReadableDatabase;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const VALUE_BYTES: usize = 200;
const WRITERS: usize = 50;
/// Each variant runs for at most this long (or its count), whichever comes first.
const BUDGET: Duration = Duration::from_secs(4);
const READ_SET: u64 = 1_000_000;

const ENTRIES: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("entries");
const META: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("meta");

fn key(stream: u64, n: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&stream.to_be_bytes());
    key[8..16].copy_from_slice(&(1_700_000_000_000 + n).to_be_bytes());
    key[16..].copy_from_slice(&0u64.to_be_bytes());
    key
}

fn value(n: u64) -> Vec<u8> {
    let mut value = vec![b'x'; VALUE_BYTES];
    value[..8].copy_from_slice(&n.to_le_bytes());
    value
}

fn meta(n: u64) -> [u8; 40] {
    let mut meta = [0u8; 40];
    meta[..8].copy_from_slice(&n.to_le_bytes());
    meta
}

/// A store as the engine would use it.
trait Store: Send + Sync {
    /// Appends one entry with its stream's metadata; returns once it is acknowledged.
    fn append(&self, stream: u64, n: u64);
    fn newest(&self, stream: u64, count: usize) -> usize;
    fn range_from(&self, stream: u64, n: u64, count: usize) -> usize;
    fn scan(&self, stream: u64) -> usize;
}

/// fsync in the background, waking the writers whose commits it covered (group commit).
struct Syncer {
    state: Mutex<(u64, u64)>, // (requested, synced)
    changed: Condvar,
}

impl Syncer {
    fn new() -> Arc<Syncer> {
        Arc::new(Syncer {
            state: Mutex::new((0, 0)),
            changed: Condvar::new(),
        })
    }

    /// Waits until an fsync that started after this call has finished.
    fn wait(&self) {
        let mut state = self.state.lock().unwrap();
        state.0 += 1;
        let ticket = state.0;
        self.changed.notify_all();
        while state.1 < ticket {
            state = self.changed.wait(state).unwrap();
        }
    }

    fn run(self: Arc<Self>, sync: impl Fn(), stop: Arc<AtomicU64>) {
        loop {
            let target = {
                let mut state = self.state.lock().unwrap();
                while state.0 == state.1 {
                    if stop.load(Ordering::Relaxed) == 1 {
                        return;
                    }
                    state = self
                        .changed
                        .wait_timeout(state, Duration::from_millis(50))
                        .unwrap()
                        .0;
                }
                state.0
            };
            sync();
            let mut state = self.state.lock().unwrap();
            state.1 = target;
            self.changed.notify_all();
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    /// Acknowledge once in the OS (fjall) / in a committed transaction (redb `None`, reference).
    Never,
    /// As `Never`, with an fsync every second in the background.
    EverySec,
    /// Acknowledge after an fsync, one per commit.
    AlwaysEach,
    /// Acknowledge after an fsync shared by every commit made before it started.
    AlwaysGroup,
}

struct Fjall {
    db: fjall::Database,
    entries: fjall::Keyspace,
    meta: fjall::Keyspace,
    policy: Policy,
    syncer: Arc<Syncer>,
}

impl Fjall {
    fn open(path: &std::path::Path, policy: Policy) -> Fjall {
        let db = fjall::Database::builder(path)
            .cache_size(64 << 20)
            .open()
            .unwrap();
        let entries = db
            .keyspace("entries", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        Fjall {
            db,
            entries,
            meta,
            policy,
            syncer: Syncer::new(),
        }
    }
}

impl Store for Fjall {
    fn append(&self, stream: u64, n: u64) {
        let mut batch = self.db.batch();
        batch.insert(&self.entries, key(stream, n), value(n));
        batch.insert(&self.meta, stream.to_be_bytes(), meta(n));
        batch.commit().unwrap();
        match self.policy {
            Policy::AlwaysEach => self.db.persist(fjall::PersistMode::SyncData).unwrap(),
            Policy::AlwaysGroup => self.syncer.wait(),
            Policy::Never | Policy::EverySec => {}
        }
    }

    fn newest(&self, stream: u64, count: usize) -> usize {
        self.entries
            .prefix(stream.to_be_bytes())
            .rev()
            .take(count)
            .map(|guard| guard.into_inner().unwrap().1.len())
            .sum()
    }

    fn range_from(&self, stream: u64, n: u64, count: usize) -> usize {
        self.entries
            .range(key(stream, n)..key(stream + 1, 0))
            .take(count)
            .map(|guard| guard.into_inner().unwrap().1.len())
            .sum()
    }

    fn scan(&self, stream: u64) -> usize {
        self.entries
            .prefix(stream.to_be_bytes())
            .map(|guard| guard.into_inner().unwrap().1.len())
            .sum()
    }
}

struct Redb {
    db: redb::Database,
    policy: Policy,
    /// Group commit: appends queued for the committer thread, and its completed generation.
    queue: Mutex<(Vec<(u64, u64)>, u64)>,
    committed: Mutex<u64>,
    changed: Condvar,
}

impl Redb {
    fn open(path: &std::path::Path, policy: Policy) -> Arc<Redb> {
        let db = redb::Builder::new()
            .set_cache_size(64 << 20)
            .create(path.join("db.redb"))
            .unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(ENTRIES).unwrap();
        txn.open_table(META).unwrap();
        txn.commit().unwrap();
        Arc::new(Redb {
            db,
            policy,
            queue: Mutex::new((Vec::new(), 0)),
            committed: Mutex::new(0),
            changed: Condvar::new(),
        })
    }

    fn write(&self, appends: &[(u64, u64)], durability: redb::Durability) {
        let mut txn = self.db.begin_write().unwrap();
        txn.set_durability(durability).unwrap();
        {
            let mut entries = txn.open_table(ENTRIES).unwrap();
            let mut meta_table = txn.open_table(META).unwrap();
            for &(stream, n) in appends {
                entries
                    .insert(key(stream, n).as_slice(), value(n).as_slice())
                    .unwrap();
                meta_table
                    .insert(stream.to_be_bytes().as_slice(), meta(n).as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }

    /// The committer: writes everything queued in one durable transaction.
    fn run(self: Arc<Self>, stop: Arc<AtomicU64>) {
        loop {
            let (batch, generation) = {
                let mut queue = self.queue.lock().unwrap();
                while queue.0.is_empty() {
                    if stop.load(Ordering::Relaxed) == 1 {
                        return;
                    }
                    queue = self
                        .changed
                        .wait_timeout(queue, Duration::from_millis(50))
                        .unwrap()
                        .0;
                }
                queue.1 += 1;
                (std::mem::take(&mut queue.0), queue.1)
            };
            self.write(&batch, redb::Durability::Immediate);
            *self.committed.lock().unwrap() = generation;
            self.changed.notify_all();
        }
    }
}

impl Store for Arc<Redb> {
    fn append(&self, stream: u64, n: u64) {
        match self.policy {
            Policy::Never => self.write(&[(stream, n)], redb::Durability::None),
            Policy::AlwaysEach => self.write(&[(stream, n)], redb::Durability::Immediate),
            Policy::EverySec | Policy::AlwaysGroup => {
                let generation = {
                    let mut queue = self.queue.lock().unwrap();
                    queue.0.push((stream, n));
                    queue.1 + 1
                };
                self.changed.notify_all();
                let mut committed = self.committed.lock().unwrap();
                while *committed < generation {
                    committed = self.changed.wait(committed).unwrap();
                }
            }
        }
    }

    fn newest(&self, stream: u64, count: usize) -> usize {
        let txn = self.db.begin_read().unwrap();
        let table = txn.open_table(ENTRIES).unwrap();
        let (from, to) = (key(stream, 0), key(stream + 1, 0));
        table
            .range(from.as_slice()..to.as_slice())
            .unwrap()
            .rev()
            .take(count)
            .map(|item| item.unwrap().1.value().len())
            .sum()
    }

    fn range_from(&self, stream: u64, n: u64, count: usize) -> usize {
        let txn = self.db.begin_read().unwrap();
        let table = txn.open_table(ENTRIES).unwrap();
        let (from, to) = (key(stream, n), key(stream + 1, 0));
        table
            .range(from.as_slice()..to.as_slice())
            .unwrap()
            .take(count)
            .map(|item| item.unwrap().1.value().len())
            .sum()
    }

    fn scan(&self, stream: u64) -> usize {
        let txn = self.db.begin_read().unwrap();
        let table = txn.open_table(ENTRIES).unwrap();
        let (from, to) = (key(stream, 0), key(stream + 1, 0));
        table
            .range(from.as_slice()..to.as_slice())
            .unwrap()
            .map(|item| item.unwrap().1.value().len())
            .sum()
    }
}

/// Appends from `writers` threads (each to its own stream) until the budget or `max` appends;
/// returns appends per second.
fn appends(store: &(impl Store + ?Sized), writers: usize, max: u64) -> f64 {
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for writer in 0..writers as u64 {
            let done = &done;
            scope.spawn(move || {
                let mut n = 0;
                while start.elapsed() < BUDGET && done.fetch_add(1, Ordering::Relaxed) < max {
                    store.append(writer + 1, n);
                    n += 1;
                }
            });
        }
    });
    let total = done.load(Ordering::Relaxed).min(max) as f64;
    total / start.elapsed().as_secs_f64()
}

/// Runs `f` with a background thread doing `sync` as the policy asks, then stops it.
fn with_background<T>(policy: Policy, syncer: Option<(Arc<Syncer>, Box<dyn Fn() + Send>)>, f: impl FnOnce() -> T) -> T {
    let stop = Arc::new(AtomicU64::new(0));
    std::thread::scope(|scope| {
        if let Some((syncer, sync)) = syncer {
            let stop = stop.clone();
            match policy {
                Policy::EverySec => {
                    scope.spawn(move || {
                        while stop.load(Ordering::Relaxed) == 0 {
                            std::thread::sleep(Duration::from_millis(100));
                            // Once a second, as Redis's appendfsync everysec.
                            static TICK: AtomicU64 = AtomicU64::new(0);
                            if TICK.fetch_add(1, Ordering::Relaxed) % 10 == 9 {
                                sync();
                            }
                        }
                    });
                }
                Policy::AlwaysGroup => {
                    scope.spawn(move || syncer.run(sync, stop));
                }
                _ => {}
            }
        }
        let result = f();
        stop.store(1, Ordering::Relaxed);
        result
    })
}

fn fjall_appends(policy: Policy, writers: usize) -> f64 {
    let dir = tempfile::tempdir_in(".").unwrap();
    let store = Fjall::open(dir.path(), policy);
    let db = store.db.clone();
    let sync: Box<dyn Fn() + Send> = Box::new(move || db.persist(fjall::PersistMode::SyncData).unwrap());
    with_background(policy, Some((store.syncer.clone(), sync)), || {
        appends(&store, writers, 200_000)
    })
}

fn redb_appends(policy: Policy, writers: usize) -> f64 {
    let dir = tempfile::tempdir_in(".").unwrap();
    let store = Redb::open(dir.path(), policy);
    let stop = Arc::new(AtomicU64::new(0));
    let committer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || store.run(stop))
    };
    let rate = appends(&store, writers, 200_000);
    stop.store(1, Ordering::Relaxed);
    store.changed.notify_all();
    committer.join().unwrap();
    rate
}

fn reads(name: &str, store: &dyn Store) {
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..10_000 {
        bytes += store.newest(1, 10);
    }
    let newest = 10_000.0 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut state = 12345u64;
    for _ in 0..2_000 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        bytes += store.range_from(1, (state >> 33) % (READ_SET - 100), 100);
    }
    let ranges = 2_000.0 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    bytes += store.scan(1);
    let scan = READ_SET as f64 / started.elapsed().as_secs_f64();
    assert!(bytes > 0);
    println!(
        "{name:<6} newest 10: {newest:>9.0}/s   100 from a random id: {ranges:>7.0}/s   scan: {:>5.2} M entries/s",
        scan / 1e6
    );
}

fn main() {
    println!("appends per second (200-byte entries; every variant survives a process crash unless marked)");
    println!("{:<34} {:>12} {:>12}", "", "1 writer", "50 writers");
    let rows: [(&str, Policy); 4] = [
        ("never (to the OS)", Policy::Never),
        ("everysec (to the OS, fsync 1/s)", Policy::EverySec),
        ("always, fsync per commit", Policy::AlwaysEach),
        ("always, group commit", Policy::AlwaysGroup),
    ];
    for (label, policy) in rows {
        println!(
            "fjall {label:<28} {:>12.0} {:>12.0}",
            fjall_appends(policy, 1),
            fjall_appends(policy, WRITERS)
        );
    }
    let rows: [(&str, Policy); 3] = [
        ("None (LOST on a crash; reference)", Policy::Never),
        ("Immediate per commit", Policy::AlwaysEach),
        ("group commit (any policy)", Policy::AlwaysGroup),
    ];
    for (label, policy) in rows {
        println!(
            "redb  {label:<28} {:>12.0} {:>12.0}",
            redb_appends(policy, 1),
            redb_appends(policy, WRITERS)
        );
    }

    println!("\nreads on one stream of {READ_SET} entries");
    let dir = tempfile::tempdir_in(".").unwrap();
    let fjall = Fjall::open(dir.path(), Policy::Never);
    let mut batch = fjall.db.batch();
    for n in 0..READ_SET {
        batch.insert(&fjall.entries, key(1, n), value(n));
        if n % 10_000 == 9_999 {
            batch.commit().unwrap();
            batch = fjall.db.batch();
        }
    }
    batch.commit().unwrap();
    reads("fjall", &fjall);
    drop(fjall);

    let dir = tempfile::tempdir_in(".").unwrap();
    let redb = Redb::open(dir.path(), Policy::Never);
    for chunk in (0..READ_SET).collect::<Vec<_>>().chunks(10_000) {
        let appends: Vec<(u64, u64)> = chunk.iter().map(|&n| (1, n)).collect();
        redb.write(&appends, redb::Durability::Immediate);
    }
    reads("redb", &redb);
}
