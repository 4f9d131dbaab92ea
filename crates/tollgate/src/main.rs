//! `tollgate`: a thin shell over the library (arguments, logging, signals).

use std::io::IsTerminal as _;

use anyhow::Context;
use clap::Parser;
use tollgate::cli::{Cli, Command, WorkspaceAction};
use tollgate::config::{Config, LogFormat, DEFAULT_DATABASE};
use tollgate::database::Database;
use tollgate::{bootstrap, server};
use tollgate_core::SystemClock;

/// mimalloc instead of the system allocator: a proxied request allocates and frees many
/// small buffers across threads, where glibc's malloc spent 11–13% of the CPU
/// (docs/BENCHMARKS.md, "Where the time goes").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = Config::from_args(args)?;
            init_logging(config.log_format);
            let mut stop = Box::pin(shutdown_signal()?);
            // A start waiting on a database or Redis that does not answer still stops on
            // SIGTERM / Ctrl-C.
            let running = tokio::select! {
                running = server::start(config) => running?,
                () = &mut stop => anyhow::bail!("stopped by a signal before serving"),
            };
            running.run_until(stop).await
        }
        Command::Workspace { action, database } => {
            init_logging(LogFormat::Text);
            let url = database.unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
            let database = Database::open(&url).await?;
            let store = database.store();
            let clock = SystemClock;
            let result = match action {
                WorkspaceAction::Create { name } => {
                    let key = bootstrap::create_workspace(store.as_ref(), &clock, &name).await?;
                    bootstrap::announce(&format!("{key}\n"));
                    tracing::info!(workspace = %name, "workspace created; its manage key is on stdout");
                    Ok(())
                }
                WorkspaceAction::Disable { name } => {
                    bootstrap::set_enabled(store.as_ref(), &name, false).await?;
                    tracing::info!(workspace = %name, "workspace disabled");
                    Ok(())
                }
                WorkspaceAction::Enable { name } => {
                    bootstrap::set_enabled(store.as_ref(), &name, true).await?;
                    tracing::info!(workspace = %name, "workspace enabled");
                    Ok(())
                }
            };
            database.close().await;
            result
        }
    }
}

/// Logs go to stderr so stdout carries only what scripts capture (keys).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when it is first polled: a signal that arrives while the server is still starting (it
/// already said it listens) must stop it gracefully, not kill it.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        Ok(async move {
            tokio::select! {
                _ = terminate.recv() => {},
                _ = interrupt.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
