//! Copying a child manifest into the target repository, for repository
//! patterns (`app-amd64:v1` → `app:v1`): a registry refuses an index whose
//! children live in another repository. Blobs are mounted across
//! repositories (or streamed where the mount is refused), then the manifest
//! is PUT at a keep tag of its own (`archmerge.keep.<hex>`, see
//! [`crate::rules::tags::keep_tag`]) — all with the rule's credentials (the
//! pushing client's by default), so nothing lands where that client could
//! not write. The keep tag is what saves the copy from distribution's
//! `garbage-collect --delete-untagged`, which deletes every untagged
//! manifest, even one a tagged index lists.

use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

use crate::rules::tags::keep_tag;
use crate::upstream::{Auth, Upstream, UpstreamError};

/// How deep an index of indexes is followed.
const MAX_DEPTH: u8 = 2;

/// Makes `to` hold manifest `digest` of `from`, with everything it needs.
pub(super) async fn manifest(
    up: &Upstream,
    from: &str,
    to: &str,
    digest: &str,
    auth: &Auth,
) -> Result<(), UpstreamError> {
    copy(up, from, to, digest, auth, 0).await
}

fn copy<'a>(
    up: &'a Upstream,
    from: &'a str,
    to: &'a str,
    digest: &'a str,
    auth: &'a Auth,
    depth: u8,
) -> Pin<Box<dyn Future<Output = Result<(), UpstreamError>> + Send + 'a>> {
    Box::pin(async move {
        // The child an index lists gets a keep tag; what it lists in turn
        // is reached through it.
        let at = if depth == 0 {
            keep_tag(digest)
        } else {
            digest.to_owned()
        };
        if up.head_manifest(to, &at, auth).await?.is_some() {
            return Ok(());
        }
        let Some(m) = up.get_manifest(from, digest, auth).await? else {
            return Err(UpstreamError::NotFound {
                what: format!("manifest {digest} in {from}"),
            });
        };
        let v: Value = serde_json::from_slice(&m.bytes).map_err(|e| UpstreamError::Malformed {
            what: format!("manifest {digest}"),
            reason: e.to_string(),
        })?;
        for (blob, size) in blobs(&v) {
            up.copy_blob(from, to, &blob, size, auth).await?;
        }
        if depth < MAX_DEPTH {
            for child in children(&v) {
                copy(up, from, to, &child, auth, depth + 1).await?;
            }
        }
        up.put_manifest(to, &at, &m.media_type, m.bytes, auth).await
    })
}

/// The config and layer blobs of an image manifest, with their sizes.
/// Layers with `urls` (Windows foreign base layers, non-distributable
/// layers) live outside the registry and are not copied: the registry
/// accepts the manifest without them.
fn blobs(v: &Value) -> Vec<(String, u64)> {
    let one = |d: &Value| Some((d["digest"].as_str()?.to_owned(), d["size"].as_u64()?));
    let mut out: Vec<(String, u64)> = v.get("config").and_then(one).into_iter().collect();
    if let Some(layers) = v["layers"].as_array() {
        out.extend(
            layers
                .iter()
                .filter(|l| l["urls"].as_array().is_none_or(|u| u.is_empty()))
                .filter_map(one),
        );
    }
    out
}

/// The child manifests of an index.
fn children(v: &Value) -> Vec<String> {
    v["manifests"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|d| d["digest"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_what_a_manifest_needs() {
        let v: Value = serde_json::from_str(
            r#"{"config":{"digest":"sha256:c","size":10},"layers":[{"digest":"sha256:l1","size":5},{"digest":"sha256:l2","size":7},{"digest":"sha256:foreign","size":9,"urls":["https://example/base"]}]}"#,
        )
        .unwrap();
        assert_eq!(
            blobs(&v),
            vec![
                ("sha256:c".to_owned(), 10),
                ("sha256:l1".to_owned(), 5),
                ("sha256:l2".to_owned(), 7)
            ]
        );
        let idx: Value =
            serde_json::from_str(r#"{"manifests":[{"digest":"sha256:a"},{"digest":"sha256:b"}]}"#)
                .unwrap();
        assert_eq!(children(&idx), vec!["sha256:a", "sha256:b"]);
        assert!(blobs(&idx).is_empty());
    }
}
