//! The Redis backend: Redis 7+, one server (a fixed pool of multiplexed connections) or a Redis
//! Cluster (see `connections`). Writes of several commands go in one pipeline (`MULTI`/`EXEC`
//! where they must be atomic); idempotent appends run as one Lua script so that racing retries
//! write exactly once. Every key derived from a stream lives in the stream's hash slot.

mod batch;
mod connections;
mod coordination;
mod parse;
mod pool;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, RedisError, Value};
use tokio_util::sync::CancellationToken;

use self::batch::{Batcher, Target};
use self::connections::{Cluster, ClusterBlocking, Connections, Standalone, WaitReplicas};
use self::pool::{BlockingConnections, Pool};
use super::{
    AppendOutcome, AppendRequest, Backend, BackendError, ClaimPage, ConsumerInfo, Delivery,
    Direction, GroupBatch, GroupCursor, GroupRead, GroupReport, GroupStart, Lease, PendingEntry,
    PendingQuery, RangeQuery, Retention, StreamInfo, StreamStats, Trim,
};
use crate::model::{ConsumerName, Entry, EntryId, GroupName, NewEntry, StreamName, now_ms};

/// How many dedicated connections blocking reads may use at once (on a cluster: dedicated
/// cluster connections, each with one connection per node it reads from).
const BLOCKING_CONNECTIONS: usize = 8;

/// Whether the configured Redis is a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMode {
    /// Ask the first node (`INFO cluster`).
    Auto,
    Cluster,
    Standalone,
}

/// How to reach Redis. Built by the configuration.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://[user:pass@]host:port/db` or `rediss://…`; holds secrets, never logged.
    pub url: String,
    /// `host:port/db`, without credentials, for banners and health output.
    pub display_address: String,
    /// Command connections kept open (multiplexed; independent of the number of clients).
    pub pool_size: usize,
    /// Start-up attempts after the first before giving up.
    pub connect_retries: u32,
    /// Longest wait for one reply (not used by blocking reads, which have their own).
    pub response_timeout: Duration,
    /// Longest wait for a connection to open.
    pub connect_timeout: Duration,
    /// PEM certificates to trust for `rediss://` instead of the system's roots.
    pub tls_ca: Option<std::path::PathBuf>,
    /// One server or a cluster.
    pub cluster: ClusterMode,
    /// More seed nodes of a cluster (`redis.urls`), besides `url`. Hold secrets.
    pub seeds: Vec<String>,
    /// Replicas a write must reach before it is acknowledged (`WAIT`); 0: no wait.
    pub wait_replicas: u32,
    /// Longest wait for them (then 503).
    pub wait_timeout: Duration,
}

impl RedisOptions {
    /// Options for the Redis at `url` with the defaults: 4 connections, 3 start-up retries, 10 s
    /// replies, 2 s connects, cluster detected, no wait for replicas.
    pub fn new(url: impl Into<String>, display_address: impl Into<String>) -> RedisOptions {
        RedisOptions {
            url: url.into(),
            display_address: display_address.into(),
            pool_size: 4,
            connect_retries: 3,
            response_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            tls_ca: None,
            cluster: ClusterMode::Auto,
            seeds: Vec::new(),
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
        }
    }

    /// A client for these options (connections open later).
    pub fn client(&self) -> Result<Client, RedisError> {
        self.client_for(&self.url)
    }

    /// A client for one node at `url` (a seed, or a node of the cluster) with these options' TLS.
    fn client_for(&self, url: &str) -> Result<Client, RedisError> {
        match self.certificates()? {
            None => Client::open(url),
            Some(certificates) => Client::build_with_tls(url, certificates),
        }
    }

    /// The seed nodes: `url`, then `seeds`.
    fn seed_urls(&self) -> Vec<String> {
        let mut urls = vec![self.url.clone()];
        urls.extend(self.seeds.iter().filter(|seed| **seed != self.url).cloned());
        urls
    }

    /// A cluster client over the seed nodes; `response_timeout` `None` for blocking reads.
    fn cluster_client(
        &self,
        response_timeout: Option<Duration>,
    ) -> Result<redis::cluster::ClusterClient, RedisError> {
        let mut builder = redis::cluster::ClusterClientBuilder::new(self.seed_urls())
            .connection_timeout(self.connect_timeout)
            // A failover takes seconds: commands meanwhile fail fast (503) rather than retry
            // past the response timeout.
            .retries(2)
            .min_retry_wait(50)
            .max_retry_wait(500);
        builder = match response_timeout {
            Some(timeout) => builder
                .response_timeout(timeout)
                .overall_response_timeout(Some(timeout)),
            None => builder.overall_response_timeout(None),
        };
        if let Some(certificates) = self.certificates()? {
            builder = builder.certs(certificates);
        }
        builder.build()
    }

    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, RedisError> {
        let Some(path) = &self.tls_ca else {
            return Ok(None);
        };
        let root_cert = std::fs::read(path).map_err(|error| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "cannot read redis.tls_ca",
                format!("{}: {error}", path.display()),
            ))
        })?;
        Ok(Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        }))
    }
}

/// Idempotent append, atomically: return the remembered ids if the key was seen, else append
/// every entry (with the retention), remember the ids, and return them.
///
/// KEYS: stream, idempotency record. ARGV: record ttl ms, max_len or "", min_id or "",
/// idle ttl ms or "", then per entry: its id (or `*`), its field count n, and n field/value pairs.
const IDEMPOTENT_APPEND: &str = r#"
local previous = redis.call('GET', KEYS[2])
if previous then return {1, previous} end
local ids = {}
local i = 5
while i <= #ARGV do
  local id = ARGV[i]
  i = i + 1
  local n = tonumber(ARGV[i])
  local args = {'XADD', KEYS[1]}
  if ARGV[2] ~= '' then
    args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = ARGV[2]
  elseif ARGV[3] ~= '' then
    args[#args + 1] = 'MINID'; args[#args + 1] = '~'; args[#args + 1] = ARGV[3]
  end
  args[#args + 1] = id
  for j = 1, 2 * n do args[#args + 1] = ARGV[i + j] end
  ids[#ids + 1] = redis.call(unpack(args))
  i = i + 1 + 2 * n
end
if ARGV[2] ~= '' and ARGV[3] ~= '' then redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
local joined = table.concat(ids, ' ')
redis.call('SET', KEYS[2], joined, 'PX', ARGV[1])
return {0, joined}
"#;

/// `XAUTOCLAIM` plus each claimed entry's delivery count (which it does not return), atomically.
///
/// KEYS: stream. ARGV: group, consumer, min idle ms, cursor, count.
const CLAIM_IDLE: &str = r#"
local page = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local counts = {}
for i, entry in ipairs(page[2]) do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
  counts[i] = pending[1] and pending[1][4] or 1
end
return {page[1], page[2], page[3], counts}
"#;

/// Sets a pending entry's idle time, keeping its owner and delivery count.
///
/// KEYS: stream. ARGV: group, id, idle ms.
const SET_PENDING_IDLE: &str = r#"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], pending[1][2], 0, ARGV[2], 'IDLE', ARGV[3], 'JUSTID')
return 1
"#;

/// `XGROUP CREATE` (with `MKSTREAM`) or `XGROUP SETID`. At `$` the group is told how many entries
/// it has "read" (all of them), so Redis can report its lag from the start.
///
/// KEYS: stream. ARGV: `CREATE` or `SETID`, group, start id or `$`.
const POSITION_GROUP: &str = r#"
local args = {'XGROUP', ARGV[1], KEYS[1], ARGV[2], ARGV[3]}
if ARGV[1] == 'CREATE' then args[#args + 1] = 'MKSTREAM' end
if ARGV[3] == '$' and redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'entries-added' then
      args[#args + 1] = 'ENTRIESREAD'; args[#args + 1] = info[i + 1]
    end
  end
end
return redis.call(unpack(args))
"#;

/// Removes a consumer only if it owns no pending entry and has been idle long enough; checked
/// and done atomically, so an entry read meanwhile can never be dropped from the pending list.
///
/// KEYS: stream. ARGV: group, consumer, min idle ms. Returns 1 when removed.
const REMOVE_IDLE_CONSUMER: &str = r#"
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, consumer in ipairs(consumers) do
  local fields = {}
  for i = 1, #consumer, 2 do fields[consumer[i]] = consumer[i + 1] end
  if fields['name'] == ARGV[2] then
    if fields['pending'] == 0 and fields['idle'] >= tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
    return 0
  end
end
return 0
"#;

/// Acknowledges entries and deletes those that were pending, atomically.
///
/// KEYS: stream. ARGV: group, then the ids. Returns how many were pending.
const ACK_AND_DELETE: &str = r#"
local acked = 0
for i = 2, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    acked = acked + 1
  end
end
return acked
"#;

/// Deletes a key only if it is a stream. KEYS: stream.
const DELETE_STREAM: &str = r#"
if redis.call('TYPE', KEYS[1]).ok == 'stream' then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Sets a stream's id generator and counters, creating the stream (empty) when it is missing:
/// `XSETID` needs the key, and an entry added and trimmed at once leaves an empty stream.
///
/// KEYS: stream. ARGV: last id, entries added, max deleted id.
const SET_LAST_ID: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '0', '0-1', 'streamgate', 'created')
end
return redis.call('XSETID', KEYS[1], ARGV[1], 'ENTRIESADDED', ARGV[2], 'MAXDELETEDID', ARGV[3])
"#;

/// The Redis backend. Cheap to clone.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    connections: Connections,
    display_address: String,
    idempotent_append: redis::Script,
    claim_idle: redis::Script,
    set_pending_idle: redis::Script,
    delete_stream: redis::Script,
    position_group: redis::Script,
    remove_idle_consumer: redis::Script,
    ack_and_delete: redis::Script,
    set_last_id: redis::Script,
    coordination: coordination::Coordination,
}

impl RedisBackend {
    /// Connects, retrying `connect_retries` times with backoff; the error names the cause.
    pub async fn connect(
        options: &RedisOptions,
        shutdown: CancellationToken,
    ) -> Result<RedisBackend, RedisError> {
        let wait = (options.wait_replicas > 0).then_some(WaitReplicas {
            replicas: options.wait_replicas,
            timeout: options.wait_timeout,
        });
        let cluster = match options.cluster {
            ClusterMode::Cluster => true,
            ClusterMode::Standalone => false,
            ClusterMode::Auto => is_cluster(options).await?,
        };
        let (connections, subscribers) = match cluster {
            true => {
                let connection = connect_cluster(options).await?;
                let blocking =
                    ClusterBlocking::new(options.cluster_client(None)?, BLOCKING_CONNECTIONS);
                let cluster = Cluster {
                    batcher: Batcher::start(Target::Cluster(connection.clone()), wait),
                    connection,
                    blocking,
                    wait,
                };
                // Pub/Sub (the control channel) on any node: PUBLISH reaches every node.
                let subscribers = cluster_nodes(options, &cluster).await;
                (Connections::Cluster(cluster), subscribers)
            }
            false => {
                let client = options.client()?;
                let connection_config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(options.connect_timeout))
                    .set_response_timeout(Some(options.response_timeout));
                let blocking = BlockingConnections::new(
                    client.clone(),
                    connection_config.clone(),
                    BLOCKING_CONNECTIONS,
                );
                let pool = Pool::connect(
                    client.clone(),
                    connection_config,
                    options.pool_size,
                    options.connect_retries,
                    shutdown.clone(),
                )
                .await?;
                let standalone = Standalone {
                    batcher: Batcher::start(Target::Pool(pool.clone()), wait),
                    pool,
                    blocking,
                    wait,
                };
                (Connections::Standalone(standalone), vec![client])
            }
        };
        let coordination = coordination::Coordination::new(subscribers, shutdown);
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                connections,
                display_address: options.display_address.clone(),
                idempotent_append: redis::Script::new(IDEMPOTENT_APPEND),
                claim_idle: redis::Script::new(CLAIM_IDLE),
                set_pending_idle: redis::Script::new(SET_PENDING_IDLE),
                delete_stream: redis::Script::new(DELETE_STREAM),
                position_group: redis::Script::new(POSITION_GROUP),
                remove_idle_consumer: redis::Script::new(REMOVE_IDLE_CONSUMER),
                ack_and_delete: redis::Script::new(ACK_AND_DELETE),
                set_last_id: redis::Script::new(SET_LAST_ID),
                coordination,
            }),
        })
    }

    /// `host:port/db` without credentials.
    pub fn address(&self) -> &str {
        &self.inner.display_address
    }

    /// A Lua script whose keys all live in one hash slot (for the Pub/Sub bridge).
    pub(crate) async fn run_script<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, BackendError> {
        self.script(invocation).await
    }

    /// Clients for the nodes Pub/Sub may subscribe on, to be tried in turn (one server: it; a
    /// cluster: every node, as each hears every PUBLISH).
    pub(crate) fn subscribers(&self) -> Vec<Client> {
        self.inner.coordination.subscribers()
    }

    /// Whether this backend talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.connections.is_cluster()
    }

    /// Resolves once Redis answers.
    pub async fn wait_until_up(&self) {
        match &self.inner.connections {
            Connections::Standalone(standalone) => standalone.pool.wait_until_up().await,
            Connections::Cluster(_) => {
                while self.ping().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// One command (see `connections`). Never a blocking one.
    async fn query<T: FromRedisValue>(&self, command: Cmd) -> Result<T, BackendError> {
        let value = self.inner.connections.query(command).await?;
        parse_value(value)
    }

    /// One command that writes (waits for replicas when configured).
    async fn write<T: FromRedisValue>(&self, command: Cmd) -> Result<T, BackendError> {
        let value = self.inner.connections.write(command).await?;
        parse_value(value)
    }

    async fn script<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, BackendError> {
        parse_value(self.inner.connections.script(invocation).await?)
    }

    /// A script that writes `stream` (waits for replicas when configured).
    async fn write_script<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        stream: &StreamName,
    ) -> Result<T, BackendError> {
        let value = self
            .inner
            .connections
            .write_script(invocation, stream.as_str().as_bytes())
            .await?;
        parse_value(value)
    }

    async fn query_pipeline(&self, pipeline: &redis::Pipeline) -> Result<Vec<Value>, BackendError> {
        self.inner.connections.pipeline(pipeline).await
    }

    /// A pipeline that writes `stream` (waits for replicas when configured).
    async fn write_pipeline(
        &self,
        pipeline: &redis::Pipeline,
        stream: &StreamName,
    ) -> Result<Vec<Value>, BackendError> {
        self.inner
            .connections
            .write_pipeline(pipeline, stream.as_str().as_bytes())
            .await
    }

    async fn idempotent_append(
        &self,
        stream: &StreamName,
        request: &AppendRequest,
        key: &super::IdempotencyKey,
        min_id: Option<EntryId>,
    ) -> Result<AppendOutcome, BackendError> {
        let retention = &request.retention;
        let mut invocation = self.inner.idempotent_append.key(stream.as_str());
        invocation
            .key(idempotency_record_key(stream, &key.key))
            .arg(key.ttl.as_millis() as u64)
            .arg(retention.max_len.map(|n| n.to_string()).unwrap_or_default())
            .arg(min_id.map(|id| id.to_string()).unwrap_or_default())
            .arg(
                retention
                    .idle_ttl
                    .map(|ttl| ttl.as_millis().to_string())
                    .unwrap_or_default(),
            );
        for entry in &request.entries {
            let fields = entry.fields();
            invocation
                .arg(entry.id.map_or_else(|| "*".to_owned(), |id| id.to_string()))
                .arg(fields.len());
            for (field, value) in &fields {
                invocation.arg(field.as_ref()).arg(value.as_ref());
            }
        }
        let (replayed, joined): (i64, String) = self.write_script(&invocation, stream).await?;
        let ids = joined
            .split(' ')
            .map(|id| {
                id.parse().map_err(|error: crate::model::EntryIdError| {
                    BackendError::Internal(error.to_string())
                })
            })
            .collect::<Result<Vec<EntryId>, _>>()?;
        Ok(AppendOutcome {
            ids,
            replayed: replayed == 1,
        })
    }
}

/// Where the first result of an idempotent append is remembered: in the stream's hash slot, so
/// the append script can check and write it with the stream on a cluster.
fn idempotency_record_key(stream: &StreamName, key: &str) -> String {
    coordination::derived_key(stream, "idempotency", &[key])
}

fn parse_value<T: FromRedisValue>(value: Value) -> Result<T, BackendError> {
    T::from_redis_value(value).map_err(|error| BackendError::Internal(error.to_string()))
}

/// Whether the first seed node reachable says it is part of a cluster (`INFO cluster`).
async fn is_cluster(options: &RedisOptions) -> Result<bool, RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(options.connect_timeout))
        .set_response_timeout(Some(options.response_timeout));
    let mut attempt = 0;
    loop {
        let mut last_error = None;
        for url in options.seed_urls() {
            let asked = async {
                let client = options.client_for(&url)?;
                let mut connection = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                redis::cmd("INFO")
                    .arg("cluster")
                    .query_async::<String>(&mut connection)
                    .await
            };
            match asked.await {
                Ok(info) => return Ok(info.contains("cluster_enabled:1")),
                Err(error) => last_error = Some(error),
            }
        }
        let error = last_error.unwrap_or_else(|| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
        });
        if attempt >= options.connect_retries {
            return Err(error);
        }
        let delay = super::backoff_delay(attempt);
        tracing::warn!(%error, attempt = attempt + 1, ?delay, "cannot connect to Redis yet, retrying");
        attempt += 1;
        tokio::time::sleep(delay).await;
    }
}

/// The command connection to a cluster, retried like a single server's first connection.
async fn connect_cluster(
    options: &RedisOptions,
) -> Result<redis::cluster_async::ClusterConnection, RedisError> {
    let client = options.cluster_client(Some(options.response_timeout))?;
    let mut attempt = 0;
    loop {
        match client.get_async_connection().await {
            Ok(connection) => return Ok(connection),
            Err(error) if attempt < options.connect_retries => {
                let delay = super::backoff_delay(attempt);
                tracing::warn!(%error, attempt = attempt + 1, ?delay, "cannot connect to the Redis Cluster yet, retrying");
                attempt += 1;
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Clients for every node of the cluster (the seeds when the node list cannot be read), with the
/// seeds' scheme, credentials and TLS.
async fn cluster_nodes(options: &RedisOptions, cluster: &Cluster) -> Vec<Client> {
    let mut urls = options.seed_urls();
    let mut command = redis::cmd("CLUSTER");
    command.arg("NODES");
    let nodes = cluster
        .connection
        .clone()
        .req_packed_command(&command)
        .await;
    if let Ok(text) = nodes.map_err(map_error).and_then(parse_value::<String>) {
        for line in text.lines() {
            let Some(address) = line.split_whitespace().nth(1) else {
                continue;
            };
            let address = address.split('@').next().unwrap_or(address);
            if let Ok(mut url) = url::Url::parse(&options.url)
                && let Some((host, port)) = address.rsplit_once(':')
                && let Ok(port) = port.parse::<u16>()
                && url.set_host(Some(host)).is_ok()
                && url.set_port(Some(port)).is_ok()
            {
                urls.push(url.to_string());
            }
        }
    }
    urls.dedup();
    urls.iter()
        .filter_map(|url| options.client_for(url).ok())
        .collect()
}

/// The `MINID` below which entries are older than `max_age`.
fn min_id_for(retention: &Retention) -> Option<EntryId> {
    let max_age = retention.max_age?;
    Some(EntryId::new(
        now_ms().saturating_sub(max_age.as_millis() as u64),
        0,
    ))
}

/// Maps a Redis error to what callers can act on.
pub(super) fn map_error(error: RedisError) -> BackendError {
    use redis::ErrorKind;
    use redis::ServerErrorKind;
    if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
        return BackendError::Unavailable(error.to_string());
    }
    match error.kind() {
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::ReadOnly
            // A slot moved (a failover or resharding) and was not followed yet.
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        )
        | ErrorKind::ClusterConnectionNotFound => BackendError::Unavailable(error.to_string()),
        _ => match server_error_code(&error).as_deref() {
            Some("WRONGTYPE") => BackendError::WrongType,
            Some("NOGROUP") => BackendError::GroupNotFound,
            _ if error.to_string().contains("The ID specified in XADD") => BackendError::InvalidId(
                error
                    .detail()
                    .unwrap_or("the id is not greater than the stream's last id")
                    .to_owned(),
            ),
            Some("OOM" | "MISCONF") => BackendError::Unavailable(error.to_string()),
            _ if is_no_such_key(&error) => BackendError::StreamNotFound,
            _ => BackendError::Internal(error.to_string()),
        },
    }
}

/// `XREAD` of `cursors` (all in one hash slot on a cluster).
fn xread(cursors: &[(StreamName, EntryId)], count: usize, block: Option<Duration>) -> Cmd {
    let mut command = redis::cmd("XREAD");
    command.arg("COUNT").arg(count.max(1));
    if let Some(block) = block {
        command.arg("BLOCK").arg(block.as_millis().max(1) as u64);
    }
    command.arg("STREAMS");
    for (stream, _) in cursors {
        command.arg(stream.as_str());
    }
    for (_, after) in cursors {
        command.arg(after.to_string());
    }
    command
}

/// One `SCAN` step over stream keys.
fn scan(cursor: u64) -> Cmd {
    let mut command = redis::cmd("SCAN");
    command
        .arg(cursor)
        .arg("COUNT")
        .arg(1000)
        .arg("TYPE")
        .arg("stream");
    command
}

/// `XADD` of one entry, trimming as `retention` says.
fn xadd(
    stream: &StreamName,
    retention: &Retention,
    min_id: Option<EntryId>,
    entry: &NewEntry,
) -> Cmd {
    let mut command = redis::cmd("XADD");
    command.arg(stream.as_str());
    if let Some(max_len) = retention.max_len {
        command.arg("MAXLEN").arg("~").arg(max_len);
    } else if let Some(min_id) = min_id {
        command.arg("MINID").arg("~").arg(min_id.to_string());
    }
    match entry.id {
        Some(id) => command.arg(id.to_string()),
        None => command.arg("*"),
    };
    for (field, value) in entry.fields() {
        command.arg(field.as_ref()).arg(value.as_ref());
    }
    command
}

/// The server's error code (`WRONGTYPE`, `OOM`, …), also when the error came from a pipeline.
fn server_error_code(error: &RedisError) -> Option<String> {
    if let Some(code) = error.code() {
        return Some(code.to_owned());
    }
    let errors = error.clone().into_server_errors()?;
    errors
        .first()
        .map(|(_, server_error)| server_error.code().to_owned())
}

/// Group commands report a missing stream in several ways; callers see one.
fn group_error(error: BackendError) -> BackendError {
    match error {
        BackendError::StreamNotFound => BackendError::GroupNotFound,
        BackendError::Internal(message) if message.contains("requires the key to exist") => {
            BackendError::GroupNotFound
        }
        other => other,
    }
}

fn group_start(start: GroupStart) -> String {
    match start {
        GroupStart::After(id) => id.to_string(),
        GroupStart::Latest => "$".to_owned(),
    }
}

/// `XINFO` on a missing key answers `ERR no such key`.
fn is_no_such_key(error: &RedisError) -> bool {
    error.to_string().contains("no such key")
}

impl Backend for RedisBackend {
    fn dead_letter_stream(&self, stream: &StreamName) -> StreamName {
        let plain = stream.dead_letter();
        if !self.is_cluster()
            || connections::slot_of(plain.as_str().as_bytes())
                == connections::slot_of(stream.as_str().as_bytes())
        {
            return plain;
        }
        let tag = coordination::hash_tag_for(stream.as_str());
        let name = if tag == stream.as_str() {
            format!("{{{}}}:dlq", stream.as_str())
        } else {
            format!("{{{tag}}}{}:dlq", stream.as_str())
        };
        StreamName::from_backend(name)
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let _: Value = self.query(redis::cmd("PING")).await?;
        Ok(())
    }

    async fn server_info(&self) -> Result<String, BackendError> {
        let replies = self
            .inner
            .connections
            .on_every_master(redis::cmd("INFO"))
            .await?;
        let mut text = String::new();
        for (node, reply) in replies {
            if !node.is_empty() {
                text.push_str(&format!("# Node {node}\r\n"));
            }
            text.push_str(&parse_value::<String>(reply)?);
        }
        Ok(text)
    }

    async fn append(
        &self,
        stream: &StreamName,
        request: AppendRequest,
    ) -> Result<AppendOutcome, BackendError> {
        request.check_ids()?;
        let min_id = min_id_for(&request.retention);

        if let Some(key) = &request.idempotency {
            return self.idempotent_append(stream, &request, key, min_id).await;
        }
        let retention = &request.retention;
        let n_commands = request.entries.len()
            + usize::from(retention.max_len.is_some() && min_id.is_some())
            + usize::from(retention.idle_ttl.is_some());
        if let ([entry], 1) = (request.entries.as_slice(), n_commands) {
            // The usual publish: one XADD, batched with other callers' commands.
            let id = self.write(xadd(stream, retention, min_id, entry)).await?;
            return Ok(AppendOutcome {
                ids: vec![parse::entry_id(id)?],
                replayed: false,
            });
        }
        // Several commands must become visible together.
        let mut pipeline = redis::pipe();
        pipeline.atomic();
        for entry in &request.entries {
            pipeline.add_command(xadd(stream, retention, min_id, entry));
        }
        if let (Some(_), Some(min_id)) = (retention.max_len, min_id) {
            pipeline
                .cmd("XTRIM")
                .arg(stream.as_str())
                .arg("MINID")
                .arg("~")
                .arg(min_id.to_string())
                .ignore();
        }
        if let Some(idle_ttl) = retention.idle_ttl {
            pipeline
                .cmd("PEXPIRE")
                .arg(stream.as_str())
                .arg(idle_ttl.as_millis() as u64)
                .ignore();
        }
        let replies = self.write_pipeline(&pipeline, stream).await?;
        let ids = replies
            .into_iter()
            .map(parse::entry_id)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AppendOutcome {
            ids,
            replayed: false,
        })
    }

    async fn range(
        &self,
        stream: &StreamName,
        query: RangeQuery,
    ) -> Result<Vec<Entry>, BackendError> {
        let mut pipeline = redis::pipe();
        pipeline.cmd("TYPE").arg(stream.as_str());
        let (first, last) = match query.direction {
            Direction::Forward => ("XRANGE", (query.start, query.end)),
            Direction::Backward => ("XREVRANGE", (query.end, query.start)),
        };
        pipeline
            .cmd(first)
            .arg(stream.as_str())
            .arg(last.0.to_string())
            .arg(last.1.to_string())
            .arg("COUNT")
            .arg(query.count);
        // The range read fails on a key of another type; the type answers first.
        pipeline.ignore_errors();
        let mut replies = self.query_pipeline(&pipeline).await?.into_iter();
        match parse::text(replies.next().unwrap_or(Value::Nil))?.as_str() {
            "stream" => parse::entries(replies.next().unwrap_or(Value::Nil)),
            "none" => Err(BackendError::StreamNotFound),
            _ => Err(BackendError::WrongType),
        }
    }

    async fn list_streams(&self) -> Result<Vec<StreamName>, BackendError> {
        let mut names = Vec::new();
        // On a cluster, every master's keys.
        let mut cursors: Vec<(String, u64)> = self
            .inner
            .connections
            .on_every_master(scan(0))
            .await?
            .into_iter()
            .map(|(node, reply)| {
                let (next, batch): (u64, Vec<String>) = parse_value(reply)?;
                names.extend(batch.into_iter().map(StreamName::from_backend));
                Ok((node, next))
            })
            .collect::<Result<_, BackendError>>()?;
        cursors.retain(|(_, next)| *next != 0);
        for (node, mut cursor) in cursors {
            while cursor != 0 {
                let reply = self.inner.connections.on_node(&node, scan(cursor)).await?;
                let (next, batch): (u64, Vec<String>) = parse_value(reply)?;
                names.extend(batch.into_iter().map(StreamName::from_backend));
                cursor = next;
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn stream_stats(&self, stream: &StreamName) -> Result<StreamStats, BackendError> {
        let mut pipeline = redis::pipe();
        pipeline.cmd("XLEN").arg(stream.as_str());
        pipeline.cmd("XINFO").arg("GROUPS").arg(stream.as_str());
        let mut replies = self.query_pipeline(&pipeline).await?.into_iter();
        let length = parse::integer(replies.next().unwrap_or(Value::Nil))?;
        let groups = parse::groups(replies.next().unwrap_or(Value::Nil))?;
        Ok(StreamStats { length, groups })
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo, BackendError> {
        let mut pipeline = redis::pipe();
        pipeline.cmd("XINFO").arg("STREAM").arg(stream.as_str());
        pipeline.cmd("XINFO").arg("GROUPS").arg(stream.as_str());
        let mut replies = self.query_pipeline(&pipeline).await?.into_iter();
        let stream_value = replies.next().unwrap_or(Value::Nil);
        let groups = parse::groups(replies.next().unwrap_or(Value::Nil))?;
        parse::stream_info(stream_value, groups)
    }

    async fn flush(&self) -> Result<(), BackendError> {
        let _: Value = self.query(redis::cmd("FLUSHDB")).await?;
        Ok(())
    }

    async fn read_after(
        &self,
        cursors: &[(StreamName, EntryId)],
        count: usize,
        block: Option<Duration>,
        interrupt: impl std::future::Future<Output = ()> + Send,
    ) -> Result<Vec<(StreamName, Vec<Entry>)>, BackendError> {
        if cursors.is_empty() {
            return Ok(Vec::new());
        }
        let groups = self
            .inner
            .connections
            .by_slot(cursors.to_vec(), |(stream, _)| stream.as_str().as_bytes());
        let replies = match block {
            Some(block) => {
                let commands = groups
                    .iter()
                    .map(|group| {
                        let key = group[0].0.as_str().as_bytes().to_vec();
                        (
                            key,
                            xread(group, count, Some(block)),
                            xread(group, count, None),
                        )
                    })
                    .collect();
                self.inner
                    .connections
                    .blocking_reads(commands, block, interrupt)
                    .await?
            }
            None => {
                let reads = groups
                    .iter()
                    .map(|group| self.inner.connections.query(xread(group, count, None)));
                futures_util::future::try_join_all(reads).await?
            }
        };
        let mut streams = Vec::new();
        for reply in replies {
            streams.extend(parse::streams(reply)?);
        }
        Ok(streams)
    }

    async fn delete_entries(
        &self,
        stream: &StreamName,
        ids: &[EntryId],
    ) -> Result<u64, BackendError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut command = redis::cmd("XDEL");
        command.arg(stream.as_str());
        for id in ids {
            command.arg(id.to_string());
        }
        self.query(command).await
    }

    async fn trim(&self, stream: &StreamName, trim: Trim) -> Result<u64, BackendError> {
        let mut command = redis::cmd("XTRIM");
        command.arg(stream.as_str());
        match trim {
            Trim::MaxLen(max_len) => command.arg("MAXLEN").arg(max_len),
            Trim::MinId(min_id) => command.arg("MINID").arg(min_id.to_string()),
        };
        self.query(command).await
    }

    async fn delete_stream(&self, stream: &StreamName) -> Result<bool, BackendError> {
        let deleted: i64 = self
            .script(&self.inner.delete_stream.key(stream.as_str()))
            .await?;
        Ok(deleted == 1)
    }

    async fn create_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        start: GroupStart,
    ) -> Result<bool, BackendError> {
        let mut invocation = self.inner.position_group.key(stream.as_str());
        invocation
            .arg("CREATE")
            .arg(group.as_str())
            .arg(group_start(start));
        match self.write_script::<Value>(&invocation, stream).await {
            Ok(_) => Ok(true),
            Err(BackendError::Internal(message)) if message.contains("BUSYGROUP") => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn destroy_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<bool, BackendError> {
        let command = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(stream.as_str())
            .arg(group.as_str())
            .clone();
        match self.write::<i64>(command).await.map_err(group_error) {
            Ok(destroyed) => Ok(destroyed == 1),
            Err(BackendError::GroupNotFound) => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn set_group_position(
        &self,
        stream: &StreamName,
        group: &GroupName,
        start: GroupStart,
    ) -> Result<(), BackendError> {
        let mut invocation = self.inner.position_group.key(stream.as_str());
        invocation
            .arg("SETID")
            .arg(group.as_str())
            .arg(group_start(start));
        self.write_script::<Value>(&invocation, stream)
            .await
            .map_err(group_error)?;
        Ok(())
    }

    async fn read_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        read: GroupRead,
    ) -> Result<GroupBatch, BackendError> {
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(group.as_str())
            .arg(consumer.as_str())
            .arg("COUNT")
            .arg(read.count.max(1));
        if read.no_ack {
            command.arg("NOACK");
        }
        command.arg("STREAMS").arg(stream.as_str());
        let (read_reply, counts) = match read.cursor {
            GroupCursor::New => {
                command.arg(">");
                // Every new entry is on its first delivery.
                let reply: Value = self.query(command).await.map_err(group_error)?;
                (reply, std::collections::HashMap::new())
            }
            GroupCursor::PendingAfter(after) => {
                command.arg(after.to_string());
                // XREADGROUP does not say how often an entry was delivered; the pending list
                // does, for exactly the entries it returned (the same bounds, the same owner).
                let mut pipeline = redis::pipe();
                pipeline.add_command(command);
                pipeline
                    .cmd("XPENDING")
                    .arg(stream.as_str())
                    .arg(group.as_str())
                    .arg(format!("({after}"))
                    .arg("+")
                    .arg(read.count.max(1))
                    .arg(consumer.as_str());
                let mut replies = self
                    .query_pipeline(&pipeline)
                    .await
                    .map_err(group_error)?
                    .into_iter();
                let read_reply = replies.next().unwrap_or(Value::Nil);
                let counts: std::collections::HashMap<EntryId, u64> =
                    parse::pending(replies.next().unwrap_or(Value::Nil))?
                        .into_iter()
                        .map(|entry| (entry.id, entry.deliveries))
                        .collect();
                (read_reply, counts)
            }
        };
        let mut batch = GroupBatch::default();
        for (_, entries) in parse::group_streams(read_reply)? {
            for (id, entry) in entries {
                match entry {
                    Some(entry) => batch.deliveries.push(Delivery {
                        deliveries: counts.get(&id).copied().unwrap_or(1),
                        entry,
                    }),
                    None => batch.deleted.push(id),
                }
            }
        }
        Ok(batch)
    }

    async fn ack(
        &self,
        stream: &StreamName,
        group: &GroupName,
        ids: &[EntryId],
        delete: bool,
    ) -> Result<u64, BackendError> {
        if ids.is_empty() {
            return Ok(0);
        }
        if delete {
            let mut invocation = self.inner.ack_and_delete.key(stream.as_str());
            invocation.arg(group.as_str());
            for id in ids {
                invocation.arg(id.to_string());
            }
            return self.write_script(&invocation, stream).await;
        }
        let mut command = redis::cmd("XACK");
        command.arg(stream.as_str()).arg(group.as_str());
        for id in ids {
            command.arg(id.to_string());
        }
        self.write(command).await
    }

    async fn claim_idle(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        min_idle: Duration,
        cursor: EntryId,
        count: usize,
    ) -> Result<ClaimPage, BackendError> {
        let mut invocation = self.inner.claim_idle.key(stream.as_str());
        invocation
            .arg(group.as_str())
            .arg(consumer.as_str())
            .arg(min_idle.as_millis() as u64)
            .arg(cursor.to_string())
            .arg(count.max(1));
        let reply: Value = self.script(&invocation).await.map_err(group_error)?;
        parse::claim_page(reply)
    }

    async fn set_pending_idle(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
        idle: Duration,
    ) -> Result<bool, BackendError> {
        let mut invocation = self.inner.set_pending_idle.key(stream.as_str());
        invocation
            .arg(group.as_str())
            .arg(id.to_string())
            .arg(idle.as_millis() as u64);
        let updated: i64 = self.script(&invocation).await.map_err(group_error)?;
        Ok(updated == 1)
    }

    async fn pending(
        &self,
        stream: &StreamName,
        group: &GroupName,
        query: PendingQuery,
    ) -> Result<Vec<PendingEntry>, BackendError> {
        let mut command = redis::cmd("XPENDING");
        command.arg(stream.as_str()).arg(group.as_str());
        if let Some(min_idle) = query.min_idle {
            command.arg("IDLE").arg(min_idle.as_millis() as u64);
        }
        command
            .arg(query.start.to_string())
            .arg(query.end.to_string())
            .arg(query.count.max(1));
        if let Some(consumer) = &query.consumer {
            command.arg(consumer.as_str());
        }
        let reply: Value = self.query(command).await.map_err(group_error)?;
        parse::pending(reply)
    }

    async fn consumers(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Vec<ConsumerInfo>, BackendError> {
        let command = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream.as_str())
            .arg(group.as_str())
            .clone();
        let reply: Value = self.query(command).await.map_err(group_error)?;
        parse::consumers(reply)
    }

    async fn remove_idle_consumer(
        &self,
        stream: &StreamName,
        group: &GroupName,
        consumer: &ConsumerName,
        min_idle: Duration,
    ) -> Result<bool, BackendError> {
        let mut invocation = self.inner.remove_idle_consumer.key(stream.as_str());
        invocation
            .arg(group.as_str())
            .arg(consumer.as_str())
            .arg(min_idle.as_millis() as u64);
        let removed: i64 = self.script(&invocation).await.map_err(group_error)?;
        Ok(removed == 1)
    }

    async fn dead_letter(
        &self,
        stream: &StreamName,
        group: &GroupName,
        id: EntryId,
        dead_letter: &StreamName,
        fields: Vec<(bytes::Bytes, bytes::Bytes)>,
    ) -> Result<EntryId, BackendError> {
        let mut pipeline = redis::pipe();
        pipeline.atomic();
        let command = pipeline.cmd("XADD").arg(dead_letter.as_str()).arg("*");
        for (field, value) in &fields {
            command.arg(field.as_ref()).arg(value.as_ref());
        }
        pipeline
            .cmd("XACK")
            .arg(stream.as_str())
            .arg(group.as_str())
            .arg(id.to_string())
            .ignore();
        let replies = self.write_pipeline(&pipeline, stream).await?;
        parse::entry_id(replies.into_iter().next().unwrap_or(Value::Nil))
    }

    async fn import(&self, stream: &StreamName, entries: Vec<Entry>) -> Result<(), BackendError> {
        if entries.windows(2).any(|pair| pair[0].id >= pair[1].id) {
            return Err(BackendError::InvalidId(
                "imported entries must have increasing ids".into(),
            ));
        }
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        pipeline.atomic();
        for entry in &entries {
            let command = pipeline
                .cmd("XADD")
                .arg(stream.as_str())
                .arg(entry.id.to_string());
            for (field, value) in &entry.fields {
                command.arg(field.as_ref()).arg(value.as_ref());
            }
            command.ignore();
        }
        self.query_pipeline(&pipeline).await?;
        Ok(())
    }

    async fn set_last_id(
        &self,
        stream: &StreamName,
        last_id: EntryId,
        entries_added: u64,
        max_deleted_id: EntryId,
    ) -> Result<(), BackendError> {
        let mut invocation = self.inner.set_last_id.key(stream.as_str());
        invocation
            .arg(last_id.to_string())
            .arg(entries_added)
            .arg(max_deleted_id.to_string());
        let _: Value = self
            .script(&invocation)
            .await
            .map_err(|error| match error {
                BackendError::Internal(message) if message.contains("XSETID") => {
                    BackendError::InvalidId(message)
                }
                other => other,
            })?;
        Ok(())
    }

    async fn restore_pending(
        &self,
        stream: &StreamName,
        group: &GroupName,
        pending: &[PendingEntry],
    ) -> Result<u64, BackendError> {
        if pending.is_empty() {
            return Ok(0);
        }
        let mut pipeline = redis::pipe();
        for entry in pending {
            pipeline
                .cmd("XCLAIM")
                .arg(stream.as_str())
                .arg(group.as_str())
                .arg(entry.consumer.as_str())
                .arg(0)
                .arg(entry.id.to_string())
                .arg("IDLE")
                .arg(entry.idle.as_millis() as u64)
                .arg("RETRYCOUNT")
                .arg(entry.deliveries)
                .arg("FORCE")
                .arg("JUSTID");
        }
        let replies = self.query_pipeline(&pipeline).await.map_err(group_error)?;
        let mut restored = 0;
        for reply in replies {
            if let Value::Array(ids) = reply {
                restored += ids.len() as u64;
            }
        }
        Ok(restored)
    }

    async fn acquire_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, BackendError> {
        self.acquire_lease_now(lease, ttl).await
    }

    async fn renew_leases(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> Result<Vec<bool>, BackendError> {
        self.renew_leases_now(leases, ttl).await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), BackendError> {
        self.release_lease_now(lease).await
    }

    async fn report_groups(
        &self,
        reports: &[GroupReport],
        ttl: Duration,
    ) -> Result<(), BackendError> {
        self.report_groups_now(reports, ttl).await
    }

    async fn group_reports(&self) -> Result<Vec<GroupReport>, BackendError> {
        self.group_reports_now().await
    }

    async fn set_group_limit(
        &self,
        stream: &StreamName,
        group: &GroupName,
        limit: u32,
    ) -> Result<(), BackendError> {
        self.set_group_limit_now(stream, group, limit).await
    }

    async fn group_limits(
        &self,
        groups: &[(StreamName, GroupName)],
    ) -> Result<Vec<Option<u32>>, BackendError> {
        self.group_limits_now(groups).await
    }

    async fn publish_control(&self, payload: bytes::Bytes) -> Result<(), BackendError> {
        self.publish_control_now(payload).await
    }

    fn control_messages(&self) -> tokio::sync::broadcast::Receiver<bytes::Bytes> {
        self.control_messages_now()
    }
}
