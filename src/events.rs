//! The registry's notification webhook: writes made straight at the
//! registry (bypassing archmerge) bring their targets up to date too.
//!
//! distribution POSTs an envelope
//! (`application/vnd.docker.distribution.events.v1+json`) of events to the
//! admin listener's `/events`. [`parse`] reads manifest pushes and deletes
//! and asks the rules what each touches ([`crate::rules::Rule::touches`],
//! the same answer a push through archmerge gets); [`apply`] acts on them
//! with archmerge's own credentials, in the background: the registry only
//! needs a quick 2xx, and retries deliveries that fail. Writes that came
//! through archmerge arrive here too; their rebuild finds the index already
//! right and writes nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::app::{Accepted, App};
use crate::bounded::{self, Backoff};
use crate::rules::{RuleSet, Touch, Write};
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
    /// The targets the events touch, and how.
    pub touches: BTreeSet<Touch>,
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
        let tag = t.tag.as_ref().filter(|tag| crate::oci::is_valid_tag(tag));
        let write = match (e.action.as_str(), tag) {
            ("push", Some(tag)) if manifest => Write::Put(tag),
            ("delete", Some(tag)) => Write::Deleted(std::slice::from_ref(tag)),
            ("delete", None) => Write::DeletedUnknown,
            _ => continue,
        };
        let touches = rules.for_repo(&t.repository).touches(&t.repository, write);
        if let (Write::Put(tag), false) = (write, touches.is_empty()) {
            if crate::oci::is_valid_digest(&t.digest) {
                work.pushed
                    .insert((t.repository.clone(), tag.to_owned(), t.digest.clone()));
            }
        }
        work.touches.extend(touches);
    }
    Ok(work)
}

/// Acts on the work in the background, with archmerge's own credentials.
pub fn apply(app: &Arc<App>, work: Work) {
    if work.touches.is_empty() {
        return;
    }
    let app = app.clone();
    tokio::spawn(async move {
        let auth = Auth::own(app.config.upstream_credentials.as_ref());
        let waits = work
            .pushed
            .iter()
            .map(|(repo, tag, digest)| tag_points_at(&app, repo, tag, digest, &auth));
        bounded::all(waits).await;
        let touches: Vec<Touch> = work.touches.into_iter().collect();
        // Failures are logged, counted and retried inside.
        app.indexes
            .after_write(Accepted {
                touches: &touches,
                auth: &auth,
                since: Instant::now(),
                pushed: None,
            })
            .await;
    });
}

/// Waits (bounded) until `repo:tag` points at `digest`: the registry may
/// notify before it has linked the tag.
async fn tag_points_at(app: &App, repo: &str, tag: &str, digest: &str, auth: &Auth) {
    let deadline = Instant::now() + TAG_WAIT;
    let mut backoff = Backoff::new(Duration::from_millis(20), 2, Duration::from_millis(500));
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
            _ => backoff.wait().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{How, Rule, TagRules};

    fn rules() -> RuleSet {
        RuleSet::single(Rule::from_tags(TagRules::default()))
    }

    fn target(repo: &str, target: &str, how: How) -> Touch {
        Touch::Target {
            repo: repo.into(),
            target: target.into(),
            how,
        }
    }

    #[test]
    fn manifest_pushes_and_deletes_touch_what_the_rules_say() {
        let body = br#"{"events":[
          {"action":"push","target":{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","repository":"app","tag":"aarch64_v1","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}},
          {"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"app","tag":"v1"}},
          {"action":"push","target":{"mediaType":"application/octet-stream","repository":"app","digest":"sha256:2"}},
          {"action":"pull","target":{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","repository":"app","tag":"x86_64"}},
          {"action":"delete","target":{"repository":"other","digest":"sha256:3"}},
          {"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"BAD","tag":"x86_64"}}
        ]}"#;
        let work = parse(body, &rules()).unwrap();
        let touches: Vec<_> = work.touches.into_iter().collect();
        assert_eq!(
            touches,
            vec![
                // The arch push, and the push at the target itself (a new base).
                target("app", "v1", How::ArchChanged),
                target("app", "v1", How::NewBase),
                Touch::ExistingTargets {
                    repo: "other".into()
                },
            ]
        );
        let pushed: Vec<_> = work.pushed.into_iter().map(|p| p.1).collect();
        assert_eq!(pushed, ["aarch64_v1"]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(b"not json", &rules()).is_err());
        assert_eq!(parse(b"{}", &rules()).unwrap(), Work::default());
    }
}
