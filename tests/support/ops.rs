//! What the operations tests need beyond the base harness: a registry with
//! more configuration (a fixed port, TLS, a notifications endpoint),
//! archmerge serving TLS, and archmerge's one-shot commands.
//!
//! Nothing here changes how [`super::spawn_registry`] or
//! [`super::spawn_archmerge_with`] behave; the spawners below reuse their
//! config, logs and `Drop` and only add to them.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use super::{
    free_port, log_file, read_log, registry_yaml, run_with_timeout, wait_for, Archmerge,
    ArchmergeOpts, Registry, RegistryOpts, REGISTRY_BIN,
};

// === one-shot commands ===

/// How long a one-shot command (`reconcile`, `inspect`, `check-config`)
/// may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `archmerge <args>` (the binary cargo built for this test run) to
/// completion with none of the test's own `ARCHMERGE_*` variables, plus
/// `env`. Does not check the exit status.
pub fn archmerge_command(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_archmerge"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("ARCHMERGE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_timeout(&mut cmd, COMMAND_TIMEOUT)
}

/// What a command printed, for assertion messages.
pub fn shown(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// === a registry with more configuration ===

/// A registry's notifications endpoint (the `notifications:` section).
#[derive(Clone, Debug)]
pub struct Notify {
    /// Where the registry POSTs its event envelopes.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>` when set.
    pub bearer: Option<String>,
}

/// What [`spawn_registry_extra`] adds to a registry of [`RegistryOpts`].
#[derive(Clone, Debug, Default)]
pub struct RegistryExtra {
    /// Listen on this port (e.g. to come back where a killed registry was)
    /// instead of a free one.
    pub port: Option<u16>,
    /// Serve https with this PEM certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Send notifications to this endpoint.
    pub notify: Option<Notify>,
}

/// Starts a registry as [`super::spawn_registry_with`] does, plus `extra`.
/// Panics (never skips) when it cannot, with the registry's own output.
pub fn spawn_registry_extra(opts: &RegistryOpts, extra: &RegistryExtra) -> Registry {
    let dir = tempfile::Builder::new()
        .prefix("archmerge-registry-")
        .tempdir()
        .expect("creating the registry temp dir");
    let mut last_error = String::new();
    // A fixed port gets one try (the caller chose it); a free one three.
    let tries = if extra.port.is_some() { 1 } else { 3 };
    for _ in 0..tries {
        let port = extra.port.unwrap_or_else(free_port);
        let mut yaml = registry_yaml(dir.path(), port, opts);
        if let Some(n) = &extra.notify {
            yaml.push_str(&notifications_yaml(n));
        }
        let config = dir.path().join("config.yml");
        fs::write(&config, yaml).expect("writing config.yml");
        let log = dir.path().join("registry.log");
        let _ = fs::remove_file(&log);
        let (out, err) = log_file(&log);
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some((cert, key)) = &extra.tls {
            cmd.env("REGISTRY_HTTP_TLS_CERTIFICATE", cert)
                .env("REGISTRY_HTTP_TLS_KEY", key);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{REGISTRY_BIN}` ({e})"));
        // Over TLS the plain-HTTP probe gets Go's "400 client sent an HTTP
        // request to an HTTPS server": that too means the registry is up.
        let up = if extra.tls.is_some() {
            wait_for(&mut child, port, |_| true)
        } else {
            wait_for(&mut child, port, |c| c == 200 || c == 401)
        };
        match up {
            Ok(()) => {
                return Registry {
                    child: Some(child),
                    port,
                    dir,
                }
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                let text = read_log(&log);
                last_error = format!("{why}\n--- registry log ---\n{text}");
                if !text.contains("address already in use") {
                    break;
                }
            }
        }
    }
    panic!("docker-registry did not come up: {last_error}");
}

fn notifications_yaml(n: &Notify) -> String {
    let headers = match &n.bearer {
        Some(t) => format!("      headers:\n        Authorization: [\"Bearer {t}\"]\n"),
        None => String::new(),
    };
    format!(
        "notifications:
  endpoints:
    - name: archmerge
      url: {url}
{headers}      timeout: 2s
      threshold: 3
      backoff: 1s
",
        url = n.url
    )
}

impl Registry {
    /// `https://127.0.0.1:PORT`, for a registry started with TLS.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.host())
    }
}

// === archmerge serving TLS ===

/// Starts archmerge as [`super::spawn_archmerge_with`] does, for a
/// listener that speaks TLS (`opts` must carry `--tls-cert`/`--tls-key`):
/// the harness's plain-HTTP probe cannot reach `/v2/` there, so readiness
/// is the admin listener (plain HTTP) answering. [`Archmerge::url`] still
/// says `http://`; use [`Archmerge::https_url`].
pub fn spawn_archmerge_tls(upstream_url: &str, opts: ArchmergeOpts) -> Archmerge {
    let dir = tempfile::Builder::new()
        .prefix("archmerge-proxy-")
        .tempdir()
        .expect("creating the archmerge temp dir");
    if let Some(toml) = &opts.config_toml {
        fs::write(dir.path().join("archmerge.toml"), toml).expect("writing archmerge.toml");
    }
    let mut a = Archmerge {
        child: None,
        port: free_port(),
        admin_port: free_port(),
        upstream: upstream_url.to_owned(),
        opts,
        dir,
    };
    let mut last_error = String::new();
    for _ in 0..3 {
        let (out, err) = log_file(&a.log_path());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_archmerge"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", a.port))
            .arg("--upstream")
            .arg(&a.upstream)
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", a.admin_port));
        if a.opts.config_toml.is_some() {
            cmd.arg("--config").arg(a.dir.path().join("archmerge.toml"));
        }
        cmd.args(&a.opts.args);
        for (k, _) in std::env::vars() {
            if k.starts_with("ARCHMERGE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RUST_LOG", "info,archmerge=debug");
        for (k, v) in &a.opts.env {
            cmd.env(k, v);
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        let mut child = cmd.spawn().expect("running archmerge");
        // The admin listener is bound after the client listener, so once
        // it answers both accept connections.
        match wait_for(&mut child, a.admin_port, |_| true) {
            Ok(()) => {
                a.child = Some(child);
                return a;
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                last_error = format!("{why}\n--- archmerge log ---\n{}", a.log_text());
                if !last_error.contains("in use") {
                    break;
                }
                a.port = free_port();
                a.admin_port = free_port();
            }
        }
    }
    panic!("archmerge (TLS) did not come up: {last_error}");
}

impl Archmerge {
    /// `https://127.0.0.1:PORT`, for an archmerge serving TLS.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.host())
    }

    /// The admin listener's port.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }
}
