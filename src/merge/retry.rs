//! Background retries of a merge that failed after its push was answered:
//! with backoff, one loop per target, until it converges, the registry
//! refuses the credentials, or the retry window closes (then `archmerge
//! reconcile` or the next push repairs it).
//!
//! A client's bearer token expires within minutes, so a retry carries
//! archmerge's own credentials (`upstream_auth`) when they are configured,
//! and the client's otherwise; when those are refused, the retries stop
//! with a log line that says so and `archmerge_merges_total{outcome=
//! "abandoned_credentials"}`. A merge whose first try the registry refused
//! for its credentials is not retried at all (`outcome="refused"`): a retry
//! with archmerge's own would write what the client could not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{MergeError, Merger, Update};
use crate::upstream::Auth;

/// First delay, cap, and how long to keep trying.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);
const RETRY_FOR: Duration = Duration::from_secs(30 * 60);

impl Merger {
    /// Keeps retrying a failed target in the background, with backoff, until
    /// it converges or the retry window closes. One loop per target.
    ///
    /// A merge the registry refused for the credentials it carried is not
    /// retried with others: archmerge never writes what the pushing client
    /// could not, unless the rule says `write_with = "archmerge"` (then it
    /// already carried archmerge's own).
    pub(super) fn spawn_retry(
        self: &Arc<Self>,
        repo: &str,
        target: &str,
        auth: &Auth,
        error: &MergeError,
    ) {
        if matches!(error, MergeError::Upstream(e) if e.is_auth()) {
            self.metrics.merge("refused");
            tracing::error!(repo, reference = target, error = %error, "the registry refused this merge the credentials it carried; not retried (see write_with in the rules)");
            return;
        }
        let key = (repo.to_owned(), target.to_owned());
        if self.retrying.insert(key.clone(), ()).is_some() {
            return;
        }
        let this = self.clone();
        let auth = self.own.clone().unwrap_or_else(|| auth.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + RETRY_FOR;
            let mut delay = RETRY_FIRST;
            loop {
                tokio::time::sleep(delay).await;
                this.metrics.merge_retries.inc();
                let update = Update {
                    repo: &key.0,
                    target: &key.1,
                    auth: &auth,
                    since: Instant::now(),
                    pushed: None,
                    ahead: None,
                };
                match this.converge(update).await {
                    Ok(outcome) => {
                        this.metrics.merge(outcome.label());
                        tracing::info!(repo = %key.0, reference = %key.1, outcome = outcome.label(), "merge converged on retry");
                        break;
                    }
                    Err(e)
                        if Instant::now() < deadline
                            && !matches!(e, MergeError::Upstream(ref u) if u.is_auth()) =>
                    {
                        tracing::warn!(repo = %key.0, reference = %key.1, error = %e, retry_in_s = delay.as_secs(), "merge retry failed");
                        delay = (delay * 2).min(RETRY_CAP);
                    }
                    Err(MergeError::Upstream(e)) if e.is_auth() => {
                        this.metrics.merge("abandoned_credentials");
                        let whose = if this.own.is_some() {
                            "archmerge's own credentials (upstream_auth) were refused"
                        } else {
                            "the pushing client's credentials were refused (a token expires); configure upstream_auth so retries use archmerge's own"
                        };
                        tracing::error!(repo = %key.0, reference = %key.1, error = %e, cause = whose, "merge retries stopped; run `archmerge reconcile`");
                        break;
                    }
                    Err(e) => {
                        this.metrics.merge("abandoned");
                        tracing::error!(repo = %key.0, reference = %key.1, error = %e, "merge retries given up; run `archmerge reconcile`");
                        break;
                    }
                }
            }
            this.retrying.remove(&key);
        });
    }
}
