//! What a target's children say: the entries an arch tag contributes (its
//! image, or the flattened images and attestations of its index), their
//! platforms, and what the target holds now. Per-digest facts (parsed
//! manifests, image config platforms) come from moka caches: content
//! addressing makes them immutable, so they are safe to share across
//! requests and identities (a client only ever reaches a digest through its
//! own, registry-authorized tag listing).

use std::sync::Arc;

use moka::future::Cache;

use super::decide::{Contribution, Current};
use super::{Facts, MergeError, Merger, Pushed};
use crate::bounded;
use crate::index::{
    self, entry_platform, flatten, parse_config_platform, parse_manifest, read_target_index,
    ConfigPlatform, Entry, EntryKind, EntrySource, Manifest, TargetState, ANN_BASE,
};
use crate::metrics::CacheLabels;
use crate::platform::Platform;
use crate::rules::ArchTag;
use crate::rules::Rule;
use crate::upstream::{Auth, FetchedManifest};
use oci_spec::image::Descriptor;

impl Merger {
    /// Caches the facts of a manifest a client just pushed, so the rebuild
    /// that follows does not fetch it back.
    pub async fn remember(&self, m: FetchedManifest) {
        if let Ok(manifest) = parse_manifest(Some(&m.media_type), &m.bytes) {
            let facts = Facts {
                media_type: media_type_of(&m.media_type, &manifest),
                size: m.bytes.len() as u64,
                manifest,
            };
            self.manifests.insert(m.digest, Arc::new(facts)).await;
        }
    }

    /// Loads the config of the image a client just pushed while the
    /// snapshot is being taken, so the plan finds its platform cached. A
    /// failure is not reported here: the plan asks again and reports it.
    pub(super) async fn warm(&self, pushed: Option<Pushed<'_>>, auth: &Auth) {
        let Some(p) = pushed else {
            return;
        };
        // Not cached yet when the snapshot is read ahead of the registry's
        // answer (nothing is cached of a push the registry may refuse).
        let (cached, parsed);
        let manifest = match self.manifests.get(&p.manifest.digest).await {
            Some(facts) => {
                cached = facts;
                &cached.manifest
            }
            None => match parse_manifest(Some(&p.manifest.media_type), &p.manifest.bytes) {
                Ok(m) => {
                    parsed = m;
                    &parsed
                }
                Err(_) => return,
            },
        };
        if let Manifest::Image(info) = manifest {
            if !info.is_image() {
                return;
            }
            let _ = self
                .config_platform(p.repo, &info.config_digest, auth)
                .await;
        }
    }

    /// What the target holds now: whether archmerge made it, the entries to
    /// keep from what it did not make, and what it held before archmerge
    /// first wrote there.
    pub(super) async fn read_current(
        &self,
        repo: &str,
        current: FetchedManifest,
        auth: &Auth,
    ) -> Result<Current, MergeError> {
        let parsed = parse_manifest(Some(&current.media_type), &current.bytes)
            .map_err(|e| MergeError::Unmergeable(e.to_string()))?;
        match parsed {
            Manifest::Index(idx) => {
                let entries = index::index_entries(&current.digest, &idx);
                Ok(match read_target_index(&current.digest, &idx) {
                    TargetState::Ours { amended } => Current {
                        ours: true,
                        amended,
                        base: idx
                            .annotations()
                            .as_ref()
                            .and_then(|a| a.get(ANN_BASE))
                            .cloned(),
                        entries,
                        manifest: current,
                    },
                    TargetState::Foreign { entries: amended } => Current {
                        ours: false,
                        amended,
                        base: Some(current.digest.clone()),
                        entries,
                        manifest: current,
                    },
                })
            }
            // Something other than an image at the target (a chart, an
            // artifact): no entry of the index, only its base, to restore.
            Manifest::Image(info) if !info.is_image() => Ok(Current {
                ours: false,
                base: Some(current.digest.clone()),
                amended: Vec::new(),
                entries: Vec::new(),
                manifest: current,
            }),
            Manifest::Image(info) => {
                let config = self
                    .config_platform(repo, &info.config_digest, auth)
                    .await?;
                let platform = Platform {
                    os: config.os.clone().unwrap_or_else(|| "unknown".into()),
                    architecture: config
                        .architecture
                        .clone()
                        .unwrap_or_else(|| "unknown".into()),
                    variant: config.variant.clone(),
                    os_version: config.os_version.clone(),
                    os_features: config.os_features.clone(),
                }
                .normalized();
                let descriptor = descriptor(
                    &info.media_type,
                    &current.digest,
                    current.bytes.len() as u64,
                )?;
                Ok(Current {
                    ours: false,
                    base: Some(current.digest.clone()),
                    amended: vec![Entry {
                        descriptor,
                        platform,
                        kind: EntryKind::Image,
                        source: EntrySource::Amended {
                            from: current.digest.clone(),
                        },
                    }],
                    entries: Vec::new(),
                    manifest: current,
                })
            }
        }
    }

    /// What one arch tag contributes: its image, or the flattened images
    /// and attestations of its index; nothing when it holds no runnable
    /// image (reported once per tag and digest).
    pub(super) async fn contribution(
        &self,
        repo: &str,
        arch: &ArchTag,
        digest: &str,
        rule: &Rule,
        auth: &Auth,
    ) -> Result<Contribution, MergeError> {
        let facts = self.facts(repo, digest, auth).await?;
        let managed = EntrySource::Managed {
            arch_tag: arch.tag.clone(),
        };
        let entries = match &facts.manifest {
            Manifest::Image(info) if !info.is_image() => {
                return Ok(self.not_an_image(repo, arch, digest, info.kind()));
            }
            Manifest::Image(info) => {
                let config = self
                    .config_platform(repo, &info.config_digest, auth)
                    .await
                    .ok();
                let platform = self.decide_platform(repo, arch, digest, rule, config.as_deref());
                vec![Entry {
                    descriptor: descriptor(&facts.media_type, digest, facts.size)?,
                    platform,
                    kind: EntryKind::Image,
                    source: managed,
                }]
            }
            Manifest::Index(idx) => {
                if let Some(t) = idx.artifact_type() {
                    let what = format!("an index of artifact type {t}");
                    return Ok(self.not_an_image(repo, arch, digest, what));
                }
                let picked = match flatten(idx, &arch.platform.key()) {
                    Ok(p) => p,
                    Err(e) => return Ok(Contribution::Unusable(e.to_string())),
                };
                let picked = self.only_images(repo, picked, auth).await?;
                if picked.is_empty() {
                    let what = "an index of no runnable image".to_owned();
                    return Ok(self.not_an_image(repo, arch, digest, what));
                }
                picked
                    .into_iter()
                    .map(|(d, kind)| {
                        let platform = match kind {
                            EntryKind::Image => {
                                let details = d.platform().as_ref().map(|p| {
                                    let p = Platform::from_oci(p);
                                    ConfigPlatform {
                                        os: Some(p.os),
                                        architecture: Some(p.architecture),
                                        variant: p.variant,
                                        os_version: p.os_version,
                                        os_features: p.os_features,
                                    }
                                });
                                self.decide_platform(repo, arch, digest, rule, details.as_ref())
                            }
                            EntryKind::Attestation { .. } => d
                                .platform()
                                .as_ref()
                                .map(Platform::from_oci)
                                .unwrap_or_default(),
                        };
                        Entry {
                            descriptor: d,
                            platform,
                            kind,
                            source: managed.clone(),
                        }
                    })
                    .collect()
            }
        };
        Ok(Contribution::Entries(entries))
    }

    /// The images of a flattened index that are runnable images (read by
    /// digest, cached), and the attestations of those.
    async fn only_images(
        &self,
        repo: &str,
        picked: Vec<(Descriptor, EntryKind)>,
        auth: &Auth,
    ) -> Result<Vec<(Descriptor, EntryKind)>, MergeError> {
        let checks = picked.iter().map(|(d, kind)| async move {
            if *kind != EntryKind::Image {
                return Ok(true);
            }
            if d.artifact_type().is_some() {
                return Ok(false);
            }
            match self.facts(repo, d.digest().as_ref(), auth).await {
                Ok(f) => Ok(matches!(&f.manifest, Manifest::Image(i) if i.is_image())),
                Err(MergeError::BadChild { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        });
        let runnable = bounded::try_all(checks).await?;
        let images: Vec<String> = picked
            .iter()
            .zip(&runnable)
            .filter(|((_, kind), ok)| **ok && *kind == EntryKind::Image)
            .map(|((d, _), _)| d.digest().to_string())
            .collect();
        Ok(picked
            .into_iter()
            .zip(runnable)
            .filter(|((_, kind), ok)| match kind {
                EntryKind::Image => *ok,
                EntryKind::Attestation { of } => images.contains(of),
            })
            .map(|(p, _)| p)
            .collect())
    }

    /// An arch tag that holds no runnable image: passed through, counted,
    /// and logged once per (tag, digest) and process.
    fn not_an_image(&self, repo: &str, arch: &ArchTag, digest: &str, what: String) -> Contribution {
        let key = (arch.tag.clone(), digest.to_owned());
        if !self.not_images_seen.contains_key(&key) {
            self.not_images_seen.insert(key, ());
            self.metrics.non_image_arch_tags.inc();
            tracing::warn!(repo, reference = %arch.tag, %digest, holds = %what, "arch tag holds no runnable image; passed through");
        }
        Contribution::NotImage(what)
    }

    fn decide_platform(
        &self,
        repo: &str,
        arch: &ArchTag,
        digest: &str,
        rule: &Rule,
        config: Option<&ConfigPlatform>,
    ) -> Platform {
        let (platform, mismatch) = entry_platform(&arch.platform, config, rule.platform_source);
        // Counted and logged once per (arch tag, digest) and process, not on
        // every rebuild of the target.
        let seen_key = (arch.tag.clone(), digest.to_owned());
        let first = mismatch.is_some() && !self.mismatches_seen.contains_key(&seen_key);
        if let Some(m) = mismatch.filter(|_| first) {
            self.mismatches_seen.insert(seen_key, ());
            self.metrics.platform_mismatches.inc();
            tracing::warn!(
                repo,
                reference = %arch.tag,
                platform = %m.alias,
                config_platform = %m.config,
                "image config disagrees with the tag alias"
            );
        }
        platform
    }

    async fn facts(&self, repo: &str, digest: &str, auth: &Auth) -> Result<Arc<Facts>, MergeError> {
        let load = async {
            let bad = |reason: String| MergeError::BadChild {
                tag: digest.to_owned(),
                reason,
            };
            let m = self
                .upstream
                .get_manifest(repo, digest, auth)
                .await?
                .ok_or_else(|| bad("manifest vanished".into()))?;
            let manifest =
                parse_manifest(Some(&m.media_type), &m.bytes).map_err(|e| bad(e.to_string()))?;
            Ok(Arc::new(Facts {
                media_type: media_type_of(&m.media_type, &manifest),
                size: m.bytes.len() as u64,
                manifest,
            }))
        };
        self.cached(&self.manifests, "manifest", digest, load).await
    }

    pub(super) async fn config_platform(
        &self,
        repo: &str,
        digest: &str,
        auth: &Auth,
    ) -> Result<Arc<ConfigPlatform>, MergeError> {
        let load = async {
            let bytes = self.upstream.get_small_blob(repo, digest, auth).await?;
            let c = parse_config_platform(&bytes).map_err(|e| MergeError::BadChild {
                tag: digest.to_owned(),
                reason: e.to_string(),
            })?;
            Ok(Arc::new(c))
        };
        self.cached(&self.configs, "config", digest, load).await
    }

    /// A per-digest fact from `cache`, loaded once however many rebuilds
    /// ask at the same moment (moka's single-flight `try_get_with`), with
    /// hits and misses counted. A failed load is not cached, and its error
    /// keeps its kind (a bad child stays a bad child).
    async fn cached<V: Clone + Send + Sync + 'static>(
        &self,
        cache: &Cache<String, V>,
        name: &'static str,
        key: &str,
        load: impl std::future::Future<Output = Result<V, MergeError>>,
    ) -> Result<V, MergeError> {
        let labels = CacheLabels { cache: name };
        if let Some(v) = cache.get(key).await {
            self.metrics.cache_hits.get_or_create(&labels).inc();
            return Ok(v);
        }
        self.metrics.cache_misses.get_or_create(&labels).inc();
        cache
            .try_get_with(key.to_owned(), load)
            .await
            .map_err(Arc::unwrap_or_clone)
    }
}

/// The media type to list a child under: the registry's `Content-Type`,
/// or, when it sent none, what the manifest itself declares.
fn media_type_of(content_type: &str, manifest: &Manifest) -> String {
    if !content_type.is_empty() && content_type != "application/octet-stream" {
        return content_type.to_owned();
    }
    match manifest {
        Manifest::Image(info) => info.media_type.clone(),
        Manifest::Index(_) => index::OCI_INDEX.to_owned(),
    }
}

fn descriptor(
    media_type: &str,
    digest: &str,
    size: u64,
) -> Result<oci_spec::image::Descriptor, MergeError> {
    let digest: oci_spec::image::Digest =
        digest
            .parse()
            .map_err(|e: oci_spec::OciSpecError| MergeError::BadChild {
                tag: digest.to_owned(),
                reason: e.to_string(),
            })?;
    Ok(oci_spec::image::Descriptor::new(
        oci_spec::image::MediaType::from(media_type),
        size,
        digest,
    ))
}
