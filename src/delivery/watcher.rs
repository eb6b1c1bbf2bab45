//! Tells whoever asks when a stream grows, fed by the instance's one tail reader
//! ([`super::tails`]). This is what keeps idle consumers free: no consumer polls; a consumer group
//! on this instance reads only after the watcher says its stream has new entries (or on its own
//! claim timer).
//!
//! Each watched stream has a tail: the newest entry id the watcher knows. Waiters hold a
//! `watch::Receiver` of it and wake when it moves. After a wake-up the tail jumps to the stream's
//! newest entry, so a backlog costs one round, not one round per entry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Notify, watch};

use super::tails::Tails;
use crate::model::{Entry, EntryId, StreamName};

struct Watched {
    tail: watch::Sender<EntryId>,
    /// Live [`TailWatch`]es for this stream.
    watchers: usize,
    /// Whether the tail has been read from the backend since the stream was added.
    initialised: bool,
}

struct Shared {
    streams: Mutex<HashMap<StreamName, Watched>>,
    /// Wakes the tail reader when the set of streams changes.
    changed: Arc<Notify>,
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
    /// A watcher that tells the tail reader of its changes through `changed`; it follows tails
    /// once the reader is given [`Watcher::follower`].
    pub(super) fn new(changed: Arc<Notify>) -> Watcher {
        Watcher {
            shared: Arc::new(Shared {
                streams: Mutex::new(HashMap::new()),
                changed,
            }),
        }
    }

    /// What the tail reader feeds.
    pub(super) fn follower(&self) -> Weak<dyn Tails> {
        Arc::downgrade(&self.shared) as Weak<dyn Tails>
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

impl Tails for Shared {
    /// The watcher needs to know only that a stream grew, and its newest id.
    fn count(&self) -> usize {
        1
    }

    fn cursors(&self) -> Vec<(StreamName, Option<EntryId>)> {
        self.lock()
            .iter()
            .map(|(stream, watched)| {
                let cursor = watched.initialised.then(|| *watched.tail.borrow());
                (stream.clone(), cursor)
            })
            .collect()
    }

    fn started(&self, stream: &StreamName, newest: EntryId) {
        if let Some(watched) = self.lock().get_mut(stream) {
            watched.initialised = true;
        }
        advance(self, stream, newest, true);
    }

    fn found(&self, stream: &StreamName, _entries: &[Entry], newest: EntryId) {
        // Straight to the newest entry: a backlog costs one round, not one per entry.
        advance(self, stream, newest, false);
    }

    fn recovered(&self) {
        // Every stream may have changed during the outage: read each one's tail again.
        for watched in self.lock().values_mut() {
            watched.initialised = false;
        }
    }
}
