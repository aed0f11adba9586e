//! Serve mode: GET and HEAD of a target tag, and of the synthesized index's
//! digest, are answered by archmerge; nothing is written to the registry.
//!
//! The index served is the one write mode would store: the same
//! [`crate::merge::Merger::plan`] over the same registry state, so the same
//! canonical bytes and digest.
//!
//! # Authorization
//!
//! Before a synthesized byte or digest goes out, the registry must
//! authorize *that* request: archmerge fetches one child manifest of the
//! index with the client's own `Authorization` (same method as the
//! client's) and passes any refusal on as the registry sent it (401 with
//! `WWW-Authenticate`, 403, …). This is done per request and never cached,
//! so no decision is reused across identities. The aggregates cache holds
//! only what the registry's content says, never who may read it.
//!
//! # Staleness bound across replicas
//!
//! An aggregate is cached for at most `cache.staleness_ms` (one second by
//! default) *counted from the moment its load began listing tags* (a moka
//! per-entry expiry), so no replica serves an index that misses an arch tag
//! pushed longer ago than that — through any replica or straight to the
//! registry. A push through this replica drops its target's entry at once.
//! Cost: at most one tags list plus one HEAD per arch tag, per target per
//! staleness period per replica; per-digest facts come from the merge's
//! caches.
//!
//! # Content negotiation
//!
//! As distribution does: the client's `Accept` lines (all of them) must
//! name the index's media type, or `*/*`; otherwise 404 `MANIFEST_UNKNOWN`.
//! A client that accepts only Docker manifest lists gets the index when
//! every child is a Docker schema2 manifest (then the index *is* a Docker
//! list) and 404 otherwise: rewriting an OCI index as a Docker list would
//! change its digest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::body::ClientBody as Incoming;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use moka::future::Cache;
use moka::Expiry;

use crate::app::App;
use crate::body::{self, Body};
use crate::config::CacheConfig;
use crate::error::{error_response, ProxyError};
use crate::forward::{self, proxy_error, ClientSide};
use crate::merge::{Desired, MergeError, Merger};
use crate::metrics::{CacheLabels, Metrics};
use crate::oci::{ErrorCode, MAX_MANIFEST_BYTES};
use crate::route::Reference;
use crate::upstream::{Auth, Upstream};

/// A synthesized index, ready to serve.
#[derive(Debug)]
pub struct Served {
    /// Canonical bytes.
    pub bytes: Bytes,
    /// `sha256:…` of the bytes.
    pub digest: String,
    /// OCI index or Docker manifest list.
    pub media_type: &'static str,
    /// A child manifest, fetched with the client's credentials to have the
    /// registry authorize each request.
    pub probe: String,
}

/// A target's aggregate and when its load began (for the expiry).
#[derive(Clone)]
struct Aggregate {
    served: Option<Arc<Served>>,
    loaded_from: Instant,
}

/// Expires an aggregate `staleness` after its load began listing tags.
struct FromLoadStart {
    staleness: Duration,
}

impl Expiry<(String, String), Aggregate> for FromLoadStart {
    fn expire_after_create(
        &self,
        _key: &(String, String),
        value: &Aggregate,
        created_at: Instant,
    ) -> Option<Duration> {
        let deadline = value.loaded_from + self.staleness;
        Some(deadline.saturating_duration_since(created_at))
    }
}

/// The serve-mode caches.
pub struct Aggregates {
    merger: Arc<Merger>,
    metrics: Arc<Metrics>,
    /// (repo, target) → aggregate, bounded staleness.
    by_target: Cache<(String, String), Aggregate>,
    /// (repo, digest) → served index; immutable by content addressing.
    by_digest: Cache<(String, String), Arc<Served>>,
}

impl Aggregates {
    /// Creates empty caches over the merge engine.
    pub fn new(merger: Arc<Merger>, metrics: Arc<Metrics>, config: &CacheConfig) -> Aggregates {
        Aggregates {
            merger,
            metrics,
            by_target: Cache::builder()
                .max_capacity(100_000)
                .expire_after(FromLoadStart {
                    staleness: config.staleness,
                })
                .build(),
            by_digest: Cache::builder()
                .weigher(|_k, v: &Arc<Served>| v.bytes.len() as u32)
                .max_capacity(config.max_bytes)
                .time_to_idle(config.served_digest_ttl)
                .build(),
        }
    }

    /// Drops a target's aggregate (after a push through this replica).
    pub async fn invalidate(&self, repo: &str, target: &str) {
        self.by_target
            .invalidate(&(repo.to_owned(), target.to_owned()))
            .await;
    }

    /// The index to serve at `repo:target`, if it has arch tags.
    pub async fn for_target(
        &self,
        repo: &str,
        target: &str,
        auth: &Auth,
    ) -> Result<Option<Arc<Served>>, Arc<MergeError>> {
        let key = (repo.to_owned(), target.to_owned());
        let labels = CacheLabels { cache: "aggregate" };
        if let Some(a) = self.by_target.get(&key).await {
            self.metrics.cache_hits.get_or_create(&labels).inc();
            return Ok(a.served);
        }
        self.metrics.cache_misses.get_or_create(&labels).inc();
        let load = async {
            let loaded_from = Instant::now();
            let (snapshot, current) = self.merger.survey(repo, target, auth).await?;
            if snapshot.values().all(|c| c.digest.is_none()) {
                return Ok(Aggregate {
                    served: None,
                    loaded_from,
                });
            }
            let plan = self
                .merger
                .plan(repo, target, &snapshot, current, auth)
                .await?;
            let served = match plan.desired {
                Desired::Index(built) => {
                    let probe = snapshot
                        .values()
                        .find_map(|c| c.digest.clone())
                        .unwrap_or_default();
                    let served = Arc::new(Served {
                        bytes: Bytes::from(built.bytes),
                        digest: built.digest,
                        media_type: built.media_type,
                        probe,
                    });
                    self.by_digest
                        .insert((repo.to_owned(), served.digest.clone()), served.clone())
                        .await;
                    Some(served)
                }
                _ => None,
            };
            Ok::<_, MergeError>(Aggregate {
                served,
                loaded_from,
            })
        };
        Ok(self.by_target.try_get_with(key, load).await?.served)
    }

    /// The index with `digest` in `repo`, if archmerge serves it: from the
    /// cache, or (another replica made it) by rebuilding the repository's
    /// targets and looking for it.
    pub async fn for_digest(&self, repo: &str, digest: &str, auth: &Auth) -> Option<Arc<Served>> {
        if let Some(s) = self
            .by_digest
            .get(&(repo.to_owned(), digest.to_owned()))
            .await
        {
            return Some(s);
        }
        for target in self.merger.targets_in(repo, auth).await.ok()? {
            if let Ok(Some(s)) = self.for_target(repo, &target, auth).await {
                if s.digest == digest {
                    return Some(s);
                }
            }
        }
        None
    }
}

/// GET or HEAD of a manifest in serve mode.
pub async fn get_manifest(
    app: &App,
    aggregates: &Aggregates,
    req: Request<Incoming>,
    repo: String,
    reference: Reference,
    client: ClientSide,
) -> Result<Response<Body>, ProxyError> {
    let auth = Auth::client(req.headers().get(header::AUTHORIZATION).cloned());
    match &reference {
        Reference::Tag(tag) if !app.merger.rule(&repo).is_arch_tag(tag) => {
            // A registry that refuses the listing (e.g. 401 for an anonymous
            // client) gets the request itself, and answers it as it will.
            if let Ok(Some(served)) = aggregates.for_target(&repo, tag, &auth).await {
                return answer(&app.upstream, &req, &repo, &served, &auth, &client).await;
            }
            forward::forward(&app.upstream, req, &client).await
        }
        Reference::Tag(_) => forward::forward(&app.upstream, req, &client).await,
        Reference::Digest(digest) => {
            let digest = digest.clone();
            let (parts, incoming) = req.into_parts();
            let head = Request::from_parts(parts.clone(), ());
            let up =
                forward::upstream_request(&app.upstream, parts, body::stream(incoming), &client);
            let resp = app.upstream.send(up).await.map_err(proxy_error)?;
            if resp.status() != StatusCode::NOT_FOUND {
                return Ok(forward::downstream_response(resp, &app.upstream, &client));
            }
            // Not in the registry: perhaps an index archmerge serves.
            let (mut resp_parts, incoming) = resp.into_parts();
            let not_found = Limited::new(incoming, MAX_MANIFEST_BYTES)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            if let Some(served) = aggregates.for_digest(&repo, &digest, &auth).await {
                return answer(&app.upstream, &head, &repo, &served, &auth, &client).await;
            }
            forward::downstream_parts(&mut resp_parts, &app.upstream, &client);
            Ok(Response::from_parts(resp_parts, body::full(not_found)))
        }
    }
}

/// Has the registry authorize the request, negotiates, and serves.
async fn answer<B>(
    upstream: &Upstream,
    req: &Request<B>,
    repo: &str,
    served: &Served,
    auth: &Auth,
    client: &ClientSide,
) -> Result<Response<Body>, ProxyError> {
    // Authorization first: even "not acceptable" would tell a client that
    // the registry refuses that an index exists here.
    let probe = upstream
        .probe_manifest(repo, &served.probe, req.method().clone(), auth)
        .await
        .map_err(proxy_error)?;
    if !probe.status().is_success() {
        return Ok(forward::downstream_response(probe, upstream, client));
    }
    if !accepts(req.headers(), served.media_type) {
        return Ok(error_response(
            StatusCode::NOT_FOUND,
            ErrorCode::ManifestUnknown,
            &format!(
                "the manifest is a {}, which the request's Accept does not list",
                served.media_type
            ),
        ));
    }
    let mut resp = Response::new(if req.method() == Method::HEAD {
        body::empty()
    } else {
        body::full(served.bytes.clone())
    });
    let h: &mut HeaderMap = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(served.media_type),
    );
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(served.bytes.len()),
    );
    if let Ok(v) = HeaderValue::from_str(&served.digest) {
        h.insert("docker-content-digest", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", served.digest)) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    Ok(resp)
}

/// Whether the `Accept` lines name `media_type` (or `*/*`).
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|item| item.split(';').next().unwrap_or("").trim())
        .any(|t| t.eq_ignore_ascii_case(media_type) || t == "*/*")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(header::ACCEPT, HeaderValue::from_static(l));
        }
        h
    }

    const OCI: &str = crate::index::OCI_INDEX;
    const LIST: &str = crate::index::DOCKER_LIST;

    #[test]
    fn negotiates_over_every_accept_line() {
        let h = headers(&[
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.oci.image.index.v1+json; q=0.5",
        ]);
        assert!(accepts(&h, OCI));
        assert!(!accepts(&h, LIST));
        assert!(accepts(&headers(&["*/*"]), LIST));
        assert!(!accepts(&headers(&[]), OCI));
        let one_line = headers(&["application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json"]);
        assert!(accepts(&one_line, LIST));
        assert!(!accepts(&one_line, OCI));
    }

    #[test]
    fn an_aggregate_expires_one_second_after_its_load_began() {
        let started = Instant::now();
        let a = Aggregate {
            served: None,
            loaded_from: started,
        };
        let expiry = FromLoadStart {
            staleness: Duration::from_secs(1),
        };
        let ttl = expiry
            .expire_after_create(
                &(String::new(), String::new()),
                &a,
                started + Duration::from_millis(300),
            )
            .unwrap();
        assert_eq!(ttl, Duration::from_millis(700));
        let late = expiry
            .expire_after_create(
                &(String::new(), String::new()),
                &a,
                started + Duration::from_secs(2),
            )
            .unwrap();
        assert_eq!(late, Duration::ZERO);
    }
}
