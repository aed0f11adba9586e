//! The state every request handler shares: validated config, the pooled
//! registry client, the merge engine, metrics and serve mode's caches.
//!
//! Built once in `main.rs` (or a test) and handed to the listeners as an
//! `Arc`; it sits below every handler and calls none of them.

use std::sync::Arc;

use crate::config::Config;
use crate::merge::Merger;
use crate::metrics::Metrics;
use crate::serve::Aggregates;
use crate::upstream::Upstream;

/// Everything a request handler needs, shared by all connections.
pub struct App {
    /// Validated settings.
    pub config: Arc<Config>,
    /// The pooled registry client.
    pub upstream: Upstream,
    /// The merge engine.
    pub merger: Arc<Merger>,
    /// Metric families.
    pub metrics: Arc<Metrics>,
    /// Serve mode's synthesized indexes (unused in write mode).
    pub aggregates: Aggregates,
}

impl App {
    /// Builds the shared state from a validated config.
    pub fn new(config: Config) -> std::io::Result<Arc<App>> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let upstream = Upstream::new(&config, metrics.clone())?;
        let merger = Arc::new(Merger::new(
            upstream.clone(),
            config.merge.clone(),
            config.cache.max_bytes,
            metrics.clone(),
        ));
        let aggregates = Aggregates::new(merger.clone(), metrics.clone(), &config.cache);
        Ok(Arc::new(App {
            config,
            upstream,
            merger,
            metrics,
            aggregates,
        }))
    }
}
