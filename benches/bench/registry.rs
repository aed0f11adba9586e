//! Registry calls the benchmark makes: blob uploads (the docker way: POST,
//! one streamed PATCH, PUT with the digest), manifests, and the small images
//! the manifest benchmarks push.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use http::{Method, StatusCode};

use crate::client::{self, expect, location, with_digest, Blob, Conn, ReqBody};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// What docker sends as `Accept` on a manifest pull (one header, as it does).
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The eight arches of the alias table the benchmarks push: (alias, os,
/// architecture, variant).
pub const ARCHES: [(&str, &str, &str, Option<&str>); 8] = [
    ("x86_64", "linux", "amd64", None),
    ("aarch64", "linux", "arm64", Some("v8")),
    ("armv7l", "linux", "arm", Some("v7")),
    ("armhf", "linux", "arm", Some("v6")),
    ("i386", "linux", "386", None),
    ("ppc64le", "linux", "ppc64le", None),
    ("s390x", "linux", "s390x", None),
    ("riscv64", "linux", "riscv64", None),
];

/// Uploads a blob: `POST` a session, stream it in one `PATCH`, close with
/// `PUT ?digest=`. The body is streamed; nothing holds the blob whole. With
/// no `size`, the PATCH says no length (hyper sends the body chunked).
pub async fn upload(
    conn: &mut Conn,
    repo: &str,
    body: ReqBody,
    size: Option<u64>,
    digest: &str,
) -> anyhow::Result<()> {
    let (parts, b) = conn
        .call(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            &[("content-length", "0")],
            client::empty(),
        )
        .await?;
    expect("start upload", &parts, &b, StatusCode::ACCEPTED)?;
    let session = location(&parts)?;
    let len = size.map(|n| n.to_string());
    let mut headers = vec![("content-type", "application/octet-stream")];
    headers.extend(len.as_deref().map(|n| ("content-length", n)));
    let resp = conn
        .send(Method::PATCH, &session, &headers, body)
        .await
        .context("PATCH blob")?;
    let (parts, b) = resp.into_parts();
    let b = http_body_util::BodyExt::collect(b).await?.to_bytes();
    expect("PATCH blob", &parts, &b, StatusCode::ACCEPTED)?;
    let session = location(&parts)?;
    let (parts, b) = conn
        .call(
            Method::PUT,
            &with_digest(&session, digest),
            &[("content-length", "0")],
            client::empty(),
        )
        .await?;
    expect("finish upload", &parts, &b, StatusCode::CREATED)
}

/// Uploads a small blob held in memory; returns its digest and size.
pub async fn upload_small(
    conn: &mut Conn,
    repo: &str,
    bytes: Vec<u8>,
) -> anyhow::Result<(String, u64)> {
    let digest = sha256(&bytes);
    let size = bytes.len() as u64;
    upload(conn, repo, client::full(bytes), Some(size), &digest).await?;
    Ok((digest, size))
}

/// Downloads a blob, counting (and dropping) its bytes.
pub async fn download(conn: &mut Conn, repo: &str, digest: &str) -> anyhow::Result<u64> {
    let resp = conn
        .send(
            Method::GET,
            &format!("/v2/{repo}/blobs/{digest}"),
            &[],
            client::empty(),
        )
        .await?;
    if resp.status() != StatusCode::OK {
        return Err(anyhow!("GET blob: {}", resp.status()));
    }
    client::drain(resp.into_body()).await
}

/// `PUT` a manifest; returns the response status.
pub async fn put_manifest(
    conn: &mut Conn,
    repo: &str,
    reference: &str,
    bytes: Bytes,
) -> anyhow::Result<http::response::Parts> {
    let len = bytes.len().to_string();
    let (parts, b) = conn
        .call(
            Method::PUT,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("content-type", OCI_MANIFEST), ("content-length", &len)],
            client::full(bytes),
        )
        .await?;
    expect(
        &format!("PUT {repo}:{reference}"),
        &parts,
        &b,
        StatusCode::CREATED,
    )?;
    Ok(parts)
}

/// `sha256:<hex>`.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// The blobs a repository's bench images share: one layer, one config per arch.
pub struct Images {
    repo: String,
    layer: (String, u64),
    /// alias → (config digest, size).
    configs: BTreeMap<&'static str, (String, u64)>,
}

impl Images {
    /// Uploads the shared layer and one config per arch into `repo`.
    pub async fn seed(conn: &mut Conn, repo: &str) -> anyhow::Result<Images> {
        let layer: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let layer_digest = sha256(&layer);
        let layer = upload_small(conn, repo, layer).await?;
        let mut configs = BTreeMap::new();
        for (alias, os, arch, variant) in ARCHES {
            let variant = variant
                .map(|v| format!(",\"variant\":\"{v}\""))
                .unwrap_or_default();
            let config = format!(
                "{{\"architecture\":\"{arch}\",\"os\":\"{os}\"{variant},\"config\":{{}},\
                 \"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[\"{layer_digest}\"]}}}}"
            );
            configs.insert(alias, upload_small(conn, repo, config.into_bytes()).await?);
        }
        Ok(Images {
            repo: repo.to_owned(),
            layer,
            configs,
        })
    }

    /// The repository.
    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// An OCI image manifest for `alias`, made distinct by `note`.
    pub fn manifest(&self, alias: &str, note: &str) -> Bytes {
        let (cd, cs) = &self.configs[alias];
        let (ld, ls) = &self.layer;
        Bytes::from(format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\
             \"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"{cd}\",\"size\":{cs}}},\
             \"layers\":[{{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"{ld}\",\"size\":{ls}}}],\
             \"annotations\":{{\"org.example.bench\":\"{note}\"}}}}"
        ))
    }
}

/// A streamed blob upload then download through one connection; returns
/// (upload seconds, download seconds). `digest` is the blob's, computed by
/// the caller before the clock starts.
pub async fn round_trip(
    conn: &mut Conn,
    repo: &str,
    blob: &Blob,
    digest: &str,
) -> anyhow::Result<(f64, f64)> {
    let limit = std::time::Duration::from_secs(600);
    let started = std::time::Instant::now();
    tokio::time::timeout(
        limit,
        upload(conn, repo, blob.body(), Some(blob.size()), digest),
    )
    .await
    .map_err(|_| anyhow!("blob upload took longer than {limit:?}"))??;
    let up = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let got = tokio::time::timeout(limit, download(conn, repo, digest))
        .await
        .map_err(|_| anyhow!("blob download took longer than {limit:?}"))??;
    let down = started.elapsed().as_secs_f64();
    if got != blob.size() {
        return Err(anyhow!("downloaded {got} bytes of {}", blob.size()));
    }
    Ok((up, down))
}
