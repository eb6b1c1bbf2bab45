//! The instance's one tail reader: one blocking read over every stream that the group watcher or
//! the broadcast hub follows, issued again every `BLOCK`, cut short when a follower's set of
//! streams changes, and retried with backoff while the backend fails. A stream that both follow
//! is read once, from the lower of their cursors; the follower ahead skips the ids it has seen.
//! What a read finds is each follower's business ([`Tails`]): the watcher moves a tail, the hub
//! feeds a channel.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::newest_id;
use crate::backend::{AnyBackend, Backend, BackendError, backoff_delay};
use crate::model::{Entry, EntryId, StreamName};

/// How long one blocking read waits before it is issued again.
const BLOCK: Duration = Duration::from_secs(10);

/// A follower of stream tails. Its set of streams changing is told to the reader through the
/// `Notify` given to [`follow`] (one waiter: `notify_one` keeps the signal until it looks).
pub(super) trait Tails: Send + Sync {
    /// Most entries one read should return per stream (a read returns the most any of its
    /// followers wants, for every stream it reads).
    fn count(&self) -> usize;

    /// Every followed stream with where its next read starts (after that id); `None` while its
    /// start is not known yet.
    fn cursors(&self) -> Vec<(StreamName, Option<EntryId>)>;

    /// A stream's start is known: its newest id when it began to be followed.
    fn started(&self, stream: &StreamName, newest: EntryId);

    /// What one read found for a followed stream, in id order, after the lowest cursor of the
    /// stream's followers (so it may begin with ids this follower has seen), and the stream's
    /// newest id as of that read.
    fn found(&self, stream: &StreamName, entries: &[Entry], newest: EntryId);

    /// The backend answers again after failures (anything may have changed meanwhile).
    fn recovered(&self) {}
}

/// Reads for `followers` until `shutdown` or until every one of them is gone.
pub(super) async fn follow(
    backend: AnyBackend,
    followers: Vec<Weak<dyn Tails>>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let live: Vec<Arc<dyn Tails>> = followers.iter().filter_map(Weak::upgrade).collect();
        if live.is_empty() {
            return;
        }
        // Armed before the followers are asked for their cursors, so a change made after that
        // cuts the next read short.
        let notified = changed.notified();
        let interrupt = async {
            tokio::select! {
                _ = notified => {}
                _ = shutdown.cancelled() => {}
            }
        };
        let result = round(&backend, &live, interrupt).await;
        if shutdown.is_cancelled() {
            return;
        }
        match result {
            Ok(()) if failures > 0 => {
                failures = 0;
                live.iter().for_each(|follower| follower.recovered());
            }
            Ok(()) => {}
            Err(error) => {
                drop(live);
                let delay = backoff_delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(%error, ?delay, "tail reader: backend read failed, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// One round: the streams a follower has just begun to follow are started, or else one blocking
/// read over every followed stream, until it finds entries or `interrupt` cuts it short.
async fn round(
    backend: &AnyBackend,
    followers: &[Arc<dyn Tails>],
    interrupt: impl Future<Output = ()> + Send,
) -> Result<(), BackendError> {
    // Each stream read: the lowest cursor of its followers, and which followers they are.
    let mut streams: HashMap<StreamName, (EntryId, Vec<&dyn Tails>)> = HashMap::new();
    let mut count = 1;
    let mut started = false;
    for follower in followers {
        for (stream, cursor) in follower.cursors() {
            let Some(cursor) = cursor else {
                let newest = newest_id(backend, &stream).await?;
                follower.started(&stream, newest);
                started = true;
                continue;
            };
            count = count.max(follower.count());
            let (lowest, following) = streams
                .entry(stream)
                .or_insert_with(|| (cursor, Vec::new()));
            *lowest = (*lowest).min(cursor);
            following.push(follower.as_ref());
        }
    }
    // Streams were started: look again before blocking (more may have been added).
    if started {
        return Ok(());
    }
    if streams.is_empty() {
        interrupt.await;
        return Ok(());
    }
    let cursors: Vec<(StreamName, EntryId)> = streams
        .iter()
        .map(|(stream, (cursor, _))| (stream.clone(), *cursor))
        .collect();
    let found = backend
        .read_after(&cursors, count, Some(BLOCK), interrupt)
        .await?;
    for (stream, entries) in found {
        let (Some(last), Some((_, following))) = (entries.last(), streams.get(&stream)) else {
            continue;
        };
        // A full read may have left entries behind: then the newest is read (one more round
        // trip for a backlog, instead of one round per page for a follower that needs only it).
        let newest = if entries.len() < count {
            last.id
        } else {
            newest_id(backend, &stream).await?
        };
        for follower in following {
            follower.found(&stream, &entries, newest);
        }
    }
    Ok(())
}
