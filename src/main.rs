//! The `archmerge` command: parse the CLI, load the config, start logging,
//! bind the listener and run the server until SIGINT/SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use archmerge::admin;
use archmerge::config::{Config, LogFormat, Settings};
use archmerge::server::{self, App};

/// Exit status for a configuration error (EX_CONFIG from sysexits.h is 78;
/// linkerd and friends use EX_USAGE, 64, for bad settings).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "archmerge",
    version,
    about = "Merges per-architecture pushes into multi-arch images, in front of an OCI registry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in front of the registry.
    Serve(Settings),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(settings) => {
            let config = match Config::load(&settings) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("archmerge: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            init_tracing(config.log_format);
            match serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "archmerge stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn serve(config: Config) -> anyhow::Result<()> {
    let (listen, admin_listen) = (config.listen, config.admin_listen);
    let app = App::new(config).context("setting up the registry client")?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let admin_listener = TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {admin_listen}"))?;
    // One signal stops both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let admin = tokio::spawn(admin::run(
        admin_listener,
        app.clone(),
        stopped(stop_rx.clone()),
    ));
    server::run(listener, app, stopped(stop_rx)).await?;
    admin.abort();
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
