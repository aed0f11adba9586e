//! The admin listener: liveness, readiness and metrics, on their own
//! (loopback by default) address so they are never exposed with the
//! registry API.
//!
//! - `GET /healthz` — 200 while the process serves.
//! - `GET /readyz` — 200 when the registry answers `/v2/` with 200 or 401,
//!   503 otherwise.
//! - `GET /metrics` — Prometheus text format.
//! - `POST /reconcile[?repo=NAME]` — reconcile one repository or the whole
//!   catalog; answers the summary as JSON.
//! - `POST /events` — the registry's notification webhook ([`crate::events`]).
//!
//! The two POST endpoints change the registry, so they need
//! `Authorization: Bearer <admin_token>`; with no token configured,
//! `/reconcile` is refused and `/events` is open to the (loopback) admin
//! address only by where it listens.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

use http_body_util::{BodyExt, Limited};

use crate::app::App;
use crate::body::{self, Body, ClientBody};
use crate::listener::{Listener, Peer};
use crate::upstream::Auth;
use crate::{events, reconcile};

/// Largest notification envelope read.
const MAX_EVENTS_BYTES: usize = 4 * 1024 * 1024;

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
    tracing::info!(addr = %listener.local_addr()?, "admin listening");
    let admin = Listener {
        name: "admin",
        builder,
        tls: None,
        header_read: app.config.timeouts.header_read,
        max_connections: None,
        idle: app.config.timeouts.idle,
        body_progress: app.config.timeouts.body_progress,
    };
    let handler = move |req, _: Peer| {
        let app = app.clone();
        async move { handle(&app, req).await }
    };
    admin.run(listener, handler, shutdown).await
}

async fn handle(app: &Arc<App>, req: Request<ClientBody>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/reconcile") => {
            if app.config.admin_token.is_none() {
                return text(
                    StatusCode::FORBIDDEN,
                    "set admin_token (ARCHMERGE_ADMIN_TOKEN) to enable POST /reconcile\n",
                );
            }
            if !authorized(app, &req) {
                return text(
                    StatusCode::UNAUTHORIZED,
                    "a valid admin token is required\n",
                );
            }
            let repos: Vec<String> = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.strip_prefix("repo="))
                .map(|r| r.to_owned())
                .collect();
            if let Some(bad) = repos.iter().find(|r| !crate::oci::is_valid_name(r)) {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid repository {bad:?}\n"),
                );
            }
            let auth = Auth::own(app.config.upstream_credentials.as_ref());
            match reconcile::run(&app.merger, &app.upstream, &repos, &auth, |_| {}).await {
                Ok(summary) => {
                    let json = serde_json::to_string(&summary).unwrap_or_default();
                    let mut resp = text(StatusCode::OK, &json);
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    resp
                }
                Err(e) => text(StatusCode::BAD_GATEWAY, &format!("reconcile failed: {e}\n")),
            }
        }
        (&Method::POST, "/events") => {
            if app.config.admin_token.is_some() && !authorized(app, &req) {
                return text(
                    StatusCode::UNAUTHORIZED,
                    "a valid admin token is required\n",
                );
            }
            let body = match Limited::new(req.into_body(), MAX_EVENTS_BYTES)
                .collect()
                .await
            {
                Ok(c) => c.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("reading events: {e}\n")),
            };
            match events::parse(&body, &app.config.merge.rules) {
                Ok(work) => {
                    events::apply(app, work);
                    text(StatusCode::OK, "accepted\n")
                }
                Err(e) => text(
                    StatusCode::BAD_REQUEST,
                    &format!("not an event envelope: {e}\n"),
                ),
            }
        }
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

/// Whether the request carries the configured admin token (compared in
/// constant time, so the comparison leaks nothing about the token).
fn authorized<B>(app: &App, req: &Request<B>) -> bool {
    let Some(token) = &app.config.admin_token else {
        return false;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
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
