//! What the kernel says about the processes under test: peak RSS (`VmHWM`,
//! reset through `clear_refs`), and the CPU time of a whole process tree.
//!
//! A proxy's CPU is that of every process it is made of: nginx's master and
//! workers, socat's parent and the child it forks per connection, HAProxy's
//! and archmerge's single process. So the CPU of a tree is, from
//! `/proc/PID/stat`, the root's `utime + stime`, plus `cutime + cstime` (the
//! children it has reaped: socat's finished connections), plus the same for
//! every live descendant.

use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant};

/// A `VmHWM`/`VmRSS`-style field of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Peak resident set size since start or since the last [`reset_peak`], MiB.
pub fn peak_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmHWM:").map(|k| k as f64 / 1024.0)
}

/// Resident set size now, MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmRSS:").map(|k| k as f64 / 1024.0)
}

/// Resets `VmHWM` to the current RSS (`echo 5 > /proc/PID/clear_refs`,
/// allowed to the process's owner). False when the kernel refused.
pub fn reset_peak(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Clock ticks per second of `/proc/PID/stat` times.
fn ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The CPU fields of one process's `/proc/PID/stat`, in ticks.
#[derive(Clone, Copy)]
struct Stat {
    ppid: u32,
    /// `utime + stime`: the process itself, all its threads.
    own: u64,
    /// `cutime + cstime`: its children that exited and were reaped.
    reaped: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after its ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): ppid is field 4, utime..cstime 14..17.
    let num = |i: usize| -> Option<u64> { f.get(i)?.parse().ok() };
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        own: num(11)? + num(12)?,
        reaped: num(13)? + num(14)?,
    })
}

/// Every process's stat, by parent.
fn children_by_parent() -> HashMap<u32, Vec<(u32, Stat)>> {
    let mut by_parent: HashMap<u32, Vec<(u32, Stat)>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(st) = stat(pid) {
                by_parent.entry(st.ppid).or_default().push((pid, st));
            }
        }
    }
    by_parent
}

/// One reading of a process tree: CPU ticks and live descendants.
struct Tree {
    ticks: u64,
    descendants: usize,
}

/// Reads the tree under `root`. The root is read before and after the scan
/// of its descendants, and the scan done again (a bounded number of times)
/// when a child was reaped in between: that child would otherwise be
/// counted twice (live in the scan, and in the root's `cutime`) or not at
/// all. Descendants' own reaped children are taken as read (none of the
/// proxies measured has grandchildren).
fn tree(root: u32) -> Option<Tree> {
    let mut last = None;
    for _ in 0..20 {
        let before = stat(root)?;
        let by_parent = children_by_parent();
        let after = stat(root)?;
        let mut ticks = after.own + after.reaped;
        let mut descendants = 0;
        let mut stack = vec![root];
        while let Some(p) = stack.pop() {
            for (pid, st) in by_parent.get(&p).into_iter().flatten() {
                ticks += st.own + st.reaped;
                descendants += 1;
                stack.push(*pid);
            }
        }
        let t = Tree { ticks, descendants };
        if before.reaped == after.reaped {
            return Some(t);
        }
        last = Some(t);
    }
    last
}

/// Measures the CPU seconds of process trees.
pub struct CpuMeter {
    tick: f64,
}

impl Default for CpuMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuMeter {
    /// A meter.
    pub fn new() -> CpuMeter {
        CpuMeter {
            tick: ticks_per_sec(),
        }
    }

    /// CPU seconds used so far by `pid` and every process under it, live or
    /// reaped; 0 for pid 0 (no process).
    pub fn seconds(&self, pid: u32) -> f64 {
        if pid == 0 {
            return 0.0;
        }
        tree(pid).map_or(0.0, |t| t.ticks as f64 / self.tick)
    }
}

/// Live processes under `pid` (socat's connection children, nginx's
/// workers); 0 for pid 0.
pub fn descendants(pid: u32) -> usize {
    if pid == 0 {
        return 0;
    }
    tree(pid).map_or(0, |t| t.descendants)
}

/// Waits (at most 2 s) until `pid` has no more than `steady` live
/// descendants: a relay's children for connections the client has closed
/// have exited and been reaped, so their last CPU is in the reading that
/// follows.
pub async fn settle(pid: u32, steady: usize) {
    if pid == 0 {
        return;
    }
    let end = Instant::now() + Duration::from_secs(2);
    while descendants(pid) > steady && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
