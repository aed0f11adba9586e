//! Merge at scale: `archmerge reconcile` of many targets × 8 arches pushed
//! straight to the registry, and a micro-benchmark of index synthesis.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use archmerge::index::{
    build_index, Entry, EntryKind, EntrySource, IndexFormat, ANN_REF_DIGEST, ANN_REF_TYPE,
    OCI_MANIFEST, REF_TYPE_ATTESTATION,
};
use archmerge::platform::Platform;
use oci_spec::image::{Descriptor, Digest, MediaType};

use crate::client::Conn;
use crate::registry::{self, Images, ARCHES};

/// Connections the seeding uses.
const PUSHERS: usize = 16;

/// The tag of one target: `t0042`.
fn target(i: usize) -> String {
    format!("t{i:04}")
}

/// Pushes `targets` × 8 arch tags (`<alias>_tNNNN`) straight to the
/// registry, concurrently; every manifest distinct. Returns seconds taken.
pub async fn seed(registry: SocketAddr, repo: &str, targets: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut conn = Conn::open(registry).await?;
    let images = Arc::new(Images::seed(&mut conn, repo).await?);
    let jobs = targets * ARCHES.len();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..PUSHERS {
        let (images, next) = (images.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(registry).await?;
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= jobs {
                    return Ok::<_, anyhow::Error>(());
                }
                let (alias, ..) = ARCHES[j % ARCHES.len()];
                let t = target(j / ARCHES.len());
                let bytes = images.manifest(alias, &t);
                registry::put_manifest(&mut conn, images.repo(), &format!("{alias}_{t}"), bytes)
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| anyhow!("seeding task: {e}"))??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One `archmerge reconcile` run.
pub struct Reconciled {
    /// Wall-clock seconds.
    pub secs: f64,
    /// Targets created, updated, unchanged, failed (from its JSON summary).
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub failed: u64,
}

/// Runs `archmerge reconcile --json REPO` against the registry, bounded by
/// `limit` (killed past it).
pub async fn reconcile(
    bin: &Path,
    registry: SocketAddr,
    repo: &str,
    limit: Duration,
) -> anyhow::Result<Reconciled> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("reconcile")
        .arg("--upstream")
        .arg(format!("http://{registry}"))
        .arg("--json")
        .arg(repo)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .map_err(|_| anyhow!("reconcile took longer than {limit:?}"))?
        .with_context(|| format!("running {}", bin.display()))?;
    let secs = started.elapsed().as_secs_f64();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "reconcile printed no JSON summary (exit {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        )
    })?;
    let n = |k: &str| summary[k].as_u64().unwrap_or(0);
    Ok(Reconciled {
        secs,
        created: n("created"),
        updated: n("updated"),
        unchanged: n("unchanged"),
        failed: summary["failed"].as_array().map_or(0, |a| a.len() as u64),
    })
}

// === index synthesis ===

fn digest(i: usize, salt: u8) -> Digest {
    let hex: String = registry::sha256(&[salt, (i >> 8) as u8, i as u8])
        .trim_start_matches("sha256:")
        .to_owned();
    Digest::from_str(&format!("sha256:{hex}")).expect("a sha256 digest")
}

/// 50 entries as buildx makes them for 25 platforms: 25 images (each from
/// its own arch tag) and their 25 attestation manifests, given in reverse
/// of the canonical order so that the sort does real work.
pub fn fifty_entries() -> Vec<Entry> {
    let oses = ["linux", "windows", "freebsd", "netbsd", "openbsd"];
    let arches = ["amd64", "arm64", "386", "ppc64le", "riscv64"];
    let mut entries = Vec::new();
    for (i, (os, arch)) in oses
        .iter()
        .flat_map(|o| arches.iter().map(move |a| (*o, *a)))
        .enumerate()
    {
        let image = digest(i, 1);
        let platform = Platform {
            os: os.to_owned(),
            architecture: arch.to_owned(),
            variant: (arch == "arm64").then(|| "v8".to_owned()),
            os_version: None,
            os_features: Vec::new(),
        };
        let source = EntrySource::Managed {
            arch_tag: format!("{os}-{arch}_v1.2"),
        };
        entries.push(Entry {
            descriptor: Descriptor::new(
                MediaType::from(OCI_MANIFEST),
                1000 + i as u64,
                image.clone(),
            ),
            platform,
            kind: EntryKind::Image,
            source: source.clone(),
        });
        let mut att = Descriptor::new(MediaType::from(OCI_MANIFEST), 500 + i as u64, digest(i, 2));
        let unknown = Platform {
            os: "unknown".into(),
            architecture: "unknown".into(),
            variant: None,
            os_version: None,
            os_features: Vec::new(),
        };
        att.set_platform(Some(unknown.to_oci()));
        att.set_annotations(Some(
            [
                (ANN_REF_TYPE.to_owned(), REF_TYPE_ATTESTATION.to_owned()),
                (ANN_REF_DIGEST.to_owned(), image.to_string()),
            ]
            .into(),
        ));
        entries.push(Entry {
            descriptor: att,
            platform: unknown,
            kind: EntryKind::Attestation {
                of: image.to_string(),
            },
            source,
        });
    }
    entries.reverse();
    entries
}

/// Median and mean nanoseconds of `build_index` over `iterations` calls
/// (after a warm-up), and the size of the index it builds.
pub fn index_synthesis(iterations: usize) -> anyhow::Result<(f64, f64, usize)> {
    let entries = fifty_entries();
    let annotations = BTreeMap::new();
    let built = build_index(&entries, IndexFormat::Auto, &annotations)?;
    if !built.dropped.is_empty() {
        bail!("the fixture lost {} entries", built.dropped.len());
    }
    let size = built.bytes.len();
    for _ in 0..iterations / 10 {
        std::hint::black_box(build_index(
            std::hint::black_box(&entries),
            IndexFormat::Auto,
            &annotations,
        )?);
    }
    let mut ns = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let b = build_index(
            std::hint::black_box(&entries),
            IndexFormat::Auto,
            &annotations,
        )?;
        ns.push(t.elapsed().as_nanos() as f64);
        std::hint::black_box(b);
    }
    let mean = ns.iter().sum::<f64>() / ns.len() as f64;
    ns.sort_by(f64::total_cmp);
    Ok((ns[ns.len() / 2], mean, size))
}
