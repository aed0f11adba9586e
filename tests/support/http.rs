//! Speaking the distribution API over raw HTTP: clients that show
//! redirects, response helpers, the OCI error body, and seeding a registry
//! (or archmerge) with blobs, manifests and small images.

use std::fs;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::LOCATION;
use reqwest::Response;

use super::{build_oci_layout, digest_of, ImageSpec};

// === clients ===

/// An HTTP/1.1 client that follows no redirect (a 307 and its `Location`
/// reach the test as they would reach docker) and has no total timeout
/// (blob streams may be long).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("building the HTTP client")
}

/// An HTTP/2 client with prior knowledge (h2c, no TLS, no upgrade dance).
pub fn h2c() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .http2_prior_knowledge()
        .build()
        .expect("building the h2c client")
}

/// The OCI error body `{"errors":[{"code":…,"message":…}]}`: returns the
/// codes, or panics showing the body when it is not that shape.
pub fn oci_error_codes(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
    let errors = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("error body has no `errors` array: {text}"));
    assert!(!errors.is_empty(), "empty `errors` array: {text}");
    errors
        .iter()
        .map(|e| {
            let code = e["code"].as_str().unwrap_or_default();
            assert!(!code.is_empty(), "error without a code: {text}");
            assert!(e["message"].is_string(), "error without a message: {text}");
            code.to_owned()
        })
        .collect()
}

// === seeding a registry over raw HTTP ===

/// OCI media types the helpers use.
pub mod media {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI gzip layer.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// Docker schema2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
}

/// Uploads `data` as a blob of `repo` the way docker does for small blobs:
/// `POST` for a session, then one `PUT ?digest=` with the body.
/// (distribution 2.8 ignores a body on `POST ?digest=` and just opens a
/// session, so the single-POST form is not used here.) Returns the digest.
/// Panics on failure.
pub async fn put_blob(client: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> String {
    let digest = digest_of(data);
    let res = client
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .expect("POST blob upload");
    let status = res.status();
    let location = res
        .headers()
        .get("location")
        .map(|l| l.to_str().unwrap().to_owned());
    let body = res.text().await.unwrap_or_default();
    assert_eq!(
        status, 202,
        "opening an upload at {base}/{repo} failed: {body}"
    );
    let location = location.expect("no Location on 202");
    let sep = if location.contains('?') { '&' } else { '?' };
    let res = client
        .put(format!("{location}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .expect("PUT blob");
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    assert_eq!(status, 201, "blob upload to {base}/{repo} failed: {body}");
    digest
}

/// PUTs a manifest; returns the response for the caller to check.
pub async fn put_manifest(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> reqwest::Response {
    client
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", media_type)
        .body(body.to_vec())
        .send()
        .await
        .expect("PUT manifest")
}

/// A small image pushed over raw HTTP (config + one layer + OCI manifest).
pub struct SmallImage {
    /// The manifest bytes as pushed.
    pub manifest: Vec<u8>,
    /// Their digest.
    pub digest: String,
    /// The layer blob.
    pub layer: Vec<u8>,
    /// Its digest.
    pub layer_digest: String,
}

/// Pushes a small OCI image for `arch` to `base` (a registry or archmerge)
/// at `repo:tag`, over raw HTTP. The layer content is derived from `seed`.
pub async fn push_small_image(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    arch: &str,
    seed: u64,
) -> SmallImage {
    let built = build_oci_layout(&ImageSpec::new("linux", arch).layer(seed, 4096), tag);
    let layer = fs::read(built.blob_path(&built.layer_digests[0])).unwrap();
    let config = fs::read(built.blob_path(&built.config_digest)).unwrap();
    put_blob(client, base, repo, &config).await;
    let layer_digest = put_blob(client, base, repo, &layer).await;
    let res = put_manifest(
        client,
        base,
        repo,
        tag,
        media::OCI_MANIFEST,
        &built.manifest,
    )
    .await;
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    assert_eq!(
        status, 201,
        "manifest PUT to {base}/{repo}:{tag} failed: {body}"
    );
    SmallImage {
        digest: built.manifest_digest.clone(),
        manifest: built.manifest.clone(),
        layer,
        layer_digest,
    }
}

// === responses ===

/// The `Location` header; panics when there is none.
pub fn location(res: &Response) -> String {
    res.headers()
        .get(LOCATION)
        .unwrap_or_else(|| panic!("no Location in {} answer", res.status()))
        .to_str()
        .unwrap()
        .to_owned()
}

/// A header as a string, if present.
pub fn header(res: &Response, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Appends `digest=` to an upload URL that already carries a query.
pub fn with_digest(upload_url: &str, digest: &str) -> String {
    let sep = if upload_url.contains('?') { '&' } else { '?' };
    format!("{upload_url}{sep}digest={digest}")
}

/// Asserts status and returns the body, showing it on a mismatch.
pub async fn expect_status(res: Response, want: u16) -> Bytes {
    let status = res.status();
    let body = res.bytes().await.expect("reading the body");
    assert_eq!(
        status.as_u16(),
        want,
        "unexpected status; body: {}",
        String::from_utf8_lossy(&body)
    );
    body
}
