//! The only place that reads files, environment and flags. Everything is validated once, at
//! start, into typed values; every problem is reported together in one message.
//!
//! Precedence, lowest first: built-in defaults < TOML file < environment < command-line flags.
//! The [`Config`] structure's field names mirror the configuration keys, so serializing it
//! (`streamgate config check`) prints the effective configuration in the file's own format.

mod reader;
mod sources;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Serialize, Serializer};

use self::reader::Reader;
pub use self::sources::{
    Cli, Command, ConfigCommand, CopyArgs, Flags, Sources, normalize_go_style_flags,
};
use crate::auth::{JwtVerifier, Scope, StaticToken, StreamPattern, token_digest};
use crate::backend::Retention;
use crate::backend::embedded::{DiskOptions, FsyncPolicy};
use crate::backend::redis::{ClusterMode, RedisOptions};

/// Sections of the file (tables whose keys merge one by one).
const SECTIONS: &[&str] = &[
    "redis",
    "consumer",
    "limits",
    "pubsub",
    "broadcast",
    "jwt",
    "cors",
    "tls",
    "probe",
    "storage",
];

/// Every configuration key, as a dotted path.
const KEYS: &[&str] = &[
    "http_address",
    "bearer_token",
    "tokens",
    "backend",
    "redis.url",
    "redis.connect_retries",
    "redis.pool_size",
    "redis.response_timeout",
    "redis.tls_ca",
    "redis.cluster",
    "redis.urls",
    "redis.wait_replicas",
    "redis.wait_timeout",
    "redis_address",
    "redis_password",
    "redis_db",
    "sse_keepalive_interval_sec",
    "sse_write_timeout",
    "consumer.default_limit",
    "consumer.visibility_timeout",
    "consumer.max_deliveries",
    "consumer.delete_on_finish",
    "consumer.cleanup_after",
    "limits.max_message_bytes",
    "limits.max_body_bytes",
    "limits.max_batch_messages",
    "limits.max_connections",
    "limits.rate_per_second",
    "limits.burst",
    "retention",
    "pubsub.patterns",
    "pubsub.stream_prefix",
    "pubsub.max_len",
    "pubsub.idle_ttl",
    "broadcast.channel_prefix",
    "jwt.hs256_secret",
    "jwt.public_key_pem",
    "jwt.audience",
    "jwt.issuer",
    "cors.allowed_origins",
    "tls.cert",
    "tls.key",
    "probe.interval",
    "probe.timeout",
    "storage.path",
    "storage.fsync",
    "storage.cache_size",
    "shutdown_timeout",
    "worker_threads",
    "log_format",
    "log_level",
];

fn is_section(path: &str) -> bool {
    SECTIONS.contains(&path)
}

fn is_known_path(path: &str) -> bool {
    KEYS.contains(&path)
}

/// A value that must never be printed or logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        redacted(self, serializer)
    }
}

/// Serializes any secret as `"<redacted>"`.
pub fn redacted<T, S: Serializer>(_: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str("<redacted>")
}

fn humantime<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*duration))
}

fn optional_humantime<S: Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => humantime(duration, serializer),
        None => serializer.serialize_none(),
    }
}

/// Which store to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Embedded,
    Redis,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    #[serde(serialize_with = "serialize_display")]
    pub http_address: SocketAddr,
    /// The full-access token; generated (and loopback-only) when no credential is configured.
    #[serde(serialize_with = "serialize_bearer")]
    pub bearer_token: Option<Secret>,
    #[serde(skip)]
    pub bearer_token_generated: bool,
    pub backend: BackendKind,
    #[serde(serialize_with = "serialize_keepalive")]
    pub sse_keepalive_interval_sec: Option<Duration>,
    /// How long a write to a client may stay blocked before the connection is dropped.
    #[serde(serialize_with = "humantime")]
    pub sse_write_timeout: Duration,
    #[serde(serialize_with = "humantime")]
    pub shutdown_timeout: Duration,
    /// Threads of the async runtime (default: one fewer than the cores, at least one).
    pub worker_threads: usize,
    pub log_format: LogFormat,
    pub log_level: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSettings>,
    /// The embedded engine's storage (unused on Redis).
    pub storage: StorageConfig,
    pub consumer: ConsumerConfig,
    pub limits: Limits,
    pub broadcast: BroadcastConfig,
    pub pubsub: PubSubConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    pub cors: CorsConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    pub probe: ProbeConfig,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<StaticToken>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retention: Vec<RetentionRule>,
    /// Things worth telling the operator that do not stop start-up.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

fn serialize_display<T: std::fmt::Display, S: Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn serialize_bearer<S: Serializer>(
    token: &Option<Secret>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match token {
        Some(_) => serializer.serialize_str("<redacted>"),
        None => serializer.serialize_str("<none>"),
    }
}

fn serialize_keepalive<S: Serializer>(
    interval: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_i64(interval.map_or(0, |interval| interval.as_secs() as i64))
}

/// How to reach Redis.
#[derive(Debug, Clone, Serialize)]
pub struct RedisSettings {
    /// The URL without its password.
    pub url: String,
    pub connect_retries: u32,
    pub pool_size: usize,
    #[serde(serialize_with = "humantime")]
    pub response_timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// `auto`, `true` or `false`.
    pub cluster: &'static str,
    /// More seed nodes, without passwords.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    pub wait_replicas: u32,
    #[serde(serialize_with = "humantime")]
    pub wait_timeout: Duration,
    #[serde(skip)]
    pub options: RedisOptions,
}

/// `storage.path` that keeps nothing (`--in-memory`).
pub const IN_MEMORY: &str = ":memory:";

/// Where and how the embedded engine keeps its data.
#[derive(Debug, Clone, Serialize)]
pub struct StorageConfig {
    /// The data directory; `None` keeps everything in memory (`":memory:"`).
    #[serde(serialize_with = "serialize_storage_path")]
    pub path: Option<PathBuf>,
    pub fsync: FsyncPolicy,
    pub cache_size: u64,
}

impl StorageConfig {
    /// How to open the data directory, or `None` in memory.
    pub fn disk(&self) -> Option<DiskOptions> {
        Some(DiskOptions {
            path: self.path.clone()?,
            fsync: self.fsync,
            cache_size: self.cache_size,
        })
    }
}

fn serialize_storage_path<S: Serializer>(
    path: &Option<PathBuf>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match path {
        Some(path) => serializer.collect_str(&path.display()),
        None => serializer.serialize_str(IN_MEMORY),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsumerConfig {
    pub default_limit: u32,
    #[serde(serialize_with = "humantime")]
    pub visibility_timeout: Duration,
    pub max_deliveries: u32,
    pub delete_on_finish: bool,
    /// A consumer with nothing pending is removed from its group after this long idle.
    #[serde(serialize_with = "humantime")]
    pub cleanup_after: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_body_bytes: usize,
    pub max_batch_messages: usize,
    pub max_connections: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetentionRule {
    pub pattern: StreamPattern,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_len: Option<u64>,
    #[serde(
        serialize_with = "optional_humantime",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_age: Option<Duration>,
    #[serde(
        serialize_with = "optional_humantime",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_ttl: Option<Duration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PubSubConfig {
    pub patterns: Vec<String>,
    pub stream_prefix: String,
    pub max_len: u64,
    #[serde(serialize_with = "humantime")]
    pub idle_ttl: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct BroadcastConfig {
    pub channel_prefix: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct JwtConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hs256_secret: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Built from the above, its key checked at start.
    #[serde(skip)]
    pub verifier: JwtVerifier,
}

/// The synthetic probe: how often it runs and how long its message may take to come back.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeConfig {
    #[serde(serialize_with = "humantime")]
    pub interval: Duration,
    #[serde(serialize_with = "humantime")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct CorsConfig {
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

impl Config {
    /// Whether `value` is a configured credential (the bearer token, a static token, the JWT
    /// secret): what must never reach a log line, wherever it appears.
    pub fn is_secret(&self, value: &str) -> bool {
        let digest = crate::auth::token_digest(value);
        self.bearer_token
            .as_ref()
            .is_some_and(|token| token.expose() == value)
            || self.tokens.iter().any(|token| token.sha256 == digest)
            || self
                .jwt
                .as_ref()
                .and_then(|jwt| jwt.hs256_secret.as_ref())
                .is_some_and(|secret| secret.expose() == value)
    }

    /// Reads and validates the configuration from `sources`. The error lists every problem.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let layered = sources
            .layer()
            .map_err(|problem| ConfigError(vec![problem]))?;
        let mut reader = Reader::new(&layered);
        let config = read(&mut reader);
        reader.report_unknown_keys();
        if !reader.errors.is_empty() {
            return Err(ConfigError(reader.errors));
        }
        let mut config = config.ok_or_else(|| ConfigError(vec!["invalid configuration".into()]))?;
        config.warnings.append(&mut reader.warnings);
        config
            .warnings
            .extend(layered.unknown_env.iter().map(|name| {
                format!("environment variable {name} names no configuration key; ignored")
            }));
        Ok(config)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_effective_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|error| format!("# cannot render: {error}\n"))
    }

    /// The retention that applies to `stream`: the first `[[retention]]` rule whose pattern
    /// matches it.
    pub fn retention_for(&self, stream: &str) -> Retention {
        self.retention
            .iter()
            .find(|rule| rule.pattern.matches(stream))
            .map(|rule| Retention {
                max_len: rule.max_len,
                max_age: rule.max_age,
                idle_ttl: rule.idle_ttl,
            })
            .unwrap_or_default()
    }

    /// Whether any credential other than a generated token is configured.
    pub fn has_configured_credentials(&self) -> bool {
        (self.bearer_token.is_some() && !self.bearer_token_generated)
            || !self.tokens.is_empty()
            || self.jwt.is_some()
    }
}

/// Every problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub Vec<String>);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration ({} problems):", many.len())?;
                for problem in many {
                    write!(f, "\n  - {problem}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads every key. Returns `None` only when an error was recorded.
fn read(r: &mut Reader) -> Option<Config> {
    let http_address = read_http_address(r);
    let configured_token = r.string("bearer_token").filter(|token| !token.is_empty());
    let tokens = read_tokens(r);
    let jwt = read_jwt(r);
    let (backend, redis) = read_backend(r);
    let storage = read_storage(r, backend);
    let sse_keepalive_interval_sec = r
        .integer("sse_keepalive_interval_sec", i64::MIN..=i64::MAX)
        .unwrap_or(15);
    let consumer = ConsumerConfig {
        default_limit: r
            .integer("consumer.default_limit", 1..=100_000)
            .unwrap_or(10) as u32,
        visibility_timeout: positive(r, "consumer.visibility_timeout")
            .unwrap_or(Duration::from_secs(300)),
        max_deliveries: r
            .integer("consumer.max_deliveries", 0..=1_000_000)
            .unwrap_or(10) as u32,
        delete_on_finish: r.boolean("consumer.delete_on_finish").unwrap_or(false),
        cleanup_after: positive(r, "consumer.cleanup_after").unwrap_or(Duration::from_secs(600)),
    };
    let limits = Limits {
        max_message_bytes: r.byte_size("limits.max_message_bytes").unwrap_or(1 << 20) as usize,
        max_body_bytes: r.byte_size("limits.max_body_bytes").unwrap_or(16 << 20) as usize,
        max_batch_messages: r
            .integer("limits.max_batch_messages", 1..=1_000_000)
            .unwrap_or(10_000) as usize,
        max_connections: r
            .integer("limits.max_connections", 1..=10_000_000)
            .unwrap_or(10_000) as usize,
        rate_per_second: r.number("limits.rate_per_second"),
        burst: r
            .integer("limits.burst", 1..=u32::MAX as i64)
            .map(|n| n as u32),
    };
    if limits.max_message_bytes > limits.max_body_bytes {
        r.problem(format!(
            "limits.max_message_bytes ({}) must not exceed limits.max_body_bytes ({})",
            limits.max_message_bytes, limits.max_body_bytes
        ));
    }
    if limits.burst.is_some() && limits.rate_per_second.is_none() {
        r.problem("limits.burst is set but limits.rate_per_second is not: set both to enable rate limiting");
    }
    let retention = read_retention(r);
    let pubsub = PubSubConfig {
        patterns: r.string_list("pubsub.patterns").unwrap_or_default(),
        stream_prefix: prefix(r, "pubsub.stream_prefix"),
        max_len: r.unsigned("pubsub.max_len", 1).unwrap_or(100),
        idle_ttl: positive(r, "pubsub.idle_ttl").unwrap_or(Duration::from_secs(3600)),
    };
    if !pubsub.patterns.is_empty() && backend == BackendKind::Embedded {
        r.error(
            "pubsub.patterns",
            "the Pub/Sub bridge reads Redis Pub/Sub: it needs the Redis backend (set redis.url)",
        );
    }
    let broadcast = BroadcastConfig {
        channel_prefix: prefix(r, "broadcast.channel_prefix"),
    };
    let cors = CorsConfig {
        allowed_origins: r.string_list("cors.allowed_origins").unwrap_or_default(),
    };
    for origin in &cors.allowed_origins {
        let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
            && !origin.trim_end_matches('/').ends_with("://")
            && axum::http::HeaderValue::from_str(origin).is_ok();
        if origin == "*" {
            r.error(
                "cors.allowed_origins",
                "list origins explicitly; \"*\" is not allowed (requests carry credentials)",
            );
        } else if !valid {
            r.error(
                "cors.allowed_origins",
                format!("{origin:?} is not an origin such as https://app.example.com"),
            );
        }
    }
    let tls = read_tls(r);
    let probe = ProbeConfig {
        interval: positive(r, "probe.interval").unwrap_or(Duration::from_secs(10)),
        timeout: positive(r, "probe.timeout").unwrap_or(Duration::from_secs(5)),
    };
    let sse_write_timeout = positive(r, "sse_write_timeout").unwrap_or(Duration::from_secs(30));
    let shutdown_timeout = r
        .duration("shutdown_timeout")
        .unwrap_or(Duration::from_secs(30));
    let worker_threads = r
        .integer("worker_threads", 1..=1024)
        .map_or_else(|| default_worker_threads(backend), |n| n as usize);
    let log_format = match r.string("log_format").as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            r.error(
                "log_format",
                format!("expected \"text\" or \"json\", got {other:?}"),
            );
            LogFormat::Text
        }
    };
    let log_level = r.string("log_level").unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        r.error(
            "log_level",
            format!("{log_level:?} is not a level (error, warn, info, debug, trace) or filter"),
        );
    }

    // Secure by default: without any configured credential, generate a token and insist on a
    // loopback address, so a fresh `cargo run` is never an open gateway on the network.
    let has_credentials = configured_token.is_some() || !tokens.is_empty() || jwt.is_some();
    let bearer_token_generated = !has_credentials;
    let bearer_token = match configured_token {
        Some(token) => Some(Secret::new(token)),
        None if bearer_token_generated => Some(Secret::new(generate_token())),
        None => None,
    };
    if let Some(address) = http_address
        && bearer_token_generated
        && !address.ip().is_loopback()
    {
        r.error(
            "http_address",
            format!(
                "refusing to listen on non-loopback address {address} without a configured token: set \
                 bearer_token (--bearer-token, STREAMGATE_BEARER_TOKEN) or [[tokens]], or listen on 127.0.0.1"
            ),
        );
    }

    if !r.errors.is_empty() {
        return None;
    }
    Some(Config {
        http_address: http_address?,
        bearer_token,
        bearer_token_generated,
        backend,
        sse_keepalive_interval_sec: (sse_keepalive_interval_sec > 0)
            .then(|| Duration::from_secs(sse_keepalive_interval_sec as u64)),
        sse_write_timeout,
        shutdown_timeout,
        worker_threads,
        log_format,
        log_level,
        redis,
        storage,
        consumer,
        limits,
        broadcast,
        pubsub,
        jwt,
        cors,
        tls,
        probe,
        tokens,
        retention,
        warnings: Vec::new(),
    })
}

fn positive(r: &mut Reader, path: &str) -> Option<Duration> {
    let duration = r.duration(path)?;
    if duration.is_zero() {
        r.error(path, "must be greater than zero");
        return None;
    }
    Some(duration)
}

fn prefix(r: &mut Reader, path: &str) -> String {
    r.string(path).unwrap_or_else(|| "sse:stream:".into())
}

/// `host:port`, `localhost:port`, or Go's `:port` (all interfaces).
fn read_http_address(r: &mut Reader) -> Option<SocketAddr> {
    let Some(text) = r.string("http_address") else {
        return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080));
    };
    match parse_listen_address(&text) {
        Some(address) => Some(address),
        None => {
            r.error(
                "http_address",
                format!("expected IP:PORT (e.g. 127.0.0.1:8080, [::1]:8080, :8080), got {text:?}"),
            );
            None
        }
    }
}

fn parse_listen_address(text: &str) -> Option<SocketAddr> {
    if let Some(port) = text.strip_prefix(':') {
        return Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port.parse().ok()?,
        ));
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        return Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            port.parse().ok()?,
        ));
    }
    text.parse().ok()
}

fn read_tokens(r: &mut Reader) -> Vec<StaticToken> {
    let Some(tables) = r.tables("tokens") else {
        return Vec::new();
    };
    let mut tokens = Vec::new();
    for (index, table) in tables.iter().enumerate() {
        let at = format!("tokens[{index}]");
        let text = |key: &str| {
            table
                .get(key)
                .and_then(|value| value.as_str())
                .map(str::to_owned)
        };
        for key in table.keys() {
            if !["name", "token", "token_sha256", "scopes", "streams"].contains(&key.as_str()) {
                r.error("tokens", format!("{at}: unknown key `{key}`"));
            }
        }
        let name = text("name").unwrap_or_else(|| at.clone());
        let sha256 = match (text("token"), text("token_sha256")) {
            (Some(token), None) if !token.is_empty() => Some(token_digest(&token)),
            (None, Some(hex_digest)) => {
                let mut digest = [0u8; 32];
                match hex::decode_to_slice(hex_digest.trim(), &mut digest) {
                    Ok(()) => Some(digest),
                    Err(_) => {
                        r.error(
                            "tokens",
                            format!("{at} ({name}): token_sha256 must be 64 hexadecimal digits"),
                        );
                        None
                    }
                }
            }
            _ => {
                r.error(
                    "tokens",
                    format!("{at} ({name}): set exactly one of `token` or `token_sha256`"),
                );
                None
            }
        };
        let scopes: Vec<Scope> = match table.get("scopes").and_then(|value| value.as_array()) {
            Some(items) => items
                .iter()
                .filter_map(|item| {
                    let scope = item.as_str().and_then(Scope::parse);
                    if scope.is_none() {
                        r.error(
                            "tokens",
                            format!("{at} ({name}): scope {item} is not publish, consume or admin"),
                        );
                    }
                    scope
                })
                .collect(),
            None => {
                r.error(
                    "tokens",
                    format!("{at} ({name}): `scopes` must list publish, consume and/or admin"),
                );
                Vec::new()
            }
        };
        let streams = table.get("streams").map(|value| {
            let items = value.as_array().cloned().unwrap_or_default();
            if value.as_array().is_none() {
                r.error(
                    "tokens",
                    format!("{at} ({name}): `streams` must be a list of globs"),
                );
            }
            items
                .iter()
                .filter_map(|item| match item.as_str().map(StreamPattern::parse) {
                    Some(Ok(pattern)) => Some(pattern),
                    _ => {
                        r.error(
                            "tokens",
                            format!("{at} ({name}): {item} is not a valid stream glob"),
                        );
                        None
                    }
                })
                .collect()
        });
        if let Some(sha256) = sha256 {
            tokens.push(StaticToken {
                name,
                sha256,
                scopes,
                streams,
            });
        }
    }
    tokens
}

/// JWT verification: an HS256 secret, or a public key given as PEM text or a PEM file's path.
fn read_jwt(r: &mut Reader) -> Option<JwtConfig> {
    let hs256_secret = r
        .string("jwt.hs256_secret")
        .filter(|secret| !secret.is_empty());
    let public_key_pem = r.string("jwt.public_key_pem");
    let audience = r.string("jwt.audience");
    let issuer = r.string("jwt.issuer");
    let (aud, iss) = (audience.as_deref(), issuer.as_deref());
    let verifier = match (&hs256_secret, &public_key_pem) {
        (None, None) => {
            if aud.is_some() || iss.is_some() {
                r.problem("jwt.audience/jwt.issuer are set but no key is: set jwt.hs256_secret or jwt.public_key_pem");
            }
            return None;
        }
        (Some(_), Some(_)) => {
            r.problem("set one of jwt.hs256_secret or jwt.public_key_pem, not both");
            return None;
        }
        (Some(secret), None) => JwtVerifier::hs256(secret, aud, iss),
        (None, Some(pem)) => {
            let text = if pem.trim_start().starts_with("-----BEGIN") {
                pem.clone()
            } else {
                match std::fs::read_to_string(pem) {
                    Ok(text) => text,
                    Err(error) => {
                        r.error("jwt.public_key_pem", format!("cannot read {pem}: {error}"));
                        return None;
                    }
                }
            };
            match JwtVerifier::public_key(&text, aud, iss) {
                Ok(verifier) => verifier,
                Err(error) => {
                    r.error("jwt.public_key_pem", error);
                    return None;
                }
            }
        }
    };
    Some(JwtConfig {
        hs256_secret: hs256_secret.map(Secret::new),
        public_key_pem,
        audience,
        issuer,
        verifier,
    })
}

fn read_tls(r: &mut Reader) -> Option<TlsConfig> {
    match (r.string("tls.cert"), r.string("tls.key")) {
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert: cert.into(),
            key: key.into(),
        }),
        (None, None) => None,
        _ => {
            r.problem("tls.cert and tls.key must be set together");
            None
        }
    }
}

fn read_retention(r: &mut Reader) -> Vec<RetentionRule> {
    let Some(tables) = r.tables("retention") else {
        return Vec::new();
    };
    let mut rules = Vec::new();
    for (index, table) in tables.iter().enumerate() {
        let at = format!("retention[{index}]");
        for key in table.keys() {
            if !["pattern", "max_len", "max_age", "idle_ttl"].contains(&key.as_str()) {
                r.error("retention", format!("{at}: unknown key `{key}`"));
            }
        }
        let pattern = match table
            .get("pattern")
            .and_then(|value| value.as_str())
            .map(StreamPattern::parse)
        {
            Some(Ok(pattern)) => Some(pattern),
            _ => {
                r.error(
                    "retention",
                    format!("{at}: `pattern` must be a stream glob such as \"orders.*\""),
                );
                None
            }
        };
        let max_len = match table.get("max_len") {
            None => None,
            Some(toml::Value::Integer(n)) if *n > 0 => Some(*n as u64),
            Some(other) => {
                r.error(
                    "retention",
                    format!("{at}: max_len must be a positive whole number, got {other}"),
                );
                None
            }
        };
        let mut duration = |key: &str| match table.get(key) {
            None => None,
            Some(toml::Value::Integer(n)) if *n > 0 => Some(Duration::from_secs(*n as u64)),
            Some(toml::Value::String(text))
                if reader::parse_duration(text).is_some_and(|d| !d.is_zero()) =>
            {
                reader::parse_duration(text)
            }
            Some(other) => {
                r.error(
                    "retention",
                    format!("{at}: {key} must be a duration such as \"1h\", got {other}"),
                );
                None
            }
        };
        let (max_age, idle_ttl) = (duration("max_age"), duration("idle_ttl"));
        if let Some(pattern) = pattern {
            rules.push(RetentionRule {
                pattern,
                max_len,
                max_age,
                idle_ttl,
            });
        }
    }
    rules
}

/// The embedded engine's storage: a data directory (default `streamgate-data`, relative to the
/// working directory) or memory, the fsync policy and the cache size.
fn read_storage(r: &mut Reader, backend: BackendKind) -> StorageConfig {
    let explicit: Vec<&str> = ["storage.path", "storage.fsync", "storage.cache_size"]
        .into_iter()
        .filter(|path| r.is_set(path))
        .collect();
    if backend == BackendKind::Redis && !explicit.is_empty() {
        r.warning(format!(
            "the Redis backend ignores the embedded engine's settings ({})",
            explicit.join(", ")
        ));
    }
    let path = match r.string("storage.path") {
        Some(path) if path == IN_MEMORY => None,
        Some(path) if path.trim().is_empty() => {
            r.error(
                "storage.path",
                format!("expected a directory or \"{IN_MEMORY}\", got an empty string"),
            );
            None
        }
        Some(path) => Some(PathBuf::from(path)),
        None => Some(PathBuf::from("streamgate-data")),
    };
    let fsync = match r.string("storage.fsync") {
        None => FsyncPolicy::EverySec,
        Some(text) => FsyncPolicy::parse(&text).unwrap_or_else(|| {
            r.error(
                "storage.fsync",
                format!("expected \"always\", \"everysec\" or \"never\", got {text:?}"),
            );
            FsyncPolicy::EverySec
        }),
    };
    let cache_size = r.byte_size("storage.cache_size").unwrap_or(64 << 20);
    if cache_size < 1 << 20 {
        r.error("storage.cache_size", "must be at least 1MiB");
    }
    StorageConfig {
        path,
        fsync,
        cache_size,
    }
}

/// The backend to use and, for Redis, how to reach it.
fn read_backend(r: &mut Reader) -> (BackendKind, Option<RedisSettings>) {
    let url = r.string("redis.url");
    let address = r
        .string("redis_address")
        .filter(|address| !address.is_empty());
    let password = r
        .string("redis_password")
        .filter(|password| !password.is_empty());
    let db = r.integer("redis_db", 0..=1_000_000);
    let connect_retries = r.integer("redis.connect_retries", 0..=1000).unwrap_or(3) as u32;
    let pool_size = r.integer("redis.pool_size", 1..=64).unwrap_or(4) as usize;
    let response_timeout = positive(r, "redis.response_timeout").unwrap_or(Duration::from_secs(10));
    let tls_ca = r.string("redis.tls_ca").map(PathBuf::from);
    let cluster = match r.string("redis.cluster").as_deref() {
        None | Some("auto") => ClusterMode::Auto,
        Some("true") => ClusterMode::Cluster,
        Some("false") => ClusterMode::Standalone,
        Some(other) => {
            r.error(
                "redis.cluster",
                format!("expected \"auto\", \"true\" or \"false\", got {other:?}"),
            );
            ClusterMode::Auto
        }
    };
    let seeds = r.string_list("redis.urls").unwrap_or_default();
    let wait_replicas = r.integer("redis.wait_replicas", 0..=16).unwrap_or(0) as u32;
    let wait_timeout = positive(r, "redis.wait_timeout").unwrap_or(Duration::from_secs(1));
    if wait_replicas > 0 && wait_timeout >= response_timeout {
        // A write waits for its WAIT within the reply's own time limit.
        r.error(
            "redis.wait_timeout",
            "must be shorter than redis.response_timeout when redis.wait_replicas is set",
        );
    }
    let url = url.or_else(|| seeds.first().cloned());
    let redis_configured = url.is_some() || address.is_some();
    let kind = match r.string("backend").as_deref() {
        None => {
            if redis_configured {
                BackendKind::Redis
            } else {
                BackendKind::Embedded
            }
        }
        Some("redis") => BackendKind::Redis,
        Some("embedded") => {
            if redis_configured {
                r.error(
                    "backend",
                    "is \"embedded\" but a Redis URL or address is also set; remove one",
                );
            }
            BackendKind::Embedded
        }
        Some(other) => {
            r.error(
                "backend",
                format!("expected \"embedded\" or \"redis\", got {other:?}"),
            );
            BackendKind::Embedded
        }
    };
    if kind == BackendKind::Embedded {
        return (kind, None);
    }
    if url.is_some() && address.is_some() {
        r.problem(
            "set either redis.url (--redis-url) or redis_address (--redis-address), not both",
        );
        return (kind, None);
    }
    let base = match (url, address) {
        (Some(url), _) => url,
        (None, Some(address)) => format!("redis://{address}"),
        (None, None) => "redis://127.0.0.1:6379".to_owned(),
    };
    let mut parsed = match url::Url::parse(&base) {
        Ok(parsed)
            if matches!(parsed.scheme(), "redis" | "rediss") && parsed.host_str().is_some() =>
        {
            parsed
        }
        _ => {
            let path = if r.is_set("redis.url") {
                "redis.url"
            } else {
                "redis_address"
            };
            r.error(
                path,
                "expected redis://[user:pass@]host:port/db, rediss://… or HOST:PORT",
            );
            return (kind, None);
        }
    };
    if let Some(password) = &password
        && parsed.set_password(Some(password)).is_err()
    {
        r.problem("redis_password cannot be applied to the Redis URL");
    }
    if let Some(db) = db {
        parsed.set_path(&format!("/{db}"));
    }
    if tls_ca.is_some() && parsed.scheme() != "rediss" {
        r.error("redis.tls_ca", "is set but the Redis URL is not rediss://");
    }
    let mut options = redis_options(&parsed);
    options.pool_size = pool_size;
    options.connect_retries = connect_retries;
    options.response_timeout = response_timeout;
    options.tls_ca = tls_ca.clone();
    options.cluster = cluster;
    options.wait_replicas = wait_replicas;
    options.wait_timeout = wait_timeout;
    for seed in &seeds {
        match url::Url::parse(seed) {
            Ok(seed) if seed.scheme() == parsed.scheme() && seed.host_str().is_some() => {
                let mut seed = seed;
                if let Some(password) = &password {
                    let _ = seed.set_password(Some(password));
                }
                options.seeds.push(seed.to_string());
            }
            _ => r.error(
                "redis.urls",
                format!(
                    "{seed:?}: expected a {}:// URL like redis.url",
                    parsed.scheme()
                ),
            ),
        }
    }
    let shown = url_without_password(parsed.as_str());
    (
        kind,
        Some(RedisSettings {
            url: shown,
            connect_retries,
            pool_size,
            response_timeout,
            tls_ca,
            cluster: match cluster {
                ClusterMode::Auto => "auto",
                ClusterMode::Cluster => "true",
                ClusterMode::Standalone => "false",
            },
            urls: options
                .seeds
                .iter()
                .map(|seed| url_without_password(seed))
                .collect(),
            wait_replicas,
            wait_timeout,
            options,
        }),
    )
}

/// `url` with its password (if any) replaced.
fn url_without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // The URL parsed, so setting its password cannot fail.
            let _ = parsed.set_password(Some("redacted"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<not a URL>".to_owned(),
    }
}

/// Options for a Redis at `parsed` (a `redis://` or `rediss://` URL), with default pool and
/// timeouts.
fn redis_options(parsed: &url::Url) -> RedisOptions {
    let port = parsed.port().unwrap_or(6379);
    let host = parsed.host_str().unwrap_or_default().to_owned();
    let db_suffix = match parsed.path().trim_start_matches('/') {
        "" | "0" => String::new(),
        db => format!("/{db}"),
    };
    RedisOptions::new(parsed.to_string(), format!("{host}:{port}{db_suffix}"))
}

/// One end of `streamgate copy`.
#[derive(Debug, Clone)]
pub enum CopyEnd {
    /// An embedded engine's data directory (created when it is the target and missing).
    Directory(PathBuf),
    Redis(RedisOptions),
}

impl CopyEnd {
    /// A `redis://` / `rediss://` URL, or else a directory.
    fn parse(text: &str) -> Result<CopyEnd, String> {
        if text.starts_with("redis://") || text.starts_with("rediss://") {
            return match url::Url::parse(text) {
                Ok(parsed) if parsed.host_str().is_some() => {
                    Ok(CopyEnd::Redis(redis_options(&parsed)))
                }
                _ => Err(format!(
                    "{text:?} is not a Redis URL such as redis://[user:pass@]host:port/db"
                )),
            };
        }
        if text.is_empty() || text == IN_MEMORY {
            return Err(format!("{text:?} is not a data directory or a Redis URL"));
        }
        Ok(CopyEnd::Directory(PathBuf::from(text)))
    }

    /// Where it is, without credentials.
    pub fn describe(&self) -> String {
        match self {
            CopyEnd::Directory(path) => path.display().to_string(),
            CopyEnd::Redis(options) => format!("redis at {}", options.display_address),
        }
    }
}

/// Whether two paths name one directory (`./d` and `d`, or through a link).
fn same_directory(a: &std::path::Path, b: &std::path::Path) -> bool {
    let real = |path: &std::path::Path| {
        std::fs::canonicalize(path)
            .or_else(|_| std::path::absolute(path))
            .unwrap_or_else(|_| path.to_owned())
    };
    real(a) == real(b)
}

/// What `streamgate copy` is asked to do.
#[derive(Debug, Clone)]
pub struct CopyPlan {
    pub from: CopyEnd,
    pub to: CopyEnd,
    /// Streams to copy; `None` copies every stream except streamgate's own.
    pub streams: Option<StreamPattern>,
    pub overwrite: bool,
}

impl CopyPlan {
    /// Checks `streamgate copy`'s arguments.
    pub fn from_args(args: &CopyArgs) -> Result<CopyPlan, ConfigError> {
        let mut problems = Vec::new();
        let mut end = |flag: &str, text: &str| {
            CopyEnd::parse(text)
                .map_err(|problem| problems.push(format!("--{flag}: {problem}")))
                .ok()
        };
        let (from, to) = (end("from", &args.from), end("to", &args.to));
        let streams = match args.streams.as_deref().map(StreamPattern::parse) {
            None => None,
            Some(Ok(pattern)) => Some(pattern),
            Some(Err(error)) => {
                problems.push(format!("--streams: not a glob ({error})"));
                None
            }
        };
        match (from, to) {
            (Some(from), Some(to)) if problems.is_empty() => {
                if let (CopyEnd::Directory(a), CopyEnd::Directory(b)) = (&from, &to)
                    && same_directory(a, b)
                {
                    return Err(ConfigError(vec![
                        "--from and --to name the same directory".into(),
                    ]));
                }
                Ok(CopyPlan {
                    from,
                    to,
                    streams,
                    overwrite: args.overwrite,
                })
            }
            _ => Err(ConfigError(problems)),
        }
    }
}

/// A random 256-bit token, hex-encoded.
fn generate_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// On Redis, one runtime thread fewer than the cores (at least one): the rest is left to the
/// kernel's network work and to a Redis on the same machine (on two shared cores, one thread
/// served more than two in every Redis scenario). The embedded engine has no Redis to leave a core
/// to: every core (on two cores, two threads published 10–20 % more than one; see BENCHMARKS.md).
fn default_worker_threads(backend: BackendKind) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    match backend {
        BackendKind::Redis => cores.saturating_sub(1).max(1),
        BackendKind::Embedded => cores,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(
        file: Option<&str>,
        env: &[(&str, &str)],
        flags: &[&str],
    ) -> Result<Config, ConfigError> {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["streamgate".to_owned()];
        if let Some(text) = file {
            let path = dir.path().join("streamgate.toml");
            std::fs::write(&path, text).unwrap();
            args.push(format!("--config={}", path.display()));
        }
        args.extend(flags.iter().map(|flag| flag.to_string()));
        let cli = Cli::try_parse_from(normalize_go_style_flags(args)).unwrap();
        let sources = Sources {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            flags: cli.flags,
        };
        Config::load(&sources)
    }

    #[test]
    fn defaults_are_embedded_on_loopback_with_a_generated_token() {
        let config = load(None, &[], &[]).unwrap();
        assert_eq!(config.backend, BackendKind::Embedded);
        assert_eq!(config.http_address.to_string(), "127.0.0.1:8080");
        assert!(config.bearer_token_generated);
        assert_eq!(config.bearer_token.as_ref().unwrap().expose().len(), 64);
        assert_eq!(config.consumer.default_limit, 10);
        assert_eq!(config.consumer.visibility_timeout, Duration::from_secs(300));
        assert_eq!(
            config.sse_keepalive_interval_sec,
            Some(Duration::from_secs(15))
        );
        assert_eq!(config.limits.max_message_bytes, 1 << 20);
    }

    #[test]
    fn file_then_env_then_flags() {
        let file = "http_address = \"127.0.0.1:1000\"\nbearer_token = \"file\"\n[consumer]\ndefault_limit = 3\nvisibility_timeout = \"5s\"\n";
        let config = load(Some(file), &[], &[]).unwrap();
        assert_eq!(config.http_address.port(), 1000);
        assert_eq!(config.bearer_token.as_ref().unwrap().expose(), "file");
        assert_eq!(config.consumer.visibility_timeout, Duration::from_secs(5));

        let env = [
            ("STREAMGATE_HTTP_ADDRESS", "127.0.0.1:2000"),
            ("STREAMGATE_CONSUMER__DEFAULT_LIMIT", "7"),
        ];
        let config = load(Some(file), &env, &[]).unwrap();
        assert_eq!(config.http_address.port(), 2000);
        assert_eq!(config.consumer.default_limit, 7);

        let config = load(Some(file), &env, &["--http-address", "127.0.0.1:3000"]).unwrap();
        assert_eq!(config.http_address.port(), 3000);
        assert_eq!(config.consumer.default_limit, 7);
    }

    #[test]
    fn rs_http_facade_names_are_accepted() {
        let env = [
            ("RS_HTTP_FACADE_REDIS_ADDRESS", "localhost:7000"),
            ("RS_HTTP_FACADE_REDIS_PASSWORD", "pw"),
            ("RS_HTTP_FACADE_REDIS_DB", "2"),
            ("RS_HTTP_FACADE_BEARER_TOKEN", "t"),
            ("RS_HTTP_FACADE_SSE_KEEPALIVE_INTERVAL_SEC", "-1"),
        ];
        let config = load(None, &env, &["-http-address=:9000"]).unwrap();
        assert_eq!(config.backend, BackendKind::Redis);
        let redis = config.redis.unwrap();
        assert_eq!(redis.options.url, "redis://:pw@localhost:7000/2");
        assert_eq!(redis.options.display_address, "localhost:7000/2");
        assert!(!redis.url.contains("pw"));
        assert_eq!(config.http_address.to_string(), "0.0.0.0:9000");
        assert_eq!(config.sse_keepalive_interval_sec, None);
        // Our own prefix wins over the compatibility name.
        let config = load(
            None,
            &[
                ("RS_HTTP_FACADE_BEARER_TOKEN", "a"),
                ("STREAMGATE_BEARER_TOKEN", "b"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(config.bearer_token.unwrap().expose(), "b");
    }

    #[test]
    fn cluster_seeds_and_replica_waits_are_read() {
        let env = [
            (
                "STREAMGATE_REDIS__URLS",
                "redis://:pw@10.0.0.1:7000,redis://:pw@10.0.0.2:7000",
            ),
            ("STREAMGATE_REDIS__WAIT_REPLICAS", "1"),
            ("STREAMGATE_REDIS__WAIT_TIMEOUT", "250ms"),
            ("STREAMGATE_REDIS__CLUSTER", "true"),
        ];
        let config = load(None, &env, &[]).unwrap();
        assert_eq!(config.backend, BackendKind::Redis);
        let redis = config.redis.unwrap();
        assert_eq!(redis.options.url, "redis://:pw@10.0.0.1:7000");
        assert_eq!(redis.options.seeds.len(), 2);
        assert_eq!(redis.options.cluster, ClusterMode::Cluster);
        assert_eq!(redis.options.wait_replicas, 1);
        assert_eq!(redis.options.wait_timeout, Duration::from_millis(250));
        assert!(redis.urls.iter().all(|url| !url.contains("pw")));
        // A wait as long as a reply's time limit could never answer in time.
        let env = [
            ("STREAMGATE_REDIS__URL", "redis://10.0.0.1:7000"),
            ("STREAMGATE_REDIS__WAIT_REPLICAS", "1"),
            ("STREAMGATE_REDIS__WAIT_TIMEOUT", "10s"),
        ];
        let error = load(None, &env, &[]).unwrap_err().to_string();
        assert!(error.contains("redis.wait_timeout"), "{error}");
        let env = [("STREAMGATE_REDIS__CLUSTER", "maybe")];
        let error = load(None, &env, &[]).unwrap_err().to_string();
        assert!(error.contains("redis.cluster"), "{error}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let file =
            "bogus = 1\n[consumer]\ndefault_limit = \"many\"\nvisibility_timeout = \"soon\"\n";
        let error = load(Some(file), &[("STREAMGATE_LOG_FORMAT", "xml")], &[]).unwrap_err();
        let text = error.to_string();
        assert_eq!(error.0.len(), 4, "{text}");
        assert!(text.contains("consumer.default_limit"), "{text}");
        assert!(text.contains("consumer.visibility_timeout"), "{text}");
        assert!(text.contains("STREAMGATE_LOG_FORMAT"), "{text}");
        assert!(text.contains("bogus"), "{text}");
    }

    #[test]
    fn malformed_file_names_the_line() {
        let error = load(Some("a = 1\nb = = 2\n"), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn non_loopback_needs_a_token() {
        let error = load(None, &[], &["--http-address", "0.0.0.0:8080"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("refusing"), "{error}");
        assert!(
            load(
                None,
                &[],
                &["--http-address", "0.0.0.0:8080", "--bearer-token", "x"]
            )
            .is_ok()
        );
        let scoped = "http_address = \"0.0.0.0:8080\"\n[[tokens]]\nname = \"w\"\ntoken = \"t\"\nscopes = [\"publish\"]\n";
        let config = load(Some(scoped), &[], &[]).unwrap();
        assert!(
            config.bearer_token.is_none(),
            "scoped tokens mean no generated token"
        );
    }

    #[test]
    fn tokens_and_retention_parse() {
        let file = r#"
[[tokens]]
name = "reader"
token_sha256 = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
scopes = ["consume"]
streams = ["orders.*"]

[[retention]]
pattern = "logs.*"
max_len = 1000
max_age = "1h"
"#;
        let config = load(Some(file), &[], &[]).unwrap();
        assert_eq!(config.tokens.len(), 1);
        assert_eq!(config.retention_for("logs.app").max_len, Some(1000));
        assert_eq!(
            config.retention_for("logs.app").max_age,
            Some(Duration::from_secs(3600))
        );
        assert_eq!(config.retention_for("orders"), Retention::default());
        let env = [(
            "STREAMGATE_TOKENS",
            r#"[{ name = "x", token = "y", scopes = ["admin"] }]"#,
        )];
        assert_eq!(load(None, &env, &[]).unwrap().tokens[0].name, "x");
    }

    #[test]
    fn effective_configuration_hides_secrets() {
        let config = load(
            None,
            &[(
                "STREAMGATE_REDIS__URL",
                "redis://u:hunter2@127.0.0.1:6390/1",
            )],
            &["--bearer-token", "tok3n"],
        )
        .unwrap();
        let text = config.to_effective_toml();
        assert!(
            !text.contains("hunter2") && !text.contains("tok3n"),
            "{text}"
        );
        assert!(text.contains("backend = \"redis\""), "{text}");
        assert!(text.contains("[consumer]"), "{text}");
    }
}
