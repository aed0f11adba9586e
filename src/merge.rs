//! Bringing a target's index up to date: rebuilt from the registry, one
//! rebuild at a time per target, verified until stable.
//!
//! # Why this converges, with any number of replicas
//!
//! The registry is the only source of truth. A rebuild never patches the
//! last list written; it lists the repository's tags, takes every arch tag
//! of the target with the digest it points at (the *snapshot*), builds the
//! canonical index from exactly that, writes it if the bytes differ, and
//! then takes the snapshot again. If the second snapshot differs, an arch
//! push landed meanwhile and the rebuild runs again; if it is equal, the
//! index written reflects every arch tag present at a moment *after* the
//! write. A rebuild that found the target already right wrote nothing and
//! needs no second snapshot: the target says what a snapshot taken after
//! the rebuild began calls for.
//!
//! Take the last write to a target, by any replica. Its writer verified
//! after writing, saw the snapshot it built from, and stopped — so every
//! arch push that completed before that verification is in the index. A
//! push that completed later has its own rebuild, which starts after the
//! push, hence after that write, and would have written again had the
//! bytes differed — contradicting "last". So once pushes stop, the index
//! lists every arch tag present, whatever the interleaving across replicas.
//! Canonical bytes make concurrent writers of the same snapshot write the
//! same digest, so racing writes are harmless.
//!
//! Inside one process, rebuilds of one target are serialised by an async
//! lock per target (a `DashMap` of `tokio::sync::Mutex`, never held across
//! the map's own guard). A push that waited for the lock skips its rebuild
//! when a rebuild that *started after the push was accepted* has since
//! converged: that rebuild's snapshot already contained the push. Eight
//! arches pushed at once through one replica thus cost about two rebuilds,
//! not eight.
//!
//! Per-digest facts (a manifest's parsed form, an image config's platform)
//! are immutable and cached in moka; tags are never cached, since they move
//! (a target's last snapshot is kept only as a guess of which arch tags to
//! HEAD early, see `snapshot`). Round trips are what a push waits for, so
//! the first round reads the snapshot, the target and the pushed image's
//! config at once: a push to a target whose other arches are already there
//! waits for three — read, write, verify — after its own PUT.
//!
//! A rebuild that fails (registry down, credentials expired mid-way) is
//! logged, counted, and retried in the background with backoff; the push
//! that triggered it has already been answered with the registry's answer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::future::try_join_all;
use moka::future::Cache;
use tokio::sync::Mutex;

use crate::config::MergeConfig;
use crate::index::{
    build_index, BuiltIndex, ConfigPlatform, Entry, EntryKind, EntrySource, Manifest, ANN_BASE,
};
use crate::metrics::Metrics;
use crate::rules::ArchTag;
use crate::rules::Rule;
use crate::upstream::{Auth, FetchedManifest, Upstream, UpstreamError};

mod children;
mod copy;
mod listing;
mod retry;
mod snapshot;

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
    /// The target holds something archmerge cannot amend.
    #[error("target holds content archmerge will not overwrite: {0}")]
    Unmergeable(String),
    /// Building the index failed.
    #[error("building the index: {0}")]
    Index(String),
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
    /// A rebuild that started after this push already converged.
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

/// What the registry's state calls for at a target.
#[derive(Debug)]
pub enum Desired {
    /// An index with these canonical bytes.
    Index(BuiltIndex),
    /// No arch tag is left: put back the manifest the index amended.
    Restore(FetchedManifest),
    /// No arch tag is left and the index amended nothing: delete it.
    Delete,
    /// No arch tag, and nothing of archmerge's at the target.
    Nothing,
}

/// What the target tag holds, as the merge reads it.
#[derive(Default)]
struct Current {
    /// archmerge wrote it.
    ours: bool,
    /// Entries of what archmerge did not make, kept where no arch tag
    /// provides their platform.
    amended: Vec<Entry>,
    /// What the target held before archmerge first wrote there.
    base: Option<String>,
}

/// A target as it is, and as it should be.
#[derive(Debug)]
pub struct Plan {
    /// What the target tag holds now.
    pub current: Option<FetchedManifest>,
    /// What it should hold.
    pub desired: Desired,
    /// Children that live in another repository (repository patterns), as
    /// (repository, digest): copied into the target's before it lists them.
    pub copies: Vec<(String, String)>,
    /// Required platforms not present yet.
    pub missing: Vec<String>,
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
    /// Start time of the latest rebuild that converged; a push accepted
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
    configs: Cache<String, Arc<ConfigPlatform>>,
    /// (arch tag, digest) pairs whose alias/config mismatch was reported.
    mismatches_seen: moka::sync::Cache<(String, String), ()>,
    /// Each target's latest snapshot: which arch tags to HEAD while the
    /// next snapshot lists the tags (a guess, never an answer).
    last_snapshots: moka::sync::Cache<TargetKey, Arc<Snapshot>>,
    /// Tag listings in flight, shared by concurrent snapshots.
    listings: listing::Listings,
}

impl Merger {
    /// Creates the engine.
    pub fn new(
        upstream: Upstream,
        config: MergeConfig,
        cache_bytes: u64,
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
            last_snapshots: moka::sync::Cache::builder()
                .weigher(|_k, v: &Arc<Snapshot>| v.len() as u32 + 1)
                .max_capacity(LAST_SNAPSHOT_CHILDREN)
                .build(),
            listings: listing::Listings::default(),
        }
    }

    /// The rule that applies to a repository.
    pub fn rule(&self, repo: &str) -> &Rule {
        self.config.rules.for_repo(repo)
    }

    /// After the registry accepted a push of an arch tag: bring its target
    /// up to date before the client is answered. Failures are retried in the
    /// background; this never fails the push.
    pub async fn after_push(
        self: &Arc<Self>,
        repo: &str,
        arch: &ArchTag,
        pushed: Pushed<'_>,
        auth: &Auth,
        accepted_at: Instant,
    ) -> Option<String> {
        self.remember(pushed.manifest.clone()).await;
        self.update(repo, &arch.target, auth, accepted_at, Some(pushed))
            .await
            .err()
            .map(|e| {
                format!(
                    "the index {repo}:{} is not up to date yet: {e}",
                    arch.target
                )
            })
    }

    /// After the registry deleted a manifest that `target` listed.
    pub async fn after_delete(
        self: &Arc<Self>,
        repo: &str,
        target: &str,
        auth: &Auth,
        since: Instant,
    ) {
        // Failures are logged, counted and retried inside.
        let _ = self.update(repo, target, auth, since, None).await;
    }

    /// Every target that has arch tags in `repo`.
    pub async fn targets_in(&self, repo: &str, auth: &Auth) -> Result<Vec<String>, MergeError> {
        let tags = self.upstream.list_tags(repo, auth).await?;
        let targets: BTreeSet<String> = tags
            .iter()
            .filter_map(|t| self.rule(repo).match_tag(t))
            .map(|a| a.target)
            .collect();
        Ok(targets.into_iter().collect())
    }

    /// The targets whose arch tags point at `digest` right now.
    pub async fn targets_of_digest(&self, repo: &str, digest: &str, auth: &Auth) -> Vec<String> {
        let Ok(tags) = self.upstream.list_tags(repo, auth).await else {
            return Vec::new();
        };
        let arch: Vec<ArchTag> = tags
            .iter()
            .filter_map(|t| self.rule(repo).match_tag(t))
            .collect();
        let heads = arch.iter().map(|a| async move {
            let d = self.upstream.head_manifest(repo, &a.tag, auth).await;
            (a.target.clone(), d)
        });
        let mut targets = BTreeSet::new();
        for (target, d) in futures_util::future::join_all(heads).await {
            if matches!(d, Ok(Some(ref d)) if d == digest) {
                targets.insert(target);
            }
        }
        targets.into_iter().collect()
    }

    /// Rebuilds one target; on failure, logs, counts and schedules retries
    /// (and returns the error, for the client's `Warning`).
    pub async fn update(
        self: &Arc<Self>,
        repo: &str,
        target: &str,
        auth: &Auth,
        since: Instant,
        pushed: Option<Pushed<'_>>,
    ) -> Result<Outcome, MergeError> {
        let started = Instant::now();
        match self.converge(repo, target, auth, since, pushed).await {
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
                tracing::warn!(repo, reference = target, error = %e, "merge failed; retrying in the background");
                self.spawn_retry(repo, target, auth);
                Err(e)
            }
        }
    }

    /// Rebuild under the target's lock, until a snapshot taken after the
    /// write equals the one the write was built from. `pushed` is the arch
    /// push that asked for it, if any.
    pub async fn converge(
        &self,
        repo: &str,
        target: &str,
        auth: &Auth,
        since: Instant,
        pushed: Option<Pushed<'_>>,
    ) -> Result<Outcome, MergeError> {
        let key = (repo.to_owned(), target.to_owned());
        // Clone the Arc out so no map guard lives across an await.
        let slot = self.slots.entry(key.clone()).or_default().clone();
        let result = {
            let mut converged = slot.converged_start.lock().await;
            if converged.is_some_and(|t| t >= since) {
                Ok(Outcome::Coalesced)
            } else {
                let started = Instant::now();
                let mut r = self.rebuild_until_stable(repo, target, auth, pushed).await;
                // distribution answers a HEAD of a tag it is still writing
                // with a 500; such a hiccup is retried at once, so the push
                // waiting on this merge still returns with its index.
                for delay_ms in [20, 100, 400] {
                    match &r {
                        Err(e) if e.is_transient() => {
                            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                            r = self.rebuild_until_stable(repo, target, auth, None).await;
                        }
                        _ => break,
                    }
                }
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
    /// the client's own PUT: read, write, verify.
    async fn rebuild_until_stable(
        &self,
        repo: &str,
        target: &str,
        auth: &Auth,
        pushed: Option<Pushed<'_>>,
    ) -> Result<Outcome, MergeError> {
        let (mut snapshot, current) = self.survey_with(repo, target, auth, pushed).await?;
        let mut current = Some(current);
        let mut outcome = Outcome::Nothing;
        for _ in 0..MAX_ROUNDS {
            let (this, wrote) = self
                .rebuild(repo, target, &snapshot, current.take(), auth)
                .await?;
            // Keep the most telling outcome across rounds.
            if outcome == Outcome::Nothing || this != Outcome::Unchanged {
                outcome = this;
            }
            // A rebuild that wrote nothing needs no verification: the target
            // already said what a snapshot taken after this merge began
            // calls for, and any writer racing with it verifies its own
            // write.
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

    /// One rebuild from one snapshot: plan it, then make the registry say
    /// it. `current` is what the target holds, when it was just read.
    /// Returns what it did, and whether it wrote (or deleted) anything.
    async fn rebuild(
        &self,
        repo: &str,
        target: &str,
        snapshot: &Snapshot,
        current: Option<Option<FetchedManifest>>,
        auth: &Auth,
    ) -> Result<(Outcome, bool), MergeError> {
        let current = match current {
            Some(c) => c,
            None => self.upstream.get_manifest(repo, target, auth).await?,
        };
        let Plan {
            current,
            desired,
            copies,
            ..
        } = self.plan(repo, target, snapshot, current, auth).await?;
        let current_digest = current.as_ref().map(|c| c.digest.as_str());
        let (bytes, media_type, digest, outcome) = match desired {
            Desired::Nothing => return Ok((Outcome::Nothing, false)),
            Desired::Delete => {
                let Some(d) = current_digest else {
                    return Ok((Outcome::Nothing, false));
                };
                // distribution deletes by digest, and a delete takes every tag
                // on that digest with it: an index also tagged elsewhere by a
                // user is left in place rather than taking that tag along.
                let others = self.other_tags_on(repo, target, d, auth).await?;
                if !others.is_empty() {
                    tracing::warn!(repo, reference = target, digest = d, also_tagged = ?others, "index has no arch tag left but is tagged elsewhere too; not deleted");
                    return Ok((Outcome::Unchanged, false));
                }
                self.upstream.delete_manifest(repo, d, auth).await?;
                return Ok((Outcome::Removed, true));
            }
            Desired::Index(b) => {
                let media_type = b.media_type.to_owned();
                let outcome = if current.is_none() {
                    Outcome::Created
                } else {
                    Outcome::Written
                };
                (Bytes::from(b.bytes), media_type, b.digest, outcome)
            }
            Desired::Restore(m) => (m.bytes, m.media_type, m.digest, Outcome::Restored),
        };
        // A registry refuses an index whose children live elsewhere.
        for (from, child) in &copies {
            copy::manifest(&self.upstream, from, repo, child, auth).await?;
        }
        let mut wrote = false;
        let outcome = if current_digest == Some(digest.as_str()) {
            self.metrics.writes_skipped.inc();
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
        let candidates = tags.into_iter().filter(|t| {
            t != target
                && !self.rule(repo).is_arch_tag(t)
                && !self.rule(repo).extra_targets.contains(t)
        });
        let heads = candidates.map(|t| async move {
            let d = self.upstream.head_manifest(repo, &t, auth).await?;
            Ok::<_, UpstreamError>((t, d))
        });
        Ok(try_join_all(heads)
            .await?
            .into_iter()
            .filter(|(_, d)| d.as_deref() == Some(digest))
            .map(|(t, _)| t)
            .collect())
    }

    /// What the registry's state calls for at `target`, given its arch tags.
    ///
    /// Managed entries come from the arch tags; entries of what the target
    /// holds that archmerge did not make are kept for every platform no
    /// arch tag provides (amend, never clobber).
    /// `current` is what the target tag holds (see [`Merger::survey`]).
    pub async fn plan(
        &self,
        repo: &str,
        target: &str,
        snapshot: &Snapshot,
        current: Option<FetchedManifest>,
        auth: &Auth,
    ) -> Result<Plan, MergeError> {
        let rule = self.rule(repo);
        let children = snapshot
            .values()
            .filter_map(|c| Some((c, c.digest.as_deref()?)));
        let children = children.map(|(c, digest)| async move {
            let entries = match self.arch_entries(&c.repo, &c.arch, digest, rule, auth).await {
                // One unusable arch tag must not hold back the others: it is
                // left out, loudly, until it is pushed again.
                Err(MergeError::BadChild { tag, reason }) => {
                    self.metrics.merge("child_skipped");
                    tracing::warn!(repo, reference = %tag, error = %reason, "arch tag left out of the index");
                    Vec::new()
                }
                other => other?,
            };
            Ok::<_, MergeError>((c, entries))
        });
        let mut managed: Vec<Entry> = Vec::new();
        let mut copies: Vec<(String, String)> = Vec::new();
        for (child, entries) in try_join_all(children).await? {
            if child.repo != repo {
                copies.extend(
                    entries
                        .iter()
                        .map(|e| (child.repo.clone(), e.descriptor.digest().to_string())),
                );
            }
            managed.extend(entries);
        }
        managed.extend(unreadable_entries(snapshot, current.as_ref()));

        let Current {
            ours,
            amended,
            base,
        } = match &current {
            None => Current::default(),
            Some(m) => self.read_current(repo, m, auth).await?,
        };
        let provided: BTreeSet<_> = managed
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Image))
            .map(|e| e.platform.key())
            .collect();
        let kept_images: BTreeSet<String> = amended
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Image) && !provided.contains(&e.platform.key()))
            .map(|e| e.descriptor.digest().to_string())
            .collect();
        let kept: Vec<Entry> = amended
            .into_iter()
            .filter(|e| match &e.kind {
                EntryKind::Image => kept_images.contains(&e.descriptor.digest().to_string()),
                EntryKind::Attestation { of } => kept_images.contains(of),
            })
            .collect();

        // A required set that is not complete publishes nothing (and takes
        // back what it published, as when the last arch tag goes).
        let missing: Vec<String> = rule.missing(&provided).map(|k| k.to_string()).collect();
        if !missing.is_empty() && !managed.is_empty() {
            tracing::info!(repo, reference = target, missing = ?missing, "waiting for required arches");
        }
        let desired = if !managed.is_empty() && missing.is_empty() {
            let mut entries = managed;
            entries.extend(kept);
            Desired::Index(self.build(rule, &entries, base)?)
        } else if ours {
            self.fall_back(repo, kept, base, auth).await?
        } else {
            Desired::Nothing
        };
        Ok(Plan {
            current,
            desired,
            copies,
            missing,
        })
    }

    fn build(
        &self,
        rule: &Rule,
        entries: &[Entry],
        base: Option<String>,
    ) -> Result<BuiltIndex, MergeError> {
        let mut annotations = rule.annotations.clone();
        if let Some(b) = base {
            annotations.insert(ANN_BASE.to_owned(), b);
        }
        let built = build_index(entries, rule.index_format, &annotations)
            .map_err(|e| MergeError::Index(e.to_string()))?;
        for d in &built.dropped {
            tracing::warn!(
                digest = %d.entry.descriptor.digest(),
                platform = %d.entry.platform,
                reason = ?d.reason,
                "entry left out of the index"
            );
        }
        Ok(built)
    }

    /// The last managed entry is gone: put back what the target held before
    /// archmerge first wrote there, or delete the index when it held nothing.
    async fn fall_back(
        &self,
        repo: &str,
        kept: Vec<Entry>,
        base: Option<String>,
        auth: &Auth,
    ) -> Result<Desired, MergeError> {
        if let Some(base) = base {
            if let Some(original) = self.upstream.get_manifest(repo, &base, auth).await? {
                return Ok(Desired::Restore(original));
            }
            tracing::warn!(repo, digest = %base, "the manifest this index amended is gone from the registry");
        }
        if kept.is_empty() {
            return Ok(Desired::Delete);
        }
        // The original is gone from the registry: list what was kept of it.
        Ok(Desired::Index(self.build(self.rule(repo), &kept, None)?))
    }
}

/// The entries the current index lists for sources these credentials may
/// not read: kept as they are, so a client scoped to its own repository
/// never drops an arch that others pushed.
fn unreadable_entries(snapshot: &Snapshot, current: Option<&FetchedManifest>) -> Vec<Entry> {
    let unreadable: BTreeSet<&str> = snapshot
        .values()
        .filter(|c| c.digest.is_none())
        .map(|c| c.arch.tag.as_str())
        .collect();
    let Some(current) = current.filter(|_| !unreadable.is_empty()) else {
        return Vec::new();
    };
    let Ok(Manifest::Index(idx)) =
        crate::index::parse_manifest(Some(&current.media_type), &current.bytes)
    else {
        return Vec::new();
    };
    crate::index::index_entries(&current.digest, &idx)
        .into_iter()
        .filter(|e| matches!(&e.source, EntrySource::Managed { arch_tag } if unreadable.contains(arch_tag.as_str())))
        .collect()
}
