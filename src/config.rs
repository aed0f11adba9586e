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
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use serde::Deserialize;

use crate::index::{IndexFormat, PlatformSource};
use crate::rules::{AliasTable, Pattern, TagRules};

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
    /// Log format: `text` or `json`.
    #[arg(long, env = "ARCHMERGE_LOG_FORMAT")]
    pub log_format: Option<String>,
}

// === raw file ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    upstream: Option<String>,
    mode: Option<String>,
    admin_listen: Option<String>,
    public_url: Option<String>,
    upstream_ca: Option<PathBuf>,
    log_format: Option<String>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    merge: RawMerge,
    #[serde(default)]
    aliases: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    header_read_secs: Option<u64>,
    connect_secs: Option<u64>,
    upstream_headers_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMerge {
    patterns: Option<Vec<String>>,
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
    /// Time a client has to send its request headers (slowloris guard).
    pub header_read: Duration,
    /// Time to open a connection to the registry.
    pub connect: Duration,
    /// Time the registry has to start answering a request.
    pub upstream_headers: Duration,
}

/// How arch tags are merged.
#[derive(Clone, Debug)]
pub struct MergeConfig {
    /// Tag patterns and the alias table.
    pub rules: TagRules,
    /// Docker list, OCI index, or chosen by the children.
    pub index_format: IndexFormat,
    /// Whether the tag alias or the image config decides the platform.
    pub platform_source: PlatformSource,
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
    /// Log format.
    pub log_format: LogFormat,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Merge rules.
    pub merge: MergeConfig,
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
        let raw = match &settings.config {
            Some(path) => read_file(path)?,
            None => RawConfig::default(),
        };
        Self::build(settings, raw)
    }

    /// Parses a TOML document under the given flags (used by tests and by
    /// `check-config`).
    pub fn from_toml(settings: &Settings, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError(vec![e.to_string().trim().to_owned()]))?;
        Self::build(settings, raw)
    }

    fn build(s: &Settings, raw: RawConfig) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let pick = |flag: &Option<String>, file: Option<String>| flag.clone().or(file);

        let listen = parse_addr(
            "listen",
            pick(&s.listen, raw.listen)
                .as_deref()
                .unwrap_or(DEFAULT_LISTEN),
            &mut errors,
        );
        let admin_listen = parse_addr(
            "admin_listen",
            pick(&s.admin_listen, raw.admin_listen)
                .as_deref()
                .unwrap_or(DEFAULT_ADMIN_LISTEN),
            &mut errors,
        );
        let upstream = match pick(&s.upstream, raw.upstream) {
            Some(u) => parse_upstream(&u).map_err(|e| errors.push(e)).ok(),
            None => {
                errors.push(
                    "upstream: required (--upstream, ARCHMERGE_UPSTREAM or `upstream`)".into(),
                );
                None
            }
        };
        let public_url = match pick(&s.public_url, raw.public_url).filter(|u| !u.is_empty()) {
            Some(u) => parse_upstream(&u)
                .map(|o| Some(o.origin))
                .unwrap_or_else(|e| {
                    errors.push(e.replacen("upstream", "public_url", 1));
                    None
                }),
            None => None,
        };
        let mode = match pick(&s.mode, raw.mode).as_deref().unwrap_or("write") {
            "write" => Mode::Write,
            "serve" => Mode::Serve,
            other => {
                errors.push(format!(
                    "mode: {other:?} is not one of \"write\", \"serve\""
                ));
                Mode::Write
            }
        };
        let log_format = match pick(&s.log_format, raw.log_format)
            .as_deref()
            .unwrap_or("text")
        {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                errors.push(format!(
                    "log_format: {other:?} is not one of \"text\", \"json\""
                ));
                LogFormat::Text
            }
        };
        let upstream_ca = s.upstream_ca.clone().or(raw.upstream_ca);
        if let Some(ca) = &upstream_ca {
            if !ca.is_file() {
                errors.push(format!(
                    "upstream_ca: {} is not a readable file",
                    ca.display()
                ));
            }
        }

        let secs = |key: &str, v: Option<u64>, default: u64, errors: &mut Vec<String>| {
            let v = v.unwrap_or(default);
            if v == 0 {
                errors.push(format!("timeouts.{key}: must be at least 1"));
            }
            Duration::from_secs(v.max(1))
        };
        let timeouts = Timeouts {
            header_read: secs(
                "header_read_secs",
                raw.timeouts.header_read_secs,
                30,
                &mut errors,
            ),
            connect: secs("connect_secs", raw.timeouts.connect_secs, 5, &mut errors),
            upstream_headers: secs(
                "upstream_headers_secs",
                raw.timeouts.upstream_headers_secs,
                300,
                &mut errors,
            ),
        };

        let aliases = AliasTable::with_overrides(&raw.aliases)
            .map_err(|e| errors.push(format!("aliases: {e}")))
            .ok();
        let patterns: Vec<Pattern> = raw
            .merge
            .patterns
            .unwrap_or_else(|| vec!["{arch}_{tag}".into(), "{arch}".into()])
            .iter()
            .filter_map(|p| {
                Pattern::parse(p)
                    .map_err(|e| errors.push(format!("merge.patterns: {p:?}: {e}")))
                    .ok()
            })
            .collect();
        if patterns.is_empty() && errors.is_empty() {
            errors.push("merge.patterns: at least one pattern is needed".into());
        }

        match (upstream, aliases) {
            (Some(upstream), Some(aliases)) if errors.is_empty() => Ok(Config {
                listen,
                upstream,
                public_url,
                mode,
                admin_listen,
                upstream_ca,
                log_format,
                timeouts,
                merge: MergeConfig {
                    rules: TagRules::new(aliases, patterns),
                    index_format: raw.merge.index_media_type.unwrap_or(IndexFormat::Auto),
                    platform_source: raw.merge.platform_source.unwrap_or(PlatformSource::Alias),
                },
            }),
            _ => Err(ConfigError(errors)),
        }
    }
}

fn read_file(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(vec![format!("{}: {e}", path.display())]))?;
    toml::from_str(&text).map_err(|e| {
        ConfigError(vec![format!(
            "{}: {}",
            path.display(),
            e.to_string().trim()
        )])
    })
}

fn parse_addr(key: &str, value: &str, errors: &mut Vec<String>) -> SocketAddr {
    value.parse().unwrap_or_else(|e| {
        errors.push(format!(
            "{key}: {value:?} is not an address like 127.0.0.1:5080 ({e})"
        ));
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

fn parse_upstream(value: &str) -> Result<Upstream, String> {
    let uri: Uri = value
        .parse()
        .map_err(|e| format!("upstream: {value:?} is not a URL ({e})"))?;
    let scheme = uri.scheme().cloned();
    let ok_scheme = matches!(scheme.as_ref().map(Scheme::as_str), Some("http" | "https"));
    if !ok_scheme {
        return Err(format!(
            "upstream: {value:?} must start with http:// or https://"
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "upstream: {value:?} must be an origin (no path): archmerge serves /v2/ as the registry does"
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("upstream: {value:?} has no host"))?;
    let scheme = scheme.unwrap_or(Scheme::HTTP);
    Ok(Upstream {
        origin: format!("{scheme}://{authority}"),
        scheme,
        authority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::default()
    }

    #[test]
    fn flags_alone_are_enough() {
        let s = Settings {
            listen: Some("127.0.0.1:6000".into()),
            upstream: Some("http://127.0.0.1:5000".into()),
            ..settings()
        };
        let c = Config::from_toml(&s, "").unwrap();
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.upstream.origin, "http://127.0.0.1:5000");
        assert_eq!(c.mode, Mode::Write);
        assert_eq!(c.timeouts.header_read, Duration::from_secs(30));
    }

    #[test]
    fn flags_win_over_the_file() {
        let s = Settings {
            upstream: Some("http://flag:1".into()),
            ..settings()
        };
        let c = Config::from_toml(
            &s,
            "upstream = \"http://file:2\"\nlisten = \"0.0.0.0:7000\"\nmode = \"serve\"\n",
        )
        .unwrap();
        assert_eq!(c.upstream.origin, "http://flag:1");
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.mode, Mode::Serve);
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let err = Config::from_toml(
            &settings(),
            "listen = \"nope\"\nmode = \"both\"\n[timeouts]\nconnect_secs = 0\n[merge]\npatterns = [\"{tag}\"]\n",
        )
        .unwrap_err();
        let text = err.to_string();
        for key in [
            "listen:",
            "upstream:",
            "mode:",
            "timeouts.connect_secs",
            "merge.patterns",
        ] {
            assert!(text.contains(key), "{key} missing in:\n{text}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_position() {
        let err = Config::from_toml(&settings(), "upstream = \"http://r:5000\"\nlisen = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn upstream_must_be_an_origin() {
        for bad in ["ftp://r", "http://r:5000/v2", "r:5000"] {
            let s = Settings {
                upstream: Some(bad.into()),
                ..settings()
            };
            assert!(Config::from_toml(&s, "").is_err(), "{bad}");
        }
    }

    #[test]
    fn merge_settings_and_aliases() {
        let c = Config::from_toml(
            &settings(),
            r#"
upstream = "https://registry.example:443"
[merge]
patterns = ["{tag}-{arch}"]
index_media_type = "oci"
platform_source = "config"
[aliases]
"windows-amd64" = "windows/amd64"
"#,
        )
        .unwrap();
        assert_eq!(c.merge.index_format, IndexFormat::Oci);
        assert_eq!(c.merge.platform_source, PlatformSource::Config);
        let m = c.merge.rules.match_tag("v1-windows-amd64").unwrap();
        assert_eq!(m.target, "v1");
        assert_eq!(m.platform.os, "windows");
    }
}
