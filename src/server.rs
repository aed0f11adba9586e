//! The client listener: accept loop, HTTP/1.1 and HTTP/2 on one port,
//! per-request dispatch, graceful shutdown.
//!
//! [`run`] takes its listener and shutdown future from the caller, so tests
//! bind port 0 and run a real server. Each request is routed once
//! ([`crate::route::parse`]) and then either forwarded untouched or handed to
//! `intercept` (manifest PUT and DELETE); the one log line and the request
//! metric are written here, where the response is final.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::app::App;
use crate::body::Body;
use crate::error::ProxyError;
use crate::forward::{self, ClientSide};
use crate::intercept;
use crate::metrics::{method_label, RequestLabels};
use crate::route::{self, Route};
use crate::serve;

/// How long in-flight requests may run after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

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
        .max_buf_size(1024 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .max_concurrent_streams(256);
    let acceptor = match &app.config.tls {
        Some(files) => Some(crate::tls::acceptor(files)?),
        None => None,
    };
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(app.config.max_connections));
    tokio::pin!(shutdown);
    tracing::info!(
        addr = %listener.local_addr()?,
        tls = app.config.tls.is_some(),
        upstream = %app.config.upstream.origin,
        mode = ?app.config.mode,
        "listening"
    );
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // Past the connection limit a client gets a clear 503, not a hang.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, peer));
            continue;
        };
        let tls = acceptor.is_some();
        let app2 = app.clone();
        let service = service_fn(move |req| {
            let app = app2.clone();
            async move { Ok::<_, Infallible>(handle(&app, req, peer, tls).await) }
        });
        match &acceptor {
            None => {
                let (builder, watcher) = (builder.clone(), graceful.watcher());
                let limit = app.config.timeouts.header_read;
                tokio::spawn(async move {
                    if !first_bytes(&stream, limit).await {
                        tracing::debug!(%peer, "no request within the header timeout");
                        return;
                    }
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Some(acceptor) => {
                // The handshake runs in the connection's task, bounded like
                // the request headers, so a slow client holds up nobody.
                let (acceptor, builder, watcher) =
                    (acceptor.clone(), builder.clone(), graceful.watcher());
                let limit = app.config.timeouts.header_read;
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
        }
    }
    tracing::info!("shutting down; draining in-flight requests");
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed; closing remaining connections");
    }
    Ok(())
}

/// Answers a connection over the limit with a 503 and an OCI error body,
/// then closes it (bounded in time: a client that does not read is dropped).
async fn refuse(mut stream: tokio::net::TcpStream, peer: SocketAddr) {
    use tokio::io::AsyncWriteExt;
    tracing::warn!(%peer, "connection limit reached; refusing a connection");
    let body = crate::oci::ErrorBody::render(
        crate::oci::ErrorCode::TooManyRequests,
        "archmerge is at its connection limit; retry later",
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        // Read the request head first (bounded): a client library that gets
        // an answer before it has written reports a broken connection, not
        // the 503.
        let _ = tokio::time::timeout(Duration::from_secs(1), read_head(&mut stream)).await;
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    })
    .await;
}

/// Reads (and drops) what the client sends until the end of a request head,
/// at most 16 KiB.
async fn read_head(stream: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = 0;
    while seen < buf.len() {
        let n = stream.read(&mut buf[seen..]).await?;
        if n == 0 {
            break;
        }
        seen += n;
        if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Ok(())
}

/// Waits, bounded by the header timeout, until the client has sent enough
/// to tell HTTP/1 from HTTP/2: the protocol detection reads before hyper's
/// own header timeout starts, so a client that sends nothing (or trickles
/// the HTTP/2 preface) would otherwise hold its connection forever.
async fn first_bytes(stream: &tokio::net::TcpStream, limit: Duration) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let wait = async {
        let mut buf = [0u8; PREFACE.len()];
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            // Enough to decide: a full preface, or bytes that are not one.
            if n == PREFACE.len() || buf[..n] != PREFACE[..n] {
                return true;
            }
            // A partial preface: `peek` would return at once again.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(limit, wait).await.unwrap_or(false)
}

/// One request: route, then forward or intercept, then log and count.
pub async fn handle(
    app: &App,
    req: Request<Incoming>,
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
        target: "archmerge::access",
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
    req: Request<Incoming>,
    route: Route,
    peer: SocketAddr,
    tls: bool,
) -> Result<Response<Body>, ProxyError> {
    let (parts, body) = req.into_parts();
    let client = ClientSide::of(&app.config, &parts, peer, tls);
    let req = Request::from_parts(parts, body);
    match (req.method(), route, app.indexes.served()) {
        (&Method::GET | &Method::HEAD, Route::Manifest { name, reference }, Some(aggregates)) => {
            serve::get_manifest(app, aggregates, req, name, reference, client).await
        }
        (&Method::PUT, Route::Manifest { name, reference }, _) => {
            intercept::put_manifest(app, req, name, reference, client).await
        }
        (&Method::DELETE, Route::Manifest { name, reference }, _) => {
            intercept::delete_manifest(app, req, name, reference, client).await
        }
        _ => forward::forward(&app.upstream, req, &client).await,
    }
}
