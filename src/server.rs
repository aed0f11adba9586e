//! The client listener: its HTTP/1.1 and HTTP/2 settings, and per-request
//! dispatch. Accepting, TLS, the connection limit and graceful shutdown are
//! the shared connection path of [`crate::listener`].
//!
//! [`run`] takes its listener and shutdown future from the caller, so tests
//! bind port 0 and run a real server. Each request is routed once
//! ([`crate::route::parse`]) and then either forwarded untouched or handed to
//! `intercept` (manifest PUT and DELETE); the one log line and the request
//! metric are written here, where the response is final.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

use crate::app::App;
use crate::body::{Body, ClientBody};
use crate::error::ProxyError;
use crate::forward::{self, ClientSide};
use crate::intercept;
use crate::listener::{Listener, Peer};
use crate::metrics::{method_label, RequestLabels};
use crate::route::{self, Route};
use crate::serve;
use crate::splice::Download;

/// Most bytes hyper reads ahead of a client connection's body.
const CLIENT_READ_BUF: usize = 256 * 1024;

/// Serves clients on `listener` until `shutdown` completes, then lets
/// in-flight requests finish (bounded by a drain timeout).
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.timeouts.header_read)
        .keep_alive(true)
        // Body chunks are written as handed over, never copied into one
        // buffer: zero-copy downloads (`crate::splice`) depend on it.
        .writev(true)
        // What one connection may hold of a request body archmerge has not
        // taken yet (a manifest waiting for the buffer budget): bounded per
        // connection, so stalled clients cannot pin memory past the budget.
        .max_buf_size(CLIENT_READ_BUF);
    builder
        .http2()
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .max_concurrent_streams(256)
        // A peer that is gone (no answer to a ping) is noticed and closed,
        // whatever its streams are waiting for.
        .keep_alive_interval(app.config.timeouts.h2_keepalive)
        .keep_alive_timeout(app.config.timeouts.h2_keepalive);
    let tls = match &app.config.tls {
        Some(files) => Some(crate::tls::acceptor(files)?),
        None => None,
    };
    tracing::info!(
        addr = %listener.local_addr()?,
        tls = app.config.tls.is_some(),
        upstream = %app.config.upstream.origin,
        mode = ?app.config.mode,
        "listening"
    );
    let clients = Listener {
        name: "client",
        builder,
        tls,
        header_read: app.config.timeouts.header_read,
        max_connections: Some(app.config.max_connections),
        idle: app.config.timeouts.idle,
        body_progress: app.config.timeouts.body_progress,
        zero_copy: app.config.zero_copy_downloads,
        zero_copy_uploads: app.downloads.splices_uploads(),
    };
    let handler = move |req, peer: Peer| {
        let app = app.clone();
        async move { handle(&app, req, peer.addr, peer.tls).await }
    };
    clients.run(listener, handler, shutdown).await
}

/// One request: route, then forward or intercept, then log and count.
pub async fn handle(
    app: &App,
    req: Request<ClientBody>,
    peer: SocketAddr,
    tls: bool,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let (resp, kind) = match route::parse(req.uri().path()) {
        Ok(route) => {
            let kind = route.kind();
            let result = dispatch(app, req, route, peer, tls).await;
            (
                result.unwrap_or_else(|e| e.into_response(&method, kind)),
                kind,
            )
        }
        Err(e) => (
            ProxyError::from(e).into_response(&method, "invalid"),
            "invalid",
        ),
    };
    let status = resp.status().as_u16();
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method_label(&method),
            route: kind,
            status,
        })
        .inc();
    let bytes = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // The access log: one line per request, never a header value (so never
    // a credential). `RUST_LOG=archmerge::access=warn` silences it.
    tracing::info!(
        target: crate::logs::ACCESS,
        method = %method,
        route = kind,
        status,
        elapsed_ms = started.elapsed().as_millis() as u64,
        bytes,
        "request"
    );
    resp
}

async fn dispatch(
    app: &App,
    req: Request<ClientBody>,
    route: Route,
    peer: SocketAddr,
    tls: bool,
) -> Result<Response<Body>, ProxyError> {
    let (parts, mut body) = req.into_parts();
    let client = ClientSide::of(&app.config, &parts, peer, tls);
    // A blob upload whose body the connection's reader left on the socket
    // (always one of the `Upload` route): it is spliced, or nothing reads it.
    if let Some(upload) = body.take_spliced() {
        let req = Request::from_parts(parts, body);
        return Ok(Box::pin(app.downloads.upload(&app.upstream, req, upload, &client)).await);
    }
    let req = Request::from_parts(parts, body);
    match (req.method(), route, app.indexes.served()) {
        // Boxed: serve mode's answer holds an index lookup and a registry
        // probe, several times a forward's future.
        (&Method::GET | &Method::HEAD, Route::Manifest { name, reference }, Some(aggregates)) => {
            Box::pin(serve::get_manifest(
                app, aggregates, req, name, reference, client,
            ))
            .await
        }
        // Boxed: a write's future holds a merge and is many times the size
        // of a forward's, which every request would otherwise carry and
        // copy along (hyper moves the request's future into place).
        (&Method::PUT, Route::Manifest { name, reference }, _) => {
            Box::pin(intercept::put_manifest(app, req, name, reference, client)).await
        }
        (&Method::DELETE, Route::Manifest { name, reference }, _) => {
            Box::pin(intercept::delete_manifest(
                app, req, name, reference, client,
            ))
            .await
        }
        // Boxed too: the zero-copy try holds the registry's answer head.
        (&Method::GET, Route::Blob { .. } | Route::Manifest { .. }, _) => {
            match Box::pin(app.downloads.get(&app.upstream, req, &client)).await {
                Download::Answered(resp) => Ok(resp),
                Download::TimedOut(after) => Err(ProxyError::UpstreamTimeout(after)),
                Download::Declined { req, failed } => {
                    Box::pin(forward::forward_after(&app.upstream, req, &client, failed)).await
                }
            }
        }
        // Boxed as well, so that the request's future is small whichever
        // way it goes: hyper moves it into place whole, and a GET answered
        // the zero-copy way would otherwise carry a forward's room too.
        _ => Box::pin(forward::forward(&app.upstream, req, &client)).await,
    }
}
