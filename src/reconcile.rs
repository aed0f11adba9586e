//! Reconcile: build or repair the indexes for arch tags already in the
//! registry — a backfill, or a repair after pushes that bypassed archmerge
//! or after a crash.
//!
//! Called by `archmerge reconcile`, by the admin `POST /reconcile`, and by
//! the registry webhook. It uses archmerge's own upstream credentials and
//! the same [`Merger::converge`] a push uses, so the result is the same
//! canonical index. Targets are found two ways: targets of the arch tags
//! present, and tags holding an index of archmerge's whose arch tags are all
//! gone (so that those fall back as a delete through archmerge would).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use serde::Serialize;

use crate::index::{parse_manifest, read_target_index, Manifest, TargetState};
use crate::merge::{Merger, Outcome};
use crate::upstream::{Auth, Upstream, UpstreamError};

/// Targets of one repository rebuilt at once.
const JOBS: usize = 8;

/// What a reconcile run did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// Repositories looked at.
    pub repositories: usize,
    /// Targets whose index was created.
    pub created: usize,
    /// Targets whose index was rewritten (or restored, or removed).
    pub updated: usize,
    /// Targets that were already right.
    pub unchanged: usize,
    /// Targets that failed, with the reason.
    pub failed: Vec<Failure>,
}

/// One target that could not be reconciled.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Failure {
    /// `repo:target`, or the repository when listing it failed.
    pub target: String,
    /// Why.
    pub error: String,
}

/// One finished target, for progress output.
pub struct Progress<'a> {
    /// How many of the repository's targets are finished (they finish in
    /// any order).
    pub done: usize,
    /// Targets of the repository.
    pub of: usize,
    /// The repository.
    pub repo: &'a str,
    /// The target tag.
    pub target: &'a str,
    /// What happened.
    pub result: Result<Outcome, String>,
}

/// Reconciles `repos` (the whole catalog when empty).
pub async fn run(
    merger: &Arc<Merger>,
    upstream: &Upstream,
    repos: &[String],
    auth: &Auth,
    mut progress: impl FnMut(&Progress<'_>),
) -> Result<Summary, UpstreamError> {
    let repos = if repos.is_empty() {
        upstream.list_catalog(auth).await?
    } else {
        repos.to_vec()
    };
    let mut summary = Summary::default();
    for repo in &repos {
        summary.repositories += 1;
        let targets = match targets(merger, upstream, repo, auth).await {
            Ok(t) => t,
            Err(e) => {
                summary.failed.push(Failure {
                    target: repo.clone(),
                    error: e.to_string(),
                });
                continue;
            }
        };
        let of = targets.len();
        let mut done = 0;
        // Targets are independent (each converges under its own lock), so
        // several are rebuilt at once: a rebuild mostly waits on the
        // registry.
        let rebuilds: Vec<_> = targets
            .iter()
            .map(|(target_repo, target)| async move {
                let result = merger
                    .converge(target_repo, target, auth, Instant::now(), None)
                    .await
                    .map_err(|e| e.to_string());
                (target_repo, target, result)
            })
            .collect();
        let mut results = futures_util::stream::iter(rebuilds).buffer_unordered(JOBS);
        while let Some((target_repo, target, result)) = results.next().await {
            done += 1;
            match &result {
                Ok(Outcome::Created) => summary.created += 1,
                Ok(Outcome::Unchanged | Outcome::Nothing | Outcome::Coalesced) => {
                    summary.unchanged += 1
                }
                Ok(_) => summary.updated += 1,
                Err(e) => summary.failed.push(Failure {
                    target: format!("{target_repo}:{target}"),
                    error: e.clone(),
                }),
            }
            progress(&Progress {
                done,
                of,
                repo: target_repo,
                target,
                result,
            });
        }
    }
    Ok(summary)
}

/// The targets a repository feeds, as (repository, tag): those of its arch
/// tags; under a repository pattern, the target repository's tag; and tags
/// holding an index of archmerge's (found by reading each other tag).
async fn targets(
    merger: &Merger,
    upstream: &Upstream,
    repo: &str,
    auth: &Auth,
) -> Result<Vec<(String, String)>, UpstreamError> {
    let tags = upstream.list_tags(repo, auth).await?;
    let rule = merger.rule(repo);
    let mut targets = BTreeSet::new();
    let mut others = Vec::new();
    for tag in &tags {
        if let Some(a) = rule.match_tag(tag) {
            targets.insert((repo.to_owned(), a.target));
        } else if let Some((target_repo, a)) = rule.match_repository(repo, tag) {
            targets.insert((target_repo, a.target));
        } else {
            others.push(tag);
        }
    }
    for tag in others {
        if targets.contains(&(repo.to_owned(), tag.clone())) {
            continue;
        }
        let Some(m) = upstream.get_manifest(repo, tag, auth).await? else {
            continue;
        };
        if let Ok(Manifest::Index(idx)) = parse_manifest(Some(&m.media_type), &m.bytes) {
            if matches!(read_target_index(&m.digest, &idx), TargetState::Ours { .. }) {
                targets.insert((repo.to_owned(), tag.clone()));
            }
        }
    }
    Ok(targets.into_iter().collect())
}
