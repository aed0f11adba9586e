//! What the kernel says about the processes under test: peak RSS (`VmHWM`,
//! reset through `clear_refs`), and CPU time (`utime + stime`) of a process
//! and its children (nginx's workers).

use std::fs;

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

/// (ppid, utime + stime ticks) of one process.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after its ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, ut + st))
}

/// Measures CPU seconds of a set of processes (each with its children).
pub struct CpuMeter {
    pids: Vec<u32>,
    tick: f64,
}

impl CpuMeter {
    /// A meter over `pids` (0 entries are ignored).
    pub fn new(pids: &[u32]) -> CpuMeter {
        CpuMeter {
            pids: pids.iter().copied().filter(|p| *p != 0).collect(),
            tick: ticks_per_sec(),
        }
    }

    /// CPU seconds used so far by each process and its direct children.
    pub fn seconds(&self, pid: u32) -> f64 {
        if !self.pids.contains(&pid) {
            return 0.0;
        }
        let mut ticks = stat(pid).map_or(0, |(_, t)| t);
        if let Ok(dir) = fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some((ppid, t)) = stat(child) {
                    if ppid == pid {
                        ticks += t;
                    }
                }
            }
        }
        ticks as f64 / self.tick
    }
}
