//! [`Stack`]: one registry with one archmerge in front of it, the unit most
//! integration tests start.
//!
//! The constructors cover the stacks the tests need: a plain one
//! ([`Stack::new`]), archmerge with options ([`Stack::with`]), a registry
//! with options ([`Stack::with_registry`]), a rules file
//! ([`Stack::with_rules`]) and a registry that notifies archmerge's admin
//! `/events` ([`Stack::with_webhook`]). Whatever the registry reads while
//! it runs (an htpasswd file, a token issuer's bundle) is handed to
//! [`Stack::keeping`] and lives as long as the stack.
//!
//! A test file adds what only it needs in an `impl Stack { … }` block of
//! its own; the helpers here are the ones several files share.

use std::any::Any;
use std::fs;
use std::path::PathBuf;

use tempfile::TempDir;

use super::{
    free_port, spawn_archmerge_with, spawn_registry_extra, spawn_registry_with, strip_ansi,
    Archmerge, ArchmergeOpts, Notify, Registry, RegistryExtra, RegistryOpts,
};

/// A registry with one archmerge in front of it. Fields drop in order:
/// archmerge first, then its registry, then what the registry needed.
pub struct Stack {
    /// Dropped first: archmerge goes before its registry.
    pub proxy: Archmerge,
    pub registry: Registry,
    /// archmerge's admin listener, `http://127.0.0.1:PORT`.
    admin: String,
    /// A copy of the rules archmerge runs with, for the one-shot commands
    /// (`inspect`, `reconcile`); set when archmerge has a config file.
    rules: Option<TempDir>,
    /// What the registry reads while it runs; dropped after it.
    kept: Vec<Box<dyn Any + Send + Sync>>,
}

impl Stack {
    /// A plain registry, archmerge with only `--listen` and `--upstream`.
    #[allow(clippy::new_without_default)] // starting processes is no `Default`
    pub fn new() -> Stack {
        Stack::with(ArchmergeOpts::default())
    }

    /// A plain registry, archmerge with `opts`.
    pub fn with(opts: ArchmergeOpts) -> Stack {
        Stack::with_registry(RegistryOpts::default(), opts)
    }

    /// A registry with `registry`, archmerge with `opts`.
    pub fn with_registry(registry: RegistryOpts, opts: ArchmergeOpts) -> Stack {
        Stack::assemble(spawn_registry_with(registry), opts, None)
    }

    /// A plain registry, archmerge with `rules` as its config file (kept
    /// for the one-shot commands: [`Stack::config_path`]).
    pub fn with_rules(rules: &str) -> Stack {
        Stack::with(rules_opts(rules, Vec::new()))
    }

    /// As [`Stack::with_rules`], with a registry that notifies archmerge's
    /// `/events` of every push and delete, so writes made straight at the
    /// registry reach archmerge.
    pub fn with_webhook(rules: &str) -> Stack {
        // The registry must know archmerge's admin address before archmerge
        // starts, so the stack picks it.
        let admin_port = free_port();
        let registry = spawn_registry_extra(
            &RegistryOpts::default(),
            &RegistryExtra {
                notify: Some(Notify {
                    url: format!("http://127.0.0.1:{admin_port}/events"),
                    bearer: None,
                }),
                ..Default::default()
            },
        );
        let args = vec!["--admin-listen".into(), format!("127.0.0.1:{admin_port}")];
        let admin = format!("http://127.0.0.1:{admin_port}");
        Stack::assemble(registry, rules_opts(rules, args), Some(admin))
    }

    /// Keeps `thing` (an htpasswd file, a token issuer) alive until the
    /// registry has stopped.
    pub fn keeping(mut self, thing: impl Any + Send + Sync) -> Stack {
        self.kept.push(Box::new(thing));
        self
    }

    /// Starts archmerge with `opts` in front of `registry`; `admin` is its
    /// admin listener when `opts` chose it.
    fn assemble(registry: Registry, opts: ArchmergeOpts, admin: Option<String>) -> Stack {
        let rules = opts.config_toml.as_deref().map(|toml| {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("archmerge.toml"), toml).unwrap();
            dir
        });
        let proxy = spawn_archmerge_with(&registry.url(), opts);
        let admin = admin.unwrap_or_else(|| proxy.admin_url());
        Stack {
            proxy,
            registry,
            admin,
            rules,
            kept: Vec::new(),
        }
    }

    /// Another archmerge, with `opts`, in front of the same registry.
    pub fn replica(&self, opts: ArchmergeOpts) -> Archmerge {
        spawn_archmerge_with(&self.registry.url(), opts)
    }

    /// The rules file archmerge runs with, for the one-shot commands.
    /// Panics when the stack was started without one.
    pub fn config_path(&self) -> PathBuf {
        self.rules
            .as_ref()
            .expect("this stack's archmerge has no config file")
            .path()
            .join("archmerge.toml")
    }

    /// archmerge's admin listener, `http://127.0.0.1:PORT`.
    pub fn admin_url(&self) -> String {
        self.admin.clone()
    }

    /// The sum of every sample of the metric `name` from the admin
    /// listener ([`metric_at`]).
    pub async fn metric(&self, name: &str) -> f64 {
        super::metric_at(&self.admin_url(), name).await
    }

    /// `127.0.0.1:PROXY/<image>`, an image reference through archmerge.
    pub fn via(&self, image: &str) -> String {
        format!("{}/{image}", self.proxy.host())
    }

    /// `127.0.0.1:REGISTRY/<image>`, an image reference straight to the
    /// registry.
    pub fn direct(&self, image: &str) -> String {
        format!("{}/{image}", self.registry.host())
    }

    /// The manifest PUTs the registry answered 201 for `repo`, as
    /// `reference`s, oldest first, from its access log.
    pub fn manifest_puts(&self, repo: &str) -> Vec<String> {
        let prefix = format!("\"PUT /v2/{repo}/manifests/");
        self.registry
            .log_text()
            .lines()
            .filter_map(|l| {
                let rest = &l[l.find(&prefix)? + prefix.len()..];
                let (reference, status) = rest.split_once(" HTTP/1.1\" ")?;
                status.starts_with("201").then(|| reference.to_owned())
            })
            .collect()
    }

    /// How many manifest PUTs to `repo:reference` the registry answered
    /// 201, from its access log.
    pub fn manifest_put_count(&self, repo: &str, reference: &str) -> usize {
        self.manifest_puts(repo)
            .iter()
            .filter(|r| *r == reference)
            .count()
    }

    /// archmerge's log without terminal colours (it writes ANSI escapes
    /// even to a file).
    pub fn proxy_log(&self) -> String {
        strip_ansi(&self.proxy.log_text())
    }
}

/// archmerge with `rules` as its config file and `args`.
fn rules_opts(rules: &str, args: Vec<String>) -> ArchmergeOpts {
    ArchmergeOpts {
        args,
        config_toml: Some(rules.to_owned()),
        ..ArchmergeOpts::default()
    }
}
