//! archmerge's benchmark: the same work sent straight to the registry (the
//! limit) and through four proxies in front of it — nginx (buffered, tuned),
//! HAProxy (HTTP mode, kernel splicing), socat (a plain TCP relay) and
//! archmerge — in one run, every repeat visiting every target in rotated
//! order, printed as one table per phase.
//!
//! `scripts/bench.sh` starts the registry and the proxies and runs this with
//! their addresses and process ids; run that, not this. Phases:
//!
//! 1. manifest GET: requests/s, p50/p99 and proxy CPU per request with 32
//!    keep-alive connections;
//! 2. index GET: the same for an index, also synthesized by a second
//!    archmerge in serve mode;
//! 3. manifest PUT: p50 of a plain tag (every target) and of an arch tag
//!    through archmerge (which also rewrites the index);
//! 4. blobs: streamed upload and download throughput and proxy CPU per GiB,
//!    a fresh blob per round and target;
//! 5. archmerge's peak RSS over the run, then with a 64 MiB and a 1 GiB blob;
//! 6. repository size: arch-tag and plain PUTs in a repository that also
//!    holds N unrelated tags (latency, registry requests per push);
//! 7. merge at scale: `archmerge reconcile` of 1,000 targets × 8 arches;
//! 8. index synthesis for 50 entries (`archmerge::index::build_index`);
//! 9. user-space instructions per manifest GET (write mode) and per index
//!    GET (serve mode), counted by callgrind (`instructions.rs`).
//!
//! Knobs (environment): `BENCH_QUICK=1` for a smoke run; `BENCH_ROUNDS`,
//! `BENCH_BLOB_MIB`, `BENCH_GET_SLICES`, `BENCH_GET_SECS`, `BENCH_GET_CONNS`,
//! `BENCH_PUTS`, `BENCH_SIZE_TAGS`, `BENCH_SIZE_PUTS`, `BENCH_SCALE_TARGETS`,
//! `BENCH_BIG_MIB`, `BENCH_INSTR_REQUESTS`;
//! `BENCH_ONLY=get,serve,put,blobs,rss,size,scale,index,instr` runs only
//! those phases.

mod client;
mod instructions;
mod load;
mod procfs;
mod registry;
mod report;
mod scale;
mod size;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use http::{header, Method, StatusCode};

use client::{Blob, Conn, Target};
use load::LoadStats;
use procfs::CpuMeter;
use report::{num, quantile, Results, Spread, Table};

/// The targets, in the order of every table.
const NAMES: [&str; 5] = ["direct", "nginx", "haproxy", "socat", "archmerge"];
const DIRECT: usize = 0;
const ARCHMERGE: usize = 4;
/// The proxies archmerge is compared with.
const PEERS: [usize; 3] = [1, 2, 3];

/// Settings of one run.
struct Settings {
    /// One per name of [`NAMES`], in that order.
    targets: Vec<Target>,
    /// The root process of each target's proxy (0 for direct).
    pids: Vec<u32>,
    /// Live processes under each proxy when it is idle (nginx's workers).
    steady: Vec<usize>,
    registry_pid: u32,
    archmerge_admin: SocketAddr,
    /// A second archmerge, in serve mode, in front of the same registry.
    serve: Target,
    serve_pid: u32,
    /// archmerge in write mode and in serve mode under callgrind, when
    /// `scripts/bench.sh` started them (the `instr` phase).
    counted: Option<[instructions::Counted; 2]>,
    archmerge_bin: PathBuf,
    registry_data: PathBuf,
    rounds: usize,
    blob_mib: u64,
    get_slices: usize,
    get_secs: f64,
    get_conns: usize,
    puts: usize,
    size_tags: Vec<usize>,
    size_puts: usize,
    scale_targets: usize,
    small_mib: u64,
    big_mib: u64,
    iterations: usize,
    /// GETs per connection in one counted window of the `instr` phase.
    instr_requests: usize,
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
        let mut targets = Vec::new();
        let mut pids = Vec::new();
        for name in NAMES {
            targets.push(Target {
                name,
                addr: addr(name)?,
            });
            pids.push(if name == "direct" {
                0
            } else {
                pid(&format!("{name}-pid"))
            });
        }
        let steady = pids.iter().map(|p| procfs::descendants(*p)).collect();
        let size_tags = std::env::var("BENCH_SIZE_TAGS")
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_else(|| pick(quick, vec![100, 20_000], vec![100, 2_000]));
        Ok(Settings {
            targets,
            pids,
            steady,
            registry_pid: pid("registry-pid"),
            archmerge_admin: addr("archmerge-admin")?,
            serve: Target {
                name: "archmerge serve",
                addr: addr("serve")?,
            },
            serve_pid: pid("serve-pid"),
            counted: match (kv.get("counted"), kv.get("counted-serve")) {
                (Some(_), Some(_)) => Some([
                    instructions::Counted {
                        addr: addr("counted")?,
                        pid: pid("counted-pid"),
                        out: get("counted-out")?.into(),
                    },
                    instructions::Counted {
                        addr: addr("counted-serve")?,
                        pid: pid("counted-serve-pid"),
                        out: get("counted-serve-out")?.into(),
                    },
                ]),
                _ => None,
            },
            archmerge_bin: get("archmerge-bin")?.into(),
            registry_data: get("registry-data")?.into(),
            rounds: env_or("BENCH_ROUNDS", pick(quick, 5, 2)),
            blob_mib: env_or("BENCH_BLOB_MIB", pick(quick, 256, 32)),
            get_slices: env_or("BENCH_GET_SLICES", pick(quick, 5, 2)),
            get_secs: env_or("BENCH_GET_SECS", pick(quick, 2.0, 1.0)),
            get_conns: env_or("BENCH_GET_CONNS", 32),
            puts: env_or("BENCH_PUTS", pick(quick, 50, 10)),
            size_tags,
            size_puts: env_or("BENCH_SIZE_PUTS", pick(quick, 20, 5)),
            scale_targets: env_or("BENCH_SCALE_TARGETS", pick(quick, 1000, 50)),
            small_mib: env_or("BENCH_SMALL_MIB", 64),
            big_mib: env_or("BENCH_BIG_MIB", pick(quick, 1024, 128)),
            iterations: env_or("BENCH_ITERATIONS", pick(quick, 10_000, 1_000)),
            instr_requests: env_or("BENCH_INSTR_REQUESTS", pick(quick, 500, 100)),
        })
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

/// The order of the targets `0..n` in repeat `r`: rotated each repeat, so
/// none is always first (or always right after the registry's disk flush).
fn rotated(n: usize, r: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (k + r) % n)
}

fn median(v: &[f64]) -> f64 {
    Spread::of(v).median
}

// === interleaved repeats ===

/// The goal of archmerge's median throughput against direct's.
fn throughput_goal(res: &mut Results, what: &str, reps: &Repeats, goal: f64, unit: &str) {
    let ratio = reps.ratio(ARCHMERGE);
    res.goal(
        &format!("{what} >= {goal}x direct (median)"),
        format!(
            "{:.3}x (range {}; {:.0} vs {:.0} {unit})",
            ratio.median,
            ratio.show(2),
            reps.tput(ARCHMERGE).median,
            reps.tput(DIRECT).median
        ),
        ratio.median >= goal,
    );
}

/// One figure per target and repeat: throughput, and the proxy's and the
/// registry's CPU per unit of work in that repeat.
struct Repeats {
    tput: Vec<Vec<f64>>,
    proxy: Vec<Vec<f64>>,
    registry: Vec<Vec<f64>>,
}

impl Repeats {
    fn new(targets: usize) -> Repeats {
        Repeats {
            tput: vec![Vec::new(); targets],
            proxy: vec![Vec::new(); targets],
            registry: vec![Vec::new(); targets],
        }
    }

    /// Target `i`'s throughput over direct's, repeat by repeat (each pair
    /// measured in the same repeat, so machine-wide swings cancel).
    fn ratio(&self, i: usize) -> Spread {
        let r: Vec<f64> = self.tput[i]
            .iter()
            .zip(&self.tput[DIRECT])
            .map(|(x, d)| x / d)
            .collect();
        Spread::of(&r)
    }

    fn tput(&self, i: usize) -> Spread {
        Spread::of(&self.tput[i])
    }

    fn proxy(&self, i: usize) -> Spread {
        Spread::of(&self.proxy[i])
    }

    /// The phase's table: a row per target.
    #[allow(clippy::too_many_arguments)]
    fn table(
        &self,
        title: String,
        names: &[&str],
        tput_unit: &str,
        tput_d: usize,
        cpu_unit: &str,
        cpu_d: usize,
        extra: (&[&str], Vec<Vec<String>>),
    ) -> Table {
        let tput_h = format!("{tput_unit} median [min–max]");
        let proxy_h = format!("proxy CPU {cpu_unit} [min–max]");
        let reg_h = format!("registry CPU {cpu_unit}");
        let mut headers = vec!["target", &tput_h, "x direct", &proxy_h, &reg_h];
        headers.extend(extra.0);
        let mut t = Table::new(title, &headers);
        for (i, name) in names.iter().enumerate() {
            let mut cells = vec![
                (*name).to_owned(),
                self.tput(i).show(tput_d),
                if i == DIRECT {
                    "1".into()
                } else {
                    num(self.ratio(i).median, 2)
                },
                self.proxy(i).show(cpu_d),
                num(median(&self.registry[i]), cpu_d),
            ];
            if let Some(e) = extra.1.get(i) {
                cells.extend(e.iter().cloned());
            }
            t.row(cells);
        }
        t
    }
}

/// What [`interleaved_get`] measured.
struct Interleaved {
    reps: Repeats,
    /// Every counted request of a target, merged over the repeats.
    stats: Vec<LoadStats>,
}

/// GET `path` with `s.get_conns` connections through `targets` in repeats,
/// the order rotated each repeat, measuring per repeat the requests/s and
/// the CPU per request of the registry and of each target's proxy process
/// tree (`pids`, 0 for none; `steady` its idle descendants).
async fn interleaved_get(
    s: &Settings,
    label: &str,
    targets: &[&Target],
    pids: &[u32],
    steady: &[usize],
    path: &str,
) -> anyhow::Result<Interleaved> {
    let n = targets.len();
    let meter = CpuMeter::new();
    let mut out = Interleaved {
        reps: Repeats::new(n),
        stats: (0..n).map(|_| LoadStats::default()).collect(),
    };
    let warm = Duration::from_millis(500);
    let measure = Duration::from_secs_f64(s.get_secs);
    for slice in 0..s.get_slices {
        for i in rotated(n, slice) {
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
            procfs::settle(pids[i], steady[i]).await;
            let (reg1, px1) = (meter.seconds(s.registry_pid), meter.seconds(pids[i]));
            // CPU is read over warm-up and window alike; scale the count.
            let all = st.ok as f64 * (warm + measure).as_secs_f64() / measure.as_secs_f64();
            let per = |c: f64| c * 1e6 / all.max(1.0);
            out.reps.tput[i].push(st.rps());
            out.reps.registry[i].push(per(reg1 - reg0));
            out.reps.proxy[i].push(if pids[i] == 0 {
                f64::NAN
            } else {
                per(px1 - px0)
            });
            say(format!(
                "{label} {:<15} slice {}: {:>7.0} req/s, proxy {:>5.0} us/req, {} errors",
                t.name,
                slice + 1,
                st.rps(),
                per(px1 - px0),
                st.errors
            ));
            out.stats[i].merge(st);
        }
    }
    Ok(out)
}

/// p50 and p99 (ms) cells of each target's merged latencies, noting errors.
fn latency_cells(
    phase: &str,
    names: &[&str],
    stats: &mut [LoadStats],
    res: &mut Results,
) -> Vec<Vec<String>> {
    let mut cells = Vec::new();
    for (i, st) in stats.iter_mut().enumerate() {
        if st.errors > 0 {
            res.notes
                .push(format!("{phase} via {}: {} errors", names[i], st.errors));
        }
        cells.push(vec![num(st.pct_ms(0.50), 2), num(st.pct_ms(0.99), 2)]);
    }
    cells
}

/// archmerge's figure beside each peer's, for the comparison table.
fn versus(res: &mut Results, figure: &str, am: f64, peers: Vec<f64>, decimals: usize) {
    res.versus.push(report::Versus {
        figure: figure.to_owned(),
        archmerge: am,
        peers: PEERS
            .iter()
            .zip(peers)
            .map(|(i, v)| (NAMES[*i], v))
            .collect(),
        decimals,
    });
}

// === phases ===

/// CPU budget of a manifest or index GET through archmerge, µs/request.
const GET_CPU_GOAL_US: f64 = 40.0;

async fn manifest_get(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let repo = "bench/get";
    let mut conn = Conn::open(s.targets[DIRECT].addr).await?;
    let images = registry::Images::seed(&mut conn, repo).await?;
    registry::put_manifest(&mut conn, repo, "v1", images.manifest("x86_64", "get")).await?;
    let path = format!("/v2/{repo}/manifests/v1");
    let targets: Vec<&Target> = s.targets.iter().collect();
    let Interleaved { reps, mut stats } =
        interleaved_get(s, "GET", &targets, &s.pids, &s.steady, &path).await?;
    let lat = latency_cells("manifest GET", &NAMES, &mut stats, res);
    res.tables.push(reps.table(
        format!(
            "manifest GET: {} keep-alive connections, {} repeats of 0.5 s warm-up + {} s",
            s.get_conns, s.get_slices, s.get_secs
        ),
        &NAMES,
        "req/s",
        0,
        "us/req",
        0,
        (&["p50 ms", "p99 ms"], lat),
    ));
    let am = reps.proxy(ARCHMERGE).median;
    versus(
        res,
        "manifest GET, us/request",
        am,
        PEERS.iter().map(|i| reps.proxy(*i).median).collect(),
        0,
    );
    res.goal(
        "manifest GET proxy CPU <= 40 us/request",
        format!("{am:.0} us (range {})", reps.proxy(ARCHMERGE).show(0)),
        am <= GET_CPU_GOAL_US,
    );
    throughput_goal(res, "manifest GET", &reps, 0.95, "req/s");
    Ok(())
}

/// GET of a target's index by 32 connections: the index write mode stored
/// (straight from the registry, through each peer, and forwarded by
/// archmerge), and the same index synthesized by archmerge in serve mode,
/// which asks the registry to authorize every GET and revalidates its
/// aggregate once per staleness period.
async fn index_get(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let repo = "bench/index";
    let archmerge = &s.targets[ARCHMERGE];
    let mut conn = Conn::open(archmerge.addr).await?;
    let images = registry::Images::seed(&mut conn, repo).await?;
    push_index_of_four(&mut conn, &images, "index").await?;
    let path = format!("/v2/{repo}/manifests/v1");
    // The two modes must serve the same bytes.
    let mut bodies = Vec::new();
    for t in [&s.targets[DIRECT], &s.serve] {
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
    let serve = NAMES.len();
    let mut targets: Vec<&Target> = s.targets.iter().collect();
    targets.push(&s.serve);
    let mut pids = s.pids.clone();
    pids.push(s.serve_pid);
    let mut steady = s.steady.clone();
    steady.push(0);
    let mut names: Vec<&str> = NAMES.to_vec();
    names[ARCHMERGE] = "archmerge (write mode)";
    names.push("archmerge serve mode");
    let Interleaved { reps, mut stats } =
        interleaved_get(s, "index GET", &targets, &pids, &steady, &path).await?;
    let lat = latency_cells("index GET", &names, &mut stats, res);
    res.tables.push(reps.table(
        format!(
            "index GET (4 arches): {} keep-alive connections, {} repeats; serve mode synthesizes the index",
            s.get_conns, s.get_slices
        ),
        &names,
        "req/s",
        0,
        "us/req",
        0,
        (&["p50 ms", "p99 ms"], lat),
    ));
    let peers = || PEERS.iter().map(|i| reps.proxy(*i).median).collect();
    let am = reps.proxy(serve).median;
    versus(res, "index GET, serve mode, us/request", am, peers(), 0);
    versus(
        res,
        "index GET, write mode, us/request",
        reps.proxy(ARCHMERGE).median,
        peers(),
        0,
    );
    res.goal(
        "index GET in serve mode proxy CPU <= 40 us/request",
        format!(
            "{am:.0} us (range {}); {:.2}x direct",
            reps.proxy(serve).show(0),
            reps.ratio(serve).median
        ),
        am <= GET_CPU_GOAL_US,
    );
    Ok(())
}

/// The first four arches' `<alias>_v1` tags of `images`' repository, pushed
/// through archmerge on `conn`: the index `v1` of four entries.
async fn push_index_of_four(
    conn: &mut Conn,
    images: &registry::Images,
    note: &str,
) -> anyhow::Result<()> {
    for (alias, ..) in registry::ARCHES.iter().take(4) {
        let bytes = images.manifest(alias, note);
        registry::put_manifest(conn, images.repo(), &format!("{alias}_v1"), bytes).await?;
    }
    Ok(())
}

async fn manifest_put(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let repo = "bench/put";
    let mut seed = Conn::open(s.targets[DIRECT].addr).await?;
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
            &mut conns[ARCHMERGE],
            repo,
            &format!("{a}_v1"),
            images.manifest(a, "w"),
        )
        .await?;
    }
    let mut plain: Vec<Vec<f64>> = vec![Vec::new(); NAMES.len()];
    let mut arch = Vec::new();
    let mut warnings = 0;
    let mut last = String::new();
    for n in 0..s.puts {
        for i in rotated(NAMES.len(), n) {
            let bytes = images.manifest("x86_64", &format!("plain-{i}-{n}"));
            let t = Instant::now();
            registry::put_manifest(&mut conns[i], repo, "plain", bytes).await?;
            plain[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
        let a = arches[n % arches.len()];
        let bytes = images.manifest(a, &format!("arch-{n}"));
        last = registry::sha256(&bytes);
        let t = Instant::now();
        let parts =
            registry::put_manifest(&mut conns[ARCHMERGE], repo, &format!("{a}_v1"), bytes).await?;
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
    let has_last = String::from_utf8_lossy(&body).contains(&last);
    if listed != arches.len() || !has_last {
        bail!(
            "after the arch pushes the index lists {listed} entries, the last push {}",
            if has_last { "among them" } else { "missing" }
        );
    }
    if warnings > 0 {
        res.notes.push(format!(
            "{warnings} arch-tag PUTs answered with a merge Warning"
        ));
    }
    let mut t = Table::new(
        format!(
            "manifest PUT: {} of a plain tag through each target, as many of an arch tag through archmerge",
            s.puts
        ),
        &["target", "p50 ms", "p90 ms", "x direct (p50)"],
    );
    let p50: Vec<f64> = plain.iter_mut().map(|v| quantile(v, 0.5)).collect();
    for (i, name) in NAMES.iter().enumerate() {
        t.row(vec![
            (*name).to_owned(),
            num(p50[i], 2),
            num(quantile(&mut plain[i], 0.9), 2),
            num(p50[i] / p50[DIRECT], 2),
        ]);
    }
    let pa = quantile(&mut arch, 0.5);
    t.row(vec![
        "archmerge, arch tag (+index)".into(),
        num(pa, 2),
        num(quantile(&mut arch, 0.9), 2),
        "-".into(),
    ]);
    res.tables.push(t);
    let plain_am = p50[ARCHMERGE];
    res.goal(
        "arch-tag PUT adds <= 5 ms (p50) over a plain PUT",
        format!("+{:.2} ms ({pa:.2} vs {plain_am:.2} ms)", pa - plain_am),
        pa - plain_am <= 5.0,
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

/// Downloads of each round's blob, per target (interleaved): downloads are
/// short, so a round's three together make one repeat, long enough for the
/// 10 ms ticks of the CPU figures.
const DOWNLOADS_PER_ROUND: usize = 3;

async fn blobs(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let repo = "bench/blob";
    let n = NAMES.len();
    let size = s.blob_mib << 20;
    let mib = s.blob_mib as f64;
    let gib = size as f64 / (1u64 << 30) as f64;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let meter = CpuMeter::new();
    let limit = Duration::from_secs(600);
    let mut up = Repeats::new(n);
    let mut chunked = Repeats::new(n);
    let mut down = Repeats::new(n);
    let snap = |i: usize| [meter.seconds(s.registry_pid), meter.seconds(s.pids[i])];
    let per_gib = |i: usize, c: f64, gib: f64| {
        if s.pids[i] == 0 {
            f64::NAN
        } else {
            c / gib
        }
    };
    for round in 0..s.rounds {
        // A fresh blob per target and round, uploaded through that target
        // with its length; then another, chunked as docker sends a layer.
        let mut digests = vec![String::new(); n];
        for (is_chunked, framed) in [(false, &mut up), (true, &mut chunked)] {
            let (kind, salt) = if is_chunked {
                ("upc", 1 << 16)
            } else {
                ("up", 0)
            };
            for i in rotated(n, round) {
                let t = &s.targets[i];
                let blob = Blob::new(nonce ^ ((round as u64) << 8 | i as u64 | salt), size);
                let digest = blob.digest();
                let (body, length) = if is_chunked {
                    (blob.chunked_body(), None)
                } else {
                    (blob.body(), Some(size))
                };
                let mut conn = Conn::open(t.addr).await?;
                let c0 = snap(i);
                let started = Instant::now();
                tokio::time::timeout(
                    limit,
                    registry::upload(&mut conn, repo, body, length, &digest),
                )
                .await
                .map_err(|_| anyhow!("upload via {} took longer than {limit:?}", t.name))?
                .with_context(|| format!("upload via {}", t.name))?;
                let secs = started.elapsed().as_secs_f64();
                drop(conn);
                procfs::settle(s.pids[i], s.steady[i]).await;
                let c1 = snap(i);
                framed.tput[i].push(mib / secs);
                framed.registry[i].push((c1[0] - c0[0]) / gib);
                framed.proxy[i].push(per_gib(i, c1[1] - c0[1], gib));
                say(format!(
                    "blob {:<9} round {}: {kind:<4} {:>7.1} MiB/s, proxy {:.2} s/GiB",
                    t.name,
                    round + 1,
                    mib / secs,
                    (c1[1] - c0[1]) / gib
                ));
                if is_chunked {
                    forget_blob(s, &digest);
                } else {
                    digests[i] = digest;
                }
            }
        }
        // Each target downloads its blob, interleaved with the others.
        let mut secs = vec![0.0f64; n];
        let mut cpu = vec![[0.0f64; 2]; n];
        for rep in 0..DOWNLOADS_PER_ROUND {
            for i in rotated(n, round + rep) {
                let t = &s.targets[i];
                let mut conn = Conn::open(t.addr).await?;
                let c0 = snap(i);
                let started = Instant::now();
                let got =
                    tokio::time::timeout(limit, registry::download(&mut conn, repo, &digests[i]))
                        .await
                        .map_err(|_| anyhow!("download via {} took longer than {limit:?}", t.name))?
                        .with_context(|| format!("download via {}", t.name))?;
                let took = started.elapsed().as_secs_f64();
                drop(conn);
                procfs::settle(s.pids[i], s.steady[i]).await;
                let c1 = snap(i);
                if got != size {
                    bail!("download via {}: {got} bytes of {size}", t.name);
                }
                secs[i] += took;
                cpu[i][0] += c1[0] - c0[0];
                cpu[i][1] += c1[1] - c0[1];
            }
        }
        let gib_down = gib * DOWNLOADS_PER_ROUND as f64;
        for i in 0..n {
            let rate = mib * DOWNLOADS_PER_ROUND as f64 / secs[i];
            down.tput[i].push(rate);
            down.registry[i].push(cpu[i][0] / gib_down);
            down.proxy[i].push(per_gib(i, cpu[i][1], gib_down));
            say(format!(
                "blob {:<9} round {}: down {:>7.1} MiB/s, proxy {:.2} s/GiB",
                s.targets[i].name,
                round + 1,
                rate,
                cpu[i][1] / gib_down
            ));
        }
        for d in &digests {
            forget_blob(s, d);
        }
    }
    res.tables.push(up.table(
        format!(
            "blob upload: a fresh {} MiB blob per target and round (POST, one streamed PATCH, PUT), {} rounds",
            s.blob_mib, s.rounds
        ),
        &NAMES,
        "MiB/s",
        0,
        "s/GiB",
        2,
        (&[], Vec::new()),
    ));
    res.tables.push(chunked.table(
        format!(
            "blob upload, chunked: the same, the PATCH in docker's 32 KiB chunks (no length), {} rounds",
            s.rounds
        ),
        &NAMES,
        "MiB/s",
        0,
        "s/GiB",
        2,
        (&[], Vec::new()),
    ));
    res.tables.push(down.table(
        format!(
            "blob download: that blob {DOWNLOADS_PER_ROUND} times per round, interleaved; a repeat is one round's {DOWNLOADS_PER_ROUND}",
        ),
        &NAMES,
        "MiB/s",
        0,
        "s/GiB",
        2,
        (&[], Vec::new()),
    ));
    let peers = |r: &Repeats| PEERS.iter().map(|i| r.proxy(*i).median).collect();
    let (d, u) = (down.proxy(ARCHMERGE), up.proxy(ARCHMERGE));
    let c = chunked.proxy(ARCHMERGE);
    versus(res, "blob download, s/GiB", d.median, peers(&down), 2);
    versus(res, "blob upload, s/GiB", u.median, peers(&up), 2);
    versus(
        res,
        "blob upload chunked, s/GiB",
        c.median,
        peers(&chunked),
        2,
    );
    res.goal(
        "download proxy CPU <= 0.15 s/GiB",
        format!("{:.2} s/GiB (range {})", d.median, d.show(2)),
        d.median <= 0.15,
    );
    res.goal(
        "upload proxy CPU <= 0.2 s/GiB",
        format!("{:.2} s/GiB (range {})", u.median, u.show(2)),
        u.median <= 0.2,
    );
    res.goal(
        "chunked upload proxy CPU <= 0.2 s/GiB",
        format!("{:.2} s/GiB (range {})", c.median, c.show(2)),
        c.median <= 0.2,
    );
    for (what, r, goal) in [
        ("download", &down, 0.9),
        ("upload", &up, 0.95),
        ("chunked upload", &chunked, 0.95),
    ] {
        throughput_goal(res, what, r, goal, "MiB/s");
    }
    Ok(())
}

/// archmerge's peak RSS budget, MiB, whatever the blob size.
const RSS_GOAL_MIB: f64 = 32.0;

async fn peak_rss(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let pid = s.pids[ARCHMERGE];
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
        let mut conn = Conn::open(s.targets[ARCHMERGE].addr).await?;
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
    res.figure("RSS MiB, idle after the phases before", num(idle, 1));
    res.figure("peak RSS MiB, the phases before", num(run, 1));
    for (mib, peak) in &peaks {
        res.figure(
            format!("peak RSS MiB, {mib} MiB blob up+down"),
            num(*peak, 1),
        );
    }
    let (small, big) = (peaks[0].1, peaks[1].1);
    let worst = run.max(small).max(big);
    res.goal(
        "archmerge peak RSS <= 32 MiB whatever the blob size",
        format!(
            "{worst:.1} MiB at most (run {run:.1}; {} MiB blob {small:.1}; {} MiB blob {big:.1})",
            peaks[0].0, peaks[1].0
        ),
        worst <= RSS_GOAL_MIB,
    );
    Ok(())
}

async fn repository_size(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let points = size::series(
        s.targets[DIRECT].addr,
        s.targets[ARCHMERGE].addr,
        s.archmerge_admin,
        &s.size_tags,
        s.size_puts,
    )
    .await?;
    let mut t = Table::new(
        format!(
            "repository size: {} plain and {} arch-tag PUTs through archmerge, alternating, in a repository that also holds N unrelated tags",
            s.size_puts, s.size_puts
        ),
        &[
            "N tags",
            "plain p50 ms",
            "arch p50 ms",
            "arch - plain ms",
            "registry req/plain push",
            "registry req/arch push",
            "arch push, by method",
        ],
    );
    let mut summary = Vec::new();
    for mut p in points {
        let plain = quantile(&mut p.plain_ms, 0.5);
        let arch = quantile(&mut p.arch_ms, 0.5);
        let (rp, ra) = p.per_push();
        say(format!(
            "size: {} tags (filled in {:.1} s): plain {plain:.2} ms, arch {arch:.2} ms, {rp:.1} / {ra:.1} registry requests",
            p.tags, p.fill_secs
        ));
        t.row(vec![
            p.tags.to_string(),
            num(plain, 2),
            num(arch, 2),
            num(arch - plain, 2),
            num(rp, 1),
            num(ra, 1),
            size::by_method(&p.arch_requests, p.arch_ms.len()),
        ]);
        summary.push((p.tags, arch, ra));
    }
    res.tables.push(t);
    if let (Some(first), Some(last)) = (summary.first(), summary.last()) {
        if summary.len() > 1 {
            let (n0, lat0, req0) = *first;
            let (n1, lat1, req1) = *last;
            res.goal(
                &format!("arch PUT at {n1} tags <= 1.5x the one at {n0}: registry requests"),
                format!("{:.2}x ({req1:.1} vs {req0:.1} per push)", req1 / req0),
                req1 <= 1.5 * req0,
            );
            res.goal(
                &format!("arch PUT at {n1} tags <= 1.5x the one at {n0}: p50 latency"),
                format!("{:.2}x ({lat1:.2} vs {lat0:.2} ms)", lat1 / lat0),
                lat1 <= 1.5 * lat0,
            );
        }
    }
    Ok(())
}

async fn merge_at_scale(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let repo = std::env::var("BENCH_SCALE_REPO").unwrap_or_else(|_| "bench/scale".into());
    let repo = repo.as_str();
    let registry = s.targets[DIRECT].addr;
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
    res.figure(
        format!("reconcile s, {label}, creating"),
        num(first.secs, 1),
    );
    res.figure(
        format!("reconcile s, {label}, unchanged"),
        num(again.secs, 1),
    );
    res.figure(
        "reconcile ms per target, creating",
        num(first.secs * 1e3 / s.scale_targets as f64, 1),
    );
    Ok(())
}

fn synthesis(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let (median_ns, mean_ns, bytes) = scale::index_synthesis(s.iterations)?;
    say(format!(
        "index synthesis: median {median_ns:.0} ns, mean {mean_ns:.0} ns ({bytes} bytes)"
    ));
    res.figure(
        format!("build_index us, 50 entries (median of {})", s.iterations),
        num(median_ns / 1e3, 1),
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
            .zip(&s.pids)
            .map(|(t, p)| format!("{}={} (pid {p})", t.name, t.addr))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    // BENCH_ONLY=get,put,blobs,… runs some phases (profiling).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |phase: &str| only.is_empty() || only.split(',').any(|p| p.trim() == phase);
    // A phase that fails is reported and the run goes on, so one failure
    // does not lose the figures of the others; the run then fails.
    let mut failed = Vec::new();
    let mut outcome = |what: &str, r: anyhow::Result<()>| {
        if let Err(e) = r {
            say(format!("{what} failed: {e:#}"));
            failed.push(format!("{what}: {e:#}"));
        }
    };
    if run("get") {
        say("manifest GET");
        outcome("manifest GET", manifest_get(&s, &mut res).await);
    }
    if run("serve") {
        say("index GET, write and serve mode");
        outcome("index GET", index_get(&s, &mut res).await);
    }
    if run("put") {
        say("manifest PUT");
        outcome("manifest PUT", manifest_put(&s, &mut res).await);
    }
    if run("blobs") {
        say("blob upload and download");
        outcome("blobs", blobs(&s, &mut res).await);
    }
    if run("rss") {
        say("archmerge peak RSS");
        outcome("peak RSS", peak_rss(&s, &mut res).await);
    }
    if run("size") {
        say("repository size");
        outcome("repository size", repository_size(&s, &mut res).await);
    }
    if run("scale") {
        say("merge at scale");
        outcome("merge at scale", merge_at_scale(&s, &mut res).await);
    }
    if run("index") {
        say("index synthesis");
        outcome("index synthesis", synthesis(&s, &mut res));
    }
    if run("instr") {
        say("instructions per request (callgrind)");
        outcome("instructions", instructions(&s, &mut res).await);
    }
    for f in &failed {
        res.notes.push(format!("FAILED {f}"));
    }
    res.print();
    if !failed.is_empty() {
        bail!("{} phase(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

/// GETs counted by callgrind (`instructions.rs`): a plain manifest through
/// archmerge in write mode, and an index of four arches synthesized by
/// archmerge in serve mode, three windows each.
async fn instructions(s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let Some([write, serve]) = &s.counted else {
        bail!("scripts/bench.sh started no archmerge under callgrind (is valgrind installed?)");
    };
    let repo = "bench/instr";
    let mut conn = Conn::open(s.targets[ARCHMERGE].addr).await?;
    let images = registry::Images::seed(&mut conn, repo).await?;
    registry::put_manifest(&mut conn, repo, "plain", images.manifest("x86_64", "instr")).await?;
    push_index_of_four(&mut conn, &images, "instr-index").await?;
    const CONNS: usize = 4;
    const WINDOWS: usize = 3;
    for (what, target, tag) in [
        ("manifest GET, write mode", write, "plain"),
        ("index GET, serve mode", serve, "v1"),
    ] {
        let path = format!("/v2/{repo}/manifests/{tag}");
        let per = instructions::per_request(
            target,
            &path,
            registry::ACCEPT_MANIFESTS,
            CONNS,
            s.instr_requests,
            WINDOWS,
        )
        .await
        .with_context(|| what.to_owned())?;
        let spread = Spread::of(&per);
        say(format!(
            "{what}: {} instructions per request",
            spread.show(0)
        ));
        res.figure(
            format!(
                "user-space instructions per {what} (callgrind; {WINDOWS} windows of {})",
                CONNS * s.instr_requests
            ),
            spread.show(0),
        );
    }
    Ok(())
}
