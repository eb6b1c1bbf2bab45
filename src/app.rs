//! Wires the backend, the shared state and the router together, prints the banner, and runs the
//! server until the shutdown token is cancelled; then drains within `shutdown_timeout`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backend::AnyBackend;
use crate::backend::embedded::EmbeddedBackend;
use crate::backend::redis::RedisBackend;
use crate::bridge;
use crate::config::{BackendKind, Config};
use crate::delivery::Delivery;
use crate::delivery::groups::GroupSettings;
use crate::http::serve::{Front, serve, tls_acceptor};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::probe::Probe;

/// Runs streamgate on an already-bound listener until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let config = Arc::new(config);
    let tls = match &config.tls {
        Some(tls) => Some(
            tls_acceptor(&tls.cert, &tls.key).map_err(|error| anyhow::anyhow!("TLS: {error}"))?,
        ),
        None => None,
    };
    let backend = connect_backend(&config, shutdown.clone()).await?;
    let local_address = listener
        .local_addr()
        .context("reading the listen address")?;
    print_banner(&config, &backend, local_address);

    let metrics = Arc::new(Metrics::new());
    if let (false, AnyBackend::Redis(redis)) = (config.pubsub.patterns.is_empty(), &backend) {
        bridge::start(
            redis,
            config.pubsub.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
    }
    let delivery = Delivery::start(
        backend.clone(),
        group_settings(&config),
        metrics.clone(),
        shutdown.clone(),
    );
    let probe = Probe::start(
        backend.clone(),
        &delivery,
        metrics.clone(),
        config.probe.clone(),
        shutdown.clone(),
    );
    let state = AppState::new(
        backend,
        delivery,
        probe,
        metrics,
        config.clone(),
        shutdown.clone(),
    );
    let front = Front {
        router: http::router(state.clone()),
        metrics: state.metrics.clone(),
        write_timeout: config.sse_write_timeout,
        sessions: state.sessions.clone(),
    };
    drop(state);
    let serving = tokio::spawn(serve(
        listener,
        front,
        tls,
        shutdown.clone(),
        config.shutdown_timeout,
    ));
    shutdown.cancelled().await;
    tracing::info!(deadline = ?config.shutdown_timeout, "shutting down: draining connections");
    serving.await.context("the server task failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Connects to the configured backend; for Redis, retries at start-up and then gives up with the
/// cause.
async fn connect_backend(
    config: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<AnyBackend> {
    match (config.backend, &config.redis) {
        (BackendKind::Redis, Some(redis)) => {
            let backend = RedisBackend::connect(&redis.options, shutdown)
                .await
                .with_context(|| {
                    format!(
                        "cannot connect to Redis at {} (tried {} times)",
                        redis.options.display_address,
                        redis.options.connect_retries + 1
                    )
                })?;
            Ok(AnyBackend::Redis(backend))
        }
        (BackendKind::Redis, None) => {
            anyhow::bail!("the Redis backend is selected but not configured")
        }
        (BackendKind::Embedded, _) => {
            let Some(options) = config.storage.disk() else {
                return Ok(AnyBackend::Embedded(EmbeddedBackend::in_memory(shutdown)));
            };
            // Recovery reads the whole directory's records: away from the runtime's threads.
            let backend =
                tokio::task::spawn_blocking(move || EmbeddedBackend::open(&options, shutdown))
                    .await
                    .context("opening the data directory")??;
            Ok(AnyBackend::Embedded(backend))
        }
    }
}

/// The start-up banner: one line each for version, backend, listen URL and docs URL, and the
/// generated token when there is one (printed once, here, and nowhere else).
fn print_banner(config: &Config, backend: &AnyBackend, address: SocketAddr) {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{address}");
    let backend_line = match backend {
        AnyBackend::Redis(_) => format!("backend: redis at {}", backend.address()),
        AnyBackend::Embedded(embedded) => match embedded.storage() {
            Some((path, fsync)) => format!(
                "backend: embedded, data in {} (fsync {})",
                path.display(),
                fsync.as_str()
            ),
            None => "backend: embedded, in memory (data is lost when streamgate stops; --data-dir keeps it)".to_owned(),
        },
    };
    let mut banner = format!(
        "streamgate {}\n{backend_line}\nlistening on {url}\ndocs: {url}/api-docs\n",
        env!("CARGO_PKG_VERSION")
    );
    if config.bearer_token_generated
        && let Some(token) = &config.bearer_token
    {
        banner.push_str(&format!(
            "token: {} (generated for this run, loopback only; set bearer_token to choose one)\n",
            token.expose()
        ));
    }
    // Not `println!`: it panics when nobody reads stdout any more (a closed pipe), and a gateway
    // must not stop serving over its banner.
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(banner.as_bytes())
        .and_then(|()| stdout.flush());
}

fn group_settings(config: &Config) -> GroupSettings {
    let consumer = &config.consumer;
    GroupSettings {
        default_limit: consumer.default_limit,
        visibility_timeout: consumer.visibility_timeout,
        max_deliveries: consumer.max_deliveries,
        delete_on_finish: consumer.delete_on_finish,
        cleanup_after: consumer.cleanup_after,
    }
}
