//! archmerge's benchmark: the same work sent three ways — straight to the
//! registry (the limit), through nginx (what archmerge replaces), through
//! archmerge — in one run, interleaved, and printed as a table of figures
//! and ratios to direct.
//!
//! `scripts/bench.sh` starts the registry, nginx and archmerge and runs this
//! with their addresses and process ids; run that, not this. Phases:
//!
//! 1. manifest GET: requests/s and p50/p99 with 32 keep-alive connections;
//! 2. manifest PUT: p50 of a plain tag (all three ways) and of an arch tag
//!    through archmerge (which also rewrites the index);
//! 3. blobs: streamed upload and download throughput, a fresh blob per round;
//! 4. archmerge's peak RSS over the run, then with a 64 MiB and a 1 GiB blob;
//! 5. merge at scale: `archmerge reconcile` of 1,000 targets × 8 arches;
//! 6. index synthesis for 50 entries (`archmerge::index::build_index`).
//!
//! Knobs (environment): `BENCH_QUICK=1` for a smoke run; `BENCH_ROUNDS`,
//! `BENCH_BLOB_MIB`, `BENCH_GET_SLICES`, `BENCH_GET_SECS`, `BENCH_PUTS`,
//! `BENCH_SCALE_TARGETS`, `BENCH_BIG_MIB`; `BENCH_ONLY=get,put,blobs,rss,
//! scale,index,serve` runs only those phases.

mod client;
mod load;
mod procfs;
mod registry;
mod scale;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use http::{header, Method, StatusCode};

use client::{Blob, Conn, Target};
use load::LoadStats;
use procfs::CpuMeter;

/// Settings of one run.
struct Settings {
    targets: Vec<Target>,
    registry_pid: u32,
    nginx_pid: u32,
    archmerge_pid: u32,
    /// A second archmerge, in serve mode, in front of the same registry.
    serve: Target,
    serve_pid: u32,
    archmerge_bin: PathBuf,
    registry_data: PathBuf,
    rounds: usize,
    blob_mib: u64,
    get_slices: usize,
    get_secs: f64,
    get_conns: usize,
    puts: usize,
    scale_targets: usize,
    small_mib: u64,
    big_mib: u64,
    iterations: usize,
}

fn pick<T>(quick: bool, full: T, small: T) -> T {
    if quick {
        small
    } else {
        full
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Settings {
    fn from_args() -> anyhow::Result<Settings> {
        let mut args = std::env::args().skip(1);
        let mut kv = std::collections::HashMap::new();
        while let Some(a) = args.next() {
            // `cargo bench` appends `--bench`; it takes no value.
            if a == "--bench" {
                continue;
            }
            let key = a
                .strip_prefix("--")
                .ok_or_else(|| anyhow!("unexpected argument {a:?}"))?
                .to_owned();
            let value = args
                .next()
                .ok_or_else(|| anyhow!("--{key} needs a value"))?;
            kv.insert(key, value);
        }
        let get = |k: &str| {
            kv.get(k)
                .cloned()
                .ok_or_else(|| anyhow!("missing --{k} (run scripts/bench.sh)"))
        };
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            get(k)?.parse().with_context(|| format!("--{k}"))
        };
        let pid = |k: &str| -> u32 { kv.get(k).and_then(|v| v.parse().ok()).unwrap_or(0) };
        let quick = env_or("BENCH_QUICK", 0u8) == 1;
        Ok(Settings {
            targets: vec![
                Target {
                    name: "direct",
                    addr: addr("direct")?,
                },
                Target {
                    name: "nginx",
                    addr: addr("nginx")?,
                },
                Target {
                    name: "archmerge",
                    addr: addr("archmerge")?,
                },
            ],
            registry_pid: pid("registry-pid"),
            nginx_pid: pid("nginx-pid"),
            archmerge_pid: pid("archmerge-pid"),
            serve: Target {
                name: "serve",
                addr: addr("serve")?,
            },
            serve_pid: pid("serve-pid"),
            archmerge_bin: get("archmerge-bin")?.into(),
            registry_data: get("registry-data")?.into(),
            rounds: env_or("BENCH_ROUNDS", pick(quick, 5, 2)),
            blob_mib: env_or("BENCH_BLOB_MIB", pick(quick, 256, 32)),
            get_slices: env_or("BENCH_GET_SLICES", pick(quick, 5, 1)),
            get_secs: env_or("BENCH_GET_SECS", pick(quick, 2.0, 1.0)),
            get_conns: env_or("BENCH_GET_CONNS", 32),
            puts: env_or("BENCH_PUTS", pick(quick, 50, 10)),
            scale_targets: env_or("BENCH_SCALE_TARGETS", pick(quick, 1000, 50)),
            small_mib: env_or("BENCH_SMALL_MIB", 64),
            big_mib: env_or("BENCH_BIG_MIB", pick(quick, 1024, 128)),
            iterations: env_or("BENCH_ITERATIONS", pick(quick, 10_000, 1_000)),
        })
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

/// The three targets in a round's order: rotated each round, so none is
/// always first (or always right after the registry's disk flush).
fn rotated(targets: &[Target], round: usize) -> Vec<(usize, Target)> {
    let n = targets.len();
    (0..n)
        .map(|i| {
            let j = (i + round) % n;
            (j, targets[j].clone())
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The process that serves a target (besides the registry behind it).
fn proxy_pid(s: &Settings, i: usize) -> u32 {
    match s.targets[i].name {
        "nginx" => s.nginx_pid,
        "archmerge" => s.archmerge_pid,
        _ => 0,
    }
}

// === results ===

/// One line of the table.
struct Row {
    figure: String,
    /// direct, nginx, archmerge.
    values: [Option<f64>; 3],
    /// Print ratios to direct.
    ratio: bool,
    decimals: usize,
}

#[derive(Default)]
struct Results {
    rows: Vec<Row>,
    checks: Vec<(String, String, bool)>,
    notes: Vec<String>,
}

impl Results {
    fn row(&mut self, figure: &str, values: [Option<f64>; 3], ratio: bool, decimals: usize) {
        self.rows.push(Row {
            figure: figure.to_owned(),
            values,
            ratio,
            decimals,
        });
    }

    fn check(&mut self, target: &str, measured: String, met: bool) {
        self.checks.push((target.to_owned(), measured, met));
    }

    fn print(&self) {
        let fmt = |v: Option<f64>, d: usize| match v {
            Some(x) if x.is_finite() => format!("{x:.d$}"),
            _ => "-".to_owned(),
        };
        println!();
        println!(
            "{:<44} {:>10} {:>10} {:>10} {:>8} {:>8}",
            "figure", "direct", "nginx", "archmerge", "ngx/dir", "am/dir"
        );
        println!("{}", "-".repeat(95));
        for r in &self.rows {
            let ratio = |i: usize| match (r.ratio, r.values[0], r.values[i]) {
                (true, Some(d), Some(x)) if d > 0.0 => format!("{:.2}", x / d),
                _ => "-".to_owned(),
            };
            println!(
                "{:<44} {:>10} {:>10} {:>10} {:>8} {:>8}",
                r.figure,
                fmt(r.values[0], r.decimals),
                fmt(r.values[1], r.decimals),
                fmt(r.values[2], r.decimals),
                ratio(1),
                ratio(2)
            );
        }
        println!();
        println!("targets:");
        for (t, m, met) in &self.checks {
            println!("  [{}] {t}: {m}", if *met { "met" } else { "MISSED" });
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}

// === phases ===

/// What [`interleaved_get`] measured, per target.
struct Interleaved {
    stats: Vec<LoadStats>,
    /// CPU seconds of (the registry, the target's own process).
    cpu: [[f64; 2]; 3],
    /// Requests answered over warm-up and window alike (what the CPU
    /// figures cover).
    requests: [u64; 3],
}

/// GET `path` with `s.get_conns` connections through three targets in
/// slices, the order rotated each slice, measuring the registry's CPU and
/// that of each target's own process (`pids`, 0 for none).
async fn interleaved_get(
    s: &Settings,
    label: &str,
    targets: [&Target; 3],
    pids: [u32; 3],
    path: &str,
) -> anyhow::Result<Interleaved> {
    let mut all = vec![s.registry_pid];
    all.extend(pids);
    let meter = CpuMeter::new(&all);
    let mut out = Interleaved {
        stats: (0..3).map(|_| LoadStats::default()).collect(),
        cpu: [[0.0; 2]; 3],
        requests: [0; 3],
    };
    let warm = Duration::from_millis(500);
    let measure = Duration::from_secs_f64(s.get_secs);
    for slice in 0..s.get_slices {
        for k in 0..3 {
            let i = (k + slice) % 3;
            let t = targets[i];
            let (reg0, px0) = (meter.seconds(s.registry_pid), meter.seconds(pids[i]));
            let st = load::get_load(
                t.addr,
                path,
                registry::ACCEPT_MANIFESTS,
                s.get_conns,
                warm,
                measure,
            )
            .await?;
            out.cpu[i][0] += meter.seconds(s.registry_pid) - reg0;
            out.cpu[i][1] += meter.seconds(pids[i]) - px0;
            // CPU is read over warm-up and window alike; scale the count.
            out.requests[i] +=
                (st.ok as f64 * (warm + measure).as_secs_f64() / measure.as_secs_f64()) as u64;
            say(format!(
                "{label} {:<9} slice {}: {:>8.0} req/s, {} errors",
                t.name,
                slice + 1,
                st.rps(),
                st.errors
            ));
            out.stats[i].merge(st);
        }
    }
    Ok(out)
}

async fn manifest_get(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let repo = "bench/get";
    let mut conn = Conn::open(s.targets[0].addr).await?;
    let images = registry::Images::seed(&mut conn, repo).await?;
    registry::put_manifest(&mut conn, repo, "v1", images.manifest("x86_64", "get")).await?;
    let path = format!("/v2/{repo}/manifests/v1");
    let targets = [&s.targets[0], &s.targets[1], &s.targets[2]];
    let pids = [0, s.nginx_pid, s.archmerge_pid];
    let Interleaved {
        mut stats,
        cpu,
        requests: all_requests,
    } = interleaved_get(s, "GET", targets, pids, &path).await?;
    let rps: Vec<f64> = stats.iter().map(LoadStats::rps).collect();
    let mut p50 = [0.0; 3];
    let mut p99 = [0.0; 3];
    for i in 0..3 {
        p50[i] = stats[i].pct_ms(0.50);
        p99[i] = stats[i].pct_ms(0.99);
        if stats[i].errors > 0 {
            res.notes.push(format!(
                "manifest GET via {}: {} errors",
                s.targets[i].name, stats[i].errors
            ));
        }
    }
    let per_req = |i: usize, k: usize| Some(cpu[i][k] * 1e6 / all_requests[i].max(1) as f64);
    res.row(
        &format!("manifest GET req/s ({} conns)", s.get_conns),
        [Some(rps[0]), Some(rps[1]), Some(rps[2])],
        true,
        0,
    );
    res.row("manifest GET p50 ms", p50.map(Some), true, 2);
    res.row("manifest GET p99 ms", p99.map(Some), true, 2);
    res.row(
        "manifest GET CPU us/req: registry",
        [per_req(0, 0), per_req(1, 0), per_req(2, 0)],
        false,
        0,
    );
    res.row(
        "manifest GET CPU us/req: proxy",
        [None, per_req(1, 1), per_req(2, 1)],
        false,
        0,
    );
    let ratio = rps[2] / rps[0];
    res.check(
        "manifest GET >= 0.9x direct",
        format!("{ratio:.2}x ({:.0} vs {:.0} req/s)", rps[2], rps[0]),
        ratio >= 0.9,
    );
    Ok(())
}

/// GET of a target's index by 32 connections: the index write mode stored
/// (straight from the registry, and forwarded by archmerge), and the same
/// index synthesized by archmerge in serve mode, which asks the registry to
/// authorize every GET and revalidates its aggregate once per staleness
/// period.
async fn index_get(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let repo = "bench/index";
    let archmerge = &s.targets[2];
    let mut conn = Conn::open(archmerge.addr).await?;
    let images = registry::Images::seed(&mut conn, repo).await?;
    for (alias, ..) in registry::ARCHES.iter().take(4) {
        let bytes = images.manifest(alias, "index");
        registry::put_manifest(&mut conn, repo, &format!("{alias}_v1"), bytes).await?;
    }
    let path = format!("/v2/{repo}/manifests/v1");
    // The two modes must serve the same bytes.
    let mut bodies = Vec::new();
    for t in [&s.targets[0], &s.serve] {
        let mut c = Conn::open(t.addr).await?;
        let (parts, body) = c
            .call(
                Method::GET,
                &path,
                &[("accept", registry::ACCEPT_MANIFESTS)],
                client::empty(),
            )
            .await?;
        client::expect(
            &format!("GET the index via {}", t.name),
            &parts,
            &body,
            StatusCode::OK,
        )?;
        bodies.push(body);
    }
    if bodies[0] != bodies[1] {
        bail!("serve mode answers other bytes than the index write mode stored");
    }
    let targets = [&s.targets[0], archmerge, &s.serve];
    let pids = [0, s.archmerge_pid, s.serve_pid];
    let Interleaved {
        mut stats,
        cpu,
        requests: all_requests,
    } = interleaved_get(s, "index GET", targets, pids, &path).await?;
    for (i, st) in stats.iter().enumerate() {
        if st.errors > 0 {
            res.notes.push(format!(
                "index GET via {}: {} errors",
                targets[i].name, st.errors
            ));
        }
    }
    let rps: Vec<f64> = stats.iter().map(LoadStats::rps).collect();
    let p50: Vec<f64> = stats.iter_mut().map(|st| st.pct_ms(0.50)).collect();
    let per_req = |i: usize, k: usize| Some(cpu[i][k] * 1e6 / all_requests[i].max(1) as f64);
    res.row(
        "index GET req/s, write mode (stored)",
        [Some(rps[0]), None, Some(rps[1])],
        true,
        0,
    );
    res.row(
        "index GET req/s, serve mode (synthesized)",
        [Some(rps[0]), None, Some(rps[2])],
        true,
        0,
    );
    res.row(
        "index GET p50 ms, serve mode",
        [Some(p50[0]), None, Some(p50[2])],
        true,
        2,
    );
    res.row(
        "index GET CPU us/req, serve mode: registry",
        [per_req(0, 0), None, per_req(2, 0)],
        false,
        0,
    );
    res.row(
        "index GET CPU us/req, serve mode: archmerge",
        [None, None, per_req(2, 1)],
        false,
        0,
    );
    Ok(())
}

async fn manifest_put(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let repo = "bench/put";
    let mut seed = Conn::open(s.targets[0].addr).await?;
    let images = registry::Images::seed(&mut seed, repo).await?;
    let arches: Vec<&str> = registry::ARCHES.iter().take(4).map(|a| a.0).collect();
    let mut conns = Vec::new();
    for t in &s.targets {
        conns.push(Conn::open(t.addr).await?);
    }
    // Warm-up: every connection used once, and the index made with all four
    // arches, so every measured arch push really changes one entry.
    for (i, c) in conns.iter_mut().enumerate() {
        registry::put_manifest(
            c,
            repo,
            "plain",
            images.manifest("x86_64", &format!("w{i}")),
        )
        .await?;
    }
    for a in &arches {
        registry::put_manifest(
            &mut conns[2],
            repo,
            &format!("{a}_v1"),
            images.manifest(a, "w"),
        )
        .await?;
    }
    let mut plain: [Vec<f64>; 3] = Default::default();
    let mut arch = Vec::new();
    let mut warnings = 0;
    let mut last = String::new();
    for n in 0..s.puts {
        for (i, _) in rotated(&s.targets, n) {
            let bytes = images.manifest("x86_64", &format!("plain-{i}-{n}"));
            let t = std::time::Instant::now();
            registry::put_manifest(&mut conns[i], repo, "plain", bytes).await?;
            plain[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
        let a = arches[n % arches.len()];
        let bytes = images.manifest(a, &format!("arch-{n}"));
        last = registry::sha256(&bytes);
        let t = std::time::Instant::now();
        let parts = registry::put_manifest(&mut conns[2], repo, &format!("{a}_v1"), bytes).await?;
        arch.push(t.elapsed().as_secs_f64() * 1e3);
        if parts.headers.contains_key(header::WARNING) {
            warnings += 1;
        }
    }
    // The index really changed: it lists four arches, the last push among them.
    let (parts, body) = seed
        .call(
            Method::GET,
            &format!("/v2/{repo}/manifests/v1"),
            &[("accept", registry::ACCEPT_MANIFESTS)],
            client::empty(),
        )
        .await?;
    client::expect("GET the index", &parts, &body, StatusCode::OK)?;
    let index: serde_json::Value = serde_json::from_slice(&body)?;
    let listed = index["manifests"].as_array().map_or(0, Vec::len);
    if listed != arches.len() || !String::from_utf8_lossy(&body).contains(&last) {
        bail!(
            "after the arch pushes the index lists {listed} entries, the last push {}",
            if String::from_utf8_lossy(&body).contains(&last) {
                "among them"
            } else {
                "missing"
            }
        );
    }
    if warnings > 0 {
        res.notes.push(format!(
            "{warnings} arch-tag PUTs answered with a merge Warning"
        ));
    }
    let p = [
        median(&mut plain[0]),
        median(&mut plain[1]),
        median(&mut plain[2]),
    ];
    let pa = median(&mut arch);
    res.row("manifest PUT p50 ms, plain tag", p.map(Some), true, 2);
    res.row(
        "manifest PUT p50 ms, arch tag (+index)",
        [None, None, Some(pa)],
        false,
        2,
    );
    res.check(
        "arch-tag PUT adds <= 15 ms (p50) over a plain-tag PUT",
        format!("+{:.2} ms ({pa:.2} vs {:.2} ms)", pa - p[2], p[2]),
        pa - p[2] <= 15.0,
    );
    Ok(())
}

/// Removes a blob's data from the registry's storage (it is never read
/// again), so a run does not leave gigabytes in the temp dir.
fn forget_blob(s: &Settings, digest: &str) {
    let hex = digest.trim_start_matches("sha256:");
    let dir = s
        .registry_data
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    let _ = std::fs::remove_dir_all(dir);
}

/// Downloads of each round's blobs, per target (interleaved): downloads are
/// short, so more samples steady the median.
const DOWNLOADS_PER_ROUND: usize = 3;

async fn blobs(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let repo = "bench/blob";
    let size = s.blob_mib << 20;
    let mib = s.blob_mib as f64;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let meter = CpuMeter::new(&[s.registry_pid, s.nginx_pid, s.archmerge_pid]);
    let limit = Duration::from_secs(600);
    let mut up: [Vec<f64>; 3] = Default::default();
    let mut down: [Vec<f64>; 3] = Default::default();
    // CPU seconds: [target][upload, download][registry, proxy].
    let mut cpu = [[[0.0f64; 2]; 2]; 3];
    let snap = |i: usize| {
        [
            meter.seconds(s.registry_pid),
            meter.seconds(proxy_pid(s, i)),
        ]
    };
    for round in 0..s.rounds {
        // A fresh blob per target and round, uploaded through that target.
        let mut digests = [String::new(), String::new(), String::new()];
        for (i, t) in rotated(&s.targets, round) {
            let blob = Blob::new(nonce ^ ((round as u64) << 8 | i as u64), size);
            let digest = blob.digest();
            let mut conn = Conn::open(t.addr).await?;
            let c0 = snap(i);
            let started = std::time::Instant::now();
            tokio::time::timeout(
                limit,
                registry::upload(&mut conn, repo, blob.body(), size, &digest),
            )
            .await
            .map_err(|_| anyhow!("upload via {} took longer than {limit:?}", t.name))?
            .with_context(|| format!("upload via {}", t.name))?;
            let secs = started.elapsed().as_secs_f64();
            let c1 = snap(i);
            cpu[i][0][0] += c1[0] - c0[0];
            cpu[i][0][1] += c1[1] - c0[1];
            up[i].push(mib / secs);
            say(format!(
                "blob {:<9} round {}: up   {:>7.1} MiB/s",
                t.name,
                round + 1,
                mib / secs
            ));
            digests[i] = digest;
        }
        // Each target downloads its blob, interleaved with the others.
        for rep in 0..DOWNLOADS_PER_ROUND {
            for (i, t) in rotated(&s.targets, round + rep) {
                let mut conn = Conn::open(t.addr).await?;
                let c0 = snap(i);
                let started = std::time::Instant::now();
                let got =
                    tokio::time::timeout(limit, registry::download(&mut conn, repo, &digests[i]))
                        .await
                        .map_err(|_| anyhow!("download via {} took longer than {limit:?}", t.name))?
                        .with_context(|| format!("download via {}", t.name))?;
                let secs = started.elapsed().as_secs_f64();
                let c1 = snap(i);
                if got != size {
                    bail!("download via {}: {got} bytes of {size}", t.name);
                }
                cpu[i][1][0] += c1[0] - c0[0];
                cpu[i][1][1] += c1[1] - c0[1];
                down[i].push(mib / secs);
                say(format!(
                    "blob {:<9} round {}: down {:>7.1} MiB/s",
                    t.name,
                    round + 1,
                    mib / secs
                ));
            }
        }
        for d in &digests {
            forget_blob(s, d);
        }
    }
    let u = [median(&mut up[0]), median(&mut up[1]), median(&mut up[2])];
    let d = [
        median(&mut down[0]),
        median(&mut down[1]),
        median(&mut down[2]),
    ];
    let gib_up = (s.rounds as u64 * size) as f64 / (1u64 << 30) as f64;
    let gib_down = gib_up * DOWNLOADS_PER_ROUND as f64;
    res.row(
        &format!(
            "blob upload MiB/s ({} MiB, median of {})",
            s.blob_mib, s.rounds
        ),
        u.map(Some),
        true,
        0,
    );
    res.row(
        &format!(
            "blob download MiB/s ({} MiB, median of {})",
            s.blob_mib,
            s.rounds * DOWNLOADS_PER_ROUND
        ),
        d.map(Some),
        true,
        0,
    );
    let per = |dir: usize, who: usize, gib: f64| {
        [
            Some(cpu[0][dir][who] / gib).filter(|_| who == 0),
            Some(cpu[1][dir][who] / gib),
            Some(cpu[2][dir][who] / gib),
        ]
    };
    res.row(
        "blob upload CPU s/GiB: registry",
        per(0, 0, gib_up),
        false,
        2,
    );
    res.row("blob upload CPU s/GiB: proxy", per(0, 1, gib_up), false, 2);
    res.row(
        "blob download CPU s/GiB: registry",
        per(1, 0, gib_down),
        false,
        2,
    );
    res.row(
        "blob download CPU s/GiB: proxy",
        per(1, 1, gib_down),
        false,
        2,
    );
    res.check(
        "download >= 0.8x direct and ahead of nginx",
        format!(
            "{:.2}x direct, {:.2}x nginx ({:.0} vs {:.0} / {:.0} MiB/s)",
            d[2] / d[0],
            d[2] / d[1],
            d[2],
            d[0],
            d[1]
        ),
        d[2] / d[0] >= 0.8 && d[2] > d[1],
    );
    res.check(
        "upload >= 0.9x direct",
        format!("{:.2}x ({:.0} vs {:.0} MiB/s)", u[2] / u[0], u[2], u[0]),
        u[2] / u[0] >= 0.9,
    );
    Ok(())
}

async fn peak_rss(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let pid = s.archmerge_pid;
    let run = procfs::peak_mib(pid).ok_or_else(|| anyhow!("no /proc/{pid}/status"))?;
    let idle = procfs::rss_mib(pid).unwrap_or(f64::NAN);
    let mut peaks = Vec::new();
    for (k, mib) in [s.small_mib, s.big_mib].into_iter().enumerate() {
        if !procfs::reset_peak(pid) {
            res.notes.push(
                "could not reset VmHWM (clear_refs refused): blob peaks include the run".into(),
            );
        }
        let blob = Blob::new(0xB16B_00B5 + k as u64, mib << 20);
        let digest = blob.digest();
        let mut conn = Conn::open(s.targets[2].addr).await?;
        let (u, d) = registry::round_trip(&mut conn, "bench/rss", &blob, &digest).await?;
        forget_blob(s, &digest);
        let peak = procfs::peak_mib(pid).unwrap_or(f64::NAN);
        say(format!(
            "rss: {mib} MiB blob up {:.0} MiB/s down {:.0} MiB/s, archmerge peak {peak:.1} MiB",
            mib as f64 / u,
            mib as f64 / d
        ));
        peaks.push((mib, peak));
    }
    res.row(
        "archmerge RSS MiB, idle after the run",
        [None, None, Some(idle)],
        false,
        1,
    );
    res.row(
        "archmerge peak RSS MiB, whole run",
        [None, None, Some(run)],
        false,
        1,
    );
    for (mib, peak) in &peaks {
        res.row(
            &format!("archmerge peak RSS MiB, {mib} MiB blob up+down"),
            [None, None, Some(*peak)],
            false,
            1,
        );
    }
    let (small, big) = (peaks[0].1, peaks[1].1);
    // "The same": within 10% or 4 MiB, whichever is larger (allocator noise).
    let same = big <= small + (small * 0.1).max(4.0);
    let worst = run.max(big);
    res.check(
        "peak RSS <= 64 MiB, and the same for a 1 GiB blob as for 64 MiB",
        format!(
            "run {run:.1} MiB; {} MiB blob {big:.1} vs {} MiB blob {small:.1} MiB",
            peaks[1].0, peaks[0].0
        ),
        worst <= 64.0 && same,
    );
    Ok(())
}

async fn merge_at_scale(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let repo = std::env::var("BENCH_SCALE_REPO").unwrap_or_else(|_| "bench/scale".into());
    let repo = repo.as_str();
    let registry = s.targets[0].addr;
    let seeded = scale::seed(registry, repo, s.scale_targets).await?;
    say(format!(
        "scale: pushed {} arch manifests straight to the registry in {seeded:.1} s",
        s.scale_targets * registry::ARCHES.len()
    ));
    let limit = Duration::from_secs(env_or("BENCH_RECONCILE_LIMIT_SECS", 300));
    let first = scale::reconcile(&s.archmerge_bin, registry, repo, limit).await?;
    say(format!(
        "scale: reconcile {:.1} s: {} created, {} updated, {} unchanged, {} failed",
        first.secs, first.created, first.updated, first.unchanged, first.failed
    ));
    let again = scale::reconcile(&s.archmerge_bin, registry, repo, limit).await?;
    say(format!(
        "scale: reconcile again {:.1} s: {} created, {} updated, {} unchanged, {} failed",
        again.secs, again.created, again.updated, again.unchanged, again.failed
    ));
    if first.created as usize != s.scale_targets || first.failed > 0 {
        res.notes.push(format!(
            "first reconcile created {} of {} targets ({} failed)",
            first.created, s.scale_targets, first.failed
        ));
    }
    let label = format!("{} targets x 8 arches", s.scale_targets);
    res.row(
        &format!("reconcile s, {label}, creating"),
        [None, None, Some(first.secs)],
        false,
        1,
    );
    res.row(
        &format!("reconcile s, {label}, unchanged"),
        [None, None, Some(again.secs)],
        false,
        1,
    );
    res.row(
        "reconcile ms per target, creating",
        [None, None, Some(first.secs * 1e3 / s.scale_targets as f64)],
        false,
        1,
    );
    Ok(())
}

fn synthesis(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let (median_ns, mean_ns, bytes) = scale::index_synthesis(s.iterations)?;
    say(format!(
        "index synthesis: median {median_ns:.0} ns, mean {mean_ns:.0} ns ({bytes} bytes)"
    ));
    res.row(
        &format!("build_index us, 50 entries (median of {})", s.iterations),
        [None, None, Some(median_ns / 1e3)],
        false,
        1,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let s = Settings::from_args()?;
    let mut res = Results::default();
    say(format!(
        "targets: {}",
        s.targets
            .iter()
            .map(|t| format!("{}={}", t.name, t.addr))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    // BENCH_ONLY=get,put,blobs,rss,scale,index runs some phases (profiling).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |phase: &str| only.is_empty() || only.split(',').any(|p| p.trim() == phase);
    if run("get") {
        say("manifest GET");
        manifest_get(&s, &mut res).await.context("manifest GET")?;
    }
    if run("serve") {
        say("index GET, write and serve mode");
        index_get(&s, &mut res).await.context("index GET")?;
    }
    if run("put") {
        say("manifest PUT");
        manifest_put(&s, &mut res).await.context("manifest PUT")?;
    }
    if run("blobs") {
        say("blob upload and download");
        blobs(&s, &mut res).await.context("blobs")?;
    }
    if run("rss") {
        say("archmerge peak RSS");
        peak_rss(&s, &mut res).await.context("peak RSS")?;
    }
    if run("scale") {
        say("merge at scale");
        merge_at_scale(&s, &mut res)
            .await
            .context("merge at scale")?;
    }
    if run("index") {
        say("index synthesis");
        synthesis(&s, &mut res).context("index synthesis")?;
    }
    res.print();
    Ok(())
}
