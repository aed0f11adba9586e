//! The integration harness every `tests/*.rs` file shares (`mod support;`).
//!
//! It runs the real thing: Debian's `docker-registry` (CNCF distribution 2.8)
//! on a free loopback port with its own temp dir, and the `archmerge` binary
//! cargo built for this test run in front of it. Both stop on `Drop`.
//!
//! - [`spawn_registry`] / [`spawn_registry_with`] — the registry.
//! - [`spawn_archmerge`] / [`spawn_archmerge_with`] — the proxy, with
//!   `kill_9()` and `restart()` for crash tests and `log_text()` for tests
//!   that read its logs.
//! - `http` — [`http()`] / [`h2c`], reqwest clients that never follow
//!   redirects (a test sees a 307 and its `Location` as a client would),
//!   response helpers, and seeding over raw HTTP ([`push_small_image`]).
//! - [`FakeUpstream`] — a tiny deliberately scripted HTTP/1.1 server for
//!   answers a real registry cannot be told to give.
//! - `image` — deterministic OCI image layouts with real tar layers.
//! - `tools` — skopeo and docker, with timeouts and loud failures.
//! - `clients` — buildah (manifest lists) and PyPI `oras` (artifacts), each
//!   with its own storage and configuration.
//! - `auth` — htpasswd files (bcrypt) and clients that send HTTP Basic.
//! - `manifest` — manifest requests with any `Accept`, answers kept whole,
//!   the eight arches of the alias table and an index's entries.
//! - `ops` — a registry with a fixed port, TLS or notifications; archmerge
//!   serving TLS; archmerge's one-shot commands.
//! - `observe` — a process watched from outside: the registry's access
//!   log (one line per request, so a test counts what archmerge cost it),
//!   archmerge's open file descriptors and their limit.
//! - `certs` — a test CA and a server certificate for 127.0.0.1 (rcgen).
//! - `token` — registry token auth: a throwaway token service whose tokens
//!   carry exactly the repository scopes a test grants.
//! - [`Stack`] — one registry with one archmerge in front of it, the
//!   helpers several test files share; each file adds its own in an
//!   `impl Stack` block.
//! - `faults` — a registry started again on its port and storage, raw
//!   HTTP/1.1 over a socket, a client trickling bytes (slowloris).
//!
//! Nothing here skips: a missing binary or a registry that never comes up is
//! a panic that says what was seen.

#![allow(dead_code)] // each test file uses its own part of the harness

mod auth;
mod certs;
mod clients;
mod fake;
mod faults;
mod http;
mod image;
mod manifest;
mod observe;
mod ops;
mod stack;
mod token;
mod tools;

#[allow(unused_imports)] // not every test file uses every part
pub use auth::*;
#[allow(unused_imports)]
pub use certs::*;
#[allow(unused_imports)]
pub use clients::*;
#[allow(unused_imports)]
pub use fake::*;
#[allow(unused_imports)]
pub use faults::*;
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use image::*;
#[allow(unused_imports)]
pub use manifest::*;
#[allow(unused_imports)]
pub use observe::*;
#[allow(unused_imports)]
pub use ops::*;
#[allow(unused_imports)]
pub use stack::*;
#[allow(unused_imports)]
pub use token::*;
#[allow(unused_imports)]
pub use tools::*;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// The `User-Agent` of the harness's readiness probe; [`FakeUpstream`]
/// leaves such requests out of what it reports.
pub const PROBE_AGENT: &str = "archmerge-test-probe";

/// How long a registry or archmerge has to answer `GET /v2/` after start.
const STARTUP: Duration = Duration::from_secs(10);

/// The registry binary of Debian's `docker-registry` package.
const REGISTRY_BIN: &str = "docker-registry";

// === ports and digests ===

/// A loopback port nothing listens on right now. The OS may hand it to
/// someone else before the caller binds it; the spawners retry on that.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// Lower-case hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `GET /v2/` over plain HTTP/1.1 to 127.0.0.1:`port` and returns
/// the status code, or `None` when nothing answered. Blocking and
/// dependency-free on purpose: the spawners run inside and outside tokio
/// runtimes alike.
pub fn v2_status(port: u16) -> Option<u16> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: {PROBE_AGENT}\r\n\
         Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    let line = std::str::from_utf8(&head).ok()?;
    line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

/// Waits until `GET /v2/` on `port` gets an HTTP answer whose status
/// `ready` accepts, or the child exits, or [`STARTUP`] passes.
fn wait_for(child: &mut Child, port: u16, ready: impl Fn(u16) -> bool) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("exited early with {status}"));
        }
        match v2_status(port) {
            Some(code) if ready(code) => return Ok(()),
            _ if Instant::now() > deadline => {
                return Err(format!("no answer on GET /v2/ within {STARTUP:?}"))
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn read_log(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<could not read {}: {e}>", path.display()))
}

fn log_file(path: &Path) -> (File, File) {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let g = f.try_clone().expect("cloning log file handle");
    (f, g)
}

fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

// === impl Registry ===

/// Variants of the registry: everything a later test may need to turn on.
#[derive(Clone, Debug, Default)]
pub struct RegistryOpts {
    /// An htpasswd file (bcrypt entries) to turn on basic auth.
    pub htpasswd: Option<PathBuf>,
    /// Extra environment: distribution reads every config key from its
    /// `REGISTRY_*` twin (e.g. `REGISTRY_STORAGE_REDIRECT_DISABLE=true`),
    /// which covers variants without templating YAML here.
    pub env: Vec<(String, String)>,
}

/// A running `docker-registry serve` with filesystem storage in a temp dir,
/// deletes enabled, no auth (unless asked). Killed on drop.
pub struct Registry {
    child: Option<Child>,
    port: u16,
    /// Holds the config, the log and the storage; removed on drop.
    dir: TempDir,
}

/// Starts a plain registry. Panics (never skips) when it cannot.
pub fn spawn_registry() -> Registry {
    spawn_registry_with(RegistryOpts::default())
}

/// Starts a registry with `opts`. Panics (never skips) when it cannot, with
/// the registry's own output in the message.
pub fn spawn_registry_with(opts: RegistryOpts) -> Registry {
    let dir = tempfile::Builder::new()
        .prefix("archmerge-registry-")
        .tempdir()
        .expect("creating the registry temp dir");
    let mut last_error = String::new();
    // A free port can be taken between `free_port` and the registry's bind;
    // three fresh ports make that race irrelevant.
    for _ in 0..3 {
        let port = free_port();
        let config = dir.path().join("config.yml");
        fs::write(&config, registry_yaml(dir.path(), port, &opts)).expect("writing config.yml");
        let log = dir.path().join("registry.log");
        let _ = fs::remove_file(&log);
        let (out, err) = log_file(&log);
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start `{REGISTRY_BIN}` ({e}). Install Debian's docker-registry \
                 package (scripts/test.sh does): apt-get install docker-registry"
            ),
        };
        // distribution answers 401 on /v2/ when auth is on; both mean "up".
        match wait_for(&mut child, port, |c| c == 200 || c == 401) {
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

fn registry_yaml(dir: &Path, port: u16, opts: &RegistryOpts) -> String {
    let auth = match &opts.htpasswd {
        Some(path) => format!(
            "auth:\n  htpasswd:\n    realm: archmerge-test\n    path: {}\n",
            path.display()
        ),
        None => String::new(),
    };
    format!(
        "version: 0.1
log:
  level: warn
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: archmerge-test-secret
{auth}",
        data = dir.join("data").display(),
    )
}

impl Registry {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// `127.0.0.1:PORT`, as image references name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The storage root (`docker/registry/v2/…` lives below it).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Everything the registry wrote (its access log included).
    pub fn log_text(&self) -> String {
        read_log(&self.dir.path().join("registry.log"))
    }

    /// Stops the registry now (for registry-down tests); drop does the same.
    pub fn kill(&mut self) {
        stop(&mut self.child);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

// === impl Archmerge ===

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
    panic!("archmerge did not come up: {last_error}");
}

impl Archmerge {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("archmerge.log")
    }

    /// Starts the process on `self.port` and waits for `/v2/` to answer
    /// (any status: a 502 from a dead upstream still means archmerge is up).
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
        match wait_for(&mut child, self.port, |_| true) {
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
