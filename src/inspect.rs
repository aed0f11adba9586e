//! `archmerge inspect REPO:TAG`: what a target lists, entry by entry, like
//! `docker manifest inspect -v` — the arch tag each entry comes from, its
//! platform, digest and size, and whether archmerge manages it or kept it
//! from what it amended. Also says whether the stored index is what the
//! registry's arch tags call for (in serve mode: what would be served).

use serde::Serialize;

use crate::index::{index_entries, parse_manifest, EntryKind, EntrySource, Manifest};
use crate::merge::{Desired, MergeError, Merger, Survey};
use crate::upstream::Auth;

/// The report for one target.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `repo:tag`.
    pub reference: String,
    /// What the tag holds: `index` (archmerge's), `foreign-index`, `image`,
    /// `synthesized` (serve mode), or `absent`.
    pub state: &'static str,
    /// Media type of what is shown.
    pub media_type: Option<String>,
    /// Digest of what is shown.
    pub digest: Option<String>,
    /// Arch tags of this target that the registry holds.
    pub arch_tags: Vec<String>,
    /// Required platforms (`required` of the repository's rule) not pushed
    /// yet: until they are, nothing is published.
    pub missing_required: Vec<String>,
    /// The digest the registry's arch tags call for, when it differs from
    /// what is stored (`archmerge reconcile` would write it).
    pub expected_digest: Option<String>,
    /// The entries.
    pub entries: Vec<Row>,
}

/// One entry.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The arch tag it comes from (managed entries).
    pub source_tag: Option<String>,
    /// The digest it was amended from (kept entries).
    pub amended_from: Option<String>,
    /// `image` or `attestation`.
    pub kind: &'static str,
    /// os/architecture[/variant], plus `os.version` when present.
    pub platform: String,
    /// Child digest.
    pub digest: String,
    /// Child size in bytes.
    pub size: u64,
}

/// Builds the report; `synthesizes` is whether the mode serves indexes
/// instead of storing them.
pub async fn report(
    merger: &Merger,
    synthesizes: bool,
    repo: &str,
    tag: &str,
    auth: &Auth,
) -> Result<Report, MergeError> {
    let Survey {
        snapshot,
        current,
        decision: plan,
    } = merger.survey(repo, tag, auth).await?;
    let expected_digest = match &plan.desired {
        Desired::Index(b) => Some(b.digest.clone()),
        Desired::Restore { base, .. } => Some(base.clone()),
        Desired::Delete | Desired::Nothing => None,
    };
    let synthesized = synthesizes && matches!(plan.desired, Desired::Index(_));
    let shown = match (&plan.desired, synthesized) {
        (Desired::Index(b), true) => {
            Some((b.digest.clone(), b.media_type.to_owned(), b.bytes.clone()))
        }
        _ => current
            .as_ref()
            .map(|c| (c.digest.clone(), c.media_type.clone(), c.bytes.to_vec())),
    };
    let mut report = Report {
        reference: format!("{repo}:{tag}"),
        state: "absent",
        media_type: None,
        digest: None,
        arch_tags: snapshot
            .values()
            .filter(|c| c.digest.is_some())
            .map(|c| c.arch.tag.clone())
            .collect(),
        missing_required: plan.missing.clone(),
        expected_digest: None,
        entries: Vec::new(),
    };
    if !synthesized {
        let stored = current.as_ref().map(|c| c.digest.as_str());
        if expected_digest.is_some() && expected_digest.as_deref() != stored {
            report.expected_digest = expected_digest;
        }
    }
    let Some((digest, media_type, bytes)) = shown else {
        return Ok(report);
    };
    report.state = if synthesized { "synthesized" } else { "image" };
    if let Ok(Manifest::Index(idx)) = parse_manifest(Some(&media_type), &bytes) {
        let entries = index_entries(&digest, &idx);
        let ours = entries
            .iter()
            .any(|e| matches!(e.source, EntrySource::Managed { .. }));
        if !synthesized {
            report.state = if ours { "index" } else { "foreign-index" };
        }
        report.entries = entries
            .into_iter()
            .map(|e| {
                let (source_tag, amended_from) = match e.source {
                    EntrySource::Managed { arch_tag } => (Some(arch_tag), None),
                    EntrySource::Amended { from } => (None, Some(from)),
                };
                let mut platform = e.platform.to_string();
                if let Some(v) = &e.platform.os_version {
                    platform.push_str(&format!(" ({v})"));
                }
                Row {
                    source_tag,
                    amended_from,
                    kind: match e.kind {
                        EntryKind::Image => "image",
                        EntryKind::Attestation { .. } => "attestation",
                    },
                    platform,
                    digest: e.descriptor.digest().to_string(),
                    size: e.descriptor.size(),
                }
            })
            .collect();
    }
    report.media_type = Some(media_type);
    report.digest = Some(digest);
    Ok(report)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}  {}", self.reference, self.state)?;
        if let (Some(mt), Some(d)) = (&self.media_type, &self.digest) {
            writeln!(f, "  {mt}\n  {d}")?;
        }
        if !self.missing_required.is_empty() {
            writeln!(
                f,
                "  WAITING for required arches: {}",
                self.missing_required.join(", ")
            )?;
        }
        match (&self.expected_digest, self.state) {
            (Some(e), "absent") => writeln!(
                f,
                "  ABSENT: no index here, though {} arch tag(s) call for {e}; a deleted \
                 target stays deleted until its next arch push or `archmerge reconcile`",
                self.arch_tags.len()
            )?,
            (Some(e), _) => writeln!(
                f,
                "  STALE: the registry's arch tags call for {e}; run `archmerge reconcile`"
            )?,
            (None, _) => {}
        }
        if !self.entries.is_empty() {
            writeln!(
                f,
                "\n  {:<24} {:<12} {:<22} {:<72} {:>10}",
                "SOURCE", "KIND", "PLATFORM", "DIGEST", "SIZE"
            )?;
        }
        for r in &self.entries {
            let source = match (&r.source_tag, &r.amended_from) {
                (Some(t), _) => t.clone(),
                (None, Some(from)) => format!("amended ({})", short(from)),
                (None, None) => "-".to_owned(),
            };
            writeln!(
                f,
                "  {:<24} {:<12} {:<22} {:<72} {:>10}",
                source, r.kind, r.platform, r.digest, r.size
            )?;
        }
        let listed: Vec<&str> = self
            .entries
            .iter()
            .filter_map(|r| r.source_tag.as_deref())
            .collect();
        let missing: Vec<&str> = self
            .arch_tags
            .iter()
            .map(String::as_str)
            .filter(|t| !listed.contains(t))
            .collect();
        if !missing.is_empty() {
            writeln!(f, "\n  arch tags not listed: {}", missing.join(", "))?;
        }
        Ok(())
    }
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}
