//! The reading half of `index`: what a manifest from the registry is, which children of a
//! buildx index an arch tag contributes, and what may be kept from a target's current index.
//!
//! Called by the merge engine with bytes it fetched. Pure; never panics on input.

use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use serde_json::Value;

use super::{
    rename_platform_keys, Entry, EntryKind, EntrySource, IndexError, ANN_AMENDED, ANN_PREFIX,
    ANN_REF_DIGEST, ANN_REF_TYPE, ANN_SOURCE_TAG, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX,
    OCI_MANIFEST, REF_TYPE_ATTESTATION,
};
use crate::platform::{Platform, PlatformKey};

/// Docker's image config media type: tells a Docker manifest from an OCI one by shape.
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker schema1 media types, refused by name.
const DOCKER_SCHEMA1: &[&str] = &[
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// A parsed manifest.
// Not boxed: a manifest is parsed once per digest and then cached behind an `Arc`.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Manifest {
    /// An image manifest (OCI or Docker schema2).
    Image(ImageManifestInfo),
    /// An image index or Docker manifest list; its `mediaType` is always set.
    Index(ImageIndex),
}

/// What the merge engine needs of an image manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageManifestInfo {
    /// The manifest's media type ([`OCI_MANIFEST`] or [`DOCKER_MANIFEST`]).
    pub media_type: String,
    /// Digest of its config blob (where os.version and friends live).
    pub config_digest: String,
    /// Media type of its config blob.
    pub config_media_type: String,
    /// Its `artifactType`, when it declares one (OCI 1.1 artifacts).
    pub artifact_type: Option<String>,
}

/// The OCI image config media type.
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

impl ImageManifestInfo {
    /// Whether this is a runnable image (SPEC §2): its config is an image
    /// config (OCI or Docker) and it declares no `artifactType`. An OCI
    /// artifact, a Helm chart, a signature or an SBOM is not.
    pub fn is_image(&self) -> bool {
        self.artifact_type.is_none()
            && matches!(self.config_media_type.as_str(), OCI_CONFIG | DOCKER_CONFIG)
    }

    /// What the manifest is when it is not an image, in a few words.
    pub fn kind(&self) -> String {
        match &self.artifact_type {
            Some(t) => format!("an artifact of type {t}"),
            None if self.is_image() => "an image".to_owned(),
            None => format!("a manifest with config {}", self.config_media_type),
        }
    }
}

/// The platform fields of an image config, each as present (non-empty) or not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigPlatform {
    /// `os`.
    pub os: Option<String>,
    /// `architecture`.
    pub architecture: Option<String>,
    /// `variant`.
    pub variant: Option<String>,
    /// `os.version`.
    pub os_version: Option<String>,
    /// `os.features`.
    pub os_features: Vec<String>,
}

/// What the target tag's current index means for the merge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetState {
    /// archmerge wrote it: keep only what it had amended from something else.
    Ours {
        /// The entries marked [`ANN_AMENDED`].
        amended: Vec<Entry>,
    },
    /// Somebody else wrote it (e.g. buildx): every entry is amended from it.
    Foreign {
        /// All its entries, amended from the index's digest.
        entries: Vec<Entry>,
    },
}

/// What a manifest is, decided by its JSON `mediaType`, else the Content-Type (parameters
/// ignored; `application/json` and `application/octet-stream` say nothing), else its shape
/// (`manifests` → index, `config` → image). OCI and Docker schema2 are accepted; schema1, other
/// types and garbage are refused.
///
/// An index is read with the `os.version`/`os.features` platform keys intact (see the module
/// doc of `index`); a missing `mediaType` is filled in with what was decided.
pub fn parse_manifest(content_type: Option<&str>, bytes: &[u8]) -> Result<Manifest, IndexError> {
    let mut value: Value =
        serde_json::from_slice(bytes).map_err(|e| IndexError::NotJson(e.to_string()))?;
    let obj = value.as_object().ok_or(IndexError::NotAnObject)?;
    if obj.get("schemaVersion").and_then(Value::as_u64) == Some(1) {
        return Err(IndexError::Schema1);
    }
    let declared = match obj.get("mediaType") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(malformed("manifest", "mediaType is not a string")),
    };
    let header = content_type
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|ct| {
            !matches!(
                ct.as_str(),
                "" | "application/json" | "application/octet-stream"
            )
        });
    let media_type = match declared.or(header) {
        Some(mt) => mt,
        None if obj.contains_key("manifests") => OCI_INDEX.to_owned(),
        None if obj.contains_key("config") => {
            let config_type = obj.get("config").and_then(|c| c.get("mediaType"));
            if config_type.and_then(Value::as_str) == Some(DOCKER_CONFIG) {
                DOCKER_MANIFEST.to_owned()
            } else {
                OCI_MANIFEST.to_owned()
            }
        }
        None if obj.contains_key("fsLayers") || obj.contains_key("signatures") => {
            return Err(IndexError::Schema1)
        }
        None => return Err(IndexError::UnknownShape),
    };
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            rename_platform_keys(
                &mut value,
                &[("os.version", "os_version"), ("os.features", "os_features")],
            );
            let mut index: ImageIndex =
                serde_json::from_value(value).map_err(|e| malformed("image index", e))?;
            if index.media_type().is_none() {
                index.set_media_type(Some(MediaType::from(media_type.as_str())));
            }
            Ok(Manifest::Index(index))
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = obj
                .get("config")
                .and_then(Value::as_object)
                .ok_or_else(|| malformed("image manifest", "no config descriptor"))?;
            let field = |k: &str| {
                config
                    .get(k)
                    .and_then(Value::as_str)
                    .ok_or_else(|| malformed("image manifest", format!("config has no {k}")))
            };
            let config_digest = field("digest")?;
            oci_spec::image::Digest::try_from(config_digest)
                .map_err(|e| malformed("image manifest", e))?;
            let artifact_type = match obj.get("artifactType") {
                None | Some(Value::Null) => None,
                Some(Value::String(t)) => Some(t.clone()),
                Some(_) => return Err(malformed("image manifest", "artifactType is not a string")),
            };
            Ok(Manifest::Image(ImageManifestInfo {
                config_media_type: field("mediaType")?.to_owned(),
                config_digest: config_digest.to_owned(),
                media_type,
                artifact_type,
            }))
        }
        mt if DOCKER_SCHEMA1.contains(&mt) => Err(IndexError::Schema1),
        _ => Err(IndexError::UnsupportedMediaType(media_type)),
    }
}

/// Reads only `os`, `architecture`, `variant`, `os.version` and `os.features` from an image
/// config. Tolerant: a field of the wrong type or an empty string counts as absent.
pub fn parse_config_platform(bytes: &[u8]) -> Result<ConfigPlatform, IndexError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| IndexError::NotJson(e.to_string()))?;
    let obj = value.as_object().ok_or(IndexError::NotAnObject)?;
    let text = |k: &str| {
        obj.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let os_features = obj
        .get("os.features")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(ConfigPlatform {
        os: text("os"),
        architecture: text("architecture"),
        variant: text("variant"),
        os_version: text("os.version"),
        os_features,
    })
}

/// The children of an arch tag that is itself an index (buildx with provenance/SBOM): the
/// images whose normalised platform key is `want`, then the attestations that name one of
/// them.
///
/// When no image matches but the index holds exactly one image, that one is taken: the alias
/// decides the platform, as with a cross-built image whose config is wrong. `want` is
/// compared as given; take it from [`Platform::key`].
pub fn flatten(
    index: &ImageIndex,
    want: &PlatformKey,
) -> Result<Vec<(Descriptor, EntryKind)>, IndexError> {
    let images: Vec<&Descriptor> = index
        .manifests()
        .iter()
        .filter(|d| attestation_of(d).is_none())
        .collect();
    let mut picked: Vec<&Descriptor> = images
        .iter()
        .copied()
        .filter(|d| platform_of(d).key() == *want)
        .collect();
    if picked.is_empty() {
        match images[..] {
            [only] => picked.push(only),
            _ => {
                let found: Vec<String> = images
                    .iter()
                    .map(|d| platform_of(d).key().to_string())
                    .collect();
                return Err(IndexError::PlatformNotFound {
                    want: want.to_string(),
                    found: found.join(", "),
                });
            }
        }
    }
    let digests: Vec<String> = picked.iter().map(|d| d.digest().to_string()).collect();
    let mut out: Vec<(Descriptor, EntryKind)> = picked
        .into_iter()
        .map(|d| (d.clone(), EntryKind::Image))
        .collect();
    for d in index.manifests() {
        if let Some(of) = attestation_of(d).filter(|of| digests.contains(of)) {
            out.push((d.clone(), EntryKind::Attestation { of }));
        }
    }
    Ok(out)
}

/// What the target's current index means: ours if any entry carries an `io.archmerge.*`
/// annotation (then only its [`ANN_AMENDED`] entries are kept), foreign otherwise (then all
/// of them are, amended from `index_digest`).
///
/// Pass an index from [`parse_manifest`], so that `os.version` survived the reading.
pub fn read_target_index(index_digest: &str, index: &ImageIndex) -> TargetState {
    let ours = index.manifests().iter().any(has_archmerge_annotation);
    let entries = index_entries(index_digest, index);
    if ours {
        TargetState::Ours {
            amended: entries
                .into_iter()
                .filter(|e| matches!(e.source, EntrySource::Amended { .. }))
                .collect(),
        }
    } else {
        TargetState::Foreign { entries }
    }
}

/// Every descriptor of an index as an [`Entry`]: managed when it carries [`ANN_SOURCE_TAG`],
/// amended from [`ANN_AMENDED`]'s digest when it carries that, otherwise amended from
/// `index_digest`. The platform is the descriptor's own (empty when it has none). For
/// `inspect`, and for rebuilding an index from itself.
pub fn index_entries(index_digest: &str, index: &ImageIndex) -> Vec<Entry> {
    index
        .manifests()
        .iter()
        .map(|d| {
            let source = match (annotation(d, ANN_SOURCE_TAG), annotation(d, ANN_AMENDED)) {
                (Some(tag), _) => EntrySource::Managed {
                    arch_tag: tag.to_owned(),
                },
                (None, Some(from)) => EntrySource::Amended {
                    from: from.to_owned(),
                },
                (None, None) => EntrySource::Amended {
                    from: index_digest.to_owned(),
                },
            };
            Entry {
                descriptor: d.clone(),
                platform: platform_of(d),
                kind: attestation_of(d)
                    .map_or(EntryKind::Image, |of| EntryKind::Attestation { of }),
                source,
            }
        })
        .collect()
}

// === helpers ===

fn malformed(what: &'static str, reason: impl ToString) -> IndexError {
    IndexError::Malformed {
        what,
        reason: reason.to_string(),
    }
}

fn annotation<'d>(d: &'d Descriptor, key: &str) -> Option<&'d str> {
    d.annotations().as_ref()?.get(key).map(String::as_str)
}

fn has_archmerge_annotation(d: &Descriptor) -> bool {
    d.annotations()
        .as_ref()
        .is_some_and(|a| a.keys().any(|k| k.starts_with(ANN_PREFIX)))
}

/// The image an attestation belongs to, if `d` is a buildx attestation manifest.
fn attestation_of(d: &Descriptor) -> Option<String> {
    if annotation(d, ANN_REF_TYPE) != Some(REF_TYPE_ATTESTATION) {
        return None;
    }
    annotation(d, ANN_REF_DIGEST).map(str::to_owned)
}

fn platform_of(d: &Descriptor) -> Platform {
    d.platform()
        .as_ref()
        .map(Platform::from_oci)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
