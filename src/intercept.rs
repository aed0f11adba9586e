//! Manifest PUT and DELETE: forward to the registry first, then bring every
//! target the write touches up to date.
//!
//! The order is the guarantee. The client's manifest is buffered (≤ 4 MiB,
//! refused with 413 before the registry is asked), forwarded, and only when
//! the registry accepted it are the targets it touches (the rules say which:
//! [`crate::rules::Rule::touches`]) brought up to date — before the client
//! gets the registry's own answer, so the last push of a CI run returns with
//! the index complete. For an arch push the rebuild's first read goes out
//! beside the PUT, and decides nothing until the registry has accepted it
//! ([`crate::merge::Merger::read_ahead`]). A failed merge never changes that
//! answer: it is logged, counted, said in a `Warning` and retried. What "up
//! to date" means is the mode's ([`crate::app::Indexes`]); nothing here
//! reads or writes indexes itself.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, request, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::sync::OwnedSemaphorePermit;

use crate::app::{Accepted, App};
use crate::body::{self, Body, ClientBody, ClientBodyError};
use crate::bounded::{self, Backoff};
use crate::error::ProxyError;
use crate::forward::{self, proxy_error, ClientSide};
use crate::merge::Pushed;
use crate::oci::MAX_MANIFEST_BYTES;
use crate::route::Reference;
use crate::rules::Write;
use crate::upstream::{Auth, FetchedManifest};

/// A manifest PUT: buffer (within the budget), forward, bring what it
/// touches up to date, answer with the registry's answer.
pub async fn put_manifest(
    app: &App,
    req: Request<ClientBody>,
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
    let limit = app.config.timeouts.header_read;
    let (bytes, _budget) =
        match tokio::time::timeout(limit, read_manifest_body(app, incoming, declared)).await {
            Ok(read) => read?,
            Err(_) => return Err(ProxyError::ClientTimeout(limit)),
        };
    let media_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let auth = Auth::client(parts.headers.get(header::AUTHORIZATION).cloned());
    let pushed = FetchedManifest {
        digest: crate::index::sha256_digest(&bytes),
        bytes: bytes.clone(),
        media_type,
    };
    let tag = match &reference {
        Reference::Tag(tag) => Some(tag.as_str()),
        Reference::Digest(_) => None,
    };
    let touches = tag.map_or_else(Vec::new, |tag| {
        app.merger.rule(repo).touches(repo, Write::Put(tag))
    });
    // The rebuild's first read goes out beside the client's PUT: an arch
    // push then waits for one round trip fewer after the registry's answer.
    let ahead = async {
        let tag = tag?;
        let pushed = Pushed {
            repo,
            tag,
            manifest: &pushed,
        };
        app.indexes.read_ahead(&touches, &auth, pushed).await
    };
    let (resp, ahead) = tokio::join!(put_upstream(app, parts, &bytes, &auth, client), ahead);
    let resp = resp?;
    let accepted_at = Instant::now();
    if !resp.status().is_success() {
        // The registry's refusal (malformed manifest, auth, …) goes back as
        // it was sent; no index is touched.
        return Ok(resp.map(body::full));
    }
    let Some(tag) = tag else {
        // A child pushed by digest before its index (buildx, `manifest push
        // --all`): remembered, so the merge that follows need not read it.
        app.merger.remember(pushed).await;
        return Ok(resp.map(body::full));
    };
    if touches.is_empty() {
        return Ok(resp.map(body::full));
    }
    let (mut parts, answer) = resp.into_parts();
    app.merger.remember(pushed.clone()).await;
    let warnings = app
        .indexes
        .after_write(Accepted {
            touches: &touches,
            auth: &auth,
            since: accepted_at,
            pushed: Some(Pushed {
                repo,
                tag,
                manifest: &pushed,
            }),
            ahead: ahead.as_ref(),
        })
        .await;
    // The push stands; a merge that failed is said, and retried in the
    // background.
    for w in warnings {
        add_warning(&mut parts.headers, &w);
    }
    Ok(Response::from_parts(parts, body::full(answer)))
}

/// PUTs the client's manifest to the registry and reads its (small) answer,
/// rewritten for the client. distribution, racing in its own storage under
/// parallel pushes that share layers, now and then refuses a manifest
/// whose blobs it does have (400 `MANIFEST_BLOB_UNKNOWN`): when every blob
/// the manifest names then proves to exist (HEADs with the client's
/// credentials), the same bytes are PUT again, at most
/// [`forward::RETRIES`] times. Nothing else is repeated.
async fn put_upstream(
    app: &App,
    parts: request::Parts,
    bytes: &Bytes,
    auth: &Auth,
    client: &ClientSide,
) -> Result<Response<Bytes>, ProxyError> {
    let mut backoff = Backoff::new(Duration::from_millis(50), 4, Duration::from_millis(400));
    let mut attempt = 0;
    loop {
        let copy = forward::copy_parts(&parts);
        let mut up =
            forward::upstream_request(&app.upstream, copy, body::full(bytes.clone()), client);
        up.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let resp = app.upstream.send(up).await.map_err(proxy_error)?;
        // Taken off the connection before any further call, so the pooled
        // connection is free for them.
        let (mut head, incoming) = resp.into_parts();
        forward::downstream_parts(&mut head, &app.upstream, client);
        let answer = Limited::new(incoming, MAX_MANIFEST_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let refused_blobs = head.status == StatusCode::BAD_REQUEST
            && crate::oci::error_codes(&answer).any(|c| c == "MANIFEST_BLOB_UNKNOWN");
        if !refused_blobs
            || attempt >= forward::RETRIES
            || !blobs_exist(app, &parts, bytes, auth).await
        {
            return Ok(Response::from_parts(head, answer));
        }
        attempt += 1;
        app.upstream.count_retry("blob_unknown");
        tracing::info!(
            attempt,
            "the registry refused a manifest whose blobs exist; sending it again"
        );
        backoff.wait().await;
    }
}

/// Whether every blob an image manifest names exists in its repository.
async fn blobs_exist(app: &App, parts: &request::Parts, bytes: &Bytes, auth: &Auth) -> bool {
    let Ok(crate::route::Route::Manifest { name, .. }) = crate::route::parse(parts.uri.path())
    else {
        return false;
    };
    let Ok(manifest) = serde_json::from_slice::<oci_spec::image::ImageManifest>(bytes) else {
        return false;
    };
    let digests = std::iter::once(manifest.config().digest().to_string())
        .chain(manifest.layers().iter().map(|l| l.digest().to_string()));
    let heads = digests.map(|d| {
        let name = &name;
        async move { app.upstream.has_blob(name, &d, auth).await }
    });
    bounded::all(heads)
        .await
        .into_iter()
        .all(|found| matches!(found, Ok(true)))
}

/// A manifest DELETE: find what it takes with it, forward, then bring every
/// target it touches up to date (a deleted target's own index stays
/// deleted).
pub async fn delete_manifest(
    app: &App,
    req: Request<ClientBody>,
    repo: String,
    reference: Reference,
    client: ClientSide,
) -> Result<Response<Body>, ProxyError> {
    let (repo, client) = (repo.as_str(), &client);
    let auth = Auth::client(req.headers().get(header::AUTHORIZATION).cloned());
    // Which arch tags does this delete take? Asked before it is gone: after
    // a delete by digest the registry no longer says which tags pointed at
    // it. A lookup that fails is not read as "none": every existing target
    // of the repository is repaired instead.
    let tags = match &reference {
        Reference::Tag(tag) => Some(vec![tag.clone()]),
        Reference::Digest(digest) => match app.merger.arch_tags_at(repo, digest, &auth).await {
            Ok(tags) => Some(tags),
            Err(e) => {
                tracing::warn!(repo, %digest, error = %e, "which arch tags a delete takes is unknown; repairing every target of the repository after it");
                None
            }
        },
    };
    let mut resp = forward::forward(&app.upstream, req, client).await?;
    if resp.status().is_success() {
        let write = match &tags {
            Some(tags) => Write::Deleted(tags),
            None => Write::DeletedUnknown,
        };
        let touches = app.merger.rule(repo).touches(repo, write);
        let accepted = Accepted {
            touches: &touches,
            auth: &auth,
            since: Instant::now(),
            pushed: None,
            ahead: None,
        };
        // Failures are logged, counted, retried inside, and said.
        for w in app.indexes.after_write(accepted).await {
            add_warning(resp.headers_mut(), &w);
        }
    }
    Ok(resp)
}

/// Says a merge that failed in a `Warning` (RFC 9111 §5.5, code 199
/// "miscellaneous"); the write itself stands.
fn add_warning(headers: &mut http::HeaderMap, text: &str) {
    let text = format!("199 archmerge {:?}", text.replace('"', "'"));
    if let Ok(v) = HeaderValue::from_str(&text) {
        headers.append(header::WARNING, v);
    }
}

/// Most of a refused body archmerge reads (and drops) before answering, and
/// how long it waits for it: many clients only read the answer once they
/// have sent their whole body, and would see a broken pipe instead of 413.
const DRAIN_CAP: u64 = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Reads and drops a refused body, bounded in size and time; past either
/// bound the connection is closed instead.
async fn drain(mut incoming: ClientBody) {
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

/// How long a manifest body waits for room in the buffer budget before it
/// is refused with 503.
const BUDGET_WAIT: Duration = Duration::from_secs(2);

/// Buffers a manifest body, refusing (and draining) more than the limit,
/// and holding what the buffer allocates in the global budget (returned;
/// released when dropped) for as long as the bytes are kept. The buffer
/// grows in steps the budget grants first, so its capacity, not only its
/// length, is what is counted.
async fn read_manifest_body(
    app: &App,
    mut incoming: ClientBody,
    declared: Option<u64>,
) -> Result<(Bytes, OwnedSemaphorePermit), ProxyError> {
    // Refused for the budget, a body is not drained first (as an oversized
    // one is): reading it is what the budget bounds. A legitimate manifest
    // is small and already sent; its client reads the 503 and retries.
    let mut held = reserve(app, None, declared.unwrap_or(0) as usize).await?;
    let mut buf = bytes::BytesMut::with_capacity(held.num_permits() * 1024);
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| match e {
            ClientBodyError::Stalled(limit) => ProxyError::ClientStalled(limit),
            other => ProxyError::ClientBody(other.to_string()),
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let needed = buf.len() + data.len();
        if needed > MAX_MANIFEST_BYTES {
            drop(held);
            drain(incoming).await;
            return Err(ProxyError::ManifestTooLarge {
                limit: MAX_MANIFEST_BYTES,
            });
        }
        if needed > buf.capacity() {
            // Double, as a growing buffer would, within the limit.
            let grow_to = needed.max(buf.capacity() * 2).min(MAX_MANIFEST_BYTES);
            held = reserve(app, Some(held), grow_to).await?;
            buf.reserve(grow_to - buf.len());
        }
        buf.extend_from_slice(data);
    }
    Ok((buf.freeze(), held))
}

/// Makes `held` cover `bytes` (in KiB permits), waiting at most
/// [`BUDGET_WAIT`] for the budget; past that, 503.
async fn reserve(
    app: &App,
    held: Option<OwnedSemaphorePermit>,
    bytes: usize,
) -> Result<OwnedSemaphorePermit, ProxyError> {
    let want = bytes.div_ceil(1024);
    let have = held.as_ref().map_or(0, |p| p.num_permits());
    let more = want.saturating_sub(have) as u32;
    let budget = app.manifest_budget.clone();
    let got = match tokio::time::timeout(BUDGET_WAIT, budget.acquire_many_owned(more)).await {
        Ok(Ok(p)) => p,
        _ => return Err(ProxyError::Busy("too many manifest bytes are buffered")),
    };
    Ok(match held {
        Some(mut h) => {
            h.merge(got);
            h
        }
        None => got,
    })
}
