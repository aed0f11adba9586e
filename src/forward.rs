//! The transparent pass-through: a client request goes to the registry and
//! the registry's answer comes back, both streamed.
//!
//! Bodies are handed over frame by frame ([`crate::body::stream`]), so a blob
//! never sits in archmerge's memory and a slow reader slows the writer
//! (backpressure). Only hop-by-hop headers are dropped; `Host` becomes the
//! registry's; `X-Forwarded-Host/Proto/For` are added; a `Location` that
//! points at the registry's own origin is rewritten to archmerge's public
//! origin with path and query kept byte for byte. Everything else —
//! `Authorization`, `WWW-Authenticate`, `Range`, `Content-Range`,
//! `Docker-*`, `OCI-*`, `Link`, `ETag`, error bodies — passes untouched.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, response, Request, Response, Version};
use hyper::body::Incoming;

use crate::body::{self, Body, ClientBody};
use crate::config::Config;
use crate::error::ProxyError;
use crate::upstream::{Upstream, UpstreamError};

/// Per-request facts about where the client came from.
#[derive(Clone, Debug)]
pub struct ClientSide {
    /// `scheme://host[:port]` the client used to reach archmerge (or the
    /// configured `public_url`): the origin `Location` headers get.
    pub public_origin: String,
    /// Host part of `public_origin`, sent as `X-Forwarded-Host`.
    pub forwarded_host: String,
    /// Scheme of `public_origin`, sent as `X-Forwarded-Proto`.
    pub forwarded_proto: &'static str,
    /// The client's address, appended to `X-Forwarded-For`.
    pub peer: SocketAddr,
}

impl ClientSide {
    /// Works out the public origin of one request.
    pub fn of(config: &Config, parts: &request::Parts, peer: SocketAddr, tls: bool) -> ClientSide {
        if let Some(public) = &config.public_url {
            let (proto, host) = public.split_once("://").unwrap_or(("http", public));
            return ClientSide {
                public_origin: public.clone(),
                forwarded_host: host.to_owned(),
                forwarded_proto: if proto == "https" { "https" } else { "http" },
                peer,
            };
        }
        let proto = if tls { "https" } else { "http" };
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| config.listen.to_string());
        ClientSide {
            public_origin: format!("{proto}://{host}"),
            forwarded_host: host,
            forwarded_proto: proto,
            peer,
        }
    }
}

/// Forwards a request with its streamed body and streams the answer back.
pub async fn forward(
    upstream: &Upstream,
    req: Request<ClientBody>,
    client: &ClientSide,
) -> Result<Response<Body>, ProxyError> {
    let (parts, mut incoming) = req.into_parts();
    // A stalled client body reaches us as the upstream client's error:
    // answer it as the client's fault, not the registry's.
    let stalled = incoming.stall_flag();
    let limit = incoming.limit();
    let req = upstream_request(upstream, parts, body::stream(incoming), client);
    let resp = upstream.send(req).await.map_err(|e| {
        if stalled.load(std::sync::atomic::Ordering::Relaxed) {
            ProxyError::ClientStalled(limit)
        } else {
            proxy_error(e)
        }
    })?;
    Ok(downstream_response(resp, upstream, client))
}

/// The request archmerge sends to the registry for a client's request.
pub fn upstream_request(
    upstream: &Upstream,
    parts: request::Parts,
    body: Body,
    client: &ClientSide,
) -> Request<Body> {
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    // The upstream client has no 100-continue support; hyper answers the
    // client's `Expect` itself when the body is first polled.
    headers.remove(header::EXPECT);
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(client.forwarded_proto),
    );
    if let Ok(v) = HeaderValue::from_str(&client.forwarded_host) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), v);
    }
    let peer_ip = client.peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {peer_ip}"),
        None => peer_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    let mut req = Request::new(body);
    *req.method_mut() = parts.method;
    *req.uri_mut() = upstream.uri(&path_and_query);
    // The pooled client picks HTTP/2 itself when ALPN offers it.
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

/// The response archmerge sends back for the registry's response.
pub fn downstream_response(
    resp: Response<Incoming>,
    upstream: &Upstream,
    client: &ClientSide,
) -> Response<Body> {
    let (mut parts, incoming) = resp.into_parts();
    downstream_parts(&mut parts, upstream, client);
    Response::from_parts(parts, body::stream(incoming))
}

/// The header half of [`downstream_response`], for a body archmerge
/// buffered itself.
pub fn downstream_parts(parts: &mut response::Parts, upstream: &Upstream, client: &ClientSide) {
    strip_hop_by_hop(&mut parts.headers);
    rewrite_location(
        &mut parts.headers,
        &upstream.config.origin,
        &client.public_origin,
    );
    parts.version = Version::HTTP_11;
}

/// Maps a failed registry call to the answer the client gets.
pub fn proxy_error(e: UpstreamError) -> ProxyError {
    match e {
        UpstreamError::Timeout(d) => ProxyError::UpstreamTimeout(d),
        other => ProxyError::UpstreamUnreachable(other.to_string()),
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus any the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Rewrites `Location` headers that point at the registry's origin.
fn rewrite_location(headers: &mut HeaderMap, upstream_origin: &str, public_origin: &str) {
    let Some(value) = headers.get(header::LOCATION) else {
        return;
    };
    let Some(rewritten) = value
        .to_str()
        .ok()
        .and_then(|v| rewrite_url(v, upstream_origin, public_origin))
    else {
        return;
    };
    if let Ok(v) = HeaderValue::from_str(&rewritten) {
        headers.insert(header::LOCATION, v);
    }
}

/// `upstream_origin` + rest → `public_origin` + rest, when the URL really is
/// on the registry's origin (the next byte starts the path or query).
fn rewrite_url(url: &str, upstream_origin: &str, public_origin: &str) -> Option<String> {
    let n = upstream_origin.len();
    let head = url.get(..n)?;
    if !head.eq_ignore_ascii_case(upstream_origin) {
        return None;
    }
    let rest = &url[n..];
    if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
        return None;
    }
    Some(format!("{public_origin}{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_registry_origin() {
        let up = "http://127.0.0.1:5000";
        let public = "https://reg.example";
        assert_eq!(
            rewrite_url(
                "http://127.0.0.1:5000/v2/a/blobs/uploads/x?_state=a%2Bb%3D&digest=sha256:1",
                up,
                public
            )
            .as_deref(),
            Some("https://reg.example/v2/a/blobs/uploads/x?_state=a%2Bb%3D&digest=sha256:1")
        );
        assert_eq!(rewrite_url("http://127.0.0.1:50001/v2/", up, public), None);
        assert_eq!(rewrite_url("https://s3.example/bucket/x", up, public), None);
        assert_eq!(rewrite_url("/v2/a/blobs/uploads/x", up, public), None);
        assert_eq!(
            rewrite_url("HTTP://127.0.0.1:5000/v2/", up, public).as_deref(),
            Some("https://reg.example/v2/")
        );
    }

    #[test]
    fn drops_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-custom"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        h.insert(
            "docker-content-digest",
            HeaderValue::from_static("sha256:x"),
        );
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key(header::AUTHORIZATION));
        assert!(h.contains_key("docker-content-digest"));
    }
}
