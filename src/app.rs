//! The state every request handler shares — validated config, the pooled
//! registry client, metrics — and the mode as one type, [`Indexes`]: what a
//! write that touches a target does, and who answers a target's GET.
//!
//! Built once in `main.rs` (or a test) and handed to the listeners as an
//! `Arc`; it sits below every handler and calls none of them.

use std::sync::Arc;
use std::time::Instant;

use crate::bounded;
use crate::config::{Config, Mode};
use crate::merge::{Merger, Pushed, ReadAhead, Update};
use crate::metrics::Metrics;
use crate::reconcile;
use crate::rules::{How, Touch};
use crate::serve::Aggregates;
use crate::upstream::{Auth, Upstream};

/// Everything a request handler needs, shared by all connections.
pub struct App {
    /// Validated settings.
    pub(crate) config: Arc<Config>,
    /// The pooled registry client.
    pub(crate) upstream: Upstream,
    /// The merge engine: writes targets in write mode, synthesizes them in
    /// serve mode, and reads them for `inspect` and reconcile in both.
    pub(crate) merger: Arc<Merger>,
    /// Metric families.
    pub(crate) metrics: Arc<Metrics>,
    /// What the mode does with targets.
    pub(crate) indexes: Indexes,
    /// The budget of buffered manifest bytes, in KiB permits: manifest
    /// bodies are read whole before the registry authenticates the client,
    /// so what all of them may pin together is bounded.
    pub(crate) manifest_budget: Arc<tokio::sync::Semaphore>,
    /// archmerge's own registry connections for zero-copy blob downloads.
    pub(crate) downloads: crate::splice::Downloads,
}

impl App {
    /// Builds the shared state from a validated config.
    pub fn new(config: Config) -> std::io::Result<Arc<App>> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let upstream = Upstream::new(&config, metrics.clone())?;
        let merger = Arc::new(Merger::new(
            upstream.clone(),
            config.merge.clone(),
            config.cache.max_bytes,
            config.upstream_credentials.as_ref(),
            metrics.clone(),
        ));
        let indexes = match config.mode {
            Mode::Write => Indexes::Write(merger.clone()),
            Mode::Serve => Indexes::Serve(Box::new(Aggregates::new(
                merger.clone(),
                metrics.clone(),
                &config.cache,
            ))),
        };
        let kib = (config.manifest_buffer_bytes / 1024) as usize;
        Ok(Arc::new(App {
            manifest_budget: Arc::new(tokio::sync::Semaphore::new(kib)),
            downloads: crate::splice::Downloads::new(&config, metrics.clone()),
            config,
            upstream,
            merger,
            metrics,
            indexes,
        }))
    }
}

// === the operations `main.rs` runs ===

impl App {
    /// `archmerge reconcile`: builds or repairs the indexes of `repos` (the
    /// whole catalog when empty) with archmerge's own credentials;
    /// `progress` sees each finished target.
    pub async fn reconcile(
        &self,
        repos: &[String],
        progress: impl FnMut(&reconcile::Progress<'_>),
    ) -> Result<reconcile::Summary, crate::upstream::UpstreamError> {
        let auth = Auth::own(self.config.upstream_credentials.as_ref());
        reconcile::run(&self.merger, repos, reconcile::Scope::All, &auth, progress).await
    }

    /// `archmerge inspect`: what `repo:tag` lists, with archmerge's own
    /// credentials.
    pub async fn inspect(
        &self,
        repo: &str,
        tag: &str,
    ) -> Result<crate::inspect::Report, crate::merge::MergeError> {
        let auth = Auth::own(self.config.upstream_credentials.as_ref());
        crate::inspect::report(&self.merger, self.indexes.synthesizes(), repo, tag, &auth).await
    }
}

/// The mode (SPEC §5), as what it does with targets.
pub enum Indexes {
    /// `write`: every write that touches a target rebuilds it in the
    /// registry before the client is answered.
    Write(Arc<Merger>),
    /// `serve`: nothing is written; GETs of targets are answered with the
    /// synthesized index, and a write only drops what is cached of it.
    Serve(Box<Aggregates>),
}

/// A write the registry accepted (or a delete it carried out), and the
/// targets it touches.
#[derive(Clone, Copy)]
pub struct Accepted<'a> {
    /// What the rules say the write touches.
    pub touches: &'a [Touch],
    /// The credentials the follow-up calls carry.
    pub auth: &'a Auth,
    /// When the registry accepted it.
    pub since: Instant,
    /// The manifest stored, when the write was a push.
    pub pushed: Option<Pushed<'a>>,
    /// The first read of the rebuild, made while the push was on its way
    /// ([`Indexes::read_ahead`]).
    pub ahead: Option<&'a ReadAhead>,
}

impl Indexes {
    /// Brings every target a write touches up to date (write mode), or
    /// forgets what is cached of it (serve mode). Returns one line per
    /// target that is not up to date yet, for the client's `Warning`; those
    /// are retried in the background.
    pub async fn after_write(&self, w: Accepted<'_>) -> Vec<String> {
        match self {
            Indexes::Write(merger) => {
                let jobs = w.touches.iter().map(|t| async move {
                    match t {
                        Touch::Target { repo, target, how } => match how {
                            How::ArchChanged | How::NewBase => {
                                let u = Update {
                                    repo,
                                    target,
                                    auth: w.auth,
                                    since: w.since,
                                    pushed: w.pushed,
                                    ahead: w.ahead,
                                };
                                merger.update(u).await.err().map(|e| {
                                    format!("the index {repo}:{target} is not up to date yet: {e}")
                                })
                            }
                            How::Deleted => {
                                tracing::debug!(repo = %repo, reference = %target, "target deleted; stays absent until its next arch push or a reconcile");
                                None
                            }
                        },
                        Touch::ExistingTargets { repo } => {
                            let repos = [repo.clone()];
                            let scope = reconcile::Scope::Existing;
                            match reconcile::run(merger, &repos, scope, w.auth, |_| {}).await {
                                Ok(s) if s.failed.is_empty() => None,
                                Ok(s) => Some(format!(
                                    "{} target(s) of {repo} are not up to date yet",
                                    s.failed.len()
                                )),
                                Err(e) => Some(format!(
                                    "the indexes of {repo} are not up to date yet: {e}"
                                )),
                            }
                        }
                    }
                });
                bounded::all(jobs).await.into_iter().flatten().collect()
            }
            Indexes::Serve(aggregates) => {
                for t in w.touches {
                    if let Touch::Target { repo, target, .. } = t {
                        aggregates.invalidate(repo, target).await;
                    }
                }
                // Some targets of a repository, unknown which: their
                // aggregates expire within the staleness bound by themselves.
                Vec::new()
            }
        }
    }

    /// For a push about to be forwarded, the first read of the rebuild it
    /// will ask for, made while the registry stores it (write mode, a push
    /// at an arch tag, which touches exactly its one target). Other writes
    /// get `None`: a push at a possible target must be read after it is
    /// stored, since its rebuild finding no arch tags ends it unverified.
    pub async fn read_ahead(
        &self,
        touches: &[Touch],
        auth: &Auth,
        pushed: Pushed<'_>,
    ) -> Option<ReadAhead> {
        let Indexes::Write(merger) = self else {
            return None;
        };
        let [Touch::Target {
            repo,
            target,
            how: How::ArchChanged,
        }] = touches
        else {
            return None;
        };
        merger.read_ahead(repo, target, auth, pushed).await
    }

    /// Serve mode's aggregates: where archmerge itself answers GETs of
    /// targets. `None` in write mode, where the registry holds them.
    pub fn served(&self) -> Option<&Aggregates> {
        match self {
            Indexes::Write(_) => None,
            Indexes::Serve(a) => Some(a),
        }
    }

    /// Whether the mode synthesizes indexes instead of storing them.
    pub fn synthesizes(&self) -> bool {
        self.served().is_some()
    }
}
