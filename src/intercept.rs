//! Manifest PUT and DELETE: forward to the registry first, then hand arch
//! tags to the merge.
//!
//! The order is the guarantee. The client's manifest is buffered (≤ 4 MiB,
//! refused with 413 before the registry is asked), forwarded, and only when
//! the registry accepted it is the target index brought up to date — before
//! the client gets the registry's own answer, so the last push of a CI run
//! returns with the index complete. A failed merge never changes that
//! answer: it is logged, counted and retried by `merge`. Nothing here reads
//! or writes indexes itself; in serve mode nothing is merged at push time,
//! the target's cached aggregate is only dropped.

use std::time::{Duration, Instant};

use crate::body::ClientBody as Incoming;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Limited};

use crate::app::App;
use crate::body::{self, Body};
use crate::config::Mode;
use crate::error::ProxyError;
use crate::forward::{self, proxy_error, ClientSide};
use crate::merge::Pushed;
use crate::oci::MAX_MANIFEST_BYTES;
use crate::route::Reference;
use crate::upstream::{Auth, FetchedManifest};

/// A manifest PUT: buffer, forward, merge when it was an arch tag, answer.
pub async fn put_manifest(
    app: &App,
    req: Request<Incoming>,
    repo: String,
    reference: Reference,
    client: ClientSide,
) -> Result<Response<Body>, ProxyError> {
    let (repo, client) = (repo.as_str(), &client);
    let (parts, incoming) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_MANIFEST_BYTES as u64) {
        drain(incoming).await;
        return Err(ProxyError::ManifestTooLarge {
            limit: MAX_MANIFEST_BYTES,
        });
    }
    let bytes = read_manifest_body(incoming).await?;
    let media_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let auth = Auth::client(parts.headers.get(header::AUTHORIZATION).cloned());

    let mut up = forward::upstream_request(&app.upstream, parts, body::full(bytes.clone()), client);
    up.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let resp = app.upstream.send(up).await.map_err(proxy_error)?;
    let accepted_at = Instant::now();
    if !resp.status().is_success() {
        // The registry's refusal (malformed manifest, auth, …) goes back as
        // it was sent; no index is touched.
        return Ok(forward::downstream_response(resp, &app.upstream, client));
    }
    let Reference::Tag(tag) = reference else {
        return Ok(forward::downstream_response(resp, &app.upstream, client));
    };
    // An arch tag of this repository, or, under a repository pattern, a tag
    // of a per-arch repository whose index lives in another repository.
    let rule = app.merger.rule(repo);
    let Some((target_repo, arch)) = rule
        .match_tag(&tag)
        .map(|a| (repo.to_owned(), a))
        .or_else(|| rule.match_repository(repo, &tag))
    else {
        return Ok(forward::downstream_response(resp, &app.upstream, client));
    };
    // Take the registry's (small) answer off the connection before the
    // merge's own calls, so the pooled connection is free for them.
    let (mut parts, incoming) = resp.into_parts();
    forward::downstream_parts(&mut parts, &app.upstream, client);
    let answer = Limited::new(incoming, MAX_MANIFEST_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let pushed = FetchedManifest {
        digest: crate::index::sha256_digest(&bytes),
        bytes,
        media_type,
    };
    let warning = match app.config.mode {
        Mode::Write => {
            let pushed = Pushed {
                repo,
                tag: &tag,
                manifest: &pushed,
            };
            app.merger
                .after_push(&target_repo, &arch, pushed, &auth, accepted_at)
                .await
        }
        Mode::Serve => {
            app.merger.remember(pushed).await;
            app.aggregates.invalidate(&target_repo, &arch.target).await;
            None
        }
    };
    // The push stands; a merge that failed is said in a `Warning` (RFC 9111
    // §5.5, code 199 "miscellaneous"), and retried in the background.
    if let Some(w) = warning {
        let text = format!("199 archmerge {:?}", w.replace('"', "'"));
        if let Ok(v) = HeaderValue::from_str(&text) {
            parts.headers.append(header::WARNING, v);
        }
    }
    Ok(Response::from_parts(parts, body::full(answer)))
}

/// A manifest DELETE: forward, then rebuild every target that listed it.
pub async fn delete_manifest(
    app: &App,
    req: Request<Incoming>,
    repo: String,
    reference: Reference,
    client: ClientSide,
) -> Result<Response<Body>, ProxyError> {
    let (repo, client) = (repo.as_str(), &client);
    let auth = Auth::client(req.headers().get(header::AUTHORIZATION).cloned());
    // Which targets does this manifest feed? Ask before it is gone: after a
    // delete by digest the registry no longer says which tags pointed at it.
    let targets = match &reference {
        Reference::Digest(digest) => app.merger.targets_of_digest(repo, digest, &auth).await,
        Reference::Tag(tag) => app
            .merger
            .rule(repo)
            .match_tag(tag)
            .map(|a| vec![a.target])
            .unwrap_or_default(),
    };
    let resp = forward::forward(&app.upstream, req, client).await?;
    if resp.status().is_success() {
        let since = Instant::now();
        for target in targets {
            match app.config.mode {
                Mode::Write => app.merger.after_delete(repo, &target, &auth, since).await,
                Mode::Serve => app.aggregates.invalidate(repo, &target).await,
            }
        }
    }
    Ok(resp)
}

/// Most of a refused body archmerge reads (and drops) before answering, and
/// how long it waits for it: many clients only read the answer once they
/// have sent their whole body, and would see a broken pipe instead of 413.
const DRAIN_CAP: u64 = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Reads and drops a refused body, bounded in size and time; past either
/// bound the connection is closed instead.
async fn drain(mut incoming: Incoming) {
    let mut seen = 0u64;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = incoming.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_CAP {
                break;
            }
        }
    })
    .await;
}

/// Buffers a manifest body, refusing (and draining) more than the limit.
async fn read_manifest_body(mut incoming: Incoming) -> Result<Bytes, ProxyError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| ProxyError::ClientBody(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > MAX_MANIFEST_BYTES {
                drain(incoming).await;
                return Err(ProxyError::ManifestTooLarge {
                    limit: MAX_MANIFEST_BYTES,
                });
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(buf.freeze())
}
