//! Blob calls of the merge: reading a small config, and copying blobs
//! between repositories (a cross-repository mount, or a streamed copy
//! where the registry refuses the mount) for repository patterns.

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use super::{expect_ok, Auth, Upstream, UpstreamError, MAX_CONFIG_BYTES};
use crate::body::{self, ClientBody};

impl Upstream {
    /// GET of a blob, following one redirect to storage without the
    /// registry credentials.
    async fn open_blob(
        &self,
        repo: &str,
        digest: &str,
        auth: &Auth,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self.call(Method::GET, &path, auth, None, None).await?;
        if !resp.status().is_redirection() {
            return Ok(resp);
        }
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| l.parse::<Uri>().ok())
            .ok_or_else(|| UpstreamError::BadUri {
                what: format!("a {} redirect for blob {digest}", resp.status().as_u16()),
                reason: "no Location, or one that does not parse".into(),
            })?;
        let req = Request::get(self.absolute(location))
            .body(body::empty())
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        self.send(req).await
    }

    /// A URI the registry sent (maybe relative) made absolute.
    fn absolute(&self, uri: Uri) -> Uri {
        if uri.scheme().is_some() {
            uri
        } else {
            self.uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        }
    }

    /// A small blob (an image config).
    pub async fn get_small_blob(
        &self,
        repo: &str,
        digest: &str,
        auth: &Auth,
    ) -> Result<Bytes, UpstreamError> {
        let resp = self.open_blob(repo, digest, auth).await?;
        expect_ok(resp, "config blob", MAX_CONFIG_BYTES).await
    }

    /// Whether `repo` has the blob.
    pub async fn has_blob(
        &self,
        repo: &str,
        digest: &str,
        auth: &Auth,
    ) -> Result<bool, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self.call(Method::HEAD, &path, auth, None, None).await?;
        match resp.status() {
            s if s.is_success() || s.is_redirection() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => expect_ok(resp, "blob head", 0).await.map(|_| false),
        }
    }

    /// Makes `to` hold the blob `digest` of `from`: a cross-repository
    /// mount, or, where the registry refuses it, a streamed copy (the blob
    /// flows from one response body into the next request body, never held
    /// in memory).
    pub async fn copy_blob(
        &self,
        from: &str,
        to: &str,
        digest: &str,
        size: u64,
        auth: &Auth,
    ) -> Result<(), UpstreamError> {
        if self.has_blob(to, digest, auth).await? {
            return Ok(());
        }
        let path = format!("/v2/{to}/blobs/uploads/?mount={digest}&from={from}");
        let resp = self.call(Method::POST, &path, auth, None, None).await?;
        if resp.status() == StatusCode::CREATED {
            return Ok(());
        }
        let location = match resp.status() {
            StatusCode::ACCEPTED => resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            _ => None,
        };
        let Some(location) = location else {
            return expect_ok(resp, "blob mount", 4096).await.map(|_| ());
        };
        let copied = self.stream_into(&location, from, digest, size, auth).await;
        if copied.is_err() {
            // Do not leave the upload session open until the registry purges it.
            if let Ok(uri) = location.parse::<Uri>() {
                let mut req = Request::delete(self.absolute(uri));
                if let Some(a) = &auth.header {
                    req = req.header(header::AUTHORIZATION, a.clone());
                }
                if let Ok(req) = req.body(body::empty()) {
                    let _ = self.send(req).await;
                }
            }
        }
        copied
    }

    /// Streams blob `digest` of `from` into the upload at `location`.
    async fn stream_into(
        &self,
        location: &str,
        from: &str,
        digest: &str,
        size: u64,
        auth: &Auth,
    ) -> Result<(), UpstreamError> {
        let source = self.open_blob(from, digest, auth).await?;
        if !source.status().is_success() {
            return expect_ok(source, "blob", 4096).await.map(|_| ());
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let target: Uri = format!("{location}{sep}digest={digest}").parse().map_err(
            |e: http::uri::InvalidUri| UpstreamError::BadUri {
                what: format!("an upload Location {location:?}"),
                reason: e.to_string(),
            },
        )?;
        let mut req = Request::builder()
            .method(Method::PUT)
            .uri(self.absolute(target))
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size);
        if let Some(a) = &auth.header {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        let req = req
            // The source must keep coming too: `send`'s clock stops while
            // the body waits for it.
            .body(body::stream(ClientBody::registry(
                source.into_body(),
                self.headers_timeout,
            )))
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        let resp = self.send(req).await?;
        expect_ok(resp, "blob upload", 4096).await.map(|_| ())
    }
}
