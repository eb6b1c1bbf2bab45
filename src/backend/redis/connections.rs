//! Where commands go: one Redis server (the pool, the batcher and dedicated blocking connections)
//! or a Redis Cluster (redis-rs's cluster connection, which follows MOVED/ASK, failovers and node
//! restarts, plus a bounded set of dedicated cluster connections for blocking reads).
//!
//! Everything above this module sends single-slot work only: a command's keys, a pipeline's or a
//! script's, all live in one stream's hash slot (derived keys carry the stream's hash tag). Reads
//! over several streams are split by slot here.
//!
//! `redis.wait_replicas`: a write is answered only once `WAIT` says that many replicas have it.
//! `WAIT` counts the writes of the connection it is sent on, so it always follows the write on
//! the same connection (a batch of writes takes one `WAIT`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::aio::ConnectionLike;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, FromRedisValue, Pipeline, ScriptInvocation, Value};
use tokio::sync::Semaphore;

use super::batch::Batcher;
use super::map_error;
use super::pool::{BlockingConnections, Pool};
use crate::backend::BackendError;

/// How long an interrupted blocking read is given to return before it is unblocked again.
const UNBLOCK_RETRY: Duration = Duration::from_millis(5);

/// Beyond its BLOCK, a blocking read's reply is late: its connection is treated as lost.
const LATE: Duration = Duration::from_secs(5);

/// Unblocks that missed a read before its client id is taken for stale (about 0.2 s).
const STALE_AFTER_MISSES: u32 = 40;

/// On a cluster, how often streams are polled when a read spans more hash slots than there are
/// free blocking connections (each slot needs a read of its own).
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// `WAIT` settings: replicas that must have a write, and how long to wait for them.
#[derive(Debug, Clone, Copy)]
pub struct WaitReplicas {
    pub replicas: u32,
    pub timeout: Duration,
}

impl WaitReplicas {
    pub fn command(&self) -> Cmd {
        let mut command = redis::cmd("WAIT");
        command
            .arg(self.replicas)
            .arg(self.timeout.as_millis() as u64);
        command
    }

    /// The outcome of a `WAIT` reply.
    pub fn check(&self, reply: &Value) -> Result<(), BackendError> {
        let acknowledged = i64::from_redis_value_ref(reply).unwrap_or(0);
        if acknowledged >= i64::from(self.replicas) {
            return Ok(());
        }
        Err(BackendError::Unavailable(format!(
            "the write reached {acknowledged} of {} replicas within {} ms (redis.wait_replicas); \
             it may still have been applied: retry with an Idempotency-Key",
            self.replicas,
            self.timeout.as_millis()
        )))
    }
}

pub enum Connections {
    Standalone(Standalone),
    Cluster(Cluster),
}

pub struct Standalone {
    pub pool: Arc<Pool>,
    pub batcher: Batcher,
    pub blocking: Arc<BlockingConnections>,
    pub wait: Option<WaitReplicas>,
}

pub struct Cluster {
    pub connection: ClusterConnection,
    pub batcher: Batcher,
    pub blocking: Arc<ClusterBlocking>,
    pub wait: Option<WaitReplicas>,
}

fn slot_route(slot: u16) -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
        slot,
        SlotAddr::Master,
    )))
}

/// The hash slot of a key, as Redis computes it (its first non-empty `{…}` tag, else the key).
/// Written out because redis-rs keeps its slot numbers private.
pub fn slot_of(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&byte| byte == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&byte| byte == b'}') {
            Some(0) | None => key,
            Some(length) => &key[open + 1..open + 1 + length],
        },
        None => key,
    };
    crc16_xmodem(hashed) % 16384
}

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with.
fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

impl Connections {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Connections::Cluster(_))
    }

    fn wait(&self) -> Option<WaitReplicas> {
        match self {
            Connections::Standalone(standalone) => standalone.wait,
            Connections::Cluster(cluster) => cluster.wait,
        }
    }

    /// One command (never a blocking one), batched with other callers' (see `batch`).
    pub async fn query(&self, command: Cmd) -> Result<Value, BackendError> {
        self.batcher().query(command, false).await
    }

    /// A command that writes, answered once replicated when `redis.wait_replicas` asks.
    pub async fn write(&self, command: Cmd) -> Result<Value, BackendError> {
        self.batcher().query(command, true).await
    }

    fn batcher(&self) -> &Batcher {
        match self {
            Connections::Standalone(standalone) => &standalone.batcher,
            Connections::Cluster(cluster) => &cluster.batcher,
        }
    }

    /// A pipeline whose keys are all in one slot.
    pub async fn pipeline(&self, pipeline: &Pipeline) -> Result<Vec<Value>, BackendError> {
        self.pipeline_then_wait(pipeline, None).await
    }

    /// A pipeline that writes `key` (and keys in its slot), answered once replicated when
    /// `redis.wait_replicas` asks.
    pub async fn write_pipeline(
        &self,
        pipeline: &Pipeline,
        key: &[u8],
    ) -> Result<Vec<Value>, BackendError> {
        self.pipeline_then_wait(pipeline, Some(key)).await
    }

    async fn pipeline_then_wait(
        &self,
        pipeline: &Pipeline,
        written: Option<&[u8]>,
    ) -> Result<Vec<Value>, BackendError> {
        let wait = self.wait().filter(|_| written.is_some());
        match self {
            Connections::Standalone(standalone) => {
                let mut lease = standalone.pool.lease()?;
                let replies: Vec<Value> = pipeline
                    .query_async(&mut lease.connection)
                    .await
                    .map_err(|error| lease.fail(error))?;
                if let Some(wait) = wait {
                    wait_on_lease(&mut lease, wait).await?;
                }
                Ok(replies)
            }
            Connections::Cluster(cluster) => match (wait, written) {
                (Some(wait), Some(key)) => {
                    let mut connection = WithWait::new(cluster, key, wait);
                    let replies = pipeline
                        .query_async(&mut connection)
                        .await
                        .map_err(map_error)?;
                    connection.check()?;
                    Ok(replies)
                }
                _ => cluster.pipeline(pipeline).await,
            },
        }
    }

    /// A Lua script whose keys are all in one slot.
    pub async fn script(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, BackendError> {
        self.script_then_wait(invocation, None).await
    }

    /// A script that writes `key`, answered once replicated when `redis.wait_replicas` asks.
    pub async fn write_script(
        &self,
        invocation: &ScriptInvocation<'_>,
        key: &[u8],
    ) -> Result<Value, BackendError> {
        self.script_then_wait(invocation, Some(key)).await
    }

    async fn script_then_wait(
        &self,
        invocation: &ScriptInvocation<'_>,
        written: Option<&[u8]>,
    ) -> Result<Value, BackendError> {
        let wait = self.wait().filter(|_| written.is_some());
        match self {
            Connections::Standalone(standalone) => {
                let mut lease = standalone.pool.lease()?;
                let value: Value = invocation
                    .invoke_async(&mut lease.connection)
                    .await
                    .map_err(|error| lease.fail(error))?;
                if let Some(wait) = wait {
                    wait_on_lease(&mut lease, wait).await?;
                }
                Ok(value)
            }
            Connections::Cluster(cluster) => match (wait, written) {
                (Some(wait), Some(key)) => {
                    let mut connection = WithWait::new(cluster, key, wait);
                    let value: Value = invocation
                        .invoke_async(&mut connection)
                        .await
                        .map_err(map_error)?;
                    connection.check()?;
                    Ok(value)
                }
                _ => invocation
                    .invoke_async(&mut cluster.connection.clone())
                    .await
                    .map_err(map_error),
            },
        }
    }

    /// `command` on every master (one server: on it), each reply with the node's address.
    pub async fn on_every_master(
        &self,
        command: Cmd,
    ) -> Result<Vec<(String, Value)>, BackendError> {
        match self {
            Connections::Standalone(_) => Ok(vec![(String::new(), self.query(command).await?)]),
            Connections::Cluster(cluster) => {
                let mut replies = Vec::new();
                for (host, port) in cluster.masters().await? {
                    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port,
                    });
                    let reply = cluster
                        .connection
                        .clone()
                        .route_command(command.clone(), routing)
                        .await
                        .map_err(map_error)?;
                    replies.push((format!("{host}:{port}"), reply));
                }
                Ok(replies)
            }
        }
    }

    /// `command` on the node `host:port` named by [`Connections::on_every_master`] (one
    /// server: on it).
    pub async fn on_node(&self, node: &str, command: Cmd) -> Result<Value, BackendError> {
        match self {
            Connections::Standalone(_) => self.query(command).await,
            Connections::Cluster(cluster) => {
                let (host, port) = node
                    .rsplit_once(':')
                    .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)))
                    .ok_or_else(|| BackendError::Internal(format!("not a node: {node}")))?;
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                cluster
                    .connection
                    .clone()
                    .route_command(command, routing)
                    .await
                    .map_err(map_error)
            }
        }
    }

    /// Splits reads over several keys into reads that each stay within one slot (one server:
    /// one read).
    pub fn by_slot<T>(&self, keys: Vec<T>, key: impl Fn(&T) -> &[u8]) -> Vec<Vec<T>> {
        if !self.is_cluster() {
            return vec![keys];
        }
        let mut groups: Vec<(u16, Vec<T>)> = Vec::new();
        for item in keys {
            let slot = slot_of(key(&item));
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, group)) => group.push(item),
                None => groups.push((slot, vec![item])),
            }
        }
        groups.into_iter().map(|(_, group)| group).collect()
    }

    /// Blocking reads (`XREAD … BLOCK`), one per single-slot command, each on a dedicated
    /// connection. Returns when one of them has a reply with entries (or all timed out), or
    /// when `interrupt` fires; the others are then cut short with `CLIENT UNBLOCK`, and every
    /// reply that arrived is returned. `commands` pairs each read's first key with the read at
    /// `block` and without blocking (used when a cluster has too few free connections).
    pub async fn blocking_reads(
        &self,
        commands: Vec<(Vec<u8>, Cmd, Cmd)>,
        block: Duration,
        interrupt: impl std::future::Future<Output = ()> + Send,
    ) -> Result<Vec<Value>, BackendError> {
        match self {
            Connections::Standalone(standalone) => {
                let Some((_, command, _)) = commands.into_iter().next() else {
                    return Ok(Vec::new());
                };
                let value = standalone
                    .blocking_read(command, block, interrupt, self)
                    .await?;
                Ok(vec![value])
            }
            Connections::Cluster(cluster) => {
                cluster.blocking_reads(commands, block, interrupt).await
            }
        }
    }
}

impl Standalone {
    /// `XREAD … BLOCK` on a dedicated connection. When `interrupt` fires first, the read is cut
    /// short with `CLIENT UNBLOCK` and its (possibly non-empty) reply is still taken, so nothing
    /// it returned is lost and the connection is clean for the next caller.
    async fn blocking_read(
        &self,
        command: Cmd,
        block: Duration,
        interrupt: impl std::future::Future<Output = ()> + Send,
        connections: &Connections,
    ) -> Result<Value, BackendError> {
        let mut lease = self.blocking.lease().await?;
        let (mut connection, client_id) = match &lease.inner {
            Some(inner) => (inner.connection.clone(), inner.client_id),
            None => return Err(BackendError::Internal("empty blocking lease".into())),
        };
        let read =
            tokio::time::timeout(block + LATE, command.query_async::<Value>(&mut connection));
        let mut read = std::pin::pin!(read);
        let outcome = tokio::select! {
            outcome = &mut read => outcome,
            _ = interrupt => loop {
                // The unblock goes on another connection and may reach Redis before the read it
                // should cut short (which then blocks for all of BLOCK): until one says it
                // unblocked the read, or the read returns, send it again.
                if unblock(connections, client_id).await {
                    break read.await;
                }
                if let Ok(outcome) = tokio::time::timeout(UNBLOCK_RETRY, &mut read).await {
                    break outcome;
                }
            },
        };
        match outcome {
            Ok(Ok(value)) => {
                lease.release();
                Ok(value)
            }
            Ok(Err(error)) => Err(map_error(error)),
            Err(_) => {
                lease.inner = None;
                Err(BackendError::Unavailable(
                    "a blocking read got no reply".into(),
                ))
            }
        }
    }
}

/// A cluster connection for one write (a script or a transaction) and its `WAIT`: whatever
/// redis-rs sends through it (`EVALSHA`, a `SCRIPT LOAD` after NOSCRIPT, `MULTI`…`EXEC`) goes as
/// one pipeline with a `WAIT` behind it to the master of `key`, so the `WAIT` counts exactly
/// that write, on the connection that carried it.
struct WithWait<'a> {
    connection: ClusterConnection,
    key: &'a [u8],
    wait: WaitReplicas,
    /// The last `WAIT`'s reply.
    replicated: Option<Value>,
}

impl<'a> WithWait<'a> {
    fn new(cluster: &Cluster, key: &'a [u8], wait: WaitReplicas) -> WithWait<'a> {
        WithWait {
            connection: cluster.connection.clone(),
            key,
            wait,
            replicated: None,
        }
    }

    /// Sends `commands` (wrapped in `MULTI`/`EXEC` when `transaction`) and a `WAIT`; returns
    /// the commands' replies (for a transaction: `MULTI`'s, the queued ones', `EXEC`'s).
    async fn send(
        &mut self,
        commands: impl Iterator<Item = &Cmd>,
        transaction: bool,
    ) -> redis::RedisResult<Vec<Value>> {
        let mut pipeline = redis::pipe();
        if transaction {
            pipeline.cmd("MULTI");
        }
        for command in commands {
            pipeline.add_command(command.clone());
        }
        if transaction {
            pipeline.cmd("EXEC");
        }
        pipeline.add_command(self.wait.command());
        let route =
            SingleNodeRoutingInfo::SpecificNode(Route::with_key(self.key, SlotAddr::Master));
        let mut attempts = 0;
        loop {
            let mut values = self
                .connection
                .clone()
                .route_pipeline(pipeline.clone(), 0, pipeline.len(), route.clone())
                .await?;
            self.replicated = values.pop();
            // One key (a script's, or a transaction's): a redirection means none of it ran.
            let moved = values.iter().find_map(|value| match value {
                Value::ServerError(error) if matches!(error.code(), "MOVED" | "ASK") => {
                    error.details().and_then(moved_slot_number)
                }
                _ => None,
            });
            match moved {
                None => return Ok(values),
                Some(slot) if attempts < 5 => {
                    attempts += 1;
                    follow_slot(&self.connection, slot, attempts).await;
                }
                Some(_) => {
                    return Err(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "the key's hash slot moved and was not followed yet",
                    )));
                }
            }
        }
    }

    /// Whether the last `WAIT` said enough replicas have the write.
    fn check(&self) -> Result<(), BackendError> {
        match &self.replicated {
            Some(Value::ServerError(error)) => Err(map_error(error.clone().into())),
            Some(reply) => self.wait.check(reply),
            None => Err(BackendError::Internal("no WAIT was sent".into())),
        }
    }
}

impl ConnectionLike for WithWait<'_> {
    fn req_packed_command<'b>(&'b mut self, command: &'b Cmd) -> redis::RedisFuture<'b, Value> {
        Box::pin(async move {
            match self.send(std::iter::once(command), false).await?.pop() {
                Some(Value::ServerError(error)) => Err(error.into()),
                Some(value) => Ok(value),
                None => Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "no reply to a command",
                ))),
            }
        })
    }

    fn req_packed_commands<'b>(
        &'b mut self,
        pipeline: &'b Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'b, Vec<Value>> {
        Box::pin(async move {
            let values = self
                .send(pipeline.cmd_iter(), pipeline.is_transaction())
                .await?;
            Ok(values.into_iter().skip(offset).take(count).collect())
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// `WAIT` on the pooled connection that carried the writes.
async fn wait_on_lease(
    lease: &mut super::pool::Lease,
    wait: WaitReplicas,
) -> Result<(), BackendError> {
    let reply: Value = wait
        .command()
        .query_async(&mut lease.connection)
        .await
        .map_err(|error| lease.fail(error))?;
    wait.check(&reply)
}

/// `CLIENT UNBLOCK client_id` on one server; true when it unblocked a read.
async fn unblock(connections: &Connections, client_id: i64) -> bool {
    let mut command = redis::cmd("CLIENT");
    command.arg("UNBLOCK").arg(client_id);
    matches!(connections.query(command).await, Ok(Value::Int(1)))
}

impl Cluster {
    /// A single-slot pipeline (atomic or not), routed by its first key (redis-rs's routing).
    async fn pipeline(&self, pipeline: &Pipeline) -> Result<Vec<Value>, BackendError> {
        routed_pipeline(&self.connection, pipeline, None)
            .await
            .map_err(map_error)
    }

    /// The masters that serve slots, from `CLUSTER NODES` (asked of any node).
    async fn masters(&self) -> Result<Vec<(String, u16)>, BackendError> {
        let mut command = redis::cmd("CLUSTER");
        command.arg("NODES");
        let reply = self
            .connection
            .clone()
            .route_command(
                command,
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
            )
            .await
            .map_err(map_error)?;
        let text = String::from_redis_value(reply)
            .map_err(|error| BackendError::Internal(error.to_string()))?;
        Ok(parse_masters(&text))
    }

    async fn blocking_reads(
        &self,
        commands: Vec<(Vec<u8>, Cmd, Cmd)>,
        block: Duration,
        interrupt: impl std::future::Future<Output = ()> + Send,
    ) -> Result<Vec<Value>, BackendError> {
        // A connection for each read: the first is waited for, the others only taken if free.
        let mut leases = Vec::with_capacity(commands.len());
        for (index, _) in commands.iter().enumerate() {
            let lease = match index {
                0 => Some(self.blocking.lease().await?),
                _ => self.blocking.try_lease().await?,
            };
            match lease {
                Some(lease) => leases.push(lease),
                None => break,
            }
        }
        if leases.len() < commands.len() {
            drop(leases);
            return self.poll(commands, block, interrupt).await;
        }
        let mut reads = FuturesUnordered::new();
        let mut pending = Vec::with_capacity(commands.len());
        for ((key, command, _), mut lease) in commands.into_iter().zip(leases) {
            let slot = slot_of(&key);
            let client_id = lease.client_id(slot).await?;
            pending.push((slot, client_id));
            let index = pending.len() - 1;
            reads.push(async move {
                let read = lease.connection.route_command(command, slot_route(slot));
                let outcome = tokio::time::timeout(block + LATE, read).await;
                (index, lease, outcome)
            });
        }
        // Per read: finished; how many unblocks missed it, `None` once one hit (an id gone stale
        // after redis-rs re-opened the connection misses every time: it is asked again next
        // time).
        let mut done = vec![false; pending.len()];
        let mut misses: Vec<Option<u32>> = vec![Some(0); pending.len()];
        let mut replies = Vec::new();
        let mut failure = None;
        let mut interrupt = std::pin::pin!(interrupt);
        let mut cut_short = false;
        loop {
            let finished = tokio::select! {
                finished = reads.next() => finished,
                _ = &mut interrupt, if !cut_short => { cut_short = true; None }
                _ = tokio::time::sleep(UNBLOCK_RETRY), if cut_short => None,
            };
            if let Some((index, mut lease, outcome)) = finished {
                done[index] = true;
                if misses[index].is_some_and(|misses| misses >= STALE_AFTER_MISSES) {
                    lease.client_ids.remove(&pending[index].0);
                }
                match outcome {
                    Ok(Ok(value)) => {
                        lease.release();
                        if !matches!(value, Value::Nil) {
                            cut_short = true;
                        }
                        replies.push(value);
                    }
                    Ok(Err(error)) => {
                        lease.forget();
                        cut_short = true;
                        failure = Some(map_error(error));
                    }
                    Err(_) => {
                        lease.forget();
                        cut_short = true;
                        failure = Some(BackendError::Unavailable(
                            "a blocking read got no reply".into(),
                        ));
                    }
                }
            } else if done.iter().all(|done| *done) {
                break;
            }
            if done.iter().all(|done| *done) {
                break;
            }
            if cut_short {
                for (index, (slot, client_id)) in pending.iter().enumerate() {
                    if let (false, Some(missed)) = (done[index], misses[index]) {
                        misses[index] = match unblock_on(self, *slot, *client_id).await {
                            // Unblocked: its reply is on its way.
                            true => None,
                            false => Some(missed + 1),
                        };
                    }
                }
            }
        }
        match failure {
            Some(error) if replies.iter().all(|value| matches!(value, Value::Nil)) => Err(error),
            _ => Ok(replies),
        }
    }

    /// Reads every slot without blocking, again every [`POLL_INTERVAL`], until something is
    /// new, `block` has passed or `interrupt` fires.
    async fn poll(
        &self,
        commands: Vec<(Vec<u8>, Cmd, Cmd)>,
        block: Duration,
        interrupt: impl std::future::Future<Output = ()> + Send,
    ) -> Result<Vec<Value>, BackendError> {
        let deadline = tokio::time::Instant::now() + block;
        let mut interrupt = std::pin::pin!(interrupt);
        loop {
            let reads = commands.iter().map(|(_, _, command)| {
                let mut connection = self.connection.clone();
                async move { connection.req_packed_command(command).await }
            });
            let replies = futures_util::future::try_join_all(reads)
                .await
                .map_err(map_error)?;
            let now = tokio::time::Instant::now();
            if now >= deadline || replies.iter().any(|value| !matches!(value, Value::Nil)) {
                return Ok(replies);
            }
            tokio::select! {
                _ = tokio::time::sleep_until((now + POLL_INTERVAL).min(deadline)) => {}
                _ = &mut interrupt => return Ok(Vec::new()),
            }
        }
    }
}

/// `CLIENT UNBLOCK client_id` on the master of `slot`; true when it unblocked a read.
async fn unblock_on(cluster: &Cluster, slot: u16, client_id: i64) -> bool {
    let mut command = redis::cmd("CLIENT");
    command.arg("UNBLOCK").arg(client_id);
    let reply = cluster
        .connection
        .clone()
        .route_command(command, slot_route(slot))
        .await;
    matches!(reply, Ok(Value::Int(1)))
}

/// A single-slot pipeline on a cluster, to `route` (else where its first key lives).
///
/// A pipeline whose slot moved (after a failover) can come back with every command refused
/// with MOVED when redis-rs has given up following it. Then one keyed command to that slot is
/// sent (redis-rs follows its MOVED and rebuilds the map), and the
/// pipeline is sent again — only when every command was refused (none ran).
pub(super) async fn routed_pipeline(
    connection: &ClusterConnection,
    pipeline: &Pipeline,
    route: Option<SingleNodeRoutingInfo>,
) -> Result<Vec<Value>, redis::RedisError> {
    let mut attempts = 0;
    loop {
        let outcome: Result<Vec<Value>, redis::RedisError> = match &route {
            Some(route) => {
                connection
                    .clone()
                    .route_pipeline(pipeline.clone(), 0, pipeline.len(), route.clone())
                    .await
            }
            None => pipeline.query_async(&mut connection.clone()).await,
        };
        let moved = match &outcome {
            // Re-sent only when nothing ran: every reply a redirection.
            Ok(values) if !values.iter().all(is_redirect) => None,
            Ok(values) => values.iter().find_map(|value| match value {
                Value::ServerError(error) if matches!(error.code(), "MOVED" | "ASK") => {
                    error.details().and_then(moved_slot_number)
                }
                _ => None,
            }),
            Err(error) => moved_slot(&error.to_string()),
        };
        match moved {
            Some(slot) if attempts < 5 => {
                attempts += 1;
                follow_slot(connection, slot, attempts).await;
            }
            _ => return outcome,
        }
    }
}

/// Sends a keyed command to `slot`: redis-rs follows its MOVED and rebuilds its slot map (in the
/// background: waits a little longer at each `attempt`).
async fn follow_slot(connection: &ClusterConnection, slot: u16, attempt: u64) {
    let mut command = redis::cmd("EXISTS");
    command.arg(format!("{{{}}}", super::coordination::tag_of_slot(slot)));
    let _ = connection.clone().req_packed_command(&command).await;
    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
}

fn is_redirect(value: &Value) -> bool {
    matches!(value, Value::ServerError(error) if matches!(error.code(), "MOVED" | "ASK"))
}

/// The slot at the start of a redirection's details (`3999 127.0.0.1:7002`).
fn moved_slot_number(details: &str) -> Option<u16> {
    details.split_whitespace().next()?.parse().ok()
}

/// The slot of a MOVED (or ASK) redirection in an error's text.
fn moved_slot(text: &str) -> Option<u16> {
    let at = ["MOVED ", "Moved: ", "ASK ", "Ask: "]
        .iter()
        .find_map(|marker| text.find(marker).map(|at| at + marker.len()))?;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// `host:port` of each connected master that serves slots, from `CLUSTER NODES`.
pub fn parse_masters(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let serves_slots = fields.len() > 8;
            if !flags.split(',').any(|flag| flag == "master")
                || flags.contains("fail")
                || !serves_slots
            {
                return None;
            }
            let address = fields.get(1)?.split('@').next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// Dedicated cluster connections for blocking reads, one read at a time each, at most `size`
/// (each holds one connection per node it has read from).
pub struct ClusterBlocking {
    client: ClusterClient,
    idle: Mutex<Vec<BlockingCluster>>,
    permits: Arc<Semaphore>,
}

/// A dedicated cluster connection and the client id it has on each slot's master.
struct BlockingCluster {
    connection: ClusterConnection,
    client_ids: HashMap<u16, i64>,
}

pub struct ClusterBlockingLease {
    connection: ClusterConnection,
    client_ids: HashMap<u16, i64>,
    keep: bool,
    pool: Arc<ClusterBlocking>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ClusterBlocking {
    /// `client` must have no response timeout (blocking replies come when the server decides).
    pub fn new(client: ClusterClient, size: usize) -> Arc<ClusterBlocking> {
        Arc::new(ClusterBlocking {
            client,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size.max(1))),
        })
    }

    async fn lease(self: &Arc<Self>) -> Result<ClusterBlockingLease, BackendError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BackendError::Unavailable("blocking connections closed".into()))?;
        self.lend(permit).await
    }

    /// A connection if a place is free now (`None` otherwise), opened if none is idle.
    async fn try_lease(self: &Arc<Self>) -> Result<Option<ClusterBlockingLease>, BackendError> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(self.lend(permit).await?)),
            Err(_) => Ok(None),
        }
    }

    async fn lend(
        self: &Arc<Self>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<ClusterBlockingLease, BackendError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let idle = match idle {
            Some(idle) => idle,
            None => BlockingCluster {
                connection: self
                    .client
                    .get_async_connection()
                    .await
                    .map_err(map_error)?,
                client_ids: HashMap::new(),
            },
        };
        Ok(ClusterBlockingLease {
            connection: idle.connection,
            client_ids: idle.client_ids,
            keep: true,
            pool: self.clone(),
            _permit: permit,
        })
    }
}

impl ClusterBlockingLease {
    /// This connection's client id on `slot`'s master (asked once, then remembered).
    async fn client_id(&mut self, slot: u16) -> Result<i64, BackendError> {
        if let Some(id) = self.client_ids.get(&slot) {
            return Ok(*id);
        }
        let mut command = redis::cmd("CLIENT");
        command.arg("ID");
        // This connection has no response timeout (it blocks): bound the wait here.
        let reply = tokio::time::timeout(
            LATE,
            self.connection.route_command(command, slot_route(slot)),
        )
        .await
        .map_err(|_| BackendError::Unavailable("no reply to CLIENT ID".into()))?
        .map_err(map_error)?;
        let id = i64::from_redis_value(reply)
            .map_err(|error| BackendError::Internal(error.to_string()))?;
        self.client_ids.insert(slot, id);
        Ok(id)
    }

    fn release(&mut self) {
        self.keep = true;
    }

    /// The read failed or is late: close the connection instead of reusing it.
    fn forget(&mut self) {
        self.keep = false;
    }
}

impl Drop for ClusterBlockingLease {
    fn drop(&mut self) {
        if self.keep {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(BlockingCluster {
                    connection: self.connection.clone(),
                    client_ids: std::mem::take(&mut self.client_ids),
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_computed_as_redis_does() {
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        // CRC16/XMODEM("123456789") is 0x31C3, below 16384.
        assert_eq!(slot_of(b"123456789"), 0x31C3);
    }

    #[test]
    fn redirections_name_their_slot() {
        assert_eq!(moved_slot("Moved: 10820 127.0.0.1:37985"), Some(10820));
        assert_eq!(moved_slot("MOVED 3739 127.0.0.1:1"), Some(3739));
        assert_eq!(moved_slot("ERR wrong number of arguments"), None);
    }

    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let text = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                    b 127.0.0.1:7001@17001 slave a 0 0 1 connected\n\
                    c 127.0.0.1:7002@17002 master,fail - 0 0 2 disconnected 5461-10922\n\
                    d 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383\n";
        assert_eq!(
            parse_masters(text),
            vec![("127.0.0.1".into(), 7000), ("127.0.0.1".into(), 7003)]
        );
    }
}
