//! Serve mode: GET and HEAD of a target tag, and of the synthesized index's
//! digest, are answered by archmerge with the index write mode would store
//! (the same [`crate::merge::Merger::survey`]); nothing is written to the
//! registry. Authorization, staleness bound, no cross-identity effects,
//! digests nobody knows, negotiation: `docs/design.md`, "Serve mode".

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::body::ClientBody;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use moka::future::Cache;
use moka::Expiry;

use crate::app::App;
use crate::body::{self, Body};
use crate::bounded;
use crate::config::CacheConfig;
use crate::error::{error_response, ProxyError};
use crate::forward::{self, proxy_error, ClientSide};
use crate::merge::{Desired, MergeError, Merger, Survey};
use crate::metrics::{CacheLabels, Metrics};
use crate::oci::{ErrorCode, MAX_MANIFEST_BYTES};
use crate::route::Reference;
use crate::upstream::{manifest_path, Auth, MANIFEST_ACCEPT};

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

/// The indexes archmerge serves in one repository, found by one search of
/// its targets, and when the search began (for the expiry).
#[derive(Clone)]
struct Searched {
    by_digest: Arc<HashMap<String, Arc<Served>>>,
    loaded_from: Instant,
    /// How long the search took.
    took: Duration,
}

/// A cached value whose freshness counts from the start of its load.
trait LoadedFrom {
    fn loaded_from(&self) -> Instant;

    /// How long it stays fresh, given the staleness bound.
    fn fresh_for(&self, staleness: Duration) -> Duration {
        staleness
    }
}

impl LoadedFrom for Aggregate {
    fn loaded_from(&self) -> Instant {
        self.loaded_from
    }
}

/// A repository search is kept at least eight times as long as it took, so
/// searching stays a small share of what a stream of unknown digests costs
/// the registry however slow it runs (at most one search in every nine
/// search-lengths); at the staleness bound while searches are quick.
const SEARCH_SHARE: u32 = 8;

impl LoadedFrom for Searched {
    fn loaded_from(&self) -> Instant {
        self.loaded_from
    }

    fn fresh_for(&self, staleness: Duration) -> Duration {
        staleness.max(self.took * SEARCH_SHARE)
    }
}

/// Expires a value `staleness` after its load began listing tags.
struct FromLoadStart {
    staleness: Duration,
}

impl<K, V: LoadedFrom> Expiry<K, V> for FromLoadStart {
    fn expire_after_create(&self, _key: &K, value: &V, created_at: Instant) -> Option<Duration> {
        let deadline = value.loaded_from() + value.fresh_for(self.staleness);
        Some(deadline.saturating_duration_since(created_at))
    }
}

/// A load that failed, and for whom: a failure is the loader's answer only.
/// Callers with other credentials that waited on it load for themselves;
/// it is never handed to another identity (a 401 for an anonymous caller
/// must not become a 404 for an authorized one).
#[derive(Debug)]
struct Failed {
    by: [u8; 32],
    error: MergeError,
}

/// The serve-mode caches.
pub struct Aggregates {
    merger: Arc<Merger>,
    metrics: Arc<Metrics>,
    /// (repo, target) → aggregate, bounded staleness.
    by_target: Cache<(String, String), Aggregate>,
    /// (repo, digest) → served index; immutable by content addressing.
    by_digest: Cache<(String, String), Arc<Served>>,
    /// repo → every index served there, bounded staleness: a digest that
    /// neither cache knows costs at most one search of the repository per
    /// staleness period, however many are asked for.
    searched: Cache<String, Searched>,
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
            searched: Cache::builder()
                .max_capacity(10_000)
                .expire_after(FromLoadStart {
                    staleness: config.staleness,
                })
                .build(),
        }
    }

    /// Drops a target's aggregate (after a push through this replica).
    pub async fn invalidate(&self, repo: &str, target: &str) {
        self.by_target
            .invalidate(&(repo.to_owned(), target.to_owned()))
            .await;
        self.searched.invalidate(repo).await;
    }

    /// The index to serve at `repo:target`, if it has arch tags.
    pub async fn for_target(
        &self,
        repo: &str,
        target: &str,
        auth: &Auth,
    ) -> Result<Option<Arc<Served>>, MergeError> {
        let key = (repo.to_owned(), target.to_owned());
        let labels = CacheLabels { cache: "aggregate" };
        if let Some(a) = self.by_target.get(&key).await {
            self.metrics.cache_hits.get_or_create(&labels).inc();
            return Ok(a.served);
        }
        self.metrics.cache_misses.get_or_create(&labels).inc();
        let load = || self.load_target(repo, target, auth);
        // Boxed: a load holds a whole survey of the target (tens of KiB of
        // future), which the cache hit of every GET would otherwise carry
        // and copy along.
        Ok(Box::pin(load_once(&self.by_target, key, auth, load))
            .await?
            .served)
    }

    async fn load_target(
        &self,
        repo: &str,
        target: &str,
        auth: &Auth,
    ) -> Result<Aggregate, Failed> {
        let loaded_from = Instant::now();
        let failed = |error| Failed {
            by: auth.fingerprint(),
            error,
        };
        let Survey {
            snapshot, decision, ..
        } = self
            .merger
            .survey(repo, target, auth)
            .await
            .map_err(failed)?;
        let served = match decision.desired {
            _ if snapshot.values().all(|c| c.digest.is_none()) => None,
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
        Ok(Aggregate {
            served,
            loaded_from,
        })
    }

    /// The index with `digest` in `repo`, if archmerge serves it: from the
    /// cache, or (another replica made it, or it is no index at all) from
    /// the latest search of the repository's targets — at most one search
    /// per repository and staleness period, so random digests cost the
    /// registry next to nothing.
    pub async fn for_digest(&self, repo: &str, digest: &str, auth: &Auth) -> Option<Arc<Served>> {
        if let Some(s) = self
            .by_digest
            .get(&(repo.to_owned(), digest.to_owned()))
            .await
        {
            return Some(s);
        }
        let search = || self.search(repo, auth);
        // Boxed, like the load of `for_target`.
        let found = Box::pin(load_once(&self.searched, repo.to_owned(), auth, search))
            .await
            .ok()?;
        found.by_digest.get(digest).cloned()
    }

    /// Every index served in `repo` right now (bounded fan-out over its
    /// targets).
    async fn search(&self, repo: &str, auth: &Auth) -> Result<Searched, Failed> {
        let loaded_from = Instant::now();
        let failed = |error| Failed {
            by: auth.fingerprint(),
            error,
        };
        let targets = self.merger.targets_in(repo, auth).await.map_err(failed)?;
        let loads = targets
            .iter()
            .map(|target| self.for_target(repo, target, auth));
        let mut by_digest = HashMap::new();
        for s in bounded::try_all(loads)
            .await
            .map_err(failed)?
            .into_iter()
            .flatten()
        {
            by_digest.insert(s.digest.clone(), s);
        }
        Ok(Searched {
            by_digest: Arc::new(by_digest),
            loaded_from,
            took: loaded_from.elapsed(),
        })
    }
}

/// `key` from `cache`, loaded once however many callers wait for it (moka's
/// single flight) and shared when the load succeeds. A failure is only the
/// loader's answer ([`Failed`]): a caller with other credentials loads for
/// itself, and shares that result if it works.
async fn load_once<K, V, F>(
    cache: &Cache<K, V>,
    key: K,
    auth: &Auth,
    load: impl Fn() -> F,
) -> Result<V, MergeError>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<V, Failed>>,
{
    match cache.try_get_with(key.clone(), load()).await {
        Ok(v) => Ok(v),
        Err(f) if f.by == auth.fingerprint() => Err(f.error.clone()),
        Err(_) => {
            let v = load().await.map_err(|f| f.error)?;
            cache.insert(key, v.clone()).await;
            Ok(v)
        }
    }
}

/// GET or HEAD of a manifest in serve mode.
pub async fn get_manifest(
    app: &App,
    aggregates: &Aggregates,
    req: Request<ClientBody>,
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
                return answer(app, &req, &repo, &served, &auth, &client).await;
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
                return answer(app, &head, &repo, &served, &auth, &client).await;
            }
            forward::downstream_parts(&mut resp_parts, &app.upstream, &client);
            Ok(Response::from_parts(resp_parts, body::full(not_found)))
        }
    }
}

/// Has the registry authorize the request, negotiates, and serves.
async fn answer<B>(
    app: &App,
    req: &Request<B>,
    repo: &str,
    served: &Served,
    auth: &Auth,
    client: &ClientSide,
) -> Result<Response<Body>, ProxyError> {
    // Authorization first: even "not acceptable" would tell a client that
    // the registry refuses that an index exists here.
    if let Some(refused) = Box::pin(probe(app, req.method(), repo, served, auth, client)).await? {
        return Ok(refused);
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

/// Asks the registry for one child manifest with the client's credentials
/// and method; `Some` is its refusal, ready to pass on. On archmerge's own
/// registry connections when it can ([`crate::splice::Downloads::small`]),
/// through the pooled client otherwise.
async fn probe(
    app: &App,
    method: &Method,
    repo: &str,
    served: &Served,
    auth: &Auth,
    client: &ClientSide,
) -> Result<Option<Response<Body>>, ProxyError> {
    let upstream = &app.upstream;
    if !auth.is_own() {
        let mut headers = HeaderMap::with_capacity(3);
        if let Some(host) = upstream.host() {
            headers.insert(header::HOST, host.clone());
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        if let Some(authorization) = auth.header() {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        let path = manifest_path(repo, &served.probe);
        if let Some(answer) = app.downloads.small(method, &path, &headers).await {
            let answer = answer.map_err(proxy_error)?;
            return Ok((!answer.status().is_success())
                .then(|| forward::downstream_body(answer, upstream, client)));
        }
    }
    let answer = upstream
        .probe_manifest(repo, &served.probe, method.clone(), auth)
        .await
        .map_err(proxy_error)?;
    Ok((!answer.status().is_success())
        .then(|| forward::downstream_response(answer, upstream, client)))
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
