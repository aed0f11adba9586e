//! Prometheus metrics: every family archmerge exports, registered in one
//! place.
//!
//! Labels are of bounded cardinality only (method, route kind, status,
//! outcome, cache name) — never a repository, tag or digest, which are
//! unbounded and belong in logs. The admin listener renders
//! [`Metrics::encode`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a finished client request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method (GET, PUT, …; anything unusual is `OTHER`).
    pub method: &'static str,
    /// Route kind from `route::Route::kind`.
    pub route: &'static str,
    /// Response status code.
    pub status: u16,
}

/// Labels of one merge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// What the merge did: written, unchanged, coalesced, removed, restored,
    /// waiting, failed.
    pub outcome: &'static str,
}

/// Labels of a cache lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// Which cache.
    pub cache: &'static str,
}

/// Labels of a request archmerge sent to the registry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// HTTP method ([`method_label`]).
    pub method: &'static str,
}

/// Labels of a retried registry request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// `status_5xx`, `unreachable` (GET/HEAD) or `blob_unknown` (a manifest
    /// PUT whose blobs then proved to exist).
    pub reason: &'static str,
}

/// All metric families.
pub struct Metrics {
    registry: Registry,
    /// Client requests by method, route kind and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Merges by outcome.
    pub merges: Family<OutcomeLabels, Counter>,
    /// Rebuilds that started from a read made while the client's push was
    /// on its way: `used`, and `read_again` when that read could not say
    /// the target was right.
    pub reads_ahead: Family<OutcomeLabels, Counter>,
    /// Time from the start of a merge to a converged index.
    pub merge_seconds: Histogram,
    /// Index writes skipped because the bytes would not change.
    pub writes_skipped: Counter,
    /// Arch tags whose image config disagrees with the tag alias.
    pub platform_mismatches: Counter,
    /// Arch tags that held no runnable image (an artifact, a chart, a
    /// signature) and were passed through.
    pub non_image_arch_tags: Counter,
    /// Background retries of a failed merge.
    pub merge_retries: Counter,
    /// Client requests archmerge sent to the registry again, by why: safe to
    /// repeat, and failed transiently.
    pub upstream_retries: Family<RetryLabels, Counter>,
    /// Requests sent to the registry, by method: forwarded client requests
    /// and archmerge's own calls alike, each retry and token fetch counted.
    pub upstream_requests: Family<MethodLabels, Counter>,
    /// Time until the registry's response headers, every upstream call.
    pub upstream_seconds: Histogram,
    /// Blob bytes moved from the registry to clients by splice(2), never
    /// copied through archmerge.
    pub spliced_bytes: Counter,
    /// Blob upload bytes moved by `splice(2)`.
    pub spliced_upload_bytes: Counter,
    /// Cache hits by cache.
    pub cache_hits: Family<CacheLabels, Counter>,
    /// Cache misses by cache.
    pub cache_misses: Family<CacheLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family under the `archmerge_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("archmerge");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Client requests", requests.clone());
        let merges = Family::<OutcomeLabels, Counter>::default();
        registry.register("merges", "Index merges by outcome", merges.clone());
        let reads_ahead = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "merge_reads_ahead",
            "Rebuilds that started from a read made while the push was on its way",
            reads_ahead.clone(),
        );
        let merge_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "merge_duration_seconds",
            "Time to bring one target index up to date",
            merge_seconds.clone(),
        );
        let writes_skipped = Counter::default();
        registry.register(
            "index_writes_skipped",
            "Index writes skipped because the canonical bytes were unchanged",
            writes_skipped.clone(),
        );
        let platform_mismatches = Counter::default();
        registry.register(
            "platform_mismatches",
            "Arch tags whose image config platform disagrees with the tag alias",
            platform_mismatches.clone(),
        );
        let non_image_arch_tags = Counter::default();
        registry.register(
            "non_image_arch_tags",
            "Arch tags holding no runnable image (artifact, chart, signature), passed through untouched",
            non_image_arch_tags.clone(),
        );
        let upstream_retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Client requests sent to the registry again after a transient failure (GET/HEAD on 5xx; a manifest PUT whose unknown blobs exist)",
            upstream_retries.clone(),
        );
        let merge_retries = Counter::default();
        registry.register(
            "merge_retries",
            "Background retries of merges that failed",
            merge_retries.clone(),
        );
        let spliced_bytes = Counter::default();
        registry.register(
            "spliced_bytes",
            "Blob bytes moved from the registry to clients by splice(2), never copied through archmerge",
            spliced_bytes.clone(),
        );
        let spliced_upload_bytes = Counter::default();
        registry.register(
            "spliced_upload_bytes",
            "Blob upload bytes (a chunked body's framing included) moved from clients to the registry by splice(2), never copied through archmerge",
            spliced_upload_bytes.clone(),
        );
        let upstream_requests = Family::<MethodLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Requests sent to the registry (forwarded client requests and archmerge's own calls)",
            upstream_requests.clone(),
        );
        let upstream_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "upstream_request_duration_seconds",
            "Time until the registry's response headers arrive",
            upstream_seconds.clone(),
        );
        let cache_hits = Family::<CacheLabels, Counter>::default();
        registry.register("cache_hits", "Cache hits", cache_hits.clone());
        let cache_misses = Family::<CacheLabels, Counter>::default();
        registry.register("cache_misses", "Cache misses", cache_misses.clone());
        Metrics {
            registry,
            requests,
            merges,
            reads_ahead,
            merge_seconds,
            writes_skipped,
            platform_mismatches,
            non_image_arch_tags,
            merge_retries,
            upstream_retries,
            upstream_requests,
            upstream_seconds,
            spliced_bytes,
            spliced_upload_bytes,
            cache_hits,
            cache_misses,
        }
    }

    /// Counts one use of a read made ahead.
    pub fn read_ahead(&self, outcome: &'static str) {
        self.reads_ahead
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts one merge outcome.
    pub fn merge(&self, outcome: &'static str) {
        self.merges.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A bounded label for an HTTP method.
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::PUT => "PUT",
        http::Method::POST => "POST",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_carry_the_prefix() {
        let m = Metrics::new();
        m.merge("written");
        m.requests
            .get_or_create(&RequestLabels {
                method: "PUT",
                route: "manifest",
                status: 201,
            })
            .inc();
        m.upstream_requests
            .get_or_create(&MethodLabels { method: "HEAD" })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("archmerge_merges_total{outcome=\"written\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "archmerge_requests_total{method=\"PUT\",route=\"manifest\",status=\"201\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("archmerge_upstream_requests_total{method=\"HEAD\"} 1"),
            "{text}"
        );
    }
}
