//! The admin listener: liveness, readiness and metrics, on their own
//! (loopback by default) address so they are never exposed with the
//! registry API.
//!
//! - `GET /healthz` — 200 while the process serves.
//! - `GET /readyz` — 200 when the registry answers `/v2/` with 200 or 401,
//!   503 otherwise.
//! - `GET /metrics` — Prometheus text format.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

use crate::body::{self, Body};
use crate::server::App;

/// How long `/readyz` waits for the registry.
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// Serves the admin endpoints until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.timeouts.header_read);
    tokio::pin!(shutdown);
    tracing::info!(addr = %listener.local_addr()?, "admin listening");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(handle(&app, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            let ready = tokio::time::timeout(READY_TIMEOUT, app.upstream.ping()).await;
            match ready {
                Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
                Ok(Err(e)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: {e}\n"),
                ),
                Err(_) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the registry did not answer in time\n",
                ),
            }
        }
        (&Method::GET, "/metrics") => {
            let mut resp = text(StatusCode::OK, &app.metrics.encode());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, s: &str) -> Response<Body> {
    let mut resp = Response::new(body::full(s.to_owned()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
