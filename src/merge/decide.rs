//! What a target should hold, decided from what was read (SPEC §2, §3).
//!
//! Pure: [`decide`] takes what each arch source contributes and what the
//! target holds now, and says what the target should hold. The fetching
//! happens before it (`children`, `snapshot`), the writing after it
//! (`Merger::rebuild`); logging what was left out is the caller's.

use std::collections::{BTreeMap, BTreeSet};

use super::Child;
use crate::index::{build_index, BuiltIndex, Dropped, Entry, EntryKind, EntrySource, ANN_BASE};
use crate::rules::Rule;
use crate::upstream::FetchedManifest;

/// What one arch source gives the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Contribution {
    /// Its image, or the flattened images and attestations of its index.
    Entries(Vec<Entry>),
    /// Its manifest cannot be used (a platform its index lacks, garbage): it
    /// is left out until it is pushed again.
    Unusable(String),
    /// Not a runnable image (an artifact, a chart, a signature): it neither
    /// becomes nor displaces an entry, so what the index lists for this arch
    /// tag stays.
    NotImage(String),
    /// These credentials may not read its repository: what the index lists
    /// for it stays, so a client scoped to its own repository never drops an
    /// arch that others pushed.
    Unreadable,
}

/// What the target tag holds, as the merge reads it.
#[derive(Clone, Debug)]
pub struct Current {
    /// The manifest itself.
    pub manifest: FetchedManifest,
    /// archmerge wrote it.
    pub ours: bool,
    /// Entries of what archmerge did not make, kept where no arch tag
    /// provides their platform.
    pub amended: Vec<Entry>,
    /// What the target held before archmerge first wrote there.
    pub base: Option<String>,
    /// Every entry it lists (none for a plain image), to keep what sources
    /// that cannot be read, or hold no image, had.
    pub entries: Vec<Entry>,
}

/// What the registry's state calls for at a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Desired {
    /// An index with these canonical bytes.
    Index(BuiltIndex),
    /// No managed entry is left: put back the manifest with digest `base`
    /// that the index amended, or, when it is gone from the registry, do
    /// `otherwise`.
    Restore {
        /// The manifest to put back.
        base: String,
        /// What to do when it is gone.
        otherwise: Box<Desired>,
    },
    /// No managed entry is left and the index amended nothing: delete it.
    Delete,
    /// No arch tag, and nothing of archmerge's at the target.
    Nothing,
}

/// The decision for one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What the target should hold.
    pub desired: Desired,
    /// Children that live in another repository (repository patterns), as
    /// (repository, digest): copied into the target's before it lists them.
    pub copies: Vec<(String, String)>,
    /// Required platforms not present yet.
    pub missing: Vec<String>,
    /// Entries the index leaves out, and why.
    pub dropped: Vec<Dropped>,
    /// What the target holds that archmerge did not make, when the index
    /// takes its place (it becomes the index's base): it loses its tag, so
    /// it gets a keep tag of its own, to be there to restore.
    pub displaced: Option<FetchedManifest>,
}

/// Why no decision could be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("building the index: {0}")]
pub struct DecideError(String);

/// What `repo:target` should hold: managed entries from the arch sources;
/// entries of what the target holds that archmerge did not make kept for
/// every platform no arch source provides (amend, never clobber); nothing
/// published while a required platform is missing; and, when no managed
/// entry is left, a fall back to what the index amended.
pub fn decide(
    rule: &Rule,
    repo: &str,
    children: &[(Child, Contribution)],
    current: Option<&Current>,
) -> Result<Decision, DecideError> {
    let mut managed: Vec<Entry> = Vec::new();
    let mut copies: Vec<(String, String)> = Vec::new();
    let mut standing: BTreeSet<&str> = BTreeSet::new();
    for (child, contribution) in children {
        match contribution {
            Contribution::Entries(entries) => {
                if child.repo != repo {
                    copies.extend(
                        entries
                            .iter()
                            .map(|e| (child.repo.clone(), e.descriptor.digest().to_string())),
                    );
                }
                managed.extend(entries.iter().cloned());
            }
            Contribution::Unusable(_) => {}
            Contribution::NotImage(_) | Contribution::Unreadable => {
                standing.insert(child.arch.tag.as_str());
            }
        }
    }
    // What the index lists for sources that stand as they were.
    let listed = current.map(|c| c.entries.as_slice()).unwrap_or_default();
    managed.extend(
        listed
            .iter()
            .filter(|e| matches!(&e.source, EntrySource::Managed { arch_tag } if standing.contains(arch_tag.as_str())))
            .cloned(),
    );

    let (ours, amended, base) = match current {
        Some(c) => (c.ours, c.amended.as_slice(), c.base.clone()),
        None => (false, &[][..], None),
    };
    let provided: BTreeSet<_> = managed
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Image))
        .map(|e| e.platform.key())
        .collect();
    let kept_images: BTreeSet<String> = amended
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Image) && !provided.contains(&e.platform.key()))
        .map(|e| e.descriptor.digest().to_string())
        .collect();
    let kept: Vec<Entry> = amended
        .iter()
        .filter(|e| match &e.kind {
            EntryKind::Image => kept_images.contains(&e.descriptor.digest().to_string()),
            EntryKind::Attestation { of } => kept_images.contains(of),
        })
        .cloned()
        .collect();

    // A required set that is not complete publishes nothing (and takes back
    // what it published, as when the last arch tag goes).
    let missing: Vec<String> = rule.missing(&provided).map(|k| k.to_string()).collect();
    let mut dropped = Vec::new();
    let mut index = |entries: &[Entry], base: Option<String>| {
        let built = build(rule, entries, base)?;
        dropped.extend(built.dropped.iter().cloned());
        Ok::<_, DecideError>(Desired::Index(built))
    };
    let desired = if !managed.is_empty() && missing.is_empty() {
        let mut entries = managed;
        entries.extend(kept);
        index(&entries, base)?
    } else if ours {
        // The last managed entry is gone: what the target held before
        // archmerge first wrote there, or, when that is gone too (or there
        // was none), what was kept of it, or nothing at all.
        let otherwise = if kept.is_empty() {
            Desired::Delete
        } else {
            index(&kept, None)?
        };
        match base {
            Some(base) => Desired::Restore {
                base,
                otherwise: Box::new(otherwise),
            },
            None => otherwise,
        }
    } else {
        Desired::Nothing
    };
    let displaced = match (&desired, current) {
        (Desired::Index(_), Some(c)) if !c.ours => Some(c.manifest.clone()),
        _ => None,
    };
    Ok(Decision {
        desired,
        copies,
        missing,
        dropped,
        displaced,
    })
}

fn build(rule: &Rule, entries: &[Entry], base: Option<String>) -> Result<BuiltIndex, DecideError> {
    let mut annotations: BTreeMap<String, String> = rule.annotations.clone();
    if let Some(b) = base {
        annotations.insert(ANN_BASE.to_owned(), b);
    }
    build_index(entries, rule.index_format, &annotations).map_err(|e| DecideError(e.to_string()))
}

#[cfg(test)]
mod tests;
