//! Delivery: turning stored entries into messages for connected clients, whatever the
//! transport. Consumer groups (competing consumers, acknowledged) live in [`groups`]; the stream
//! watcher that wakes them in [`watcher`]; broadcast (every subscriber sees every message) in
//! [`hub`], with multi-stream resume positions in [`cursor`]. One tail reader ([`tails`]) feeds
//! both the watcher and the hub.
//!
//! Knows the backend and the model; knows nothing about HTTP, SSE framing or WebSocket frames.

pub mod cursor;
pub mod groups;
pub mod hub;
mod instances;
mod tails;
pub mod watcher;

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::groups::{GroupSettings, Groups};
use self::hub::Hub;
use self::watcher::Watcher;
use crate::backend::{AnyBackend, Backend, BackendError, Direction, RangeQuery};
use crate::metrics::Metrics;
use crate::model::{EntryId, StreamName};

/// The delivery services of one instance.
pub struct Delivery {
    pub groups: Groups,
    pub hub: Hub,
}

impl Delivery {
    /// Starts the tail reader feeding the stream watcher and the broadcast hub, and the group
    /// dispatch; they run until `shutdown`.
    pub fn start(
        backend: AnyBackend,
        settings: GroupSettings,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Delivery {
        let changed = Arc::new(Notify::new());
        let watcher = Watcher::new(changed.clone());
        let hub = Hub::start(backend.clone(), changed.clone(), shutdown.clone());
        tokio::spawn(tails::follow(
            backend.clone(),
            vec![watcher.follower(), hub.follower()],
            changed,
            shutdown.clone(),
        ));
        Delivery {
            groups: Groups::start(
                backend.clone(),
                watcher,
                settings,
                metrics,
                shutdown.clone(),
            ),
            hub,
        }
    }
}

/// Why the server ended a subscription on purpose (SPEC 3.7): each transport tells its client
/// (SSE `event: end`, a WebSocket frame or close code) so that a deliberate end can be told from
/// a cut connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    GroupDeleted,
    StreamDeleted,
    Shutdown,
    TokenExpired,
    SlowConsumer,
}

impl EndReason {
    /// The reason as clients see it.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::GroupDeleted => "group_deleted",
            EndReason::StreamDeleted => "stream_deleted",
            EndReason::Shutdown => "shutdown",
            EndReason::TokenExpired => "token_expired",
            EndReason::SlowConsumer => "slow_consumer",
        }
    }
}

/// The newest entry id of a stream (`0-0` for an empty or missing one).
pub(crate) async fn newest_id(
    backend: &AnyBackend,
    stream: &StreamName,
) -> Result<EntryId, BackendError> {
    let query = RangeQuery {
        start: EntryId::MIN,
        end: EntryId::MAX,
        count: 1,
        direction: Direction::Backward,
    };
    match backend.range(stream, query).await {
        Ok(entries) => Ok(entries.first().map_or(EntryId::MIN, |entry| entry.id)),
        Err(BackendError::StreamNotFound | BackendError::WrongType) => Ok(EntryId::MIN),
        Err(error) => Err(error),
    }
}
