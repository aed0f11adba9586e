//! The registry: Debian's `docker-registry` (CNCF distribution 2.8) on a
//! free loopback port with its own temp dir (config, log, storage),
//! stopped on `Drop`. [`RegistryOpts`] covers basic auth and any setting
//! distribution reads from the environment; [`RegistryExtra`] adds a fixed
//! port, TLS and a notifications endpoint.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::process::{free_port, log_file, read_log, stop, wait_for};

/// The registry binary of Debian's `docker-registry` package.
pub(super) const REGISTRY_BIN: &str = "docker-registry";

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
    pub(super) child: Option<Child>,
    pub(super) port: u16,
    /// Holds the config, the log and the storage; removed on drop.
    pub(super) dir: TempDir,
}

/// Starts a plain registry. Panics (never skips) when it cannot.
pub fn spawn_registry() -> Registry {
    spawn_registry_with(RegistryOpts::default())
}

/// Starts a registry with `opts`. Panics (never skips) when it cannot, with
/// the registry's own output in the message.
pub fn spawn_registry_with(opts: RegistryOpts) -> Registry {
    spawn_registry_extra(&opts, &RegistryExtra::default())
}

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

/// Starts a registry with `opts`, plus `extra`. Panics (never skips) when
/// it cannot, with the registry's own output in the message.
pub fn spawn_registry_extra(opts: &RegistryOpts, extra: &RegistryExtra) -> Registry {
    let dir = tempfile::Builder::new()
        .prefix("archmerge-registry-")
        .tempdir()
        .expect("creating the registry temp dir");
    let mut last_error = String::new();
    // A free port can be taken between `free_port` and the registry's bind;
    // three fresh ports make that race irrelevant. A fixed port gets one
    // try (the caller chose it).
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
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some((cert, key)) = &extra.tls {
            cmd.env("REGISTRY_HTTP_TLS_CERTIFICATE", cert)
                .env("REGISTRY_HTTP_TLS_KEY", key);
        }
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

    /// `https://127.0.0.1:PORT`, for a registry started with TLS.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.host())
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

    /// The registry's process id (to stop and continue it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the registry is running").id()
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
