//! Bringing a target's index up to date: [`Merger::update`] is the one way
//! in; the snapshot and facts are read, [`decide::decide`] says what the
//! target should hold, then it is written and verified until stable, one
//! rebuild at a time per target.
//!
//! Why this converges with any number of replicas: `docs/design.md`,
//! "Convergence"; why one entry point and a pure decision: "The write model".

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use moka::future::Cache;
use tokio::sync::Mutex;

use crate::bounded::{self, Backoff};
use crate::config::MergeConfig;
use crate::index::Manifest;
use crate::metrics::Metrics;
use crate::rules::{ArchTag, Role, Rule, WriteWith};
use crate::upstream::{Auth, FetchedManifest, Upstream, UpstreamError};

mod children;
mod copy;
pub mod decide;
mod listing;
mod retry;
mod snapshot;

pub use decide::{Decision, Desired};
pub use snapshot::Pushed;

/// Rebuild rounds before a merge gives up for now (and retries later).
const MAX_ROUNDS: usize = 8;

/// Children remembered across all targets' last snapshots (a few MiB).
const LAST_SNAPSHOT_CHILDREN: u64 = 32_768;

/// Why a rebuild failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum MergeError {
    /// A registry call failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// An arch tag's manifest could not be used.
    #[error("arch tag {tag}: {reason}")]
    BadChild {
        /// The arch tag.
        tag: String,
        /// What was wrong.
        reason: String,
    },
    /// The target holds content archmerge cannot amend.
    #[error("target holds content archmerge will not overwrite: {0}")]
    Unmergeable(String),
    /// Building the index failed.
    #[error(transparent)]
    Index(#[from] decide::DecideError),
    /// Pushes kept landing during every round.
    #[error("no stable snapshot after {0} rounds")]
    NotConverged(usize),
}

impl MergeError {
    /// A registry 5xx: likely gone on an immediate retry.
    fn is_transient(&self) -> bool {
        matches!(self, MergeError::Upstream(UpstreamError::Status { status, .. }) if status.is_server_error())
    }
}

/// What one rebuild did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An index was written where the target had none.
    Created,
    /// A new index replaced the target's content.
    Written,
    /// The index already had these bytes.
    Unchanged,
    /// A rebuild that started after this write already converged.
    Coalesced,
    /// The last managed entry went; the index was deleted.
    Removed,
    /// The last managed entry went; what the index amended was put back.
    Restored,
    /// No arch tag and nothing of archmerge's at the target.
    Nothing,
}

impl Outcome {
    /// A bounded label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Written => "written",
            Outcome::Unchanged => "unchanged",
            Outcome::Coalesced => "coalesced",
            Outcome::Removed => "removed",
            Outcome::Restored => "restored",
            Outcome::Nothing => "nothing",
        }
    }
}

/// Whether a fetched manifest is an index (or Docker list).
fn is_index(m: &FetchedManifest) -> bool {
    matches!(
        crate::index::parse_manifest(Some(&m.media_type), &m.bytes),
        Ok(Manifest::Index(_))
    )
}

/// Which arch tags a target has, and the digest each points at.
pub type Snapshot = BTreeMap<String, Child>;

/// One arch source of a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Child {
    /// The repository it lives in (the target's own, or a per-arch
    /// repository under a repository pattern).
    pub repo: String,
    /// The arch tag (`repo:tag` under a repository pattern).
    pub arch: ArchTag,
    /// The manifest digest it points at; `None` when these credentials may
    /// not read that repository.
    pub digest: Option<String>,
}

/// A request to bring one target up to date: the one way into the merge.
#[derive(Clone, Copy, Debug)]
pub struct Update<'a> {
    /// The repository the target lives in.
    pub repo: &'a str,
    /// The target tag.
    pub target: &'a str,
    /// Whose credentials the registry calls carry.
    pub auth: &'a Auth,
    /// When the write that asks for this was accepted: a rebuild that
    /// started later and converged already saw it.
    pub since: Instant,
    /// The manifest the registry has just accepted (at an arch tag, or at
    /// the target itself), trusted without reading it back.
    pub pushed: Option<Pushed<'a>>,
    /// The first read of the rebuild, made while the registry was still
    /// storing `pushed` ([`Merger::read_ahead`]).
    pub ahead: Option<&'a ReadAhead>,
}

/// A rebuild's first read, made while the registry was still storing the
/// arch push that asks for it, with the push already in it. It may predate
/// other writes, so it is only a place to start: a rebuild that starts from
/// it writes and verifies, or reads again. Why that is enough:
/// `docs/design.md`, "What a push waits for".
#[derive(Debug)]
pub struct ReadAhead {
    snapshot: Snapshot,
    current: Option<FetchedManifest>,
}

/// A target as the registry has it, and what it should hold (serve mode,
/// `inspect`).
#[derive(Debug)]
pub struct Survey {
    /// Its arch sources.
    pub snapshot: Snapshot,
    /// What the target tag holds now.
    pub current: Option<FetchedManifest>,
    /// What it should hold.
    pub decision: Decision,
}

/// A manifest's parsed form, cached by digest.
struct Facts {
    media_type: String,
    size: u64,
    manifest: Manifest,
}

/// The per-target serialisation point.
#[derive(Default)]
struct Slot {
    /// Start time of the latest rebuild that converged; a write accepted
    /// before it needs no rebuild of its own.
    converged_start: Mutex<Option<Instant>>,
}

type TargetKey = (String, String);

/// The merge engine, shared by every request.
pub struct Merger {
    upstream: Upstream,
    config: MergeConfig,
    metrics: Arc<Metrics>,
    /// One async lock per target being rebuilt. Entries are removed when no
    /// request holds them, so the map stays as small as the work in flight.
    slots: DashMap<TargetKey, Arc<Slot>>,
    /// Targets with a background retry pending (one retry loop per target).
    retrying: DashMap<TargetKey, ()>,
    /// Manifest digest → parsed facts. Immutable by content addressing.
    manifests: Cache<String, Arc<Facts>>,
    /// Config digest → platform details. Immutable by content addressing.
    configs: Cache<String, Arc<crate::index::ConfigPlatform>>,
    /// (arch tag, digest) pairs whose alias/config mismatch was reported.
    mismatches_seen: moka::sync::Cache<(String, String), ()>,
    /// (arch tag, digest) pairs reported as holding no runnable image.
    not_images_seen: moka::sync::Cache<(String, String), ()>,
    /// Each target's latest snapshot: which arch tags to HEAD while the
    /// next snapshot lists the tags (a guess, never an answer).
    last_snapshots: moka::sync::Cache<TargetKey, Arc<Snapshot>>,
    /// Tag listings in flight, shared by concurrent snapshots.
    listings: listing::Listings,
    /// Repositories whose listing was too large to ask for on every
    /// snapshot (a hint: HEADing candidates is exact at any size).
    large_repositories: moka::sync::Cache<String, ()>,
    /// archmerge's own credentials (`upstream_auth`), when configured:
    /// background retries use them, since a client's token expires.
    own: Option<Auth>,
}

impl Merger {
    /// Creates the engine.
    pub fn new(
        upstream: Upstream,
        config: MergeConfig,
        cache_bytes: u64,
        own_credentials: Option<&crate::config::Credentials>,
        metrics: Arc<Metrics>,
    ) -> Merger {
        Merger {
            upstream,
            config,
            metrics,
            slots: DashMap::new(),
            retrying: DashMap::new(),
            manifests: Cache::builder()
                .weigher(|_k, v: &Arc<Facts>| (v.size as u32).max(64))
                .max_capacity(cache_bytes)
                .build(),
            configs: Cache::builder().max_capacity(100_000).build(),
            mismatches_seen: moka::sync::Cache::new(100_000),
            not_images_seen: moka::sync::Cache::new(100_000),
            last_snapshots: moka::sync::Cache::builder()
                .weigher(|_k, v: &Arc<Snapshot>| v.len() as u32 + 1)
                .max_capacity(LAST_SNAPSHOT_CHILDREN)
                .build(),
            listings: listing::Listings::default(),
            large_repositories: moka::sync::Cache::new(10_000),
            own: own_credentials.map(|c| Auth::own(Some(c))),
        }
    }

    /// The rule that applies to a repository.
    pub fn rule(&self, repo: &str) -> &Rule {
        self.config.rules.for_repo(repo)
    }

    /// The registry client the merge uses.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Brings one target up to date: the one entry point of every write
    /// (a push or delete through archmerge, the webhook, reconcile). A
    /// failure is logged, counted and retried in the background, and
    /// returned (for the client's `Warning`).
    pub async fn update(self: &Arc<Self>, u: Update<'_>) -> Result<Outcome, MergeError> {
        let started = Instant::now();
        let u = Update {
            auth: self.writer(u.repo, u.auth),
            ..u
        };
        let (repo, target) = (u.repo, u.target);
        match self.converge(u).await {
            // A write at a tag that turned out to be no target: no merge
            // happened, so none is counted or logged.
            Ok(Outcome::Nothing) => Ok(Outcome::Nothing),
            Ok(outcome) => {
                self.metrics.merge(outcome.label());
                self.metrics
                    .merge_seconds
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    repo,
                    reference = target,
                    outcome = outcome.label(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "merge"
                );
                Ok(outcome)
            }
            Err(e) => {
                self.metrics.merge("failed");
                tracing::warn!(repo, reference = target, error = %e, "merge failed");
                self.spawn_retry(repo, target, u.auth, &e);
                Err(e)
            }
        }
    }

    /// Whose credentials write `repo`'s targets: a rule may have
    /// archmerge's own do it.
    fn writer<'a>(&'a self, repo: &str, client: &'a Auth) -> &'a Auth {
        self.own
            .as_ref()
            .filter(|_| self.writes_with_own(repo))
            .unwrap_or(client)
    }

    /// Whether `repo`'s targets are written with archmerge's own
    /// credentials.
    fn writes_with_own(&self, repo: &str) -> bool {
        self.own.is_some() && self.rule(repo).write_with == WriteWith::Archmerge
    }

    /// The first read of the rebuild an arch push asks for, made while the
    /// client's PUT is still on its way (so a push waits for one round trip
    /// fewer after it): the target's snapshot with `pushed` in it, and what
    /// the target holds. `None` when a rebuild of the target is already in
    /// flight here (the push will most likely be coalesced into the next
    /// one), when the target is written with archmerge's own credentials
    /// (the registry has not yet said whether this client may push, and
    /// archmerge reads nothing with its own for a client the registry may
    /// refuse), or when the read failed (the rebuild then reads as usual).
    pub async fn read_ahead(
        &self,
        target_repo: &str,
        target: &str,
        auth: &Auth,
        pushed: Pushed<'_>,
    ) -> Option<ReadAhead> {
        let key = (target_repo.to_owned(), target.to_owned());
        if self.writes_with_own(target_repo) || self.slots.contains_key(&key) {
            return None;
        }
        let (mut snapshot, current) = self
            .survey_with(target_repo, target, auth, Some(pushed))
            .await
            .ok()?;
        // The listing may have begun before the registry stored the push:
        // a new arch tag is then missing from it.
        if pushed.repo == target_repo && !snapshot.contains_key(pushed.tag) {
            let rule = self.rule(target_repo);
            for arch in rule.arch_tags_for_target(std::iter::once(pushed.tag), target) {
                let child = Child {
                    repo: target_repo.to_owned(),
                    arch,
                    digest: Some(pushed.manifest.digest.clone()),
                };
                snapshot.insert(child.arch.tag.clone(), child);
            }
        }
        Some(ReadAhead { snapshot, current })
    }

    /// What a target holds and what it should hold, without writing.
    pub async fn survey(
        &self,
        repo: &str,
        target: &str,
        auth: &Auth,
    ) -> Result<Survey, MergeError> {
        let (snapshot, current) = self.survey_with(repo, target, auth, None).await?;
        let decision = self
            .plan(repo, target, &snapshot, current.clone(), auth)
            .await?;
        Ok(Survey {
            snapshot,
            current,
            decision,
        })
    }

    /// Every target of `repo` that has arch tags: its own, and under a
    /// repository pattern those of its per-arch repositories.
    pub async fn targets_in(&self, repo: &str, auth: &Auth) -> Result<Vec<String>, MergeError> {
        let rule = self.rule(repo);
        let sources = rule
            .source_repositories(repo)
            .into_iter()
            .map(|(source, ..)| source);
        let listings = std::iter::once(repo.to_owned())
            .chain(sources)
            .map(|source| async move {
                let tags = match self.upstream.list_tags(&source, auth).await {
                    // A per-arch repository these credentials may not list
                    // gives nothing to find there.
                    Err(e) if e.is_auth() && source != repo => Vec::new(),
                    other => other?,
                };
                Ok::<_, UpstreamError>((source, tags))
            });
        let mut targets = Vec::new();
        for (source, tags) in bounded::try_all(listings).await? {
            for tag in tags {
                if let Role::Arch {
                    repo: target_repo,
                    arch,
                } = rule.role(&source, &tag)
                {
                    if target_repo == repo {
                        targets.push(arch.target);
                    }
                }
            }
        }
        targets.sort();
        targets.dedup();
        Ok(targets)
    }

    /// The arch tags of `repo` (its own, or under a repository pattern) that
    /// point at `digest` right now: what a delete of `digest` takes with it.
    /// A lookup that fails fails the whole answer; it never counts as "no".
    pub async fn arch_tags_at(
        &self,
        repo: &str,
        digest: &str,
        auth: &Auth,
    ) -> Result<Vec<String>, MergeError> {
        let tags = self.upstream.list_tags(repo, auth).await?;
        let rule = self.rule(repo);
        let arch = tags
            .into_iter()
            .filter(|t| matches!(rule.role(repo, t), Role::Arch { .. }));
        self.tags_at(repo, digest, arch, auth).await
    }

    /// Which of `tags` point at `digest` (HEADs, bounded, each tried again
    /// after a registry 5xx; any other failure fails the answer).
    async fn tags_at(
        &self,
        repo: &str,
        digest: &str,
        tags: impl Iterator<Item = String>,
        auth: &Auth,
    ) -> Result<Vec<String>, MergeError> {
        let heads = tags.map(|tag| async move {
            let d = self.head_with_retry(repo, &tag, auth).await?;
            Ok::<_, UpstreamError>((tag, d))
        });
        Ok(bounded::try_all(heads)
            .await?
            .into_iter()
            .filter(|(_, d)| d.as_deref() == Some(digest))
            .map(|(t, _)| t)
            .collect())
    }

    /// A HEAD of a tag, tried again after a registry 5xx.
    async fn head_with_retry(
        &self,
        repo: &str,
        tag: &str,
        auth: &Auth,
    ) -> Result<Option<String>, UpstreamError> {
        let (backoff, retries) = Backoff::hiccup();
        let transient = |e: &UpstreamError| matches!(e, UpstreamError::Status { status, .. } if status.is_server_error());
        backoff
            .retry(retries, transient, |_| {
                self.upstream.head_manifest(repo, tag, auth)
            })
            .await
    }

    /// Rebuild under the target's lock, until a snapshot taken after the
    /// write equals the one the write was built from.
    async fn converge(&self, u: Update<'_>) -> Result<Outcome, MergeError> {
        let Update {
            repo,
            target,
            auth,
            since,
            pushed,
            ahead,
        } = u;
        let key = (repo.to_owned(), target.to_owned());
        // Clone the Arc out so no map guard lives across an await.
        let slot = self.slots.entry(key.clone()).or_default().clone();
        let result = {
            let mut converged = slot.converged_start.lock().await;
            if converged.is_some_and(|t| t >= since) {
                Ok(Outcome::Coalesced)
            } else {
                let started = Instant::now();
                // distribution answers a HEAD of a tag it is still writing
                // with a 500; such a hiccup is retried at once, so the push
                // waiting on this merge still returns with its index (only
                // the first try may trust the pushed manifest).
                let (backoff, retries) = Backoff::hiccup();
                let r = backoff
                    .retry(retries, MergeError::is_transient, |n| {
                        let (pushed, ahead) = match n {
                            0 => (pushed, ahead),
                            _ => (None, None),
                        };
                        self.rebuild_until_stable(repo, target, auth, pushed, ahead)
                    })
                    .await;
                if r.is_ok() {
                    *converged = Some(started);
                }
                r
            }
        };
        drop(slot);
        // The map's own Arc is the only one left when nobody waits.
        self.slots.remove_if(&key, |_, s| Arc::strong_count(s) == 1);
        result
    }

    /// Rebuild rounds until the snapshot after a write equals the one it
    /// was built from. The first round reads the snapshot, the target and
    /// the pushed image's config at once; the verification snapshot HEADs
    /// the arch tags it expects while it lists the tags. So a push whose
    /// target already has its other arches costs three round trips after
    /// the client's own PUT: read, write, verify; two when the read was
    /// made ahead, while the client's PUT was on its way.
    async fn rebuild_until_stable(
        &self,
        repo: &str,
        target: &str,
        auth: &Auth,
        pushed: Option<Pushed<'_>>,
        ahead: Option<&ReadAhead>,
    ) -> Result<Outcome, MergeError> {
        let (mut snapshot, current) = match ahead {
            Some(a) => (a.snapshot.clone(), a.current.clone()),
            None => self.survey_with(repo, target, auth, pushed).await?,
        };
        let mut read_ahead = ahead.is_some();
        if read_ahead {
            self.metrics.read_ahead("used");
        }
        let mut current = Some(current);
        let mut outcome = Outcome::Nothing;
        for _ in 0..MAX_ROUNDS {
            let (this, wrote) = self
                .rebuild(repo, target, &snapshot, current.take(), auth, read_ahead)
                .await?;
            // Keep the most telling outcome across rounds.
            if outcome == Outcome::Nothing || this != Outcome::Unchanged {
                outcome = this;
            }
            // A rebuild that wrote nothing needs no verification: the target
            // already said what a snapshot taken after this merge began
            // calls for, and any writer racing with it verifies its own
            // write. A read made ahead may predate another write, so it
            // cannot say that: the target is read again instead.
            if !wrote && read_ahead {
                read_ahead = false;
                self.metrics.read_ahead("read_again");
                let (again, holds) = self.survey_with(repo, target, auth, pushed).await?;
                (snapshot, current) = (again, Some(holds));
                continue;
            }
            if !wrote {
                return Ok(outcome);
            }
            let expected = Arc::new(snapshot);
            let after = self
                .snapshot_with(repo, target, auth, None, Some(expected.clone()))
                .await?;
            if after == *expected {
                return Ok(outcome);
            }
            snapshot = after;
        }
        Err(MergeError::NotConverged(MAX_ROUNDS))
    }

    /// One rebuild from one snapshot: decide, then make the registry say
    /// it. `current` is what the target holds, when it was just read.
    /// Returns what it did, and whether it wrote (or deleted) anything. A
    /// write skipped from a read made `ahead` is not counted: the target is
    /// read again, and that round counts it.
    async fn rebuild(
        &self,
        repo: &str,
        target: &str,
        snapshot: &Snapshot,
        current: Option<Option<FetchedManifest>>,
        auth: &Auth,
        ahead: bool,
    ) -> Result<(Outcome, bool), MergeError> {
        let current = match current {
            Some(c) => c,
            None => self.upstream.get_manifest(repo, target, auth).await?,
        };
        let current_digest = current.as_ref().map(|c| c.digest.clone());
        let Decision {
            mut desired,
            copies,
            displaced,
            ..
        } = self.plan(repo, target, snapshot, current, auth).await?;
        let (bytes, media_type, digest, outcome) = loop {
            match desired {
                Desired::Nothing => return Ok((Outcome::Nothing, false)),
                Desired::Delete => {
                    let Some(d) = current_digest.as_deref() else {
                        return Ok((Outcome::Nothing, false));
                    };
                    // distribution deletes by digest, and a delete takes every
                    // tag on that digest with it: an index also tagged
                    // elsewhere by a user is left in place rather than taking
                    // that tag along.
                    let others = self.other_tags_on(repo, target, d, auth).await?;
                    if !others.is_empty() {
                        tracing::warn!(repo, reference = target, digest = d, also_tagged = ?others, "index has no arch tag left but is tagged elsewhere too; not deleted");
                        return Ok((Outcome::Unchanged, false));
                    }
                    self.upstream.delete_manifest(repo, d, auth).await?;
                    return Ok((Outcome::Removed, true));
                }
                Desired::Index(b) => {
                    let outcome = match current_digest {
                        None => Outcome::Created,
                        Some(_) => Outcome::Written,
                    };
                    let bytes = Bytes::from(b.bytes);
                    break (bytes, b.media_type.to_owned(), b.digest, outcome);
                }
                Desired::Restore { base, otherwise } => {
                    match self.upstream.get_manifest(repo, &base, auth).await? {
                        Some(m) => break (m.bytes, m.media_type, m.digest, Outcome::Restored),
                        None => {
                            tracing::warn!(repo, digest = %base, "the manifest this index amended is gone from the registry");
                            desired = *otherwise;
                        }
                    }
                }
            }
        };
        // A registry refuses an index whose children live elsewhere.
        for (from, child) in &copies {
            copy::manifest(&self.upstream, from, repo, child, auth).await?;
        }
        // What the index displaces keeps a tag of its own (garbage-collect
        // --delete-untagged would delete it, and it is what a fall back
        // restores).
        if let Some(m) = displaced.filter(|m| m.digest != digest) {
            let keep = crate::rules::tags::keep_tag(&m.digest);
            self.upstream
                .put_manifest(repo, &keep, &m.media_type, m.bytes, auth)
                .await?;
        }
        let mut wrote = false;
        let outcome = if current_digest.as_deref() == Some(digest.as_str()) {
            if !ahead {
                self.metrics.writes_skipped.inc();
            }
            Outcome::Unchanged
        } else {
            self.upstream
                .put_manifest(repo, target, &media_type, bytes.clone(), auth)
                .await?;
            tracing::debug!(repo, reference = target, %digest, "index written");
            wrote = true;
            outcome
        };
        // The same index at the rule's extra targets (e.g. `latest`).
        for extra in &self.rule(repo).extra_targets {
            if extra == target || outcome == Outcome::Restored {
                continue;
            }
            let there = self.upstream.head_manifest(repo, extra, auth).await?;
            if there.as_deref() != Some(digest.as_str()) {
                self.upstream
                    .put_manifest(repo, extra, &media_type, bytes.clone(), auth)
                    .await?;
                wrote = true;
            }
        }
        Ok((outcome, wrote))
    }

    /// Tags other than `target` (and other than arch tags) that point at
    /// `digest`.
    async fn other_tags_on(
        &self,
        repo: &str,
        target: &str,
        digest: &str,
        auth: &Auth,
    ) -> Result<Vec<String>, MergeError> {
        let tags = self.upstream.list_tags(repo, auth).await?;
        let rule = self.rule(repo);
        let candidates = tags
            .into_iter()
            .filter(|t| t != target && !rule.is_arch_tag(t) && !rule.extra_targets.contains(t));
        self.tags_at(repo, digest, candidates, auth).await
    }

    /// What the registry's state calls for at `target`: what each arch
    /// source contributes and what the target holds are read (in
    /// parallel, bounded), then [`decide::decide`] says what it should hold.
    async fn plan(
        &self,
        repo: &str,
        target: &str,
        snapshot: &Snapshot,
        current: Option<FetchedManifest>,
        auth: &Auth,
    ) -> Result<Decision, MergeError> {
        let rule = self.rule(repo);
        let children = snapshot.values().map(|c| async move {
            let Some(digest) = c.digest.as_deref() else {
                return Ok((c.clone(), decide::Contribution::Unreadable));
            };
            let contribution = match self
                .contribution(&c.repo, &c.arch, digest, rule, auth)
                .await
            {
                Err(MergeError::BadChild { reason, .. }) => decide::Contribution::Unusable(reason),
                other => other?,
            };
            Ok::<_, MergeError>((c.clone(), contribution))
        });
        let read_current = async {
            match current {
                None => Ok(None),
                // With no arch source, only an index of archmerge's matters
                // (to fall back); a plain image is left alone unread.
                Some(m) if snapshot.is_empty() && !is_index(&m) => Ok(None),
                Some(m) => self.read_current(repo, m, auth).await.map(Some),
            }
        };
        let (children, current) = tokio::join!(bounded::try_all(children), read_current);
        let (children, current) = (children?, current?);
        for (child, c) in &children {
            if let decide::Contribution::Unusable(reason) = c {
                // One unusable arch tag must not hold back the others: it is
                // left out, loudly, until it is pushed again.
                self.metrics.merge("child_skipped");
                tracing::warn!(repo, reference = %child.arch.tag, error = %reason, "arch tag left out of the index");
            }
        }
        let decision = decide::decide(rule, repo, &children, current.as_ref())?;
        if !decision.missing.is_empty()
            && matches!(
                decision.desired,
                Desired::Nothing | Desired::Delete | Desired::Restore { .. }
            )
            && !snapshot.is_empty()
        {
            tracing::info!(repo, reference = target, missing = ?decision.missing, "waiting for required arches");
        }
        for d in &decision.dropped {
            tracing::warn!(
                digest = %d.entry.descriptor.digest(),
                platform = %d.entry.platform,
                reason = ?d.reason,
                "entry left out of the index"
            );
        }
        Ok(decision)
    }
}
