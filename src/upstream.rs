//! The registry behind archmerge: one pooled client, and the typed calls the
//! merge makes.
//!
//! `forward` sends whole client requests through [`Upstream::send`]; `merge`
//! uses the typed calls (tags, manifests, small blobs), each carrying the
//! pushing client's own `Authorization` so archmerge never reads or writes
//! what that client could not. Nothing here decides what to merge.

use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{self, Body};
use crate::config::{Config, Credentials, Upstream as UpstreamConfig};
use crate::metrics::Metrics;
use crate::oci::MAX_MANIFEST_BYTES;

mod blobs;
mod pace;
mod token;

/// The registry path of a manifest, by tag or digest.
pub fn manifest_path(repo: &str, reference: &str) -> String {
    format!("/v2/{repo}/manifests/{reference}")
}

/// Every manifest media type archmerge understands, sent as `Accept` on its
/// own manifest reads so the registry never converts what it returns.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Largest read buffer of one registry connection.
const UPSTREAM_READ_BUF: usize = 1024 * 1024;

/// Largest image config archmerge reads to learn `os.version` and friends.
const MAX_CONFIG_BYTES: usize = 8 * 1024 * 1024;

/// Why a call to the registry failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made, or it broke before an answer.
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    /// The registry did not start answering in time.
    #[error("registry did not answer within {0:?}")]
    Timeout(Duration),
    /// The registry answered with an unexpected status.
    #[error("registry answered {status} to {what}: {body}")]
    Status {
        /// What was asked.
        what: String,
        /// The status it answered.
        status: StatusCode,
        /// The start of its body, for the log.
        body: String,
    },
    /// A body could not be read, or was larger than archmerge reads.
    #[error("reading {what} from the registry failed: {reason}")]
    Body {
        /// What was read.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A body was read whole but is not what it should be (JSON that does
    /// not parse, a field missing).
    #[error("the registry's {what} is malformed: {reason}")]
    Malformed {
        /// What was read.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry has no such manifest or blob, where one must exist.
    #[error("the registry has no {what}")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The registry named a URI archmerge cannot request: a token realm, a
    /// redirect or an upload `Location`.
    #[error("the registry sent {what} that is not a usable URI: {reason}")]
    BadUri {
        /// Which URI.
        what: String,
        /// Why it cannot be used.
        reason: String,
    },
}

impl UpstreamError {
    /// Whether the registry refused for lack of credentials or rights.
    pub fn is_auth(&self) -> bool {
        matches!(self, UpstreamError::Status { status, .. }
            if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN)
    }
}

/// A manifest as the registry stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedManifest {
    /// The exact bytes.
    pub bytes: Bytes,
    /// `Content-Type` as the registry sent it.
    pub media_type: String,
    /// `sha256:…` of the bytes (computed, not trusted from a header).
    pub digest: String,
}

/// The credentials of one registry call.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    /// The `Authorization` value sent (a client's is passed on unchanged).
    header: Option<HeaderValue>,
    /// archmerge's own credentials, to answer a Bearer challenge with.
    own: Option<Arc<Credentials>>,
}

impl Auth {
    /// A digest of the credentials, to tell identities apart without
    /// keeping the credentials themselves as a key.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        if let Some(v) = &self.header {
            h.update(v.as_bytes());
        }
        h.finalize().into()
    }

    /// The `Authorization` these credentials send first. For archmerge's
    /// own ([`Auth::is_own`]), [`Upstream`]'s calls may exchange it for a
    /// token on a challenge; a client's is only ever passed on.
    pub fn header(&self) -> Option<&HeaderValue> {
        self.header.as_ref()
    }

    /// Whether these are archmerge's own credentials.
    pub fn is_own(&self) -> bool {
        self.own.is_some()
    }

    /// A client's credentials, exactly as the client sent them.
    pub fn client(header: Option<HeaderValue>) -> Auth {
        let header = header.map(|mut h| {
            h.set_sensitive(true);
            h
        });
        Auth { header, own: None }
    }

    /// archmerge's own identity: HTTP Basic from the configured credentials
    /// (exchanged for a token when the registry challenges with Bearer), or
    /// anonymous.
    pub fn own(credentials: Option<&Credentials>) -> Auth {
        use base64::Engine as _;
        let Some(c) = credentials else {
            return Auth::default();
        };
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", c.username, c.password));
        Auth {
            header: sensitive(&format!("Basic {token}")),
            own: Some(Arc::new(c.clone())),
        }
    }
}

/// `Host` as the pooled client would write it for a plaintext registry:
/// the host, and the port unless it is 80.
fn plaintext_host(upstream: &UpstreamConfig) -> Option<HeaderValue> {
    if upstream.scheme != http::uri::Scheme::HTTP {
        return None;
    }
    let authority = &upstream.authority;
    let value = match authority.port_u16() {
        Some(80) | None => HeaderValue::from_str(authority.host()),
        Some(port) => HeaderValue::from_str(&format!("{}:{port}", authority.host())),
    };
    value.ok()
}

/// A header value marked sensitive (hyper keeps it out of debug output).
fn sensitive(value: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Body>;

/// The pooled client for the registry.
#[derive(Clone)]
pub struct Upstream {
    client: HttpsClient,
    /// Where the registry is.
    pub config: UpstreamConfig,
    /// How long the registry may take to start answering.
    headers_timeout: Duration,
    /// Where upstream latency is observed.
    metrics: Arc<Metrics>,
    /// Bearer tokens for archmerge's own identity, by challenge.
    tokens: token::Tokens,
    /// The `Host` of a plaintext registry's requests, made once.
    host: Option<HeaderValue>,
}

impl Upstream {
    /// Builds the pooled client: http or https (system roots plus the
    /// optional CA file), HTTP/2 by ALPN, connect timeout from the config.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> std::io::Result<Upstream> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeouts.connect));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = crate::tls::client_config(
            config.upstream_ca.as_deref(),
            config.upstream_insecure_skip_tls_verify,
        )?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            // Blob downloads arrive in reads of up to this size (hyper's
            // default is ~400 KiB): fewer, larger chunks cut archmerge's CPU
            // per downloaded GiB by about a fifth (scripts/bench.sh). The
            // buffer only grows while the registry sends faster than the
            // client reads.
            .http1_max_buf_size(UPSTREAM_READ_BUF)
            .build(https);
        Ok(Upstream {
            client,
            config: config.upstream.clone(),
            headers_timeout: config.timeouts.upstream_headers,
            metrics,
            tokens: token::Tokens::default(),
            host: plaintext_host(&config.upstream),
        })
    }

    /// The `Host` header of a request forwarded to a plaintext registry
    /// (HTTP/1.1 only), made once instead of by the pooled client per
    /// request; `None` for TLS, where ALPN may pick HTTP/2 and the client
    /// sets what the version needs.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// How long the registry may take to start answering, and (for a body
    /// archmerge passes on) between two pieces of a body.
    pub fn headers_timeout(&self) -> Duration {
        self.headers_timeout
    }

    /// Counts a client request sent to the registry again.
    pub fn count_retry(&self, reason: &'static str) {
        self.metrics
            .upstream_retries
            .get_or_create(&crate::metrics::RetryLabels { reason })
            .inc();
    }

    /// The registry URI for a path and query.
    pub fn uri(&self, path_and_query: &str) -> Uri {
        Uri::builder()
            .scheme(self.config.scheme.clone())
            .authority(self.config.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .unwrap_or_else(|_| Uri::from_static("/"))
    }

    /// The registry URI for the path and query of a client's URI (shared,
    /// not parsed again).
    pub fn uri_of(&self, client: &Uri) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.config.scheme.clone());
        parts.authority = Some(self.config.authority.clone());
        parts.path_and_query = Some(
            client
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
    }

    /// Sends a request and waits (bounded) for the response headers; the
    /// body then streams with no total timeout. The bound counts from the
    /// registry's last progress on the request body ([`pace`]), so an upload
    /// takes as long as its client sends.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        self.metrics
            .upstream_requests
            .get_or_create(&crate::metrics::MethodLabels {
                method: crate::metrics::method_label(req.method()),
            })
            .inc();
        let started = std::time::Instant::now();
        let pace = pace::Pace::new();
        let req = req.map(|body| {
            body::stream(pace::Paced {
                body,
                pace: pace.clone(),
            })
        });
        let answer = self.client.request(req);
        tokio::pin!(answer);
        let result = loop {
            let deadline = pace.deadline(self.headers_timeout);
            tokio::select! {
                result = &mut answer => break Some(result),
                _ = tokio::time::sleep_until(deadline) => {
                    if pace.deadline(self.headers_timeout) <= tokio::time::Instant::now() {
                        break None;
                    }
                }
            }
        };
        self.metrics
            .upstream_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Some(Ok(resp)) => Ok(resp),
            Some(Err(e)) => Err(UpstreamError::Unreachable(error_chain(&e))),
            None => Err(UpstreamError::Timeout(self.headers_timeout)),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        auth: &Auth,
        accept: Option<&'static str>,
        content: Option<(&str, Bytes)>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let build = |authorization: Option<&HeaderValue>| {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(self.uri(path));
            if let Some(a) = authorization {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
            if let Some(accept) = accept {
                req = req.header(header::ACCEPT, accept);
            }
            let body = match &content {
                Some((media_type, bytes)) => {
                    req = req
                        .header(header::CONTENT_TYPE, *media_type)
                        .header(header::CONTENT_LENGTH, bytes.len());
                    body::full(bytes.clone())
                }
                None => body::empty(),
            };
            req.body(body)
                .map_err(|e| UpstreamError::Unreachable(format!("building request: {e}")))
        };
        let resp = self.send(build(auth.header.as_ref())?).await?;
        // archmerge's own calls answer a token registry's challenge; a
        // client's credentials are only ever passed on.
        let Some(own) = &auth.own else {
            return Ok(resp);
        };
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(token::Challenge::parse)
        else {
            return Ok(resp);
        };
        // Boxed: the token exchange is rare and its future large; every
        // call would otherwise carry it.
        Box::pin(async {
            let bearer = self
                .tokens
                .get(self, &challenge, auth.header.as_ref(), own)
                .await?;
            self.send(build(Some(&bearer))?).await
        })
        .await
    }

    /// Whether the registry answers its API root (200, or 401 when it
    /// wants credentials): what `/readyz` reports.
    pub async fn ping(&self) -> Result<(), UpstreamError> {
        let resp = self
            .call(Method::GET, "/v2/", &Auth::default(), None, None)
            .await?;
        match resp.status() {
            StatusCode::OK | StatusCode::UNAUTHORIZED => Ok(()),
            status => Err(UpstreamError::Status {
                what: "/v2/".into(),
                status,
                body: String::new(),
            }),
        }
    }

    /// Every tag of a repository, following `Link` pagination.
    pub async fn list_tags(&self, repo: &str, auth: &Auth) -> Result<Vec<String>, UpstreamError> {
        self.list_paginated(&format!("/v2/{repo}/tags/list"), "tags", auth)
            .await
    }

    /// Every repository of the registry (`/v2/_catalog`), paginated.
    pub async fn list_catalog(&self, auth: &Auth) -> Result<Vec<String>, UpstreamError> {
        self.list_paginated("/v2/_catalog", "repositories", auth)
            .await
    }

    /// A distribution listing (`{"<key>": [...]}`), following `Link: <…>;
    /// rel="next"` until the registry sends none. A 404 is an empty list.
    /// No `n` is asked for: registries cap it (distribution's
    /// `catalog.maxentries`) and refuse a larger one, so the registry's own
    /// page size is used.
    async fn list_paginated(
        &self,
        first: &str,
        key: &str,
        auth: &Auth,
    ) -> Result<Vec<String>, UpstreamError> {
        let mut items = Vec::new();
        let mut path = first.to_owned();
        // Bounded: a registry that keeps sending `next` cannot loop us forever.
        for _ in 0..100_000 {
            let resp = self.call(Method::GET, &path, auth, None, None).await?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(items);
            }
            let next = next_link(resp.headers());
            let bytes = expect_ok(resp, key, MAX_MANIFEST_BYTES).await?;
            let mut page: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Malformed {
                    what: format!("{key} listing"),
                    reason: e.to_string(),
                })?;
            if let serde_json::Value::Array(list) = page[key].take() {
                items.extend(
                    list.into_iter()
                        .filter_map(|v| v.as_str().map(str::to_owned)),
                );
            }
            match next {
                Some(n) if n != path => path = n,
                _ => break,
            }
        }
        Ok(items)
    }

    /// A manifest by tag or digest; `None` when the registry has none.
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
        auth: &Auth,
    ) -> Result<Option<FetchedManifest>, UpstreamError> {
        let path = manifest_path(repo, reference);
        let resp = self
            .call(Method::GET, &path, auth, Some(MANIFEST_ACCEPT), None)
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = expect_ok(resp, "manifest", MAX_MANIFEST_BYTES).await?;
        let digest = crate::index::sha256_digest(&bytes);
        Ok(Some(FetchedManifest {
            bytes,
            media_type,
            digest,
        }))
    }

    /// The digest a tag points at, by HEAD; `None` when the tag is gone.
    pub async fn head_manifest(
        &self,
        repo: &str,
        reference: &str,
        auth: &Auth,
    ) -> Result<Option<String>, UpstreamError> {
        let path = manifest_path(repo, reference);
        let resp = self
            .call(Method::HEAD, &path, auth, Some(MANIFEST_ACCEPT), None)
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        expect_ok(resp, "manifest head", 0).await?;
        match digest {
            Some(d) => Ok(Some(d)),
            // A registry that sends no digest on HEAD: read the bytes instead.
            None => Ok(self
                .get_manifest(repo, reference, auth)
                .await?
                .map(|m| m.digest)),
        }
    }

    /// A manifest request made with a client's credentials only to learn
    /// whether the registry lets that client read the repository; the
    /// response is returned as the registry sent it.
    pub async fn probe_manifest(
        &self,
        repo: &str,
        reference: &str,
        method: Method,
        auth: &Auth,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = manifest_path(repo, reference);
        self.call(method, &path, auth, Some(MANIFEST_ACCEPT), None)
            .await
    }

    /// Stores a manifest at a tag or digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
        auth: &Auth,
    ) -> Result<(), UpstreamError> {
        let path = manifest_path(repo, reference);
        let resp = self
            .call(Method::PUT, &path, auth, None, Some((media_type, bytes)))
            .await?;
        expect_ok(resp, "manifest put", MAX_MANIFEST_BYTES).await?;
        Ok(())
    }

    /// Deletes a manifest by digest (which also removes the tags on it).
    pub async fn delete_manifest(
        &self,
        repo: &str,
        digest: &str,
        auth: &Auth,
    ) -> Result<(), UpstreamError> {
        let path = manifest_path(repo, digest);
        let resp = self.call(Method::DELETE, &path, auth, None, None).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        expect_ok(resp, "manifest delete", MAX_MANIFEST_BYTES).await?;
        Ok(())
    }
}

/// Reads a bounded body after a 2xx; any other status becomes an error
/// carrying the start of the registry's body.
async fn expect_ok(
    resp: Response<Incoming>,
    what: &str,
    limit: usize,
) -> Result<Bytes, UpstreamError> {
    let status = resp.status();
    if !status.is_success() {
        let body = read_limited(resp.into_body(), 1024, what)
            .await
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
            .unwrap_or_default();
        return Err(UpstreamError::Status {
            what: what.to_owned(),
            status,
            body,
        });
    }
    read_limited(resp.into_body(), limit, what).await
}

async fn read_limited(body: Incoming, limit: usize, what: &str) -> Result<Bytes, UpstreamError> {
    Limited::new(body, limit.max(1))
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| UpstreamError::Body {
            what: what.to_owned(),
            reason: e.to_string(),
        })
}

/// The path of a `Link: <…>; rel="next"` header, as distribution paginates.
fn next_link(headers: &http::HeaderMap) -> Option<String> {
    let link = headers.get(header::LINK)?.to_str().ok()?;
    let (target, params) = link.split_once(';')?;
    if !params.contains("rel=\"next\"") && !params.contains("rel=next") {
        return None;
    }
    let target = target.trim().trim_start_matches('<').trim_end_matches('>');
    let uri: Uri = target.parse().ok()?;
    uri.path_and_query().map(|p| p.as_str().to_owned())
}

/// An error with its sources, one line (hyper's outermost message alone says
/// little, e.g. "client error (Connect)").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plaintext_registry_gets_the_host_the_pooled_client_would_write() {
        let host = |origin: &str| {
            let uri: Uri = origin.parse().unwrap();
            plaintext_host(&UpstreamConfig {
                scheme: uri.scheme().unwrap().clone(),
                authority: uri.authority().unwrap().clone(),
                origin: origin.into(),
            })
        };
        assert_eq!(host("http://127.0.0.1:5000").unwrap(), "127.0.0.1:5000");
        assert_eq!(host("http://registry:80").unwrap(), "registry");
        assert_eq!(host("http://registry").unwrap(), "registry");
        assert_eq!(host("http://[::1]:5000").unwrap(), "[::1]:5000");
        assert!(host("https://registry:443").is_none());
    }

    #[test]
    fn follows_next_links() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::LINK,
            HeaderValue::from_static("</v2/a/tags/list?last=x&n=100>; rel=\"next\""),
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("/v2/a/tags/list?last=x&n=100")
        );
        h.insert(
            header::LINK,
            HeaderValue::from_static("<http://r:5000/v2/a/tags/list?last=y>; rel=\"next\""),
        );
        assert_eq!(next_link(&h).as_deref(), Some("/v2/a/tags/list?last=y"));
        h.insert(header::LINK, HeaderValue::from_static("</x>; rel=\"prev\""));
        assert_eq!(next_link(&h), None);
    }
}
