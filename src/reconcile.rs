//! Reconcile: build or repair the indexes for arch tags already in the
//! registry — a backfill, or a repair after pushes that bypassed archmerge
//! or after a crash.
//!
//! Called by `archmerge reconcile`, by the admin `POST /reconcile`, and for
//! deletes whose targets are unknown (a webhook delete by digest). It goes
//! through the same [`Merger::update`] a push does (same metrics, same
//! retries), so the result is the same canonical index. Targets are found
//! with the rules' one answer ([`crate::rules::Rule::role`]): targets of the
//! arch tags present (in the repository, or under a repository pattern in
//! the target repository), and tags holding an index of archmerge's whose
//! arch tags are all gone (so that those fall back as a delete through
//! archmerge would).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use serde::Serialize;

use crate::bounded;
use crate::index::{parse_manifest, read_target_index, Manifest, TargetState};
use crate::merge::{Merger, Outcome, Update};
use crate::rules::Role;
use crate::upstream::{Auth, UpstreamError};

/// Targets of one repository rebuilt at once.
const JOBS: usize = 8;

/// Which targets a run rebuilds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every target: created where absent (backfill, repair).
    All,
    /// Only targets whose tag exists now: a target whose index was deleted
    /// stays deleted (SPEC §3).
    Existing,
}

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
    repos: &[String],
    scope: Scope,
    auth: &Auth,
    mut progress: impl FnMut(&Progress<'_>),
) -> Result<Summary, UpstreamError> {
    let repos = if repos.is_empty() {
        merger.upstream().list_catalog(auth).await?
    } else {
        repos.to_vec()
    };
    let mut summary = Summary::default();
    for repo in &repos {
        summary.repositories += 1;
        let targets = match targets(merger, repo, scope, auth).await {
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
                let update = Update {
                    repo: target_repo,
                    target,
                    auth,
                    since: Instant::now(),
                    pushed: None,
                    ahead: None,
                };
                let result = merger.update(update).await.map_err(|e| e.to_string());
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
/// tags (under a repository pattern, the target repository's tag), and tags
/// holding an index of archmerge's (found by reading each other tag). With
/// [`Scope::Existing`], only those whose tag exists now.
async fn targets(
    merger: &Merger,
    repo: &str,
    scope: Scope,
    auth: &Auth,
) -> Result<Vec<(String, String)>, UpstreamError> {
    let upstream = merger.upstream();
    let tags = upstream.list_tags(repo, auth).await?;
    let rule = merger.rule(repo);
    let mut targets = BTreeSet::new();
    let mut others = Vec::new();
    for tag in &tags {
        match rule.role(repo, tag) {
            Role::Arch { repo, arch } => {
                targets.insert((repo, arch.target));
            }
            Role::Target => others.push(tag),
            Role::Untouched => {}
        }
    }
    let others = others
        .into_iter()
        .filter(|tag| !targets.contains(&(repo.to_owned(), (*tag).clone())));
    let reads = others.map(|tag| async move {
        let ours = match upstream.get_manifest(repo, tag, auth).await? {
            None => false,
            Some(m) => matches!(
                parse_manifest(Some(&m.media_type), &m.bytes),
                Ok(Manifest::Index(idx)) if matches!(read_target_index(&m.digest, &idx), TargetState::Ours { .. })
            ),
        };
        Ok::<_, UpstreamError>(ours.then(|| (repo.to_owned(), tag.clone())))
    });
    targets.extend(bounded::try_all(reads).await?.into_iter().flatten());
    if scope == Scope::Existing {
        // Which tags each target repository has: this repository's listing
        // is at hand; a target repository of a repository pattern is listed.
        let mut present: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        present.insert(repo.to_owned(), tags.iter().cloned().collect());
        for (target_repo, _) in &targets {
            if !present.contains_key(target_repo) {
                let listed = upstream.list_tags(target_repo, auth).await?;
                present.insert(target_repo.clone(), listed.into_iter().collect());
            }
        }
        targets.retain(|(r, t)| present.get(r).is_some_and(|tags| tags.contains(t)));
    }
    Ok(targets.into_iter().collect())
}
