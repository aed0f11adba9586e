//! The registry's notification webhook: arch tags pushed or deleted
//! straight at the registry (bypassing archmerge) are merged too.
//!
//! distribution POSTs an envelope
//! (`application/vnd.docker.distribution.events.v1+json`) of events to the
//! admin listener's `/events`. [`parse`] picks out what matters — manifest
//! pushes of arch tags, and manifest deletes — and [`apply`] acts on them
//! with archmerge's own credentials, in the background: the registry only
//! needs a quick 2xx, and retries deliveries that fail. Pushes that came
//! through archmerge arrive here too; their rebuild finds the index already
//! right and writes nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::app::App;
use crate::config::Mode;
use crate::rules::RuleSet;
use crate::upstream::Auth;

/// How long a pushed tag is awaited before its target is rebuilt anyway.
const TAG_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(default)]
    action: String,
    #[serde(default)]
    target: Target,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Target {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    repository: String,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    digest: String,
}

/// What the events ask archmerge to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// (repo, target) to rebuild: an arch tag of it was pushed or deleted.
    pub targets: BTreeSet<(String, String)>,
    /// Repositories to reconcile whole: a manifest was deleted by digest,
    /// and the event does not say which tags listed it.
    pub repos: BTreeSet<String>,
    /// Pushed (repo, tag, digest): distribution sends the event from inside
    /// the manifest save, *before* it links the tag, so each is awaited
    /// (bounded) before the rebuild that should see it.
    pub pushed: BTreeSet<(String, String, String)>,
}

/// Reads an envelope; events that are not about manifests are ignored.
pub fn parse(body: &[u8], rules: &RuleSet) -> Result<Work, serde_json::Error> {
    let envelope: Envelope = serde_json::from_slice(body)?;
    let mut work = Work::default();
    for e in envelope.events {
        let t = e.target;
        let manifest = t.media_type.contains("manifest") || t.media_type.contains("image.index");
        if t.repository.is_empty() || !crate::oci::is_valid_name(&t.repository) {
            continue;
        }
        let rule = rules.for_repo(&t.repository);
        let target = |tag: &str| {
            rule.match_tag(tag)
                .map(|a| (t.repository.clone(), a.target))
                .or_else(|| {
                    rule.match_repository(&t.repository, tag)
                        .map(|(repo, a)| (repo, a.target))
                })
        };
        match (e.action.as_str(), &t.tag) {
            ("push", Some(tag)) if manifest => {
                if let Some(target) = target(tag) {
                    work.targets.insert(target);
                    if crate::oci::is_valid_digest(&t.digest) {
                        work.pushed
                            .insert((t.repository.clone(), tag.clone(), t.digest.clone()));
                    }
                }
            }
            ("delete", Some(tag)) => work.targets.extend(target(tag)),
            ("delete", None) => {
                work.repos.insert(t.repository);
            }
            _ => {}
        }
    }
    Ok(work)
}

/// Acts on the work in the background, with archmerge's own credentials.
pub fn apply(app: &Arc<App>, work: Work) {
    if work.targets.is_empty() && work.repos.is_empty() {
        return;
    }
    let app = app.clone();
    tokio::spawn(async move {
        let auth = Auth::own(app.config.upstream_credentials.as_ref());
        let waits = work
            .pushed
            .iter()
            .map(|(repo, tag, digest)| tag_points_at(&app, repo, tag, digest, &auth));
        futures_util::future::join_all(waits).await;
        for (repo, target) in &work.targets {
            match app.config.mode {
                Mode::Write => {
                    // Failures are logged, counted and retried inside.
                    let _ = app
                        .merger
                        .update(repo, target, &auth, Instant::now(), None)
                        .await;
                }
                Mode::Serve => app.aggregates.invalidate(repo, target).await,
            }
        }
        for repo in &work.repos {
            match app.config.mode {
                Mode::Write => {
                    let repos = [repo.clone()];
                    let done =
                        crate::reconcile::run(&app.merger, &app.upstream, &repos, &auth, |_| {})
                            .await;
                    if let Err(e) = done {
                        tracing::warn!(repo, error = %e, "reconcile after a delete event failed");
                    }
                }
                // Aggregates expire within a second by themselves.
                Mode::Serve => {}
            }
        }
    });
}

/// Waits (bounded) until `repo:tag` points at `digest`: the registry may
/// notify before it has linked the tag.
async fn tag_points_at(app: &App, repo: &str, tag: &str, digest: &str, auth: &Auth) {
    let deadline = Instant::now() + TAG_WAIT;
    let mut delay = Duration::from_millis(20);
    loop {
        match app.upstream.head_manifest(repo, tag, auth).await {
            Ok(Some(d)) if d == digest => return,
            // Not linked yet, or still the digest before this push (a tag
            // moved on by a later push is waited out too: bounded, and in
            // the background).
            _ if Instant::now() >= deadline => {
                tracing::warn!(repo, reference = tag, %digest, "pushed tag never appeared; merging what is there");
                return;
            }
            _ => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Rule;
    use crate::rules::TagRules;

    fn rules() -> RuleSet {
        RuleSet::single(Rule::from_tags(TagRules::default()))
    }

    #[test]
    fn picks_manifest_pushes_of_arch_tags_and_deletes() {
        let body = br#"{"events":[
          {"action":"push","target":{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","repository":"app","tag":"aarch64_v1","digest":"sha256:1"}},
          {"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"app","tag":"v1"}},
          {"action":"push","target":{"mediaType":"application/octet-stream","repository":"app","digest":"sha256:2"}},
          {"action":"pull","target":{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","repository":"app","tag":"x86_64"}},
          {"action":"delete","target":{"repository":"other","digest":"sha256:3"}},
          {"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"BAD","tag":"x86_64"}}
        ]}"#;
        let work = parse(body, &rules()).unwrap();
        let targets: Vec<_> = work.targets.into_iter().collect();
        assert_eq!(targets, vec![("app".to_owned(), "v1".to_owned())]);
        assert_eq!(
            work.repos.into_iter().collect::<Vec<_>>(),
            vec!["other".to_owned()]
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(b"not json", &rules()).is_err());
        assert_eq!(parse(b"{}", &rules()).unwrap(), Work::default());
    }
}
