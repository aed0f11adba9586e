//! The `archmerge` command: parse the CLI, load the config, start logging,
//! then serve (until SIGINT/SIGTERM), reconcile, inspect or check the config.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use archmerge::admin;
use archmerge::app::App;
use archmerge::config::{Config, LogFormat, Settings};
use archmerge::logs;
use archmerge::server;

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
    /// Build or repair the indexes for arch tags already in the registry.
    Reconcile {
        #[command(flatten)]
        settings: Settings,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Repositories to reconcile (default: the whole catalog).
        repos: Vec<String>,
    },
    /// Show what a target lists, entry by entry.
    Inspect {
        #[command(flatten)]
        settings: Settings,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The target, as REPO:TAG.
        reference: String,
    },
    /// Validate a configuration file (exit 0 when valid).
    CheckConfig(Settings),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (settings, quiet) = match &cli.command {
        Command::Serve(s) | Command::CheckConfig(s) => (s, false),
        Command::Reconcile { settings, .. } | Command::Inspect { settings, .. } => (settings, true),
    };
    let config = match Config::load(settings) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("archmerge: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_tracing(config.log_format, quiet);
    let result = match cli.command {
        Command::Serve(_) => serve(config),
        Command::CheckConfig(_) => {
            println!("configuration is valid");
            Ok(ExitCode::SUCCESS)
        }
        Command::Reconcile { json, repos, .. } => reconcile(config, repos, json),
        Command::Inspect {
            json, reference, ..
        } => inspect(config, &reference, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("archmerge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat, quiet: bool) {
    // One-shot commands print their own output; their logs stay at warn.
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.event_format(logs::Text::default()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn reconcile(config: Config, repos: Vec<String>, json: bool) -> anyhow::Result<ExitCode> {
    let app = App::new(config).context("setting up the registry client")?;
    let tty = std::io::stderr().is_terminal();
    let summary = app
        .reconcile(&repos, |p| {
            if tty {
                let result = match &p.result {
                    Ok(o) => o.label().to_owned(),
                    Err(e) => format!("FAILED: {e}"),
                };
                eprintln!("[{}/{}] {}:{}  {}", p.done, p.of, p.repo, p.target, result);
            }
        })
        .await
        .context("listing the registry")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "reconciled {} repositories: {} created, {} updated, {} unchanged, {} failed",
            summary.repositories,
            summary.created,
            summary.updated,
            summary.unchanged,
            summary.failed.len()
        );
        for f in &summary.failed {
            println!("  failed {}: {}", f.target, f.error);
        }
    }
    Ok(if summary.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[tokio::main]
async fn inspect(config: Config, reference: &str, json: bool) -> anyhow::Result<ExitCode> {
    let Some((repo, tag)) = reference
        .rsplit_once(':')
        .filter(|(r, t)| archmerge::oci::is_valid_name(r) && archmerge::oci::is_valid_tag(t))
    else {
        anyhow::bail!("{reference:?} is not REPO:TAG");
    };
    let app = App::new(config).context("setting up the registry client")?;
    let report = app.inspect(repo, tag).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn serve(config: Config) -> anyhow::Result<ExitCode> {
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
    Ok(ExitCode::SUCCESS)
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
