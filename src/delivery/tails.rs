//! The blocking tail reader that the group watcher and the broadcast hub both run: one blocking
//! read over every stream a follower follows, issued again every `BLOCK`, cut short when the set
//! of streams changes, and retried with backoff while the backend fails. What a read finds is the
//! follower's business ([`Tails`]): the watcher moves a tail, the hub feeds a channel.

use std::future::Future;
use std::sync::Weak;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::newest_id;
use crate::backend::{AnyBackend, Backend, BackendError, backoff_delay};
use crate::model::{Entry, EntryId, StreamName};

/// How long one blocking read waits before it is issued again.
const BLOCK: Duration = Duration::from_secs(10);

/// A follower of stream tails.
pub(super) trait Tails: Send + Sync + 'static {
    /// What the follower is, for log lines.
    const NAME: &'static str;
    /// Most entries one read returns per stream.
    const COUNT: usize;

    /// Notified when the set of followed streams changes (it cuts a blocking read short).
    fn changed(&self) -> &Notify;

    /// Every followed stream with where its next read starts (after that id); `None` while its
    /// start is not known yet.
    fn cursors(&self) -> Vec<(StreamName, Option<EntryId>)>;

    /// A stream's start is known: its newest id when it began to be followed.
    fn started(&self, stream: &StreamName, newest: EntryId);

    /// What one read found after a stream's cursor, in id order.
    fn found(
        &self,
        backend: &AnyBackend,
        stream: StreamName,
        entries: Vec<Entry>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// The backend answers again after failures (anything may have changed meanwhile).
    fn recovered(&self) {}
}

/// Follows `tails` until `shutdown` or until the follower is gone.
pub(super) async fn follow<T: Tails>(
    backend: AnyBackend,
    tails: Weak<T>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let Some(strong) = tails.upgrade() else {
            return;
        };
        // Armed before the snapshot, so a change made after it cuts the next read short.
        let changed = strong.changed().notified();
        let cursors = strong.cursors();
        let outcome = async {
            let mut known = Vec::with_capacity(cursors.len());
            let mut started = false;
            for (stream, cursor) in cursors {
                match cursor {
                    Some(cursor) => known.push((stream, cursor)),
                    None => {
                        let newest = newest_id(&backend, &stream).await?;
                        strong.started(&stream, newest);
                        started = true;
                    }
                }
            }
            // Streams were started: look again before blocking (more may have been added).
            if started {
                return Ok(());
            }
            let interrupt = async {
                tokio::select! {
                    _ = changed => {}
                    _ = shutdown.cancelled() => {}
                }
            };
            if known.is_empty() {
                interrupt.await;
                return Ok(());
            }
            let found = backend
                .read_after(&known, T::COUNT, Some(BLOCK), interrupt)
                .await?;
            for (stream, entries) in found {
                strong.found(&backend, stream, entries).await?;
            }
            Ok::<(), BackendError>(())
        };
        let result = outcome.await;
        if shutdown.is_cancelled() {
            return;
        }
        match result {
            Ok(()) if failures > 0 => {
                failures = 0;
                strong.recovered();
            }
            Ok(()) => {}
            Err(error) => {
                drop(strong);
                let delay = backoff_delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(%error, ?delay, "{}: backend read failed, retrying", T::NAME);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}
