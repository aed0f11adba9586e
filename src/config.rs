//! Settings: command-line flags, `ARCHMERGE_*` environment variables and the
//! TOML file, merged and validated into one [`Config`].
//!
//! Precedence is flag > environment > file > built-in default: clap reads a
//! flag or its `env` twin into [`Settings`]; what is still unset comes from
//! the file. Validation reports every problem with its key before failing,
//! so one run of `archmerge check-config` shows them all. The rest of the
//! crate takes `&Config` and never reads the environment itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use serde::Deserialize;
use toml::Spanned;

use crate::index::{IndexFormat, PlatformSource};
use crate::rules::RuleSet;

mod rules;

/// The settings that flags and environment variables can give.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Settings {
    /// TOML configuration file.
    #[arg(long, env = "ARCHMERGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on for registry clients, e.g. 0.0.0.0:5080.
    #[arg(long, env = "ARCHMERGE_LISTEN")]
    pub listen: Option<String>,
    /// The registry behind archmerge, e.g. http://127.0.0.1:5000.
    #[arg(long, env = "ARCHMERGE_UPSTREAM")]
    pub upstream: Option<String>,
    /// `write` (store indexes in the registry) or `serve` (answer them).
    #[arg(long, env = "ARCHMERGE_MODE")]
    pub mode: Option<String>,
    /// Address of the admin listener (health, metrics).
    #[arg(long, env = "ARCHMERGE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// The origin clients use to reach archmerge, for `Location` headers.
    #[arg(long, env = "ARCHMERGE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// PEM file of CA certificates for an https upstream.
    #[arg(long, env = "ARCHMERGE_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Accept any certificate from an https upstream. Dangerous: only for a
    /// registry on a trusted network whose certificate cannot be verified.
    #[arg(long, env = "ARCHMERGE_UPSTREAM_INSECURE_SKIP_TLS_VERIFY")]
    pub upstream_insecure_skip_tls_verify: bool,
    /// User archmerge itself authenticates as (reconcile, webhook).
    #[arg(long, env = "ARCHMERGE_UPSTREAM_USERNAME")]
    pub upstream_username: Option<String>,
    /// Password for `upstream_username` (prefer the env variable or a file).
    #[arg(long, env = "ARCHMERGE_UPSTREAM_PASSWORD", hide_env_values = true)]
    pub upstream_password: Option<String>,
    /// PEM certificate chain: serve clients over TLS (HTTP/2 by ALPN).
    #[arg(long, env = "ARCHMERGE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "ARCHMERGE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Bearer token that `POST /reconcile` and `POST /events` require.
    #[arg(long, env = "ARCHMERGE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "ARCHMERGE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Most client connections served at once; more get 503.
    #[arg(long, env = "ARCHMERGE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
}

// === raw file ===

type S = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<S>,
    upstream: Option<S>,
    mode: Option<S>,
    admin_listen: Option<S>,
    public_url: Option<S>,
    upstream_ca: Option<Spanned<PathBuf>>,
    #[serde(default)]
    upstream_insecure_skip_tls_verify: bool,
    tls_cert: Option<Spanned<PathBuf>>,
    tls_key: Option<Spanned<PathBuf>>,
    admin_token: Option<S>,
    log_format: Option<S>,
    max_connections: Option<Spanned<usize>>,
    manifest_buffer_mib: Option<Spanned<u64>>,
    zero_copy_downloads: Option<bool>,
    zero_copy_uploads: Option<bool>,
    #[serde(default)]
    upstream_auth: RawUpstreamAuth,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    merge: RawMerge,
    #[serde(default)]
    aliases: BTreeMap<String, S>,
    #[serde(default)]
    rules: Vec<rules::RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamAuth {
    username: Option<S>,
    password: Option<S>,
    password_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    header_read_secs: Option<Spanned<u64>>,
    idle_secs: Option<Spanned<u64>>,
    body_progress_secs: Option<Spanned<u64>>,
    h2_keepalive_secs: Option<Spanned<u64>>,
    connect_secs: Option<Spanned<u64>>,
    upstream_headers_secs: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    staleness_ms: Option<Spanned<u64>>,
    served_digest_ttl_secs: Option<Spanned<u64>>,
    manifests_mib: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMerge {
    patterns: Option<Vec<S>>,
    index_media_type: Option<IndexFormat>,
    platform_source: Option<PlatformSource>,
}

// === validated ===

/// What archmerge does with a merged index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// PUT the index to the registry at the target tag.
    Write,
    /// Answer GET/HEAD of the target with the index; write nothing.
    Serve,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The registry behind archmerge.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// host:port as requests address it.
    pub authority: Authority,
    /// `scheme://authority` — the prefix of `Location` headers to rewrite.
    pub origin: String,
}

/// Timeouts; there is deliberately no total timeout, since a blob stream may
/// rightly take hours.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Time a client has to send its request headers (slowloris guard);
    /// also bounds the TLS handshake and, on a keep-alive HTTP/1.1
    /// connection, the wait for the next request.
    pub header_read: Duration,
    /// Time a client connection may stay open with no request in flight
    /// (HTTP/1.1 between requests, HTTP/2 with no open stream).
    pub idle: Duration,
    /// Time a request body may send nothing while archmerge reads it; a
    /// slow upload goes on, a stalled one fails and frees its connection.
    pub body_progress: Duration,
    /// Interval of HTTP/2 keep-alive pings, and how long a ping may go
    /// unanswered before the connection is closed.
    pub h2_keepalive: Duration,
    /// Time to open a connection to the registry.
    pub connect: Duration,
    /// Time the registry has to start answering a request, counted from its
    /// last progress on the request body.
    pub upstream_headers: Duration,
}

/// Cache sizes and lifetimes. Caches only ever hold what the registry's
/// content says, never who may read it.
#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    /// Serve mode: how stale a served index may be (across replicas).
    pub staleness: Duration,
    /// Serve mode: how long a served index stays reachable by digest after
    /// it was last asked for.
    pub served_digest_ttl: Duration,
    /// Weight bound of each per-digest cache (manifests, served indexes).
    pub max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            staleness: Duration::from_millis(1000),
            served_digest_ttl: Duration::from_secs(600),
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// How arch tags are merged.
#[derive(Clone, Debug)]
pub struct MergeConfig {
    /// The rule of each repository.
    pub rules: RuleSet,
}

/// The validated configuration the rest of the crate reads.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client listener.
    pub listen: SocketAddr,
    /// The registry.
    pub upstream: Upstream,
    /// Origin clients use for archmerge, when it differs from their `Host`.
    pub public_url: Option<String>,
    /// Write or serve.
    pub mode: Mode,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Extra CA certificates for an https upstream.
    pub upstream_ca: Option<PathBuf>,
    /// Accept any upstream certificate (explicit, loudly named opt-in).
    pub upstream_insecure_skip_tls_verify: bool,
    /// archmerge's own registry credentials (reconcile, webhook).
    pub upstream_credentials: Option<Credentials>,
    /// Certificate and key of the client listener, when it speaks TLS.
    pub tls: Option<TlsFiles>,
    /// Token the admin write endpoints require.
    pub admin_token: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Most client connections served at once.
    pub max_connections: usize,
    /// Most manifest bytes buffered at once, across all requests: manifest
    /// bodies are read whole before the registry is asked, so before it
    /// authenticates the client; this bounds what unauthenticated clients
    /// can pin.
    pub manifest_buffer_bytes: u64,
    /// Whether blob and manifest downloads from a plaintext registry to a
    /// plaintext HTTP/1.1 client are spliced (`crate::splice`) instead of
    /// copied.
    pub zero_copy_downloads: bool,
    /// Whether blob upload bodies from a plaintext HTTP/1.1 client to a
    /// plaintext registry are spliced (`crate::splice`) instead of copied.
    pub zero_copy_uploads: bool,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Caches.
    pub cache: CacheConfig,
    /// Merge rules.
    pub merge: MergeConfig,
}

/// A user and password for the registry.
#[derive(Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password (never logged: `Debug` hides it).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// PEM files of the client listener.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// Every problem found in the settings, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

const DEFAULT_LISTEN: &str = "127.0.0.1:5080";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:5081";

impl Config {
    /// Reads the file named in `settings` (if any) and merges it under the
    /// flags and environment.
    pub fn load(settings: &Settings) -> Result<Config, ConfigError> {
        match &settings.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(vec![format!("{}: {e}", path.display())]))?;
                Self::parse(settings, &text, &path.display().to_string())
            }
            None => Self::parse(settings, "", "(no file)"),
        }
    }

    /// Parses a TOML document under the given flags (used by tests and by
    /// `check-config`).
    pub fn from_toml(settings: &Settings, text: &str) -> Result<Config, ConfigError> {
        Self::parse(settings, text, "config")
    }

    fn parse(settings: &Settings, text: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|sp| format!(" (at {})", Place::of(text, file, sp.start)))
                .unwrap_or_default();
            ConfigError(vec![format!("{}{at}", e.message().trim())])
        })?;
        Check {
            text,
            file,
            errors: Vec::new(),
        }
        .build(settings, raw)
    }
}

/// A line and column in the config file, for error messages.
struct Place<'a> {
    file: &'a str,
    line: usize,
    column: usize,
}

impl<'a> Place<'a> {
    fn of(text: &str, file: &'a str, offset: usize) -> Place<'a> {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Place { file, line, column }
    }
}

impl std::fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} line {}, column {}",
            self.file, self.line, self.column
        )
    }
}

/// Validation state: every problem is collected with where it came from.
struct Check<'a> {
    text: &'a str,
    file: &'a str,
    errors: Vec<String>,
}

/// A setting's value and where it was given.
struct Given<T> {
    value: T,
    /// `None` for a flag or env variable, else the byte offset in the file.
    at: Option<usize>,
}

impl<'a> Check<'a> {
    /// Flag/env first, then the file.
    fn pick<T: Clone>(&self, flag: &Option<T>, file: Option<Spanned<T>>) -> Option<Given<T>> {
        match (flag, file) {
            (Some(v), _) => Some(Given {
                value: v.clone(),
                at: None,
            }),
            (None, Some(s)) => {
                let at = s.span().start;
                Some(Given {
                    value: s.into_inner(),
                    at: Some(at),
                })
            }
            (None, None) => None,
        }
    }

    fn error(&mut self, key: &str, at: Option<usize>, message: impl std::fmt::Display) {
        let origin = match at {
            Some(offset) => format!(" (at {})", Place::of(self.text, self.file, offset)),
            None => " (from a flag or environment variable)".to_owned(),
        };
        self.errors.push(format!("{key}: {message}{origin}"));
    }

    fn addr(&mut self, key: &str, given: Option<Given<String>>, default: &str) -> SocketAddr {
        let (value, at) = given.map_or((default.to_owned(), None), |g| (g.value, g.at));
        value.parse().unwrap_or_else(|e| {
            self.error(
                key,
                at,
                format!("{value:?} is not an address like 127.0.0.1:5080 ({e})"),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn origin(&mut self, key: &str, given: Given<String>) -> Option<Upstream> {
        parse_origin(&given.value)
            .map_err(|e| self.error(key, given.at, e))
            .ok()
    }

    fn file(&mut self, key: &str, given: &Option<Given<PathBuf>>) {
        if let Some(g) = given {
            if !g.value.is_file() {
                let path = g.value.display().to_string();
                self.error(key, g.at, format!("{path} is not a readable file"));
            }
        }
    }

    fn secs(&mut self, key: &str, given: Option<Spanned<u64>>, default: u64) -> Duration {
        let (v, at) = given.map_or((default, None), |s| (*s.get_ref(), Some(s.span().start)));
        if v == 0 {
            self.error(key, at, "must be at least 1");
        }
        Duration::from_secs(v.max(1))
    }

    fn build(mut self, s: &Settings, raw: RawConfig) -> Result<Config, ConfigError> {
        let listen = self.pick(&s.listen, raw.listen);
        let listen = self.addr("listen", listen, DEFAULT_LISTEN);
        let admin_listen = self.pick(&s.admin_listen, raw.admin_listen);
        let admin_listen = self.addr("admin_listen", admin_listen, DEFAULT_ADMIN_LISTEN);
        let upstream = match self.pick(&s.upstream, raw.upstream) {
            Some(g) => self.origin("upstream", g),
            None => {
                self.errors.push(
                    "upstream: required (--upstream, ARCHMERGE_UPSTREAM or `upstream` in the file)"
                        .into(),
                );
                None
            }
        };
        let public_url = match self.pick(&s.public_url, raw.public_url) {
            Some(g) if !g.value.is_empty() => self.origin("public_url", g).map(|o| o.origin),
            _ => None,
        };
        let mode = match self.pick(&s.mode, raw.mode) {
            None => Mode::Write,
            Some(g) => match g.value.as_str() {
                "write" => Mode::Write,
                "serve" => Mode::Serve,
                other => {
                    let msg = format!("{other:?} is not one of \"write\", \"serve\"");
                    self.error("mode", g.at, msg);
                    Mode::Write
                }
            },
        };
        let log_format = match self.pick(&s.log_format, raw.log_format) {
            None => LogFormat::Text,
            Some(g) => match g.value.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    let msg = format!("{other:?} is not one of \"text\", \"json\"");
                    self.error("log_format", g.at, msg);
                    LogFormat::Text
                }
            },
        };
        let upstream_ca = self.pick(&s.upstream_ca, raw.upstream_ca);
        self.file("upstream_ca", &upstream_ca);
        let tls_cert = self.pick(&s.tls_cert, raw.tls_cert);
        let tls_key = self.pick(&s.tls_key, raw.tls_key);
        self.file("tls_cert", &tls_cert);
        self.file("tls_key", &tls_key);
        let tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.value,
                key: key.value,
            }),
            (None, None) => None,
            (Some(g), None) | (None, Some(g)) => {
                self.error("tls_cert", g.at, "tls_cert and tls_key go together");
                None
            }
        };
        let admin_token = self
            .pick(&s.admin_token, raw.admin_token)
            .map(|g| g.value)
            .filter(|t| !t.is_empty());
        if !admin_listen.ip().is_loopback() && admin_token.is_none() {
            self.errors.push(format!(
                "admin_listen: {admin_listen} is not a loopback address, and POST /events and \
                 POST /reconcile change the registry: set admin_token (--admin-token, \
                 ARCHMERGE_ADMIN_TOKEN) or listen on 127.0.0.1"
            ));
        }
        let upstream_credentials = self.credentials(s, raw.upstream_auth);

        let timeouts = Timeouts {
            header_read: self.secs(
                "timeouts.header_read_secs",
                raw.timeouts.header_read_secs,
                30,
            ),
            idle: self.secs("timeouts.idle_secs", raw.timeouts.idle_secs, 60),
            body_progress: self.secs(
                "timeouts.body_progress_secs",
                raw.timeouts.body_progress_secs,
                60,
            ),
            h2_keepalive: self.secs(
                "timeouts.h2_keepalive_secs",
                raw.timeouts.h2_keepalive_secs,
                20,
            ),
            connect: self.secs("timeouts.connect_secs", raw.timeouts.connect_secs, 5),
            upstream_headers: self.secs(
                "timeouts.upstream_headers_secs",
                raw.timeouts.upstream_headers_secs,
                300,
            ),
        };

        let max_connections = match self.pick(&s.max_connections, raw.max_connections) {
            Some(g) if g.value == 0 => {
                self.error("max_connections", g.at, "must be at least 1");
                1
            }
            Some(g) => g.value,
            None => 4096,
        };
        let manifest_buffer_bytes = match raw.manifest_buffer_mib {
            Some(v) if !(4..=4096).contains(v.get_ref()) => {
                let at = Some(v.span().start);
                self.error(
                    "manifest_buffer_mib",
                    at,
                    "must be 4 to 4096 (one manifest may be 4 MiB)",
                );
                16 << 20
            }
            Some(v) => v.into_inner() << 20,
            None => 16 << 20,
        };
        let staleness = match raw.cache.staleness_ms {
            Some(v) if !(1..=60_000).contains(v.get_ref()) => {
                self.error(
                    "cache.staleness_ms",
                    Some(v.span().start),
                    "must be 1 to 60000",
                );
                1000
            }
            Some(v) => v.into_inner(),
            None => 1000,
        };
        let served_ttl = self.secs(
            "cache.served_digest_ttl_secs",
            raw.cache.served_digest_ttl_secs,
            600,
        );
        let mib = match raw.cache.manifests_mib {
            Some(v) if !(1..=4096).contains(v.get_ref()) => {
                self.error(
                    "cache.manifests_mib",
                    Some(v.span().start),
                    "must be 1 to 4096",
                );
                64
            }
            Some(v) => v.into_inner(),
            None => 64,
        };
        let cache = CacheConfig {
            staleness: Duration::from_millis(staleness),
            served_digest_ttl: served_ttl,
            max_bytes: mib * 1024 * 1024,
        };

        let has_own = upstream_credentials.is_some();
        let rules = self.rules(raw.aliases, raw.merge, raw.rules, mode, has_own);

        match upstream {
            Some(upstream) if self.errors.is_empty() => Ok(Config {
                listen,
                upstream,
                public_url,
                mode,
                admin_listen,
                upstream_ca: upstream_ca.map(|g| g.value),
                upstream_insecure_skip_tls_verify: s.upstream_insecure_skip_tls_verify
                    || raw.upstream_insecure_skip_tls_verify,
                upstream_credentials,
                tls,
                admin_token,
                log_format,
                max_connections,
                manifest_buffer_bytes,
                zero_copy_downloads: raw.zero_copy_downloads.unwrap_or(true),
                zero_copy_uploads: raw.zero_copy_uploads.unwrap_or(true),
                timeouts,
                cache,
                merge: MergeConfig { rules },
            }),
            _ => Err(ConfigError(self.errors)),
        }
    }

    fn credentials(&mut self, s: &Settings, raw: RawUpstreamAuth) -> Option<Credentials> {
        let username = self.pick(&s.upstream_username, raw.username)?;
        let password = match (&s.upstream_password, raw.password, raw.password_file) {
            (Some(p), _, _) => Some(p.clone()),
            (None, Some(p), None) => Some(p.into_inner()),
            (None, None, Some(f)) => match std::fs::read_to_string(f.get_ref()) {
                Ok(p) => Some(p.trim_end_matches(['\r', '\n']).to_owned()),
                Err(e) => {
                    let path = f.get_ref().display().to_string();
                    self.error(
                        "upstream_auth.password_file",
                        Some(f.span().start),
                        format!("{path}: {e}"),
                    );
                    None
                }
            },
            (None, Some(p), Some(_)) => {
                self.error(
                    "upstream_auth.password",
                    Some(p.span().start),
                    "give password or password_file, not both",
                );
                None
            }
            (None, None, None) => {
                self.error(
                    "upstream_auth.password",
                    username.at,
                    "a username needs a password",
                );
                None
            }
        };
        password.map(|password| Credentials {
            username: username.value,
            password,
        })
    }
}

fn parse_origin(value: &str) -> Result<Upstream, String> {
    let uri: Uri = value
        .parse()
        .map_err(|e| format!("{value:?} is not a URL ({e})"))?;
    let scheme = uri.scheme().cloned();
    let ok_scheme = matches!(scheme.as_ref().map(Scheme::as_str), Some("http" | "https"));
    if !ok_scheme {
        return Err(format!("{value:?} must start with http:// or https://"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{value:?} must be an origin (no path): archmerge serves /v2/ as the registry does"
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{value:?} has no host"))?;
    let scheme = scheme.unwrap_or(Scheme::HTTP);
    Ok(Upstream {
        origin: format!("{scheme}://{authority}"),
        scheme,
        authority,
    })
}

#[cfg(test)]
mod tests;
