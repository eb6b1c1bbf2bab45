//! Tells whoever asks when a stream grows, with one blocking read per instance for all watched
//! streams. This is what keeps idle consumers free: no consumer polls; a consumer group on this
//! instance reads only after the watcher says its stream has new entries (or on its own claim
//! timer).
//!
//! Each watched stream has a tail: the newest entry id the watcher knows. Waiters hold a
//! `watch::Receiver` of it and wake when it moves. After a wake-up the tail jumps to the stream's
//! newest entry (one extra read), so a backlog costs one round, not one round per entry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::newest_id;
use crate::backend::{AnyBackend, Backend, BackendError, backoff_delay};
use crate::model::{EntryId, StreamName};

/// How long one blocking read waits before it is issued again.
const BLOCK: Duration = Duration::from_secs(10);

struct Watched {
    tail: watch::Sender<EntryId>,
    /// Live [`TailWatch`]es for this stream.
    watchers: usize,
    /// Whether the tail has been read from the backend since the stream was added.
    initialised: bool,
}

struct Shared {
    streams: Mutex<HashMap<StreamName, Watched>>,
    /// Wakes the watcher task when the set of streams changes (one waiter: `notify_one` keeps the
    /// signal until it looks).
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamName, Watched>> {
        self.streams
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The instance's stream watcher. Cheap to clone.
#[derive(Clone)]
pub struct Watcher {
    shared: Arc<Shared>,
}

/// Interest in one stream's tail; the stream is no longer watched once every `TailWatch` for it
/// is dropped.
pub struct TailWatch {
    pub receiver: watch::Receiver<EntryId>,
    stream: StreamName,
    shared: Weak<Shared>,
}

impl Drop for TailWatch {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut streams = shared.lock();
        if let Some(watched) = streams.get_mut(&self.stream) {
            watched.watchers -= 1;
            if watched.watchers == 0 {
                streams.remove(&self.stream);
                shared.changed.notify_one();
            }
        }
    }
}

impl Watcher {
    /// Starts the watcher task; it runs until `shutdown`.
    pub fn start(backend: AnyBackend, shutdown: CancellationToken) -> Watcher {
        let shared = Arc::new(Shared {
            streams: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        });
        tokio::spawn(run(backend, Arc::downgrade(&shared), shutdown));
        Watcher { shared }
    }

    /// Starts watching `stream`. The receiver changes whenever the stream may have grown
    /// (including once when the watcher first reads its tail, and after a backend outage).
    pub fn watch(&self, stream: &StreamName) -> TailWatch {
        let mut streams = self.shared.lock();
        let watched = streams.entry(stream.clone()).or_insert_with(|| Watched {
            tail: watch::Sender::new(EntryId::MIN),
            watchers: 0,
            initialised: false,
        });
        watched.watchers += 1;
        let receiver = watched.tail.subscribe();
        if !watched.initialised {
            self.shared.changed.notify_one();
        }
        TailWatch {
            receiver,
            stream: stream.clone(),
            shared: Arc::downgrade(&self.shared),
        }
    }
}

/// Moves a stream's tail forward (never back) and wakes its waiters; `force` wakes them even
/// when it did not move.
fn advance(shared: &Shared, stream: &StreamName, newest: EntryId, force: bool) {
    let streams = shared.lock();
    if let Some(watched) = streams.get(stream) {
        watched.tail.send_if_modified(|tail| {
            let moved = newest > *tail;
            if moved {
                *tail = newest;
            }
            moved || force
        });
    }
}

async fn run(backend: AnyBackend, shared: Weak<Shared>, shutdown: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        // Armed before the snapshot, so a change made after it cuts the next read short.
        let changed = strong.changed.notified();
        let (uninitialised, cursors): (Vec<StreamName>, Vec<(StreamName, EntryId)>) = {
            let streams = strong.lock();
            let uninitialised = streams
                .iter()
                .filter(|(_, watched)| !watched.initialised)
                .map(|(stream, _)| stream.clone())
                .collect();
            let cursors = streams
                .iter()
                .filter(|(_, watched)| watched.initialised)
                .map(|(stream, watched)| (stream.clone(), *watched.tail.borrow()))
                .collect();
            (uninitialised, cursors)
        };
        let outcome = async {
            for stream in &uninitialised {
                let newest = newest_id(&backend, stream).await?;
                if let Some(watched) = strong.lock().get_mut(stream) {
                    watched.initialised = true;
                }
                advance(&strong, stream, newest, true);
            }
            if !uninitialised.is_empty() {
                return Ok(());
            }
            if cursors.is_empty() {
                tokio::select! {
                    _ = changed => {}
                    _ = shutdown.cancelled() => {}
                }
                return Ok(());
            }
            let interrupt = async {
                tokio::select! {
                    _ = changed => {}
                    _ = shutdown.cancelled() => {}
                }
            };
            let found = backend
                .read_after(&cursors, 1, Some(BLOCK), interrupt)
                .await?;
            for (stream, _) in found {
                let newest = newest_id(&backend, &stream).await?;
                advance(&strong, &stream, newest, false);
            }
            Ok::<(), BackendError>(())
        };
        let result = outcome.await;
        drop(strong);
        if shutdown.is_cancelled() {
            return;
        }
        match result {
            Ok(()) if failures > 0 => {
                // Back after an outage: every stream may have changed meanwhile.
                failures = 0;
                if let Some(strong) = shared.upgrade() {
                    for watched in strong.lock().values_mut() {
                        watched.initialised = false;
                    }
                }
            }
            Ok(()) => {}
            Err(error) => {
                let delay = backoff_delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(%error, ?delay, "stream watcher: backend read failed, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}
