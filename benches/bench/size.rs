//! The repository-size series: an arch-tag PUT and a plain PUT through
//! archmerge in a repository that also holds N unrelated tags, for growing
//! N: p50 latency, and the registry requests archmerge made per push (from
//! its own `archmerge_upstream_requests_total` on the admin port).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bytes::Bytes;
use http::{Method, StatusCode};

use crate::client::{self, Conn};
use crate::registry::{self, Images, ARCHES};

/// Connections that fill the unrelated tags.
const FILLERS: usize = 16;

/// The name of unrelated tag `i`: no arch alias, no arch pattern.
fn unrelated(i: usize) -> String {
    format!("u{i:05}")
}

/// Registry requests archmerge has sent so far, by method, read from its
/// admin listener's `/metrics` (a connection of its own each time: the
/// admin listener closes idle ones, and filling a repository takes a while).
pub async fn upstream_requests(admin: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut conn = Conn::open(admin).await?;
    let (parts, body) = conn
        .call(Method::GET, "/metrics", &[], client::empty())
        .await?;
    client::expect("GET /metrics", &parts, &body, StatusCode::OK)?;
    let text = String::from_utf8_lossy(&body);
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("archmerge_upstream_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let method = labels
            .split(',')
            .find_map(|l| l.strip_prefix("method=\""))
            .map(|m| m.trim_end_matches('"').to_owned())
            .unwrap_or_default();
        out.insert(method, value.trim().parse::<f64>().unwrap_or(0.0));
    }
    if out.is_empty() {
        bail!("archmerge's /metrics has no archmerge_upstream_requests_total");
    }
    Ok(out)
}

/// `after - before`, by method, added into `into`.
fn add_delta(
    into: &mut BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) {
    for (m, v) in after {
        let d = v - before.get(m).copied().unwrap_or(0.0);
        if d != 0.0 {
            *into.entry(m.clone()).or_default() += d;
        }
    }
}

/// Tags `from..to` of `repo`, all at the same small manifest, pushed
/// straight to the registry by [`FILLERS`] connections.
async fn fill(
    registry: SocketAddr,
    repo: &str,
    bytes: Bytes,
    from: usize,
    to: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(from));
    let mut tasks = Vec::new();
    for _ in 0..FILLERS {
        let (next, bytes, repo) = (next.clone(), bytes.clone(), repo.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(registry).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return Ok::<_, anyhow::Error>(());
                }
                registry::put_manifest(&mut conn, &repo, &unrelated(i), bytes.clone()).await?;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| anyhow!("filling task: {e}"))??;
    }
    Ok(())
}

/// What the pushes at one repository size saw.
pub struct Point {
    /// Unrelated tags in the repository.
    pub tags: usize,
    /// Seconds the filling up to this size took.
    pub fill_secs: f64,
    /// Latencies, ms.
    pub plain_ms: Vec<f64>,
    pub arch_ms: Vec<f64>,
    /// Registry requests per push, by method.
    pub plain_requests: BTreeMap<String, f64>,
    pub arch_requests: BTreeMap<String, f64>,
}

impl Point {
    /// Registry requests per plain and per arch push, all methods.
    pub fn per_push(&self) -> (f64, f64) {
        let n = self.plain_ms.len().max(1) as f64;
        (
            self.plain_requests.values().sum::<f64>() / n,
            self.arch_requests.values().sum::<f64>() / n,
        )
    }
}

/// `GET 2, HEAD 5, PUT 2` per push.
pub fn by_method(m: &BTreeMap<String, f64>, pushes: usize) -> String {
    let n = pushes.max(1) as f64;
    let parts: Vec<String> = m
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .map(|(k, v)| format!("{k} {:.1}", v / n))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// The series: for each size in `sizes` (ascending), fill the repository up
/// to that many unrelated tags, then push `puts` times a plain tag and an
/// arch tag (four arches of one target in turn, every manifest distinct)
/// through archmerge, alternately.
pub async fn series(
    registry: SocketAddr,
    archmerge: SocketAddr,
    admin: SocketAddr,
    sizes: &[usize],
    puts: usize,
) -> anyhow::Result<Vec<Point>> {
    let repo = "bench/size";
    let mut direct = Conn::open(registry).await?;
    let images = Images::seed(&mut direct, repo).await?;
    let filler = images.manifest("x86_64", "unrelated");
    let arches: Vec<&str> = ARCHES.iter().take(4).map(|a| a.0).collect();
    let mut am = Conn::open(archmerge).await?;
    // The target's index with all four arches, and the plain tag, so every
    // measured arch push changes one entry.
    for a in &arches {
        registry::put_manifest(&mut am, repo, &format!("{a}_v1"), images.manifest(a, "w")).await?;
    }
    registry::put_manifest(&mut am, repo, "plain", images.manifest("x86_64", "w")).await?;
    let mut points = Vec::new();
    let mut filled = 0;
    for &tags in sizes {
        let started = Instant::now();
        fill(registry, repo, filler.clone(), filled, tags.max(filled)).await?;
        filled = filled.max(tags);
        let fill_secs = started.elapsed().as_secs_f64();
        // A connection of its own: archmerge closes one left idle while the
        // repository filled.
        let mut am = Conn::open(archmerge).await?;
        let mut p = Point {
            tags,
            fill_secs,
            plain_ms: Vec::new(),
            arch_ms: Vec::new(),
            plain_requests: BTreeMap::new(),
            arch_requests: BTreeMap::new(),
        };
        let mut before = upstream_requests(admin).await?;
        for k in 0..puts {
            let bytes = images.manifest("x86_64", &format!("plain-{tags}-{k}"));
            let t = Instant::now();
            registry::put_manifest(&mut am, repo, "plain", bytes).await?;
            p.plain_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let after = upstream_requests(admin).await?;
            add_delta(&mut p.plain_requests, &before, &after);
            before = after;

            let a = arches[k % arches.len()];
            let bytes = images.manifest(a, &format!("arch-{tags}-{k}"));
            let t = Instant::now();
            registry::put_manifest(&mut am, repo, &format!("{a}_v1"), bytes).await?;
            p.arch_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let after = upstream_requests(admin).await?;
            add_delta(&mut p.arch_requests, &before, &after);
            before = after;
        }
        // What archmerge still sends after the last answer is the last
        // arch push's.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = upstream_requests(admin).await?;
        add_delta(&mut p.arch_requests, &before, &after);
        points.push(p);
    }
    Ok(points)
}
