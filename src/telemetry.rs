//! Logging set-up: text or JSON lines on standard error (standard output carries the banner and
//! command output), filtered by the configured level.
//! Request spans carry the correlation id, so every line logged while serving a request has it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The storage engine's own log (through the `log` crate) reports routine work at `info`; only
/// its warnings and errors are the operator's business, unless a filter names it.
const STORAGE_ENGINE: [&str; 2] = ["fjall", "lsm_tree"];

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat, level: &str) {
    let mut filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    for target in STORAGE_ENGINE
        .into_iter()
        .filter(|target| !level.contains(target))
    {
        if let Ok(directive) = format!("{target}=warn").parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second initialisation (only in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
