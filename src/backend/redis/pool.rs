//! A fixed set of multiplexed Redis connections, each kept alive by its own supervisor task.
//!
//! Why not `ConnectionManager`: while it reconnects, every command waits for the reconnection
//! attempts to finish, so a publish during an outage would hang instead of answering 503 at once,
//! and it retries in bursts rather than with one capped backoff. Here a broken connection is taken
//! out of rotation immediately, commands fail fast with `Unavailable` while no connection is up,
//! and the supervisor reconnects with capped exponential backoff and jitter. Connections are
//! multiplexed, so the count stays fixed whatever the number of HTTP clients.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::map_error;
use crate::backend::{BackendError, backoff_delay};

/// One connection place. The lock guards a clone-able handle and is never held across `.await`.
struct Slot {
    current: RwLock<Option<(u64, MultiplexedConnection)>>,
    broken: Notify,
}

impl Slot {
    fn take_if_generation(&self, generation: u64) -> bool {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        if current
            .as_ref()
            .is_some_and(|(live, _)| *live == generation)
        {
            *current = None;
            true
        } else {
            false
        }
    }
}

/// The pool of command connections.
pub struct Pool {
    slots: Vec<Arc<Slot>>,
    next: AtomicUsize,
    /// How many slots hold a connection right now.
    n_connected: Arc<AtomicUsize>,
    /// True while at least one connection is up; watched by those waiting for the store to return.
    up: watch::Sender<bool>,
}

/// A connection taken from the pool for one command, with what is needed to report it broken.
pub struct Lease {
    pub connection: MultiplexedConnection,
    slot: Arc<Slot>,
    generation: u64,
    n_connected: Arc<AtomicUsize>,
}

impl Lease {
    /// Maps a command's error, taking the connection out of rotation when it is broken.
    pub fn fail(&self, error: RedisError) -> BackendError {
        if is_connection_error(&error) && self.slot.take_if_generation(self.generation) {
            self.n_connected.fetch_sub(1, Ordering::SeqCst);
            self.slot.broken.notify_one();
        }
        map_error(error)
    }
}

/// Errors after which the connection cannot be trusted again.
fn is_connection_error(error: &RedisError) -> bool {
    error.is_io_error() || error.is_connection_dropped() || error.is_unrecoverable_error()
}

impl Pool {
    /// Opens `size` connections. The first one is tried `1 + connect_retries` times with backoff;
    /// if it never succeeds the error is returned (start-up then exits). The others are opened by
    /// their supervisors in the background.
    pub async fn connect(
        client: Client,
        connection_config: AsyncConnectionConfig,
        size: usize,
        connect_retries: u32,
        shutdown: CancellationToken,
    ) -> Result<Arc<Pool>, RedisError> {
        let mut attempt = 0;
        let first = loop {
            match client
                .get_multiplexed_async_connection_with_config(&connection_config)
                .await
            {
                Ok(connection) => break connection,
                Err(error) if attempt < connect_retries => {
                    let delay = backoff_delay(attempt);
                    tracing::warn!(%error, attempt = attempt + 1, ?delay, "cannot connect to Redis yet, retrying");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
                Err(error) => return Err(error),
            }
        };
        let slots: Vec<Arc<Slot>> = (0..size.max(1))
            .map(|_| {
                Arc::new(Slot {
                    current: RwLock::new(None),
                    broken: Notify::new(),
                })
            })
            .collect();
        *slots[0].current.write().unwrap_or_else(|p| p.into_inner()) = Some((0, first));
        let (up, _) = watch::channel(true);
        let pool = Arc::new(Pool {
            slots,
            next: AtomicUsize::new(0),
            n_connected: Arc::new(AtomicUsize::new(1)),
            up,
        });
        for (index, slot) in pool.slots.iter().enumerate() {
            tokio::spawn(supervise(
                Arc::downgrade(&pool),
                slot.clone(),
                client.clone(),
                connection_config.clone(),
                index != 0,
                shutdown.clone(),
            ));
        }
        Ok(pool)
    }

    /// A live connection, round-robin; `Unavailable` at once when none is up.
    pub fn lease(&self) -> Result<Lease, BackendError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for offset in 0..self.slots.len() {
            let slot = &self.slots[(start + offset) % self.slots.len()];
            let current = slot.current.read().unwrap_or_else(|p| p.into_inner());
            if let Some((generation, connection)) = current.as_ref() {
                return Ok(Lease {
                    connection: connection.clone(),
                    slot: slot.clone(),
                    generation: *generation,
                    n_connected: self.n_connected.clone(),
                });
            }
        }
        Err(BackendError::Unavailable("no connection to Redis".into()))
    }

    /// Resolves once at least one connection is up (at once if one is).
    pub async fn wait_until_up(&self) {
        let mut up = self.up.subscribe();
        // An error means the pool is gone; there is nothing to wait for then.
        let _ = up.wait_for(|up| *up).await;
    }

    fn publish_state(&self) {
        let up = self.n_connected.load(Ordering::SeqCst) > 0;
        self.up
            .send_if_modified(|current| std::mem::replace(current, up) != up);
    }
}

/// Keeps one slot connected until shutdown: waits for the slot to be reported broken, then
/// reconnects with backoff.
async fn supervise(
    pool: std::sync::Weak<Pool>,
    slot: Arc<Slot>,
    client: Client,
    connection_config: AsyncConnectionConfig,
    mut needs_connection: bool,
    shutdown: CancellationToken,
) {
    let mut generation = 0u64;
    let mut attempt = 0u32;
    loop {
        if !needs_connection {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = slot.broken.notified() => {}
            }
            if let Some(pool) = pool.upgrade() {
                pool.publish_state();
            }
            tracing::warn!("lost a connection to Redis, reconnecting");
        }
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            connected = client.get_multiplexed_async_connection_with_config(&connection_config) => connected,
        };
        let Some(pool) = pool.upgrade() else { return };
        match connected {
            Ok(connection) => {
                generation += 1;
                *slot.current.write().unwrap_or_else(|p| p.into_inner()) =
                    Some((generation, connection));
                pool.n_connected.fetch_add(1, Ordering::SeqCst);
                pool.publish_state();
                if attempt > 0 {
                    tracing::info!(attempts = attempt, "reconnected to Redis");
                }
                attempt = 0;
                needs_connection = false;
            }
            Err(error) => {
                drop(pool);
                let delay = backoff_delay(attempt);
                tracing::debug!(%error, ?delay, "Redis reconnect failed");
                attempt = attempt.saturating_add(1);
                needs_connection = true;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Dedicated connections for blocking reads, one caller at a time each (a blocking command on a
/// shared connection would stall every other command on it). At most `size` exist.
pub struct BlockingConnections {
    client: Client,
    connection_config: AsyncConnectionConfig,
    idle: std::sync::Mutex<Vec<BlockingConnection>>,
    permits: Arc<tokio::sync::Semaphore>,
}

/// A blocking connection and its server-side client id (for `CLIENT UNBLOCK`).
pub struct BlockingConnection {
    pub connection: MultiplexedConnection,
    pub client_id: i64,
}

/// A blocking connection lent to one caller. Returned to the pool by [`BlockingLease::release`]
/// once its command has completed; dropped otherwise, which closes it, so that Redis forgets a
/// blocked command nobody waits for.
pub struct BlockingLease {
    pub inner: Option<BlockingConnection>,
    pool: Arc<BlockingConnections>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl BlockingLease {
    /// Gives the connection back for reuse; call only when no command is in flight on it.
    pub fn release(mut self) {
        if let Some(connection) = self.inner.take() {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(connection);
        }
    }
}

impl BlockingConnections {
    pub fn new(client: Client, connection_config: AsyncConnectionConfig, size: usize) -> Arc<Self> {
        Arc::new(BlockingConnections {
            client,
            // Blocking replies arrive when the server decides; callers bound the wait themselves.
            connection_config: connection_config.set_response_timeout(None),
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(size.max(1))),
        })
    }

    /// Waits for a free place, then lends an idle connection or opens a new one.
    pub async fn lease(self: &Arc<Self>) -> Result<BlockingLease, BackendError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BackendError::Unavailable("blocking connections closed".into()))?;
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let connection = match idle {
            Some(connection) => connection,
            None => {
                let mut connection = self
                    .client
                    .get_multiplexed_async_connection_with_config(&self.connection_config)
                    .await
                    .map_err(map_error)?;
                let client_id: i64 = redis::cmd("CLIENT")
                    .arg("ID")
                    .query_async(&mut connection)
                    .await
                    .map_err(map_error)?;
                BlockingConnection {
                    connection,
                    client_id,
                }
            }
        };
        Ok(BlockingLease {
            inner: Some(connection),
            pool: self.clone(),
            _permit: permit,
        })
    }
}
