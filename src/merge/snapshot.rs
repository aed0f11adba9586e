//! Taking a target's snapshot — its arch tags and the digest each points at
//! — in one round trip when archmerge has seen the target before: the arch
//! tags it had last time are HEADed while the tags are listed. Why a guess
//! still gives an exact snapshot: `docs/design.md`, "Convergence".

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::{Child, MergeError, Merger, Snapshot};
use crate::bounded;
use crate::rules::ArchTag;
use crate::upstream::{Auth, FetchedManifest, UpstreamError};

/// Tags past which a repository's listing is not asked for again: its
/// targets' arch tags are HEADed by name instead.
const LARGE_REPOSITORY: usize = 1_000;

/// A manifest the registry has just accepted at a tag.
#[derive(Clone, Copy, Debug)]
pub struct Pushed<'a> {
    /// The repository it was pushed to (a per-arch repository under a
    /// repository pattern).
    pub repo: &'a str,
    /// The tag it was pushed to.
    pub tag: &'a str,
    /// The manifest.
    pub manifest: &'a FetchedManifest,
}

/// What a HEAD of one source found: absent (`None`), or its digest, which
/// is itself `None` when these credentials may not read that per-arch
/// repository (unknown, not empty: `plan` keeps what the index already
/// says about it).
type Found = Result<Option<Option<String>>, UpstreamError>;

impl Merger {
    /// A snapshot, HEADing the arch tags of `expected` (by default the
    /// target's last snapshot) while the tags are listed, and taking the
    /// digest of `pushed` as the registry's answer gave it.
    pub(super) async fn snapshot_with(
        &self,
        repo: &str,
        target: &str,
        auth: &Auth,
        pushed: Option<Pushed<'_>>,
        expected: Option<Arc<Snapshot>>,
    ) -> Result<Snapshot, MergeError> {
        let began = Instant::now();
        let key = (repo.to_owned(), target.to_owned());
        let expected = expected.or_else(|| self.last_snapshots.get(&key));
        let known = |source: &str, tag: &str| {
            pushed
                .filter(|p| p.repo == source && p.tag == tag)
                .map(|p| p.manifest.digest.clone())
        };
        let rule = self.rule(repo);

        // Under repository patterns, the target tag of each per-arch
        // repository: known without a listing.
        let patterned =
            rule.source_repositories(repo)
                .into_iter()
                .map(|(source, alias, platform)| {
                    let arch = ArchTag {
                        tag: format!("{source}:{target}"),
                        alias,
                        platform,
                        target: target.to_owned(),
                    };
                    async move {
                        let found = match known(&source, target) {
                            Some(d) => Ok(Some(Some(d))),
                            None => self.head(repo, &source, target, auth).await,
                        };
                        (source, arch, found)
                    }
                });
        // In a large repository (its last listing had more than
        // LARGE_REPOSITORY tags) the listing costs the registry more than
        // asking for each tag the target could have: those are HEADed
        // instead, and what exists of them is exactly what the listing would
        // show (`Rule::candidates`).
        let candidates = self
            .large_repositories
            .contains_key(repo)
            .then(|| rule.candidates(target));
        // The arch tags of this repository the target had last time (or
        // could have), HEADed while the tags are listed.
        let early: Vec<String> = match &candidates {
            Some(c) => c
                .iter()
                .filter(|a| known(repo, &a.tag).is_none())
                .map(|a| a.tag.clone())
                .collect(),
            None => expected
                .iter()
                .flat_map(|s| s.values())
                .filter(|c| c.repo == repo && known(repo, &c.arch.tag).is_none())
                .map(|c| c.arch.tag.clone())
                .collect(),
        };
        let early = early.into_iter().map(|tag| async move {
            let found = self.head(repo, repo, &tag, auth).await;
            (tag, found)
        });
        let listing = async {
            match candidates {
                Some(c) => Ok(c),
                None => {
                    let tags = self
                        .listings
                        .tags(&self.upstream, repo, auth, began)
                        .await?;
                    if tags.len() > LARGE_REPOSITORY {
                        self.large_repositories.insert(repo.to_owned(), ());
                    }
                    Ok::<_, MergeError>(
                        rule.arch_tags_for_target(tags.iter().map(String::as_str), target),
                    )
                }
            }
        };
        let (arch_tags, early, patterned) =
            tokio::join!(listing, bounded::all(early), bounded::all(patterned),);
        let mut early: HashMap<String, Found> = early.into_iter().collect();

        // Every arch tag the listing shows: its digest from the push, from
        // the early HEAD, or from a HEAD now (an arch tag not expected).
        let local = arch_tags?.into_iter().map(|arch| {
            let found = early.remove(&arch.tag);
            let pushed = known(repo, &arch.tag);
            async move {
                let found = match (pushed, found) {
                    (Some(d), _) => Ok(Some(Some(d))),
                    (None, Some(found)) => found,
                    (None, None) => self.head(repo, repo, &arch.tag, auth).await,
                };
                (repo.to_owned(), arch, found)
            }
        });
        let local = bounded::all(local).await;

        let mut snapshot = Snapshot::new();
        for (source, arch, found) in local.into_iter().chain(patterned) {
            if let Some(digest) = found? {
                let child = Child {
                    repo: source,
                    arch,
                    digest,
                };
                snapshot.insert(child.arch.tag.clone(), child);
            }
        }
        self.last_snapshots.insert(key, Arc::new(snapshot.clone()));
        Ok(snapshot)
    }

    /// HEAD of one source's tag.
    async fn head(&self, repo: &str, source: &str, tag: &str, auth: &Auth) -> Found {
        match self.upstream.head_manifest(source, tag, auth).await {
            Err(e) if e.is_auth() && source != repo => Ok(Some(None)),
            other => Ok(other?.map(Some)),
        }
    }

    /// A snapshot and what the target tag holds, read at the same time,
    /// after `pushed` was accepted: its image config is loaded meanwhile,
    /// for the plan that follows, and when it was pushed at the target
    /// itself it is what the target holds.
    pub(super) async fn survey_with(
        &self,
        repo: &str,
        target: &str,
        auth: &Auth,
        pushed: Option<Pushed<'_>>,
    ) -> Result<(Snapshot, Option<FetchedManifest>), MergeError> {
        let at_target = pushed.filter(|p| p.repo == repo && p.tag == target);
        let current = async {
            match at_target {
                Some(p) => Ok(Some(p.manifest.clone())),
                None => self.upstream.get_manifest(repo, target, auth).await,
            }
        };
        // The pushed image's config is needed when it is an arch tag's; one
        // pushed at the target itself is read only if the target has arch
        // tags.
        let arch_push = pushed.filter(|_| at_target.is_none());
        let (snapshot, current, ()) = tokio::join!(
            self.snapshot_with(repo, target, auth, pushed, None),
            current,
            self.warm(arch_push, auth),
        );
        Ok((snapshot?, current?))
    }
}
