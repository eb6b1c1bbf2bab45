//! The `streamgate` binary: parse the configuration, set up logging, bind, and run the app until a
//! signal asks it to stop.

use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use streamgate::config::{
    Cli, Command, Config, ConfigCommand, CopyArgs, CopyPlan, LogFormat, Sources,
    normalize_go_style_flags,
};
use streamgate::{app, copy, telemetry};

/// mimalloc rather than the system allocator: every request allocates and frees a few dozen small
/// objects across two threads, and glibc's malloc was an eighth of the publish path's CPU (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_go_style_flags(std::env::args()));
    if let Some(Command::Copy(args)) = &cli.command {
        return copy_between(args);
    }
    let config = match Config::load(&Sources::from_process(cli.flags)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("streamgate: {error}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Config(ConfigCommand::Check)) => {
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            if config.bearer_token_generated {
                println!(
                    "# bearer_token: none configured; one is generated at start-up (loopback only)"
                );
            }
            print!("{}", config.to_effective_toml());
            ExitCode::SUCCESS
        }
        None | Some(Command::Serve) => serve(config),
        Some(Command::Copy(_)) => unreachable!("handled before the configuration is read"),
    }
}

/// `streamgate copy`: needs no server configuration, only its own arguments.
fn copy_between(args: &CopyArgs) -> ExitCode {
    let plan = match CopyPlan::from_args(args) {
        Ok(plan) => plan,
        Err(error) => {
            eprintln!("streamgate copy: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(LogFormat::Text, "warn");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("streamgate copy: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(copy::run(&plan)) {
        Ok(report) => {
            print!("{}", report.render());
            if report.complete() {
                ExitCode::SUCCESS
            } else {
                eprintln!("streamgate copy: some streams were not copied (see the table)");
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("streamgate copy: {}", causes(&error));
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> ExitCode {
    telemetry::init(config.log_format, &config.log_level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("streamgate: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = TcpListener::bind(config.http_address)
            .await
            .map_err(|error| {
                anyhow::anyhow!("cannot listen on {}: {error}", config.http_address)
            })?;
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        app::run(listener, config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Once, on the log (standard error, like every log line).
            tracing::error!("{}", causes(&error));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: a cause that an error's own message
/// already quotes (as Redis client errors do) is not repeated.
fn causes(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if line.contains(&message) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&message);
    }
    line
}

/// Cancels `shutdown` on SIGINT or SIGTERM; a second signal exits at once.
async fn stop_on_signal(shutdown: CancellationToken) {
    wait_for_signal().await;
    tracing::info!("signal received");
    shutdown.cancel();
    wait_for_signal().await;
    tracing::warn!("second signal: exiting without draining");
    std::process::exit(130);
}

async fn wait_for_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
