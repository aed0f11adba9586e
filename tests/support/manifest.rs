//! Asking for a manifest as a client does — any method, any `Accept` lines,
//! any credentials — and keeping the whole answer (status, headers, bytes)
//! for the test to compare; plus the arches of the classic template and
//! what an index lists for them.

use std::collections::BTreeSet;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::Value;

use super::{build_oci_layout, digest_of, media, put_blob, put_manifest, ImageSpec};

/// Every manifest media type, as docker and skopeo send in `Accept`.
pub const ACCEPT_ANY_MANIFEST: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// A manifest request's answer, whole.
#[derive(Debug)]
pub struct ManifestAnswer {
    /// What was asked, for messages.
    pub asked: String,
    /// The status code.
    pub status: u16,
    /// Every header.
    pub headers: HeaderMap,
    /// The body (empty for HEAD).
    pub body: Bytes,
}

impl ManifestAnswer {
    /// A header as a string, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<not ascii>").to_owned())
    }

    /// `Docker-Content-Digest`, if present.
    pub fn digest_header(&self) -> Option<String> {
        self.header("docker-content-digest")
    }

    /// `Content-Type`, if present.
    pub fn content_type(&self) -> Option<String> {
        self.header("content-type")
    }

    /// `Content-Length` as a number, if present.
    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }

    /// The body as text, for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics showing it when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{}: body is not JSON ({e}): {}", self.asked, self.text()))
    }

    /// Panics with the answer unless its status is `want`.
    pub fn expect(self, want: u16) -> ManifestAnswer {
        assert_eq!(
            self.status,
            want,
            "{} answered {}\nheaders: {:?}\nbody: {}",
            self.asked,
            self.status,
            self.headers,
            self.text()
        );
        self
    }

    /// (platform, digest) of every entry of the index in the body.
    pub fn entries(&self) -> BTreeSet<(String, String)> {
        index_entries(&self.json())
    }
}

/// `<method> <base>/v2/<repo>/manifests/<reference>` with one `Accept` line
/// per item of `accept` (none when empty), sent by `client` (which carries
/// the credentials, if any).
pub async fn ask_manifest(
    client: &reqwest::Client,
    method: Method,
    base: &str,
    repo: &str,
    reference: &str,
    accept: &[&str],
) -> ManifestAnswer {
    let url = format!("{base}/v2/{repo}/manifests/{reference}");
    let mut req = client.request(method.clone(), &url);
    for a in accept {
        req = req.header("accept", *a);
    }
    let res = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.bytes().await.expect("reading a manifest answer");
    ManifestAnswer {
        asked: format!("{method} {url}"),
        status,
        headers,
        body,
    }
}

/// GET with every manifest type accepted.
pub async fn get_any_manifest(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
) -> ManifestAnswer {
    ask_manifest(
        client,
        Method::GET,
        base,
        repo,
        reference,
        &[ACCEPT_ANY_MANIFEST],
    )
    .await
}

/// The sorted tags of `repo` as `client` may list them; empty when the
/// registry knows none. Panics on any other answer than 200 or 404.
pub async fn list_tags(client: &reqwest::Client, base: &str, repo: &str) -> Vec<String> {
    let url = format!("{base}/v2/{repo}/tags/list");
    let res = client.get(&url).send().await.expect("GET tags/list");
    let status = res.status().as_u16();
    let body = res.bytes().await.unwrap_or_default();
    match status {
        404 => Vec::new(),
        200 => {
            let v: Value = serde_json::from_slice(&body).expect("tags list is JSON");
            let mut tags: Vec<String> = v["tags"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            tags.sort();
            tags
        }
        _ => panic!("GET {url}: {status} {}", String::from_utf8_lossy(&body)),
    }
}

// === pushing ===

/// A manifest pushed: its bytes and digest.
#[derive(Clone, Debug)]
pub struct PushedImage {
    /// The manifest bytes as pushed.
    pub manifest: Vec<u8>,
    /// Their digest.
    pub digest: String,
}

/// A push a client made that the registry took: what it stored, and
/// archmerge's `Warning` when its merge failed (the push stands).
#[derive(Clone, Debug)]
pub struct TriedPush {
    /// The pushed manifest's digest.
    pub digest: String,
    /// archmerge's `Warning` header, if any.
    pub warning: Option<String>,
}

/// Where a client's push stopped: the step, and the registry's (or
/// archmerge's) status and `Retry-After` when it answered at all.
#[derive(Clone, Debug)]
pub struct PushFailure {
    /// `HEAD blob`, `POST upload`, `PUT blob` or `PUT manifest`.
    pub step: &'static str,
    /// The status answered, `None` when the request itself failed.
    pub status: Option<u16>,
    /// The answer's `Retry-After`.
    pub retry_after: Option<String>,
    /// The transport error, or the answer's body.
    pub detail: String,
}

impl std::fmt::Display for PushFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.status, &self.retry_after) {
            (Some(s), Some(after)) => {
                write!(f, "{}: {s}, Retry-After {after} {}", self.step, self.detail)
            }
            (Some(s), None) => write!(f, "{}: {s} {}", self.step, self.detail),
            (None, _) => write!(f, "{}: {}", self.step, self.detail),
        }
    }
}

/// One push of `spec`'s image at `repo:tag` through `base`, as a CI job's
/// client makes it (config and layer blobs, then the manifest), reporting
/// where it stopped instead of panicking: load and fault tests want to
/// count failures. With `head_first`, each blob is HEADed first and only
/// the missing ones are uploaded, as `docker push` does.
pub async fn try_push(
    base: &str,
    repo: &str,
    tag: &str,
    spec: &ImageSpec,
    head_first: bool,
) -> Result<TriedPush, PushFailure> {
    let c = super::http();
    let built = build_oci_layout(spec, tag);
    let failed = |step: &'static str, res: &reqwest::Response, detail: String| PushFailure {
        step,
        status: Some(res.status().as_u16()),
        retry_after: super::header(res, "retry-after"),
        detail,
    };
    let broke = |step: &'static str, e: reqwest::Error| PushFailure {
        step,
        status: None,
        retry_after: None,
        detail: e.to_string(),
    };
    for d in built.blob_digests() {
        if head_first {
            let url = format!("{base}/v2/{repo}/blobs/{d}");
            let res = c
                .head(url)
                .send()
                .await
                .map_err(|e| broke("HEAD blob", e))?;
            match res.status().as_u16() {
                200 => continue,
                404 => {}
                _ => return Err(failed("HEAD blob", &res, d.clone())),
            }
        }
        let blob = std::fs::read(built.blob_path(&d)).expect("reading a built blob");
        let res = c
            .post(format!("{base}/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .map_err(|e| broke("POST upload", e))?;
        if res.status() != 202 {
            return Err(failed("POST upload", &res, String::new()));
        }
        let at = super::location(&res);
        let res = c
            .put(super::with_digest(&at, &d))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(blob)
            .send()
            .await
            .map_err(|e| broke("PUT blob", e))?;
        if res.status() != 201 {
            return Err(failed("PUT blob", &res, String::new()));
        }
    }
    let res = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header(reqwest::header::CONTENT_TYPE, media::OCI_MANIFEST)
        .body(built.manifest.clone())
        .send()
        .await
        .map_err(|e| broke("PUT manifest", e))?;
    if res.status() != 201 {
        let head = failed("PUT manifest", &res, String::new());
        let body = res.text().await.unwrap_or_default();
        return Err(PushFailure {
            detail: format!("{tag}: {body}"),
            ..head
        });
    }
    let warning = super::header(&res, "warning");
    Ok(TriedPush {
        digest: built.manifest_digest.clone(),
        warning,
    })
}

/// Pushes the image of `spec` (config, layers, OCI manifest) to `base` at
/// `repo:tag` over raw HTTP, as `client` (and its credentials); panics
/// unless every step succeeds.
pub async fn push_image(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    spec: &ImageSpec,
) -> PushedImage {
    let built = build_oci_layout(spec, tag);
    for d in built.blob_digests() {
        let blob = std::fs::read(built.blob_path(&d)).expect("reading a built blob");
        put_blob(client, base, repo, &blob).await;
    }
    let res = put_manifest(
        client,
        base,
        repo,
        tag,
        media::OCI_MANIFEST,
        &built.manifest,
    )
    .await;
    let status = res.status().as_u16();
    let body = res.text().await.unwrap_or_default();
    assert_eq!(
        status, 201,
        "manifest PUT to {base}/{repo}:{tag} failed: {body}"
    );
    PushedImage {
        digest: built.manifest_digest.clone(),
        manifest: built.manifest.clone(),
    }
}

// === arches ===

/// One arch of the classic template: its tag alias and the platform its
/// image is built for (and the index must list).
#[derive(Clone, Copy, Debug)]
pub struct ArchSpec {
    /// The tag alias, e.g. `aarch64`.
    pub alias: &'static str,
    /// The OCI architecture, e.g. `arm64`.
    pub arch: &'static str,
    /// The OCI variant, e.g. `v8`.
    pub variant: Option<&'static str>,
}

impl ArchSpec {
    /// `linux/<arch>[/<variant>]`, as the index lists it.
    pub fn platform(&self) -> String {
        match self.variant {
            Some(v) => format!("linux/{}/{v}", self.arch),
            None => format!("linux/{}", self.arch),
        }
    }

    /// A small image whose config names this platform; `seed` makes its
    /// layer (and so its digest) unique.
    pub fn image(&self, seed: u64) -> ImageSpec {
        let spec = ImageSpec::new("linux", self.arch).layer(seed, 2048);
        match self.variant {
            Some(v) => spec.variant(v),
            None => spec,
        }
    }
}

const fn arch_spec(
    alias: &'static str,
    arch: &'static str,
    variant: Option<&'static str>,
) -> ArchSpec {
    ArchSpec {
        alias,
        arch,
        variant,
    }
}

/// The classic template's four arches and four more, as the spec's alias
/// table maps them.
pub const EIGHT_ARCHES: [ArchSpec; 8] = [
    arch_spec("x86_64", "amd64", None),
    arch_spec("aarch64", "arm64", Some("v8")),
    arch_spec("armv7l", "arm", Some("v7")),
    arch_spec("armhf", "arm", Some("v6")),
    arch_spec("i386", "386", None),
    arch_spec("ppc64le", "ppc64le", None),
    arch_spec("s390x", "s390x", None),
    arch_spec("riscv64", "riscv64", None),
];

/// The arches stories push most, under the alias table's first names
/// (`x86_64_v1`, `aarch64_v1`, …).
pub const AMD64: ArchSpec = EIGHT_ARCHES[0];
/// arm64 (v8), alias `aarch64`.
pub const ARM64: ArchSpec = EIGHT_ARCHES[1];
/// ppc64le.
pub const PPC64LE: ArchSpec = EIGHT_ARCHES[5];
/// s390x.
pub const S390X: ArchSpec = EIGHT_ARCHES[6];
/// riscv64.
pub const RISCV64: ArchSpec = EIGHT_ARCHES[7];

/// (platform, digest) of every entry of an index or manifest list.
pub fn index_entries(index: &Value) -> BTreeSet<(String, String)> {
    index["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("not an index: {index}"))
        .iter()
        .map(|m| {
            let p = &m["platform"];
            let mut s = format!(
                "{}/{}",
                p["os"].as_str().unwrap_or("?"),
                p["architecture"].as_str().unwrap_or("?")
            );
            if let Some(v) = p["variant"].as_str().filter(|v| !v.is_empty()) {
                s.push('/');
                s.push_str(v);
            }
            (s, m["digest"].as_str().unwrap_or("?").to_owned())
        })
        .collect()
}

/// Asserts that `a` is a 200 carrying an index whose headers say exactly
/// what its bytes are: `Docker-Content-Digest` = sha256 of the body,
/// `Content-Length` = its length, `Content-Type` = its `mediaType`.
pub fn assert_index_answer(a: &ManifestAnswer) {
    assert_eq!(a.status, 200, "{}: {} {}", a.asked, a.status, a.text());
    let json = a.json();
    assert!(
        json["manifests"].is_array(),
        "{}: not an index: {}",
        a.asked,
        a.text()
    );
    assert_eq!(
        a.digest_header().as_deref(),
        Some(digest_of(&a.body).as_str()),
        "{}: Docker-Content-Digest",
        a.asked
    );
    assert_eq!(
        a.content_length(),
        Some(a.body.len() as u64),
        "{}: Content-Length",
        a.asked
    );
    assert_eq!(
        a.content_type().as_deref(),
        json["mediaType"].as_str(),
        "{}: Content-Type against the index's mediaType",
        a.asked
    );
}
