//! The transparent pass-through: a client request goes to the registry and
//! the registry's answer comes back, both streamed.
//!
//! Bodies are handed over frame by frame ([`crate::body::stream`]), so a blob
//! never sits in archmerge's memory and a slow reader slows the writer
//! (backpressure). Only hop-by-hop headers are dropped; `Host` becomes the
//! registry's; the forwarding headers (`Forwarded`, `X-Forwarded-*`) are
//! archmerge's own, never the client's; a `Location` that points at the
//! registry's own origin is rewritten to archmerge's public origin with path
//! and query kept byte for byte. Everything else —
//! `Authorization`, `WWW-Authenticate`, `Range`, `Content-Range`,
//! `Docker-*`, `OCI-*`, `Link`, `ETag`, error bodies — passes untouched.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, response, Request, Response, Version};
use hyper::body::Incoming;

use crate::body::{self, Body, ClientBody};
use crate::bounded::Backoff;
use crate::config::Config;
use crate::error::ProxyError;
use crate::upstream::{Upstream, UpstreamError};

/// Per-request facts about where the client came from.
#[derive(Clone, Debug)]
pub struct ClientSide {
    /// `scheme://host[:port]` the client used to reach archmerge (or the
    /// configured `public_url`): the origin `Location` headers get.
    pub public_origin: String,
    /// Host part of `public_origin`, sent as `X-Forwarded-Host` and as the
    /// `host` of `Forwarded`.
    pub forwarded_host: String,
    /// Scheme of `public_origin`, sent as `X-Forwarded-Proto` and as the
    /// `proto` of `Forwarded`.
    pub forwarded_proto: &'static str,
    /// The client's address, sent as `X-Forwarded-For` and as the `for` of
    /// `Forwarded`.
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
        let mut public_origin = String::with_capacity(proto.len() + 3 + host.len());
        public_origin.push_str(proto);
        public_origin.push_str("://");
        public_origin.push_str(&host);
        ClientSide {
            public_origin,
            forwarded_host: host,
            forwarded_proto: proto,
            peer,
        }
    }
}

/// How many times a request that is safe to repeat is sent again after the
/// registry failed it transiently.
pub const RETRIES: usize = 2;

/// Forwards a request with its streamed body and streams the answer back.
/// A GET or HEAD without a body is safe to repeat: a registry 5xx, or a
/// connection that broke before any answer, is tried again ([`RETRIES`]
/// times, short backoff); nothing else ever is.
pub async fn forward(
    upstream: &Upstream,
    req: Request<ClientBody>,
    client: &ClientSide,
) -> Result<Response<Body>, ProxyError> {
    forward_after(upstream, req, client, None).await
}

/// [`forward`] after a first try made another way (a zero-copy download)
/// failed for `failed` (`status_5xx`, `unreachable`): that try counts as
/// the first of the [`RETRIES`] + 1.
pub async fn forward_after(
    upstream: &Upstream,
    req: Request<ClientBody>,
    client: &ClientSide,
    failed: Option<&'static str>,
) -> Result<Response<Body>, ProxyError> {
    use http_body::Body as _;
    let (parts, mut incoming) = req.into_parts();
    let repeatable =
        matches!(parts.method, http::Method::GET | http::Method::HEAD) && incoming.is_end_stream();
    if !repeatable {
        // A client body that stalled, broke off or was malformed reaches us
        // as the upstream client's error: answer it as the client's fault,
        // not the registry's.
        let failed = incoming.failure();
        let limit = incoming.limit();
        let gathered = body::Gathered::new(incoming);
        let req = upstream_request(upstream, parts, body::stream(gathered), client);
        let resp = upstream.send(req).await.map_err(|e| {
            if failed.stalled() {
                ProxyError::ClientStalled(limit)
            } else if let Some(why) = failed.broken() {
                ProxyError::UploadBroken(format!("the client's body broke off: {why}"))
            } else {
                proxy_error(e)
            }
        })?;
        return Ok(downstream_response(resp, upstream, client));
    }
    let mut backoff = Backoff::new(Duration::from_millis(50), 4, Duration::from_millis(400));
    let mut attempt = 0;
    if let Some(reason) = failed {
        attempt += 1;
        upstream.count_retry(reason);
        backoff.wait().await;
    }
    loop {
        let req = upstream_request(upstream, copy_parts(&parts), body::empty(), client);
        let reason = match upstream.send(req).await {
            Ok(resp) if resp.status().is_server_error() && attempt < RETRIES => "status_5xx",
            Err(UpstreamError::Unreachable(_)) if attempt < RETRIES => "unreachable",
            Ok(resp) => return Ok(downstream_response(resp, upstream, client)),
            Err(e) => return Err(proxy_error(e)),
        };
        attempt += 1;
        upstream.count_retry(reason);
        tracing::debug!(method = %parts.method, reason, attempt, "retrying a request that is safe to repeat");
        backoff.wait().await;
    }
}

/// The parts of a request without a body, again (`Parts` is not `Clone`:
/// its extensions are not; none are needed upstream).
pub fn copy_parts(parts: &request::Parts) -> request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// The request archmerge sends to the registry for a client's request.
pub fn upstream_request(
    upstream: &Upstream,
    parts: request::Parts,
    body: Body,
    client: &ClientSide,
) -> Request<Body> {
    // The client's header map is rewritten in place and sent on.
    let mut headers = parts.headers;
    rewrite_request_headers(&mut headers, upstream.host(), client);
    let mut req = Request::new(body);
    *req.method_mut() = parts.method;
    *req.uri_mut() = upstream.uri_of(&parts.uri);
    // The pooled client picks HTTP/2 itself when ALPN offers it.
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

/// A client's request headers made the registry's, in place: what stays
/// behind ([`StaysBehind`]) goes, and `host` (when there is one to send)
/// and archmerge's [`forwarding`] headers come in.
fn rewrite_request_headers(
    headers: &mut HeaderMap,
    host: Option<&HeaderValue>,
    client: &ClientSide,
) {
    let stays = StaysBehind::of(headers);
    // Most requests carry nothing to drop but a `Host` that is replaced
    // anyway: one scan, and a list only when there is more.
    if headers
        .keys()
        .any(|n| *n != header::HOST && stays.contains(n))
    {
        let gone: Vec<HeaderName> = headers
            .keys()
            .filter(|n| stays.contains(n))
            .cloned()
            .collect();
        for name in gone {
            headers.remove(name);
        }
    }
    match host {
        Some(host) => headers.insert(header::HOST, host.clone()),
        None => headers.remove(header::HOST),
    };
    for (name, value) in forwarding(client).into_iter().flatten() {
        headers.insert(name, value);
    }
}

/// Which of a client's request headers stay behind on the way to the
/// registry: the hop-by-hop ones and those `Connection` names (RFC 9110
/// §7.6.1); `Host`, since the registry gets its own; `Expect`, since the
/// upstream client has no 100-continue support (hyper answers the client's
/// itself when the body is first polled); and every forwarding header,
/// since archmerge sends its own ([`forwarding`]).
pub(crate) struct StaysBehind<'a> {
    hop_by_hop: HopByHop<'a>,
}

impl<'a> StaysBehind<'a> {
    pub(crate) fn of(headers: &'a HeaderMap) -> StaysBehind<'a> {
        StaysBehind {
            hop_by_hop: HopByHop::of(headers),
        }
    }

    pub(crate) fn contains(&self, name: &HeaderName) -> bool {
        *name == header::HOST
            || *name == header::EXPECT
            || is_forwarding(name)
            || self.hop_by_hop.contains(name)
    }
}

/// Which of a message's headers describe one connection, not the message
/// (RFC 9110 §7.6.1): the [`HOP_BY_HOP`] ones and any its `Connection`
/// headers name.
struct HopByHop<'a> {
    /// The message's headers, when it has a `Connection` header whose
    /// options may name more.
    connection: Option<&'a HeaderMap>,
}

impl<'a> HopByHop<'a> {
    fn of(headers: &'a HeaderMap) -> HopByHop<'a> {
        HopByHop {
            connection: headers.contains_key(header::CONNECTION).then_some(headers),
        }
    }

    fn contains(&self, name: &HeaderName) -> bool {
        is_hop_by_hop(name)
            || self.connection.is_some_and(|headers| {
                connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(name.as_str()))
            })
    }
}

// Made at compile time: `from_static` in a function checks its argument
// on every call.
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The forwarding headers archmerge sends in place of whatever the client
/// sent. The registry builds the `Location` of an upload from them
/// (distribution 2.8 takes `Forwarded` ahead of `X-Forwarded-*`, and only
/// `Location`s on its own origin are rewritten on the way back), and logs
/// and notifies the client address they name: a client's own would steer
/// its uploads elsewhere and put any address in the registry's records.
///
/// The three values that name the client are slices of the one buffer
/// `Forwarded` is written into: one allocation per request.
pub(crate) fn forwarding(client: &ClientSide) -> [Option<(HeaderName, HeaderValue)>; 4] {
    let proto = client.forwarded_proto;
    let peer = client.peer.ip();
    let mut out = [
        Some((X_FORWARDED_PROTO, HeaderValue::from_static(proto))),
        None,
        None,
        None,
    ];
    let host = &client.forwarded_host;
    // RFC 7239: an IPv6 node and a host with a port are quoted strings.
    let mut forwarded = String::with_capacity(32 + host.len());
    forwarded.push_str("for=");
    if peer.is_ipv6() {
        forwarded.push_str("\"[");
    }
    let ip_start = forwarded.len();
    push_ip(&mut forwarded, peer);
    let ip_end = forwarded.len();
    if peer.is_ipv6() {
        forwarded.push_str("]\"");
    }
    forwarded.push_str(";host=\"");
    let host_start = forwarded.len();
    for c in host.chars() {
        if c == '\\' || c == '"' {
            forwarded.push('\\');
        }
        forwarded.push(c);
    }
    let host_end = forwarded.len();
    forwarded.push_str("\";proto=");
    forwarded.push_str(proto);
    let forwarded = bytes::Bytes::from(forwarded);
    let value =
        |range: std::ops::Range<usize>| HeaderValue::from_maybe_shared(forwarded.slice(range));
    out[1] = value(ip_start..ip_end).ok().map(|v| (X_FORWARDED_FOR, v));
    // The host as it is when nothing in it was escaped.
    let host_value = if host_end - host_start == host.len() {
        value(host_start..host_end)
    } else {
        HeaderValue::from_str(host)
    };
    let Ok(host_value) = host_value else {
        return out;
    };
    out[2] = Some((X_FORWARDED_HOST, host_value));
    out[3] = HeaderValue::from_maybe_shared(forwarded)
        .ok()
        .map(|v| (header::FORWARDED, v));
    out
}

/// `ip` as `Display` writes it; an IPv4 address without `fmt`'s machinery,
/// which took a third of what the forwarding headers cost a request.
fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    use std::fmt::Write as _;
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(octet));
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A forwarding header a client may send and archmerge replaces.
fn is_forwarding(name: &HeaderName) -> bool {
    let name = name.as_str();
    name == "forwarded" || name == "x-real-ip" || name.starts_with("x-forwarded-")
}

/// The response archmerge sends back for the registry's response.
pub fn downstream_response(
    resp: Response<Incoming>,
    upstream: &Upstream,
    client: &ClientSide,
) -> Response<Body> {
    // A registry that stops sending mid-body ends the answer (the client
    // sees it cut short) instead of holding the client's connection.
    let limit = upstream.headers_timeout();
    let resp = resp.map(|incoming| body::stream(ClientBody::registry(incoming, limit)));
    downstream_body(resp, upstream, client)
}

/// [`downstream_response`] for a body archmerge reads itself.
pub fn downstream_body(
    resp: Response<Body>,
    upstream: &Upstream,
    client: &ClientSide,
) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    downstream_parts(&mut parts, upstream, client);
    Response::from_parts(parts, body)
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
        UpstreamError::Unreachable(reason) => ProxyError::UpstreamUnreachable(reason),
        // Only archmerge's own typed calls read bodies and follow URIs; the
        // calls a client's request makes fail as one of the two above.
        other @ (UpstreamError::Status { .. }
        | UpstreamError::Body { .. }
        | UpstreamError::Malformed { .. }
        | UpstreamError::NotFound { .. }
        | UpstreamError::BadUri { .. }) => ProxyError::UpstreamUnreachable(other.to_string()),
    }
}

/// Removes the headers that describe one connection ([`HopByHop`]).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none (a `Connection` header is one itself): one
    // scan instead of a removal for each.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let hop_by_hop = HopByHop::of(headers);
    let gone: Vec<HeaderName> = headers
        .keys()
        .filter(|n| hop_by_hop.contains(n))
        .cloned()
        .collect();
    for name in gone {
        headers.remove(name);
    }
}

/// The options a message's `Connection` headers list (header names, or
/// `close`), trimmed.
pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The headers [`HopByHop`] names whatever `Connection` says.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

/// Whether a header is one of [`HOP_BY_HOP`].
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
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

    fn client(host: &str, peer: &str) -> ClientSide {
        ClientSide {
            public_origin: format!("https://{host}"),
            forwarded_host: host.to_owned(),
            forwarded_proto: "https",
            peer: peer.parse().unwrap(),
        }
    }

    fn values<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn forwarding_headers_are_archmerges_own() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("forwarded", "host=evil.example;proto=http"),
            ("forwarded", "for=192.0.2.1"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-port", "8443"),
            ("x-forwarded-prefix", "/evil"),
            ("x-real-ip", "192.0.2.1"),
            ("authorization", "Basic eA=="),
        ] {
            h.append(name, HeaderValue::from_static(value));
        }
        rewrite_request_headers(&mut h, None, &client("reg.example:5443", "10.0.0.7:40000"));
        assert_eq!(
            values(&h, "forwarded"),
            [r#"for=10.0.0.7;host="reg.example:5443";proto=https"#]
        );
        assert_eq!(values(&h, "x-forwarded-host"), ["reg.example:5443"]);
        assert_eq!(values(&h, "x-forwarded-proto"), ["https"]);
        assert_eq!(values(&h, "x-forwarded-for"), ["10.0.0.7"]);
        for gone in ["x-forwarded-port", "x-forwarded-prefix", "x-real-ip"] {
            assert!(!h.contains_key(gone), "{gone} kept");
        }
        assert_eq!(values(&h, "authorization"), ["Basic eA=="]);
        assert_eq!(h.len(), 5, "{h:?}");
    }

    #[test]
    fn forwarded_quotes_an_ipv6_node_and_escapes_the_host() {
        let mut h = HeaderMap::new();
        rewrite_request_headers(&mut h, None, &client(r#"a"b\c"#, "[::1]:40000"));
        assert_eq!(
            values(&h, "forwarded"),
            [r#"for="[::1]";host="a\"b\\c";proto=https"#]
        );
        assert_eq!(values(&h, "x-forwarded-for"), ["::1"]);
    }

    #[test]
    fn an_address_is_written_as_display_writes_it() {
        for ip in [
            "10.0.0.7",
            "0.0.0.0",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "::ffff:10.0.0.7",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn an_unreachable_registry_is_said_once() {
        let e = proxy_error(UpstreamError::Unreachable("connection refused".into()));
        assert_eq!(
            e.to_string(),
            "the registry is unreachable: connection refused"
        );
        let e = proxy_error(UpstreamError::Timeout(std::time::Duration::from_secs(3)));
        assert!(matches!(e, ProxyError::UpstreamTimeout(_)), "{e:?}");
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
