//! The registry's notification webhook: writes made straight at the
//! registry (bypassing archmerge) bring their targets up to date too.
//!
//! distribution POSTs an envelope
//! (`application/vnd.docker.distribution.events.v1+json`) of events to the
//! admin listener's `/events`. [`parse`] reads manifest pushes and deletes
//! and asks the rules what each touches ([`crate::rules::Rule::touches`],
//! the same answer a push through archmerge gets); [`Queue`] acts on them
//! with archmerge's own credentials, in the background: the registry only
//! needs a quick 2xx, and retries deliveries that fail. Writes that came
//! through archmerge arrive here too; their rebuild finds the index already
//! right and writes nothing.

use std::collections::{BTreeMap, BTreeSet};
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
    /// The targets the events touch, and how, each with the pushes to await
    /// before it is rebuilt.
    pub touches: BTreeMap<Touch, BTreeSet<PushedTag>>,
}

/// A push an event reports, as (repo, tag, digest): distribution sends the
/// event from inside the manifest save, *before* it links the tag, so it is
/// awaited (bounded) before the rebuild that should see it.
pub type PushedTag = (String, String, String);

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
            // A delete by digest: distribution sends one more event per tag
            // the delete took, which says exactly what it touched; this one
            // says nothing more, and repairing every target of the
            // repository for it would cost the registry a read of every tag.
            ("delete", None) => continue,
            _ => continue,
        };
        let pushed = match write {
            Write::Put(tag) if crate::oci::is_valid_digest(&t.digest) => {
                Some((t.repository.clone(), tag.to_owned(), t.digest.clone()))
            }
            _ => None,
        };
        for touch in rules.for_repo(&t.repository).touches(&t.repository, write) {
            work.touches
                .entry(touch)
                .or_default()
                .extend(pushed.clone());
        }
    }
    Ok(work)
}

/// Targets waiting for the webhook's workers, at most.
pub const QUEUE: usize = 512;

/// Targets the webhook's workers rebuild at once.
const WORKERS: usize = 4;

/// The webhook's bounded work: touched targets wait here, coalesced (a
/// target touched again while it waits is queued once), and a few workers
/// rebuild them with archmerge's own credentials. An envelope that would
/// overflow the queue is refused whole ([`Full`]); the registry delivers it
/// again later.
pub struct Queue {
    pending: std::sync::Mutex<Pending>,
    wake: tokio::sync::Notify,
}

/// What waits: each target, and the pushes to await before rebuilding it.
/// Behind a `std::sync::Mutex`: it is never held across an `.await`.
type Pending = BTreeMap<Touch, BTreeSet<PushedTag>>;

/// The queue has no room for an envelope.
#[derive(Debug, thiserror::Error)]
#[error("{pending} targets already wait for the webhook's workers (at most {QUEUE})")]
pub struct Full {
    /// Targets waiting.
    pub pending: usize,
}

impl Queue {
    /// An empty queue and its workers, which run until the process ends.
    pub fn start(app: Arc<App>) -> Arc<Queue> {
        let queue = Arc::new(Queue {
            pending: std::sync::Mutex::new(Pending::default()),
            wake: tokio::sync::Notify::new(),
        });
        for _ in 0..WORKERS {
            tokio::spawn(queue.clone().work(app.clone()));
        }
        queue
    }

    /// Queues what an envelope touches, or refuses it whole when it would
    /// not fit.
    pub fn push(&self, work: Work) -> Result<(), Full> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let new = work.touches.keys().filter(|t| !p.contains_key(t)).count();
        if p.len() + new > QUEUE {
            return Err(Full { pending: p.len() });
        }
        for (touch, pushed) in work.touches {
            p.entry(touch).or_default().extend(pushed);
        }
        drop(p);
        self.wake.notify_waiters();
        self.wake.notify_one();
        Ok(())
    }

    /// Targets waiting now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// One worker: takes a target (and the pushes it must wait for) and
    /// brings it up to date, until the process ends.
    async fn work(self: Arc<Self>, app: Arc<App>) {
        let auth = Auth::own(app.config.upstream_credentials.as_ref());
        loop {
            let next = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_first();
            let Some((touch, pushed)) = next else {
                self.wake.notified().await;
                continue;
            };
            let waits = pushed
                .iter()
                .map(|(repo, tag, digest)| tag_points_at(&app, repo, tag, digest, &auth));
            bounded::all(waits).await;
            // Failures are logged, counted and retried inside.
            app.indexes
                .after_write(Accepted {
                    touches: std::slice::from_ref(&touch),
                    auth: &auth,
                    since: Instant::now(),
                    pushed: None,
                    ahead: None,
                })
                .await;
        }
    }
}

/// Waits (bounded) until `repo:tag` points at `digest`: the registry may
/// notify before it has linked the tag.
async fn tag_points_at(app: &App, repo: &str, tag: &str, digest: &str, auth: &Auth) {
    // The registry stores the manifest before it notifies: one that is not
    // there (deleted since, or an event made up) has nothing to wait for.
    if !matches!(
        app.upstream.head_manifest(repo, digest, auth).await,
        Ok(Some(_))
    ) {
        return;
    }
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
        Touch::target(repo, target, how)
    }

    #[test]
    fn manifest_pushes_and_deletes_touch_what_the_rules_say() {
        let body = br#"{"events":[
          {"action":"push","target":{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","repository":"app","tag":"aarch64_v1","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}},
          {"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"app","tag":"v1"}},
          {"action":"push","target":{"mediaType":"application/octet-stream","repository":"app","digest":"sha256:2"}},
          {"action":"pull","target":{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","repository":"app","tag":"x86_64"}},
          {"action":"delete","target":{"repository":"other","digest":"sha256:3"}},
          {"action":"delete","target":{"repository":"other","tag":"x86_64_v9"}},
          {"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"BAD","tag":"x86_64"}}
        ]}"#;
        let work = parse(body, &rules()).unwrap();
        let touches: Vec<_> = work.touches.keys().cloned().collect();
        assert_eq!(
            touches,
            vec![
                // The arch push, and the push at the target itself (a new base).
                target("app", "v1", How::ArchChanged),
                target("app", "v1", How::NewBase),
                // The delete by digest says which tags it took in events of
                // their own.
                target("other", "v9", How::ArchChanged),
            ]
        );
        // Only the arch push named a digest: its rebuild awaits its tag.
        let awaited: Vec<_> = work
            .touches
            .values()
            .map(|p| p.iter().map(|p| p.1.as_str()).collect::<Vec<_>>())
            .collect();
        assert_eq!(awaited, [vec!["aarch64_v1"], vec![], vec![]]);
    }

    #[test]
    fn the_queue_coalesces_and_refuses_what_does_not_fit() {
        let queue = Queue {
            pending: std::sync::Mutex::new(Pending::default()),
            wake: tokio::sync::Notify::new(),
        };
        let work = |n: usize| Work {
            touches: (0..n)
                .map(|i| {
                    (
                        target("app", &format!("v{i}"), How::NewBase),
                        BTreeSet::new(),
                    )
                })
                .collect(),
        };
        queue.push(work(QUEUE - 1)).unwrap();
        // The same targets again take no room.
        queue.push(work(QUEUE - 1)).unwrap();
        assert_eq!(queue.len(), QUEUE - 1);
        queue.push(work(QUEUE)).unwrap();
        assert!(queue.push(work(QUEUE + 1)).is_err());
        assert_eq!(queue.len(), QUEUE);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(b"not json", &rules()).is_err());
        assert_eq!(parse(b"{}", &rules()).unwrap(), Work::default());
    }
}
