//! Entries → canonical index bytes and digest (SPEC §2–3), and the reading side: manifest
//! parsing, flattening of buildx indexes, and what archmerge may keep from a target's current
//! index.
//!
//! Called by the merge engine (which fetches manifests and configs from the registry and hands
//! the bytes here) and by `inspect`. The building half lives in this file; the reading half in
//! `index/read.rs`, the platform decision in `index/decide.rs`, re-exported here.
//!
//! Pure: no I/O, no logging, no clock. Everything that could differ between two replicas
//! building the same target (input order, `HashMap` iteration order, serializer settings) is
//! pinned down here, because "the same set of children always gives the same bytes" is what
//! lets replicas converge and lets "nothing changed, nothing written" work.
//!
//! oci-spec 0.10 serializes a descriptor's platform with the keys `os_version` and
//! `os_features` instead of the spec's `os.version` and `os.features` (and drops the dotted
//! keys when reading). Both directions are fixed up here: index bytes are built and parsed
//! only through [`build_index`] and [`parse_manifest`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::platform::{Platform, PlatformKey};

mod decide;
mod read;

pub use decide::{entry_platform, PlatformSource};
pub use read::{
    flatten, index_entries, parse_config_platform, parse_manifest, read_target_index,
    ConfigPlatform, Manifest, TargetState,
};

/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker schema2 manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema2 image manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// On every entry archmerge manages: the arch tag it came from.
pub const ANN_SOURCE_TAG: &str = "io.archmerge.tag";
/// On entries kept from something archmerge did not make: the digest of that manifest.
pub const ANN_AMENDED: &str = "io.archmerge.amended";
/// On the index: the digest of what the target held before archmerge first wrote there
/// (a plain image or a foreign index), put back when no arch tag is left.
pub const ANN_BASE: &str = "io.archmerge.base";
/// Prefix of every annotation archmerge owns (stale ones are removed before writing).
pub const ANN_PREFIX: &str = "io.archmerge.";
/// buildx: what kind of reference an entry is.
pub const ANN_REF_TYPE: &str = "vnd.docker.reference.type";
/// buildx: the digest of the image an attestation belongs to.
pub const ANN_REF_DIGEST: &str = "vnd.docker.reference.digest";
/// The [`ANN_REF_TYPE`] value of an attestation manifest.
pub const REF_TYPE_ATTESTATION: &str = "attestation-manifest";

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryKind {
    /// A runnable image for one platform.
    Image,
    /// A buildx attestation manifest (provenance/SBOM), listed after all images.
    Attestation {
        /// Digest of the image it belongs to.
        of: String,
    },
}

/// Where an entry came from: this is what the `io.archmerge.*` annotations record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntrySource {
    /// From an arch tag archmerge merges.
    Managed {
        /// The arch tag, e.g. `aarch64_v1.2`.
        arch_tag: String,
    },
    /// Kept from a manifest archmerge did not make (amend, never clobber).
    Amended {
        /// Digest of that manifest.
        from: String,
    },
}

/// One descriptor in the index, with what archmerge knows about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The child as the registry knows it (mediaType, digest, size, and anything else it had).
    pub descriptor: Descriptor,
    /// The platform to emit for an image (ignored for attestations, which keep the
    /// descriptor's own). An empty os and architecture mean "unknown": the descriptor's own
    /// platform, if any, is kept.
    pub platform: Platform,
    /// Image or attestation.
    pub kind: EntryKind,
    /// Managed or amended.
    pub source: EntrySource,
}

/// Which index media type to write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexFormat {
    /// A Docker manifest list when every child is a Docker schema2 manifest, else OCI.
    #[default]
    Auto,
    /// Always an OCI image index.
    Oci,
    /// Always a Docker manifest list; fails when a child is not a Docker schema2 manifest.
    Docker,
}

/// A built index: what to PUT and under which digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltIndex {
    /// The canonical bytes (see [`build_index`]).
    pub bytes: Vec<u8>,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// [`OCI_INDEX`] or [`DOCKER_LIST`].
    pub media_type: &'static str,
    /// Entries left out, for the caller to log; in processing order (deterministic).
    pub dropped: Vec<Dropped>,
}

/// An entry [`build_index`] left out, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    /// The entry as given.
    pub entry: Entry,
    /// Why it is not in the index.
    pub reason: DropReason,
}

/// Why an entry was left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Another image won its platform.
    Superseded {
        /// Digest of the image that is listed instead.
        by: String,
    },
    /// The same child (digest and platform) was given twice.
    Duplicate,
    /// An attestation whose image is not in the index.
    OrphanAttestation,
}

/// Why an index could not be built, or a manifest not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// No entries: an empty index is never written.
    #[error("no entries: an index needs at least one image")]
    Empty,
    /// `index_media_type = "docker"` but a child is not a Docker schema2 manifest.
    #[error("a Docker manifest list cannot list {digest} of type {media_type}")]
    DockerIncompatible {
        /// The child.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// Serialization failed (not expected to happen).
    #[error("serializing the index: {0}")]
    Serialize(String),
    /// The body is not JSON.
    #[error("manifest is not JSON: {0}")]
    NotJson(String),
    /// The body is JSON but not an object.
    #[error("manifest is not a JSON object")]
    NotAnObject,
    /// Docker schema1, which has no descriptors to list.
    #[error("Docker schema1 manifests are not supported")]
    Schema1,
    /// A manifest type archmerge does not merge.
    #[error("unsupported manifest media type {0}")]
    UnsupportedMediaType(String),
    /// No `mediaType`, no usable Content-Type, and neither `manifests` nor `config`.
    #[error(
        "cannot tell what this manifest is: no mediaType, and neither `manifests` nor `config`"
    )]
    UnknownShape,
    /// Recognised, but its fields do not parse.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What it was read as.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// [`flatten`]: no image for the arch tag's platform.
    #[error("no image for {want} in the index (it lists: {found})")]
    PlatformNotFound {
        /// The platform asked for.
        want: String,
        /// The image platforms it has, comma-separated.
        found: String,
    },
}

// === build ===

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in Sha256::digest(bytes) {
        let _ = write!(out, "{b:02x}"); // writing to a String cannot fail
    }
    out
}

/// Builds the index for `entries`.
///
/// **Which entries.** One image per [`PlatformKey`] among managed entries: a managed entry
/// beats an amended one, and of two managed entries the smaller arch tag name wins (then the
/// smaller digest), so that every replica picks the same. Amended entries of a platform that
/// no managed entry provides are all kept, except exact duplicates: they are what the target
/// held before (a Windows index lists one `windows/amd64` per `os.version`), and amending
/// must not clobber. Attestations follow their image; those whose image is not listed are
/// dropped. Everything left out is in [`BuiltIndex::dropped`].
///
/// **Order.** Images by normalised (os, architecture, variant, os.version), then digest; then
/// attestations, in the order of their images, then digest.
///
/// **Each descriptor.** The entry's descriptor as it is (urls, artifactType, data kept), with
/// the normalised platform for images (attestations keep their own, buildx writes
/// `unknown/unknown`), and its annotations with stale `io.archmerge.*` keys replaced by
/// [`ANN_SOURCE_TAG`] or [`ANN_AMENDED`]. These annotations are also written in Docker lists:
/// distribution keeps descriptor annotations there, and without them a target could not be
/// recognised as archmerge's.
///
/// **Media type.** See [`IndexFormat`]. `annotations` (index level) are written for OCI only,
/// except archmerge's own `io.archmerge.*` keys (e.g. [`ANN_BASE`]), which go into both: a
/// Docker manifest list has no such field in its schema, but distribution stores the list as
/// sent and clients ignore fields they do not know.
///
/// **Bytes.** One fixed serializer: the `oci_spec` [`ImageIndex`] (schemaVersion 2,
/// `mediaType` always present) is turned into a `serde_json::Value`, every object's keys are
/// put in byte order (explicitly, so a dependency enabling serde_json's `preserve_order`
/// cannot change it, and oci-spec's `HashMap` annotations come out stable), the platform keys
/// are spelled `os.version`/`os.features`, and the value is written compact with no trailing
/// newline.
pub fn build_index(
    entries: &[Entry],
    format: IndexFormat,
    annotations: &BTreeMap<String, String>,
) -> Result<BuiltIndex, IndexError> {
    if entries.is_empty() {
        return Err(IndexError::Empty);
    }
    let mut dropped = Vec::new();
    let images = choose_images(entries, &mut dropped);
    let attestations = choose_attestations(entries, &images, &mut dropped);

    let descriptors: Vec<Descriptor> = images
        .iter()
        .chain(&attestations)
        .map(|e| emitted_descriptor(e))
        .collect();
    if descriptors.is_empty() {
        return Err(IndexError::Empty);
    }
    let media_type = choose_media_type(&descriptors, format)?;

    let mut index = ImageIndex::default();
    index.set_media_type(Some(MediaType::from(media_type)));
    index.set_manifests(descriptors);
    // A Docker list has no index-level annotations in its schema: there only
    // archmerge's own bookkeeping goes (distribution stores the list as sent,
    // and Docker clients ignore fields they do not know).
    let annotations: HashMap<String, String> = annotations
        .iter()
        .filter(|(k, _)| media_type == OCI_INDEX || k.starts_with(ANN_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !annotations.is_empty() {
        index.set_annotations(Some(annotations));
    }
    let bytes = canonical_bytes(&index)?;
    Ok(BuiltIndex {
        digest: sha256_digest(&bytes),
        bytes,
        media_type,
        dropped,
    })
}

/// The total order of images: platform, digest, then the rest only to break exact ties
/// (even between entries no registry could produce, like one digest with two sizes).
fn image_order(e: &Entry) -> impl Ord + '_ {
    let n = e.platform.normalized();
    (
        (n.os, n.architecture, n.variant, n.os_version),
        e.descriptor.digest().as_ref(),
        n.os_features,
        &e.source,
        e.descriptor.media_type().to_string(),
        e.descriptor.size(),
    )
}

/// Source preference within one platform: managed first, smaller arch tag first, then the
/// descriptor itself, so that the choice never depends on input order.
fn source_order(e: &Entry) -> (&EntrySource, &str, String, u64) {
    (
        &e.source,
        e.descriptor.digest().as_ref(),
        e.descriptor.media_type().to_string(),
        e.descriptor.size(),
    )
}

/// The images to list, in index order; the others go to `dropped`.
fn choose_images<'e>(entries: &'e [Entry], dropped: &mut Vec<Dropped>) -> Vec<&'e Entry> {
    let mut images: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Image)
        .collect();
    images.sort_by_cached_key(|e: &&'e Entry| image_order(e));

    // `EntrySource` orders `Managed` before `Amended`, and arch tags by name.
    let mut winners: BTreeMap<PlatformKey, &Entry> = BTreeMap::new();
    for &e in images
        .iter()
        .filter(|e| matches!(e.source, EntrySource::Managed { .. }))
    {
        let w = winners.entry(e.platform.key()).or_insert(e);
        if source_order(e) < source_order(w) {
            *w = e;
        }
    }

    let mut kept: Vec<&Entry> = Vec::with_capacity(images.len());
    for e in images {
        let reason = match winners.get(&e.platform.key()) {
            Some(w) if std::ptr::eq(*w, e) => None,
            Some(w) if w.source == e.source && same_child(w, e) => Some(DropReason::Duplicate),
            Some(w) => Some(DropReason::Superseded {
                by: w.descriptor.digest().to_string(),
            }),
            None if kept.last().is_some_and(|k| same_child(k, e)) => Some(DropReason::Duplicate),
            None => None,
        };
        match reason {
            None => kept.push(e),
            Some(reason) => dropped.push(Dropped {
                entry: e.clone(),
                reason,
            }),
        }
    }
    kept
}

/// Same digest, same normalised platform: listing both would say the same thing twice.
fn same_child(a: &Entry, b: &Entry) -> bool {
    a.descriptor.digest() == b.descriptor.digest()
        && a.platform.normalized() == b.platform.normalized()
}

/// The attestations of listed images, in their images' order; the others go to `dropped`.
fn choose_attestations<'e>(
    entries: &'e [Entry],
    images: &[&Entry],
    dropped: &mut Vec<Dropped>,
) -> Vec<&'e Entry> {
    let mut position: HashMap<String, usize> = HashMap::new();
    for (i, e) in images.iter().enumerate() {
        position
            .entry(e.descriptor.digest().to_string())
            .or_insert(i);
    }
    let mut listed = Vec::new();
    for e in entries {
        let EntryKind::Attestation { of } = &e.kind else {
            continue;
        };
        match position.get(of) {
            Some(&pos) => listed.push((pos, e)),
            None => dropped.push(Dropped {
                entry: e.clone(),
                reason: DropReason::OrphanAttestation,
            }),
        }
    }
    listed.sort_by_cached_key(|(pos, e)| (*pos, source_order(e)));
    let mut seen = BTreeSet::new();
    let mut kept = Vec::with_capacity(listed.len());
    for (_, e) in listed {
        if seen.insert(e.descriptor.digest().to_string()) {
            kept.push(e);
        } else {
            dropped.push(Dropped {
                entry: e.clone(),
                reason: DropReason::Duplicate,
            });
        }
    }
    kept
}

/// The descriptor as it goes into the index.
fn emitted_descriptor(e: &Entry) -> Descriptor {
    let mut d = e.descriptor.clone();
    let known = !(e.platform.os.is_empty() && e.platform.architecture.is_empty());
    if e.kind == EntryKind::Image && known {
        d.set_platform(Some(e.platform.to_oci()));
    }
    let mut annotations = d.annotations().clone().unwrap_or_default();
    annotations.retain(|k, _| !k.starts_with(ANN_PREFIX));
    match &e.source {
        EntrySource::Managed { arch_tag } => {
            annotations.insert(ANN_SOURCE_TAG.into(), arch_tag.clone())
        }
        EntrySource::Amended { from } => annotations.insert(ANN_AMENDED.into(), from.clone()),
    };
    d.set_annotations(Some(annotations));
    d
}

fn choose_media_type(
    children: &[Descriptor],
    format: IndexFormat,
) -> Result<&'static str, IndexError> {
    let not_docker = children
        .iter()
        .find(|d| d.media_type().as_ref() != DOCKER_MANIFEST);
    match (format, not_docker) {
        (IndexFormat::Oci, _) | (IndexFormat::Auto, Some(_)) => Ok(OCI_INDEX),
        (IndexFormat::Auto | IndexFormat::Docker, None) => Ok(DOCKER_LIST),
        (IndexFormat::Docker, Some(d)) => Err(IndexError::DockerIncompatible {
            digest: d.digest().to_string(),
            media_type: d.media_type().to_string(),
        }),
    }
}

/// The one serializer (see [`build_index`]).
fn canonical_bytes(index: &ImageIndex) -> Result<Vec<u8>, IndexError> {
    let mut value =
        serde_json::to_value(index).map_err(|e| IndexError::Serialize(e.to_string()))?;
    rename_platform_keys(
        &mut value,
        &[("os_version", "os.version"), ("os_features", "os.features")],
    );
    serde_json::to_vec(&sorted(value)).map_err(|e| IndexError::Serialize(e.to_string()))
}

/// Rebuilds every object with its keys in byte order.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let ordered: BTreeMap<String, Value> = map.into_iter().collect();
            Value::Object(ordered.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Renames keys of `manifests[*].platform` (the oci-spec workaround described in the module
/// doc; [`read`] uses it the other way round).
fn rename_platform_keys(index: &mut Value, renames: &[(&str, &str)]) {
    let Some(manifests) = index.get_mut("manifests").and_then(Value::as_array_mut) else {
        return;
    };
    for platform in manifests
        .iter_mut()
        .filter_map(|m| m.get_mut("platform").and_then(Value::as_object_mut))
    {
        for (from, to) in renames {
            if let Some(v) = platform.remove(*from) {
                platform.insert((*to).to_owned(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests;
