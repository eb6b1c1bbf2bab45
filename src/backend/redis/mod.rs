//! The Redis backend: standalone Redis 7+ through a fixed pool of multiplexed connections.
//! Writes of several commands go in one pipeline (`MULTI`/`EXEC` where they must be atomic);
//! idempotent appends run as one Lua script so that racing retries write exactly once.

mod parse;
mod pool;

use std::sync::Arc;
use std::time::Duration;

use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, RedisError, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use self::pool::Pool;
pub use self::pool::backoff_delay;
use super::{
    AppendOutcome, AppendRequest, Backend, BackendError, Direction, RangeQuery, Retention,
    StreamInfo, StreamStats,
};
use crate::model::{Entry, EntryId, StreamName, now_ms};

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
}

/// Idempotent append, atomically: return the remembered ids if the key was seen, else append
/// every entry (with the retention), remember the ids, and return them.
///
/// KEYS: stream, idempotency record. ARGV: record ttl ms, max_len or "", min_id or "",
/// idle ttl ms or "", then per entry: its field count n followed by n field/value pairs.
const IDEMPOTENT_APPEND: &str = r#"
local previous = redis.call('GET', KEYS[2])
if previous then return {1, previous} end
local ids = {}
local i = 5
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local args = {'XADD', KEYS[1]}
  if ARGV[2] ~= '' then
    args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = ARGV[2]
  elseif ARGV[3] ~= '' then
    args[#args + 1] = 'MINID'; args[#args + 1] = '~'; args[#args + 1] = ARGV[3]
  end
  args[#args + 1] = '*'
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

/// The Redis backend. Cheap to clone.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Arc<Pool>,
    display_address: String,
    idempotent_append: redis::Script,
}

impl RedisBackend {
    /// Connects, retrying `connect_retries` times with backoff; the error names the cause.
    pub async fn connect(
        options: &RedisOptions,
        shutdown: CancellationToken,
    ) -> Result<RedisBackend, RedisError> {
        let client = Client::open(options.url.as_str())?;
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout));
        let pool = Pool::connect(
            client,
            connection_config,
            options.pool_size,
            options.connect_retries,
            shutdown,
        )
        .await?;
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                pool,
                display_address: options.display_address.clone(),
                idempotent_append: redis::Script::new(IDEMPOTENT_APPEND),
            }),
        })
    }

    /// `host:port/db` without credentials.
    pub fn address(&self) -> &str {
        &self.inner.display_address
    }

    /// Resolves once a connection to Redis is up.
    pub async fn wait_until_up(&self) {
        self.inner.pool.wait_until_up().await
    }

    async fn query<T: FromRedisValue>(&self, command: &Cmd) -> Result<T, BackendError> {
        let mut lease = self.inner.pool.lease()?;
        let value: Value = command
            .query_async(&mut lease.connection)
            .await
            .map_err(|error| lease.fail(error))?;
        T::from_redis_value(value).map_err(|error| BackendError::Internal(error.to_string()))
    }

    async fn query_pipeline(&self, pipeline: &redis::Pipeline) -> Result<Vec<Value>, BackendError> {
        let mut lease = self.inner.pool.lease()?;
        pipeline
            .query_async(&mut lease.connection)
            .await
            .map_err(|error| lease.fail(error))
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
            invocation.arg(fields.len());
            for (field, value) in &fields {
                invocation.arg(field.as_ref()).arg(value.as_ref());
            }
        }
        let mut lease = self.inner.pool.lease()?;
        let (replayed, joined): (i64, String) = invocation
            .invoke_async(&mut lease.connection)
            .await
            .map_err(|error| lease.fail(error))?;
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

/// Where the first result of an idempotent append is remembered. Hashed so that any stream name
/// and key fit, and kept under streamgate's own prefix.
fn idempotency_record_key(stream: &StreamName, key: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(stream.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(key.as_bytes());
    format!("streamgate:idempotency:{}", hex::encode(hasher.finalize()))
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
            | ServerErrorKind::ReadOnly,
        ) => BackendError::Unavailable(error.to_string()),
        _ => match server_error_code(&error).as_deref() {
            Some("WRONGTYPE") => BackendError::WrongType,
            Some("OOM" | "MISCONF") => BackendError::Unavailable(error.to_string()),
            _ if is_no_such_key(&error) => BackendError::StreamNotFound,
            _ => BackendError::Internal(error.to_string()),
        },
    }
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

/// `XINFO` on a missing key answers `ERR no such key`.
fn is_no_such_key(error: &RedisError) -> bool {
    error.to_string().contains("no such key")
}

impl Backend for RedisBackend {
    async fn ping(&self) -> Result<(), BackendError> {
        let _: Value = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    async fn server_info(&self) -> Result<String, BackendError> {
        self.query(&redis::cmd("INFO")).await
    }

    async fn append(
        &self,
        stream: &StreamName,
        request: AppendRequest,
    ) -> Result<AppendOutcome, BackendError> {
        let min_id = min_id_for(&request.retention);
        if let Some(key) = &request.idempotency {
            return self.idempotent_append(stream, &request, key, min_id).await;
        }
        let retention = &request.retention;
        let mut pipeline = redis::pipe();
        // One command needs no transaction; several must become visible together.
        let n_commands = request.entries.len()
            + usize::from(retention.max_len.is_some() && min_id.is_some())
            + usize::from(retention.idle_ttl.is_some());
        if n_commands > 1 {
            pipeline.atomic();
        }
        for entry in &request.entries {
            let command = pipeline.cmd("XADD").arg(stream.as_str());
            if let Some(max_len) = retention.max_len {
                command.arg("MAXLEN").arg("~").arg(max_len);
            } else if let Some(min_id) = min_id {
                command.arg("MINID").arg("~").arg(min_id.to_string());
            }
            command.arg("*");
            for (field, value) in entry.fields() {
                command.arg(field.as_ref()).arg(value.as_ref());
            }
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
        let replies = self.query_pipeline(&pipeline).await?;
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
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .arg("TYPE")
                        .arg("stream"),
                )
                .await?;
            names.extend(batch.into_iter().map(StreamName::from_backend));
            if next == 0 {
                break;
            }
            cursor = next;
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
        let _: Value = self.query(&redis::cmd("FLUSHDB")).await?;
        Ok(())
    }
}
