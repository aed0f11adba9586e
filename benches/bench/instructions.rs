//! User-space instructions per request, counted by callgrind: the one
//! figure of the run that does not move with the machine's load.
//!
//! `scripts/bench.sh` starts two more archmerge instances (write mode and
//! serve mode) under `valgrind --tool=callgrind --instr-atstart=no`: they
//! run some 50 times slower and count nothing until told. A window here
//! turns instrumentation on (`callgrind_control --instr=on`), sends a fixed
//! number of GETs over a few keep-alive connections, turns it off and has
//! callgrind write what it counted (`--dump`); the dump's `totals:` line
//! over the number of requests is the figure. The same build, inputs and
//! requests give the same count to a fraction of a percent, whatever else
//! the machine does, so two builds are compared with one window each.
//! What it leaves out is the kernel's share (syscalls, TCP, wake-ups) and
//! what an instruction costs (cache misses; a `rep movsb` counts once per
//! byte): read it beside the CPU per request of the GET phases, not instead.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context as _};
use http::{Method, StatusCode};

use crate::client::{self, Conn};

/// One archmerge under callgrind.
pub struct Counted {
    pub addr: SocketAddr,
    /// The valgrind process (callgrind_control addresses it by pid).
    pub pid: u32,
    /// `--callgrind-out-file`: dump `k` is written to `OUT.k`.
    pub out: PathBuf,
}

/// Instructions per request of `windows` windows of `conns` × `per_conn`
/// GETs of `path`, after a warm-up that opens the connections and fills
/// archmerge's caches.
pub async fn per_request(
    target: &Counted,
    path: &str,
    accept: &'static str,
    conns: usize,
    per_conn: usize,
    windows: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut open = Vec::new();
    for _ in 0..conns {
        open.push(Conn::open(target.addr).await?);
    }
    // Warm-up, not counted: every connection used, the registry
    // connections pooled.
    send_all(&mut open, path, accept, per_conn.div_ceil(10).max(2)).await?;
    let mut figures = Vec::new();
    for _ in 0..windows {
        control(target.pid, "--instr=on")?;
        send_all(&mut open, path, accept, per_conn).await?;
        control(target.pid, "--instr=off")?;
        let before = last_dump(&target.out)?;
        control(target.pid, "--dump")?;
        let dump = last_dump(&target.out)?;
        if dump.0 <= before.0 {
            bail!("callgrind wrote no dump for {}", target.out.display());
        }
        let total = totals(&dump.1)?;
        figures.push(total as f64 / (conns * per_conn) as f64);
    }
    Ok(figures)
}

/// `per_conn` GETs on each connection, the connections at once; every one
/// must be answered 200 (each bounded in time by [`Conn::call`]).
async fn send_all(
    conns: &mut [Conn],
    path: &str,
    accept: &'static str,
    per_conn: usize,
) -> anyhow::Result<()> {
    let runs = conns.iter_mut().map(|conn| async move {
        for _ in 0..per_conn {
            let (parts, body) = conn
                .call(Method::GET, path, &[("accept", accept)], client::empty())
                .await?;
            client::expect(&format!("GET {path}"), &parts, &body, StatusCode::OK)?;
        }
        Ok::<_, anyhow::Error>(())
    });
    for r in futures_util::future::join_all(runs).await {
        r?;
    }
    Ok(())
}

/// `callgrind_control ARG PID`; it returns once callgrind has done it.
fn control(pid: u32, arg: &str) -> anyhow::Result<()> {
    let out = Command::new("callgrind_control")
        .arg(arg)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control (Debian's valgrind)")?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !said.contains("OK") {
        bail!(
            "callgrind_control {arg} {pid} failed: {}{}",
            said,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The highest-numbered dump of `out` (`OUT.k`), as (k, path); (0, out)
/// when there is none yet.
fn last_dump(out: &Path) -> anyhow::Result<(u32, PathBuf)> {
    let dir = out
        .parent()
        .ok_or_else(|| anyhow!("{} has no dir", out.display()))?;
    let stem = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{} has no file name", out.display()))?;
    let mut last = (0, out.to_path_buf());
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(k) = name
            .to_str()
            .and_then(|n| n.strip_prefix(stem))
            .and_then(|n| n.strip_prefix('.'))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if k > last.0 {
            last = (k, entry.path());
        }
    }
    Ok(last)
}

/// The `totals:` line of a callgrind dump (the only event counted is `Ir`).
fn totals(dump: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(dump).with_context(|| dump.display().to_string())?;
    text.lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("{} has no totals line", dump.display()))
}
