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
//! `/reconcile` is refused and `/events` is open to the admin address only
//! by where it listens, which must then be loopback (config refuses any
//! other). `/events` queues its work, bounded ([`events::Queue`]): an
//! envelope that does not fit is answered 503 with `Retry-After`.

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
    let queue = events::Queue::start(app.clone());
    let admin = Listener {
        name: "admin",
        builder,
        tls: None,
        header_read: app.config.timeouts.header_read,
        max_connections: None,
        idle: app.config.timeouts.idle,
        body_progress: app.config.timeouts.body_progress,
        zero_copy: false,
        zero_copy_uploads: false,
    };
    let handler = move |req, _: Peer| {
        let (app, queue) = (app.clone(), queue.clone());
        async move { handle(&app, &queue, req).await }
    };
    admin.run(listener, handler, shutdown).await
}

async fn handle(app: &Arc<App>, queue: &events::Queue, req: Request<ClientBody>) -> Response<Body> {
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
            let repos = repos_of(req.uri().query().unwrap_or(""));
            if let Some(bad) = repos.iter().find(|r| !crate::oci::is_valid_name(r)) {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid repository {bad:?}\n"),
                );
            }
            let auth = Auth::own(app.config.upstream_credentials.as_ref());
            let scope = reconcile::Scope::All;
            match reconcile::run(&app.merger, &repos, scope, &auth, |_| {}).await {
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
                Ok(work) => match queue.push(work) {
                    Ok(()) => text(StatusCode::OK, "accepted\n"),
                    // Refused whole: the registry delivers the envelope again.
                    Err(full) => {
                        tracing::warn!(error = %full, "webhook queue full; envelope refused");
                        let mut resp = text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!("{full}; deliver again later\n"),
                        );
                        resp.headers_mut()
                            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("5"));
                        resp
                    }
                },
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

/// The `repo=` values of a `/reconcile` query, percent-decoded (so that
/// `repo=team%2Fapp`, as `curl --data-urlencode` sends it, names
/// `team/app`).
fn repos_of(query: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("repo="))
        .map(|r| {
            percent_encoding::percent_decode_str(r)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect()
}

/// Whether the request carries the configured admin token.
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
    token_matches(given, token)
}

/// `given == token`, in time that says nothing about the token: both are
/// hashed first, so the constant-time comparison always sees 32 bytes
/// (`subtle` compares slices of different lengths in no time at all, which
/// would tell the token's length).
fn token_matches(given: &str, token: &str) -> bool {
    use sha2::{Digest as _, Sha256};
    use subtle::ConstantTimeEq as _;
    let given = Sha256::digest(given.as_bytes());
    let token = Sha256::digest(token.as_bytes());
    given.as_slice().ct_eq(token.as_slice()).into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_repositories_are_read_from_the_query_percent_decoded() {
        assert_eq!(repos_of("repo=team%2Fapp&x=1&repo=db"), ["team/app", "db"]);
        assert_eq!(repos_of("repo=a/b"), ["a/b"]);
        assert_eq!(repos_of(""), Vec::<String>::new());
        // Still checked as a name afterwards: a decoded `..` is refused there.
        assert_eq!(repos_of("repo=%2e%2e"), [".."]);
    }

    #[test]
    fn the_admin_token_matches_only_itself() {
        assert!(token_matches("s3cret-token", "s3cret-token"));
        assert!(!token_matches("s3cret-tokeN", "s3cret-token"));
        assert!(!token_matches("s3cret", "s3cret-token"));
        assert!(!token_matches("s3cret-token-and-more", "s3cret-token"));
        assert!(!token_matches("", "s3cret-token"));
    }
}
