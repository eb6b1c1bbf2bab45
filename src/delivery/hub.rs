//! Broadcast: every subscriber of a stream sees every message, and a subscriber that reconnects
//! continues exactly after the last id it saw.
//!
//! The instance's one tail reader ([`super::tails`]) reads every stream that has subscribers
//! here, and the hub turns each entry into one shared [`Frame`]; transports cache their encoding of a frame in
//! it, so a message is serialized once however many subscribers it has. Each stream keeps a ring
//! of recent frames so a reconnect with a recent id needs no backend read.
//!
//! A subscriber takes its live receiver and looks at the ring under one lock, then replays what
//! it missed (from the ring, or from the backend a page at a time) and switches to live frames,
//! skipping ids it has already sent: no gap and no duplicate at the seam. A subscriber that falls
//! more than the live channel's capacity behind is told so (`Lagged`) and goes back to reading by
//! its own cursor; it never holds more than a page, so a slow client costs only itself.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use super::newest_id;
use super::tails::Tails;
use crate::backend::{AnyBackend, Backend, BackendError, Direction, RangeQuery, backoff_delay};
use crate::model::{Entry, EntryId, StreamName, now_ms};

/// Recent frames kept per stream for reconnects: at most this many, and this many bytes.
const RING_FRAMES: usize = 1024;
const RING_BYTES: usize = 1 << 20;
/// Live frames a subscriber may be behind before it reads by its own cursor instead.
const LIVE_CAPACITY: usize = 1024;
/// Entries read per catch-up page, and per stream in one read of the hub's reader.
const PAGE: usize = 500;
/// How long a stream without subscribers keeps its ring, for clients that reconnect.
const LINGER: Duration = Duration::from_secs(60);

/// How many encodings a frame can cache (one per transport format).
pub const ENCODINGS: usize = 4;

/// One message, shared by every subscriber it goes to.
pub struct Frame {
    pub stream: Arc<StreamName>,
    pub entry: Entry,
    encodings: [OnceLock<Bytes>; ENCODINGS],
}

impl Frame {
    fn new(stream: Arc<StreamName>, entry: Entry) -> Frame {
        Frame {
            stream,
            entry,
            encodings: Default::default(),
        }
    }

    pub fn id(&self) -> EntryId {
        self.entry.id
    }

    /// This frame encoded by `encode`, computed once per `slot` and shared afterwards. Each
    /// transport format uses its own slot.
    pub fn encoded(&self, slot: usize, encode: impl FnOnce(&Frame) -> Bytes) -> Bytes {
        self.encodings[slot].get_or_init(|| encode(self)).clone()
    }

    /// Roughly how much memory the frame holds.
    fn size(&self) -> usize {
        self.entry
            .fields
            .iter()
            .map(|(field, value)| field.len() + value.len())
            .sum::<usize>()
            * 2
            + 128
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The whole retained history.
    Beginning,
    /// Entries appended from now on.
    Latest,
    /// After an id the client saw (a resume): refused if it is in the future; announced as a gap
    /// if it is older than everything retained.
    After(EntryId),
}

/// What a subscription yields.
#[derive(Clone)]
pub enum HubEvent {
    /// The requested id is older than the oldest retained entry; delivery resumes there.
    Gap {
        requested: EntryId,
        resumed_from: EntryId,
    },
    Message(Arc<Frame>),
}

/// Why a subscription could not start.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("id {requested} is after the stream's last id {last}")]
    FutureId { requested: EntryId, last: EntryId },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

struct Ring {
    /// The newest id the reader has seen; `None` until it has read the stream's tail.
    tail: Option<EntryId>,
    /// Every entry after `floor` (up to `tail`) is in `frames`.
    floor: EntryId,
    frames: VecDeque<Arc<Frame>>,
    bytes: usize,
    /// Since when nobody has subscribed (for lingering).
    idle_since: Option<Instant>,
}

struct Channel {
    stream: Arc<StreamName>,
    ring: Mutex<Ring>,
    /// Signalled when the reader has read the stream's tail (the ring's floor is known).
    initialised: Notify,
    live: broadcast::Sender<Arc<Frame>>,
    subscribers: AtomicUsize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Never held across an await; a poisoned lock still guards consistent data.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Channel {
    /// Adds the entries read after the tail to the ring and sends them live, in order (those
    /// up to the tail are skipped).
    fn push(&self, entries: &[Entry]) {
        let mut ring = lock(&self.ring);
        for entry in entries {
            if ring.tail.is_some_and(|tail| entry.id <= tail) {
                continue;
            }
            let frame = Arc::new(Frame::new(self.stream.clone(), entry.clone()));
            ring.tail = Some(frame.id());
            ring.bytes += frame.size();
            ring.frames.push_back(frame.clone());
            while ring.frames.len() > RING_FRAMES || ring.bytes > RING_BYTES {
                let Some(evicted) = ring.frames.pop_front() else {
                    break;
                };
                ring.bytes -= evicted.size();
                ring.floor = evicted.id();
            }
            // Sent under the ring's lock: a subscriber that took its receiver and looked at the
            // ring under this lock sees every frame exactly in one of the two.
            let _ = self.live.send(frame);
        }
    }
}

struct Shared {
    backend: AnyBackend,
    channels: Mutex<HashMap<StreamName, Arc<Channel>>>,
    /// Wakes the tail reader when the set of streams changes.
    changed: Arc<Notify>,
}

/// The instance's broadcast hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

/// A subscriber of one stream.
pub struct Subscription {
    channel: Arc<Channel>,
    backend: AnyBackend,
    receiver: broadcast::Receiver<Arc<Frame>>,
    /// The last id sent (or the start point).
    last: EntryId,
    catching_up: bool,
    /// Set after falling behind the live channel: the next backend page checks whether what was
    /// missed is still retained.
    check_gap: bool,
    queue: VecDeque<Arc<Frame>>,
    gap: Option<HubEvent>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.channel.subscribers.fetch_sub(1, Ordering::AcqRel) == 1 {
            lock(&self.channel.ring).idle_since = Some(Instant::now());
        }
    }
}

impl Hub {
    /// A hub that tells the tail reader of its changes through `changed`, and its sweeper (it
    /// runs until `shutdown`); it receives entries once the reader is given [`Hub::follower`].
    pub(super) fn start(
        backend: AnyBackend,
        changed: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Hub {
        let shared = Arc::new(Shared {
            backend,
            channels: Mutex::new(HashMap::new()),
            changed,
        });
        tokio::spawn(sweep(Arc::downgrade(&shared), shutdown));
        Hub { shared }
    }

    /// What the tail reader feeds.
    pub(super) fn follower(&self) -> Weak<dyn Tails> {
        Arc::downgrade(&self.shared) as Weak<dyn Tails>
    }

    /// Subscribes to a stream from `start`. Fails before anything is sent when `start` is an id
    /// in the future.
    pub async fn subscribe(
        &self,
        stream: &StreamName,
        start: Start,
    ) -> Result<Subscription, SubscribeError> {
        let channel = {
            let mut channels = lock(&self.shared.channels);
            let channel = channels
                .entry(stream.clone())
                .or_insert_with(|| {
                    self.shared.changed.notify_one();
                    Arc::new(Channel {
                        stream: Arc::new(stream.clone()),
                        ring: Mutex::new(Ring {
                            tail: None,
                            floor: EntryId::MIN,
                            frames: VecDeque::new(),
                            bytes: 0,
                            idle_since: None,
                        }),
                        initialised: Notify::new(),
                        live: broadcast::Sender::new(LIVE_CAPACITY),
                        subscribers: AtomicUsize::new(0),
                    })
                })
                .clone();
            channel.subscribers.fetch_add(1, Ordering::AcqRel);
            channel
        };
        let (receiver, tail, floor) = {
            let mut ring = lock(&channel.ring);
            ring.idle_since = None;
            (channel.live.subscribe(), ring.tail, ring.floor)
        };
        let mut subscription = Subscription {
            channel,
            backend: self.shared.backend.clone(),
            receiver,
            last: EntryId::MIN,
            catching_up: true,
            check_gap: false,
            queue: VecDeque::new(),
            gap: None,
        };
        let backend = &self.shared.backend;
        subscription.last = match start {
            Start::Beginning => EntryId::MIN,
            Start::Latest => match tail {
                Some(tail) => tail,
                None => newest_id(backend, stream).await?,
            },
            Start::After(requested) => {
                let covered = tail.is_some_and(|tail| requested >= floor && requested <= tail);
                if !covered {
                    subscription.gap = resume_gap(backend, stream, requested).await?;
                }
                requested
            }
        };
        Ok(subscription)
    }
}

/// The gap a subscription resuming after `requested` must announce first (SPEC 3.3): one only
/// when entries after `requested` were removed — deleted by id (`max_deleted_id`, kept by Redis 7
/// and the embedded engine alike) or trimmed away (the first retained entry is past `requested`
/// and the stream has lost entries). A stream that never lost an entry has none, wherever the
/// resume point is. `FutureId` when `requested` is past the stream's last id.
async fn resume_gap(
    backend: &AnyBackend,
    stream: &StreamName,
    requested: EntryId,
) -> Result<Option<HubEvent>, SubscribeError> {
    let info = match backend.stream_info(stream).await {
        Ok(info) => info,
        Err(BackendError::StreamNotFound) if requested == EntryId::MIN => return Ok(None),
        Err(BackendError::StreamNotFound) => {
            return Err(SubscribeError::FutureId {
                requested,
                last: EntryId::MIN,
            });
        }
        Err(error) => return Err(error.into()),
    };
    if requested > info.last_generated_id {
        return Err(SubscribeError::FutureId {
            requested,
            last: info.last_generated_id,
        });
    }
    let first = info.first_entry.map(|entry| entry.id);
    let trimmed_after =
        info.entries_added > info.length && first.is_some_and(|first| first > requested);
    let deleted_after = info.max_deleted_id > requested;
    if !trimmed_after && !deleted_after {
        return Ok(None);
    }
    // Resumed from the oldest entry still there after `requested`.
    let resumed_from = match first.filter(|first| *first > requested) {
        Some(first) => Some(first),
        None => {
            let next = RangeQuery {
                start: requested.successor().unwrap_or(EntryId::MAX),
                end: EntryId::MAX,
                count: 1,
                direction: Direction::Forward,
            };
            backend
                .range(stream, next)
                .await?
                .first()
                .map(|entry| entry.id)
        }
    };
    Ok(resumed_from.map(|resumed_from| HubEvent::Gap {
        requested,
        resumed_from,
    }))
}

impl Subscription {
    pub fn stream(&self) -> &StreamName {
        &self.channel.stream
    }

    /// The last id delivered (or where the subscription started).
    pub fn position(&self) -> EntryId {
        self.last
    }

    /// The next event, in id order, skipping expired messages; `None` when the hub is gone.
    /// While the backend is unreachable it waits and retries: subscribers stay connected and
    /// resume when it returns.
    pub async fn next(&mut self) -> Option<HubEvent> {
        let mut failures = 0u32;
        loop {
            if let Some(gap) = self.gap.take() {
                return Some(gap);
            }
            while let Some(frame) = self.queue.pop_front() {
                if frame.id() <= self.last {
                    continue;
                }
                self.last = frame.id();
                if frame.entry.is_expired(now_ms()) {
                    continue;
                }
                return Some(HubEvent::Message(frame));
            }
            if self.catching_up {
                // Boxed: a backend read's state exists only while catching up, so an idle
                // subscriber (waiting for live frames) stays small.
                if let Err(error) = Box::pin(self.catch_up()).await {
                    let delay = backoff_delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(%error, ?delay, stream = %self.channel.stream, "catching up failed, retrying");
                    // Boxed for the same reason.
                    Box::pin(tokio::time::sleep(delay)).await;
                }
                continue;
            }
            match self.receiver.recv().await {
                Ok(frame) => self.queue.push_back(frame),
                Err(RecvError::Lagged(_)) => {
                    self.catching_up = true;
                    self.check_gap = true;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// Queues what comes after `last`: from the ring when it reaches back that far, else the
    /// next page from the backend (not shared: a subscriber catching up pays for itself).
    ///
    /// Live frames cover only what comes after the ring's floor (the stream's newest id when the
    /// reader started on it), so the subscriber switches to them only once its position has
    /// reached the floor, waiting for the reader to start if it has not yet.
    async fn catch_up(&mut self) -> Result<(), BackendError> {
        let initialised = self.channel.initialised.notified();
        let mut initialised = std::pin::pin!(initialised);
        // Armed before looking, so a start signalled after the look is not missed.
        initialised.as_mut().enable();
        let floor = {
            let ring = lock(&self.channel.ring);
            if ring.tail.is_some() && self.last >= ring.floor {
                let last = self.last;
                self.queue.extend(
                    ring.frames
                        .iter()
                        .filter(|frame| frame.id() > last)
                        .cloned(),
                );
                self.catching_up = false;
                // Whatever it missed is in the ring: nothing was lost.
                self.check_gap = false;
                return Ok(());
            }
            ring.tail.map(|_| ring.floor)
        };
        let Some(start) = self.last.successor() else {
            self.catching_up = false;
            return Ok(());
        };
        let query = RangeQuery {
            start,
            end: EntryId::MAX,
            count: PAGE,
            direction: Direction::Forward,
        };
        let page = match self.backend.range(&self.channel.stream, query).await {
            Ok(page) => page,
            Err(BackendError::StreamNotFound) => Vec::new(),
            Err(error) => return Err(error),
        };
        if std::mem::take(&mut self.check_gap) {
            // Fell so far behind that what it missed may have been trimmed meanwhile: say so.
            let oldest = RangeQuery {
                start: EntryId::MIN,
                count: 1,
                ..query
            };
            let oldest = self
                .backend
                .range(&self.channel.stream, oldest)
                .await
                .unwrap_or_default();
            if let Some(oldest) = oldest.first().filter(|oldest| oldest.id > self.last) {
                self.gap = Some(HubEvent::Gap {
                    requested: self.last,
                    resumed_from: oldest.id,
                });
            }
        }
        let reached = page.last().map_or(self.last, |entry| entry.id);
        let complete = page.len() < PAGE;
        let stream = self.channel.stream.clone();
        self.queue.extend(
            page.into_iter()
                .map(|entry| Arc::new(Frame::new(stream.clone(), entry))),
        );
        if complete {
            match floor {
                Some(floor) if reached >= floor => self.catching_up = false,
                // Entries up to the floor were appended since the page was read: read on.
                Some(_) => {}
                None if self.queue.is_empty() => initialised.await,
                None => {}
            }
        }
        Ok(())
    }
}

/// What the tail reader reads for the hub: every stream with a channel, a page at a time.
impl Tails for Shared {
    fn count(&self) -> usize {
        PAGE
    }

    fn cursors(&self) -> Vec<(StreamName, Option<EntryId>)> {
        lock(&self.channels)
            .iter()
            .map(|(stream, channel)| (stream.clone(), lock(&channel.ring).tail))
            .collect()
    }

    fn started(&self, stream: &StreamName, newest: EntryId) {
        let Some(channel) = lock(&self.channels).get(stream).cloned() else {
            return;
        };
        {
            let mut ring = lock(&channel.ring);
            ring.tail = Some(newest);
            ring.floor = newest;
        }
        channel.initialised.notify_waiters();
    }

    fn found(&self, stream: &StreamName, entries: &[Entry], _newest: EntryId) {
        let channel = lock(&self.channels).get(stream).cloned();
        if let Some(channel) = channel {
            channel.push(entries);
        }
    }
}

/// Drops channels nobody has subscribed to for `LINGER`.
async fn sweep(shared: Weak<Shared>, shutdown: CancellationToken) {
    let mut timer = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = timer.tick() => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut channels = lock(&shared.channels);
        let before = channels.len();
        channels.retain(|_, channel| {
            channel.subscribers.load(Ordering::Acquire) > 0
                || lock(&channel.ring)
                    .idle_since
                    .is_none_or(|since| since.elapsed() < LINGER)
        });
        if channels.len() != before {
            shared.changed.notify_one();
        }
    }
}
