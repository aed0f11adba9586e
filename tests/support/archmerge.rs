//! archmerge: the binary cargo built for this test run, `archmerge serve`
//! on a free loopback port in front of an upstream, its admin listener on
//! a port of its own, its log in a temp dir; stopped on `Drop`. Plain
//! HTTP ([`spawn_archmerge`], [`spawn_archmerge_with`]) or TLS
//! ([`spawn_archmerge_tls`]); `kill_9()`, `terminate()` and `restart()`
//! for crash and shutdown tests.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::process::{free_port, log_file, read_log, stop, wait_for};

/// Extra ways to start archmerge.
#[derive(Clone, Debug, Default)]
pub struct ArchmergeOpts {
    /// Extra arguments after `serve --listen … --upstream …`.
    pub args: Vec<String>,
    /// Extra environment (`ARCHMERGE_*`, `RUST_LOG`).
    pub env: Vec<(String, String)>,
    /// TOML text written to a file and passed as `--config`.
    pub config_toml: Option<String>,
    /// Start archmerge with this open-file limit (soft and hard
    /// `RLIMIT_NOFILE`), through util-linux's `prlimit`, which sets it and
    /// execs archmerge in the same process.
    pub nofile: Option<u64>,
}

/// A running `archmerge serve` on a fixed loopback port, its stderr in a log
/// file. Killed on drop.
pub struct Archmerge {
    child: Option<Child>,
    port: u16,
    /// The admin listener's port: each archmerge gets its own, so parallel
    /// tests never fight over the default 127.0.0.1:5081.
    admin_port: u16,
    upstream: String,
    opts: ArchmergeOpts,
    /// The listener speaks TLS (the options carry `--tls-cert`/`--tls-key`).
    tls: bool,
    /// Holds the log and the config file.
    dir: TempDir,
}

/// Starts archmerge in front of `upstream_url` with only `--listen` and
/// `--upstream`, as the README does.
pub fn spawn_archmerge(upstream_url: &str) -> Archmerge {
    spawn_archmerge_with(upstream_url, ArchmergeOpts::default())
}

/// Starts archmerge with extra args, env or a config file.
pub fn spawn_archmerge_with(upstream_url: &str, opts: ArchmergeOpts) -> Archmerge {
    spawn(upstream_url, opts, false)
}

/// Starts archmerge as [`spawn_archmerge_with`] does, for a listener that
/// speaks TLS (`opts` must carry `--tls-cert`/`--tls-key`): the harness's
/// plain-HTTP probe cannot reach `/v2/` there, so readiness is the admin
/// listener (plain HTTP) answering. [`Archmerge::url`] still says
/// `http://`; use [`Archmerge::https_url`].
pub fn spawn_archmerge_tls(upstream_url: &str, opts: ArchmergeOpts) -> Archmerge {
    spawn(upstream_url, opts, true)
}

fn spawn(upstream_url: &str, opts: ArchmergeOpts, tls: bool) -> Archmerge {
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
        tls,
        dir,
    };
    // As for the registry: a port taken between `free_port` and the bind is
    // retried on a fresh one.
    let mut last_error = String::new();
    for _ in 0..3 {
        match a.start() {
            Ok(()) => return a,
            Err(e) if e.contains("in use") => {
                last_error = e;
                a.port = free_port();
                a.admin_port = free_port();
            }
            Err(e) => {
                last_error = e;
                break;
            }
        }
    }
    let what = if tls { "archmerge (TLS)" } else { "archmerge" };
    panic!("{what} did not come up: {last_error}");
}

impl Archmerge {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("archmerge.log")
    }

    /// Starts the process on `self.port` and waits for `/v2/` to answer
    /// (any status: a 502 from a dead upstream still means archmerge is up);
    /// over TLS, for the admin listener to answer (it is bound after the
    /// client listener, so once it answers both accept connections).
    fn start(&mut self) -> Result<(), String> {
        let (out, err) = log_file(&self.log_path());
        let mut cmd = match self.opts.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_archmerge"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_archmerge")),
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--upstream")
            .arg(&self.upstream);
        if !self.admin_listen_given() {
            cmd.arg("--admin-listen")
                .arg(format!("127.0.0.1:{}", self.admin_port));
        }
        if self.opts.config_toml.is_some() {
            cmd.arg("--config")
                .arg(self.dir.path().join("archmerge.toml"));
        }
        cmd.args(&self.opts.args);
        // The test's own environment must not leak settings in.
        for (k, _) in std::env::vars() {
            if k.starts_with("ARCHMERGE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RUST_LOG", "info,archmerge=debug");
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
        let probed = if self.tls { self.admin_port } else { self.port };
        match wait_for(&mut child, probed, |_| true) {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("{why}\n--- archmerge log ---\n{}", self.log_text()))
            }
        }
    }

    /// Whether the test chose the admin listener itself.
    fn admin_listen_given(&self) -> bool {
        self.opts
            .args
            .iter()
            .any(|a| a.starts_with("--admin-listen"))
            || self
                .opts
                .env
                .iter()
                .any(|(k, _)| k == "ARCHMERGE_ADMIN_LISTEN")
            || self
                .opts
                .config_toml
                .as_deref()
                .is_some_and(|t| t.contains("admin_listen"))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// `127.0.0.1:PORT`, as image references name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:ADMIN_PORT`, the admin listener (unless the test
    /// chose its own address).
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The sum of every sample of the metric `name` from the admin
    /// listener ([`metric_at`]).
    pub async fn metric(&self, name: &str) -> f64 {
        metric_at(&self.admin_url(), name).await
    }

    /// `https://127.0.0.1:PORT`, for an archmerge serving TLS.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.host())
    }

    /// The admin listener's port.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// The port (kept across [`Archmerge::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the running archmerge.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("archmerge is not running").id()
    }

    /// Everything archmerge logged so far, across restarts.
    pub fn log_text(&self) -> String {
        read_log(&self.log_path())
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill_9(&mut self) {
        stop(&mut self.child);
    }

    /// SIGTERM, then wait up to `grace` for a clean exit; returns the exit
    /// status, or panics (with the log) if the process did not stop.
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("archmerge is not running");
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for archmerge") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "archmerge did not exit within {grace:?} of SIGTERM\n--- log ---\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts archmerge again on the same port with the same settings
    /// (killing it first if it still runs).
    pub fn restart(&mut self) {
        stop(&mut self.child);
        if let Err(e) = self.start() {
            panic!("archmerge did not come back on port {}: {e}", self.port);
        }
    }

    /// Peak resident set size so far (`VmHWM` of /proc/PID/status), bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:") * 1024
    }

    /// Current resident set size (`VmRSS`), bytes.
    pub fn rss_bytes(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:") * 1024
    }
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status:\n{status}"))
}

impl Drop for Archmerge {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// The sum of every sample of the metric `name` (whatever its labels), from
/// the admin listener at `admin`; 0 when there is none. A `name` with labels
/// (`family{outcome="used"}`) is that one series.
pub async fn metric_at(admin: &str, name: &str) -> f64 {
    let url = format!("{admin}/metrics");
    let text = super::http()
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = match name.contains('{') {
                true => series,
                false => series.split('{').next()?,
            };
            (metric == name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}
