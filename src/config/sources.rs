//! Where configuration comes from: the command line, the environment and a TOML file, merged
//! into one table (file < environment < flags) that remembers where each value came from.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use toml::{Table, Value};

/// streamgate: Redis Streams on HTTP.
#[derive(Debug, Parser)]
#[command(name = "streamgate", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Work with the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Copy streams, consumer groups and pending entries between a data directory and Redis
    /// (either way): ids, fields, group positions, and pending entries with owner and delivery
    /// count. Safe to re-run: what was copied is skipped.
    Copy(CopyArgs),
}

/// `streamgate copy`'s arguments.
#[derive(Debug, Clone, Args)]
pub struct CopyArgs {
    /// Where to copy from: a data directory (streamgate must not be running on it) or a Redis
    /// URL (redis://…, rediss://…).
    #[arg(long, value_name = "SOURCE")]
    pub from: String,
    /// Where to copy to: a data directory (created if missing) or a Redis URL.
    #[arg(long, value_name = "TARGET")]
    pub to: String,
    /// Only the streams whose names match this glob, e.g. "orders.*" [default: every stream
    /// except streamgate's own].
    #[arg(long, value_name = "PATTERN")]
    pub streams: Option<String>,
    /// Replace target streams that already exist with other content (refused otherwise).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate file, environment and flags together (without contacting Redis) and print the
    /// effective configuration with secrets redacted.
    Check,
}

/// The command-line flags. Their names are relied on by users' scripts; Go-style single-dash
/// spellings (`-http-address=:8080`, as rs-http-facade takes them) are accepted too.
#[derive(Debug, Default, Clone, Args)]
pub struct Flags {
    /// TOML configuration file (also STREAMGATE_CONFIG or RS_HTTP_FACADE_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1:8080].
    #[arg(long, global = true, value_name = "ADDR")]
    pub http_address: Option<String>,
    /// The token that grants every scope.
    #[arg(long, global = true, value_name = "TOKEN")]
    pub bearer_token: Option<String>,
    /// `embedded` or `redis` [default: redis when a Redis URL or address is set, else embedded].
    #[arg(long, global = true, value_name = "KIND")]
    pub backend: Option<String>,
    /// redis://[user:pass@]host:port/db (rediss:// for TLS).
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Redis HOST:PORT (rs-http-facade style; see also --redis-password, --redis-db).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub redis_address: Option<String>,
    /// Redis password.
    #[arg(long, global = true, value_name = "PASSWORD")]
    pub redis_password: Option<String>,
    /// Redis database number.
    #[arg(long, global = true, value_name = "N")]
    pub redis_db: Option<String>,
    /// Seconds between SSE keep-alive comments; 0 or negative disables them [default: 15].
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true)]
    pub sse_keepalive_interval_sec: Option<String>,
    /// `text` or `json` [default: text].
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter directive [default: info].
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// The embedded engine's data directory (storage.path) [default: streamgate-data].
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "in_memory")]
    pub data_dir: Option<String>,
    /// Keep the embedded engine's data in memory only: it is lost when streamgate stops.
    #[arg(long, global = true)]
    pub in_memory: bool,
}

/// Long flag names that may also be written Go-style with one dash.
const LONG_FLAGS: &[&str] = &[
    "config",
    "http-address",
    "bearer-token",
    "backend",
    "redis-url",
    "redis-address",
    "redis-password",
    "redis-db",
    "sse-keepalive-interval-sec",
    "log-format",
    "log-level",
    "data-dir",
    "in-memory",
];

/// Rewrites `-http-address=…` / `-http-address …` (Go's flag syntax, used by rs-http-facade's
/// users) to the `--http-address` clap understands. Everything else is left alone.
pub fn normalize_go_style_flags(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .map(|arg| {
            let Some(rest) = arg.strip_prefix('-').filter(|rest| !rest.starts_with('-')) else {
                return arg;
            };
            let name = rest.split_once('=').map_or(rest, |(name, _)| name);
            if LONG_FLAGS.contains(&name) {
                format!("-{arg}")
            } else {
                arg
            }
        })
        .collect()
}

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Env(String),
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "in {}", path.display()),
            Origin::Env(name) => write!(f, "from environment variable {name}"),
            Origin::Flag(name) => write!(f, "from flag --{name}"),
        }
    }
}

/// The merged configuration table and the origin of each value in it (by dotted path).
#[derive(Debug, Default)]
pub struct Layered {
    pub table: Table,
    pub origins: HashMap<String, Origin>,
    /// Environment variables with our prefix that name no configuration key.
    pub unknown_env: Vec<String>,
}

/// Everything configuration is read from; tests build one without touching the process.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub env: Vec<(String, String)>,
    pub flags: Flags,
}

impl Sources {
    /// The process's environment and the parsed flags.
    pub fn from_process(flags: Flags) -> Sources {
        Sources {
            env: std::env::vars().collect(),
            flags,
        }
    }

    fn env_var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The configuration file to read, if one is named (flag > STREAMGATE_CONFIG >
    /// RS_HTTP_FACADE_CONFIG).
    pub fn config_file(&self) -> Option<(PathBuf, Origin)> {
        if let Some(path) = &self.flags.config {
            return Some((path.clone(), Origin::Flag("config")));
        }
        ["STREAMGATE_CONFIG", "RS_HTTP_FACADE_CONFIG"]
            .into_iter()
            .find_map(|name| {
                let value = self.env_var(name)?;
                Some((PathBuf::from(value), Origin::Env(name.to_owned())))
            })
    }

    /// Reads the file (if any) and merges the environment and flags over it.
    pub fn layer(&self) -> Result<Layered, String> {
        let mut layered = Layered::default();
        if let Some((path, origin)) = self.config_file() {
            let text = std::fs::read_to_string(&path).map_err(|error| {
                format!(
                    "cannot read configuration file {} ({origin}): {error}",
                    path.display()
                )
            })?;
            let table: Table = text.parse().map_err(|error: toml::de::Error| {
                format!(
                    "configuration file {} is not valid TOML: {error}",
                    path.display()
                )
            })?;
            layered.merge_table(table, &Origin::File(path), "");
        }
        self.layer_env(&mut layered);
        self.layer_flags(&mut layered);
        Ok(layered)
    }

    fn layer_env(&self, layered: &mut Layered) {
        // rs-http-facade's names first, so that our own prefix wins when both are set.
        for (suffix, key) in COMPAT_ENV {
            let name = format!("RS_HTTP_FACADE_{suffix}");
            if let Some(value) = self.env_var(&name) {
                layered.set(key, Value::String(value.to_owned()), Origin::Env(name));
            }
        }
        for (name, value) in &self.env {
            let Some(suffix) = name.strip_prefix("STREAMGATE_") else {
                continue;
            };
            if NOT_CONFIG_KEYS.contains(&suffix) {
                continue;
            }
            let path = suffix.to_ascii_lowercase().replace("__", ".");
            if !super::is_known_path(&path) {
                layered.unknown_env.push(name.clone());
                continue;
            }
            layered.set(
                &path,
                Value::String(value.clone()),
                Origin::Env(name.clone()),
            );
        }
    }

    fn layer_flags(&self, layered: &mut Layered) {
        let flags = &self.flags;
        let pairs: [(&'static str, &str, &Option<String>); 10] = [
            ("http-address", "http_address", &flags.http_address),
            ("bearer-token", "bearer_token", &flags.bearer_token),
            ("backend", "backend", &flags.backend),
            ("redis-url", "redis.url", &flags.redis_url),
            ("redis-address", "redis_address", &flags.redis_address),
            ("redis-password", "redis_password", &flags.redis_password),
            ("redis-db", "redis_db", &flags.redis_db),
            (
                "sse-keepalive-interval-sec",
                "sse_keepalive_interval_sec",
                &flags.sse_keepalive_interval_sec,
            ),
            ("log-format", "log_format", &flags.log_format),
            ("log-level", "log_level", &flags.log_level),
        ];
        for (flag, path, value) in pairs {
            if let Some(value) = value {
                layered.set(path, Value::String(value.clone()), Origin::Flag(flag));
            }
        }
        if let Some(path) = &flags.data_dir {
            layered.set(
                "storage.path",
                Value::String(path.clone()),
                Origin::Flag("data-dir"),
            );
        }
        if flags.in_memory {
            layered.set(
                "storage.path",
                Value::String(super::IN_MEMORY.to_owned()),
                Origin::Flag("in-memory"),
            );
        }
    }
}

/// rs-http-facade's environment variables and the keys they set.
const COMPAT_ENV: [(&str, &str); 6] = [
    ("REDIS_ADDRESS", "redis_address"),
    ("REDIS_PASSWORD", "redis_password"),
    ("REDIS_DB", "redis_db"),
    ("HTTP_ADDRESS", "http_address"),
    ("BEARER_TOKEN", "bearer_token"),
    ("SSE_KEEPALIVE_INTERVAL_SEC", "sse_keepalive_interval_sec"),
];

/// `STREAMGATE_*` variables that are not configuration keys.
const NOT_CONFIG_KEYS: &[&str] = &["CONFIG", "REQUIRE_REDIS"];

impl Layered {
    /// Sets a value at a dotted path, creating tables on the way.
    pub fn set(&mut self, path: &str, value: Value, origin: Origin) {
        let mut table = &mut self.table;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                table.insert(part.to_owned(), value);
                break;
            }
            let child = table
                .entry(part.to_owned())
                .or_insert_with(|| Value::Table(Table::new()));
            if !child.is_table() {
                *child = Value::Table(Table::new());
            }
            let Value::Table(child) = child else {
                unreachable!("made a table above")
            };
            table = child;
        }
        self.origins.insert(path.to_owned(), origin);
    }

    fn merge_table(&mut self, table: Table, origin: &Origin, prefix: &str) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                // Tables merge key by key; arrays of tables (tokens, retention) are whole values.
                Value::Table(child) if super::is_section(&path) => {
                    self.merge_table(child, origin, &path)
                }
                value => self.set(&path, value, origin.clone()),
            }
        }
    }

    /// Where the value at `path` came from.
    pub fn origin(&self, path: &str) -> Option<&Origin> {
        self.origins.get(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_flags_are_rewritten() {
        let args = [
            "streamgate",
            "-http-address=:8080",
            "-bearer-token",
            "t",
            "-x",
            "--log-level=info",
        ]
        .map(String::from);
        assert_eq!(
            normalize_go_style_flags(args),
            [
                "streamgate",
                "--http-address=:8080",
                "--bearer-token",
                "t",
                "-x",
                "--log-level=info"
            ]
        );
    }
}
