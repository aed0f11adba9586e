//! Watching the processes of a test from outside, as an operator would.
//!
//! - The registry's access log. distribution writes one line per request
//!   it answered, in Apache's combined log format, to its stdout (which the
//!   harness sends to `registry.log`, between its own logrus lines):
//!
//!   ```text
//!   127.0.0.1 - - [03/Dec/2026:09:06:15 +0000] "GET /v2/foo/manifests/bar HTTP/1.1" 404 93 "" "ua x"
//!   ```
//!
//!   [`Registry::access_log`] parses those lines; [`Registry::requests_seen`]
//!   counts them, so a test takes the count at two points and knows how many
//!   requests the registry answered in between (a line is written when the
//!   answer is done: [`Registry::requests_settled`] waits for the count to
//!   stop moving first).
//! - archmerge's open file descriptors (`/proc/PID/fd`) and the limit it
//!   runs under (`/proc/PID/limits`), and a sampler that keeps the peak.
//! - archmerge's log as text: [`strip_ansi`] takes out the colours it
//!   writes even to a file (a colour code could split what a test looks
//!   for).

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Archmerge, Registry};

// === the registry's access log ===

/// One request as the registry's access log shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// `GET`, `HEAD`, `PUT`, …
    pub method: String,
    /// The request target (path and query).
    pub path: String,
    /// The status the registry answered.
    pub status: u16,
    /// The `User-Agent` the request carried.
    pub agent: String,
}

/// Parses one combined-log-format line:
/// `HOST - USER [TIME] "METHOD PATH PROTO" STATUS BYTES "REFERER" "AGENT"`.
/// `None` for any other line (distribution's own logrus lines).
pub fn parse_access_line(line: &str) -> Option<Access> {
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut parts = request.split(' ');
    let method = parts.next()?;
    let path = parts.next()?;
    let proto = parts.next()?;
    if !proto.starts_with("HTTP/") || !method.chars().all(|c| c.is_ascii_uppercase()) {
        return None;
    }
    let status: u16 = rest.get(..3)?.parse().ok()?;
    let agent = rest
        .rsplit_once(" \"")
        .map(|(_, a)| a.trim_end().trim_end_matches('"').to_owned())
        .unwrap_or_default();
    Some(Access {
        method: method.to_owned(),
        path: path.to_owned(),
        status,
        agent,
    })
}

impl Registry {
    /// Every request the registry answered so far, in order.
    pub fn access_log(&self) -> Vec<Access> {
        self.log_text()
            .lines()
            .filter_map(parse_access_line)
            .collect()
    }

    /// How many requests the registry answered so far.
    pub fn requests_seen(&self) -> usize {
        self.log_text()
            .lines()
            .filter(|l| parse_access_line(l).is_some())
            .count()
    }

    /// [`Registry::requests_seen`] once the count has not moved for 200 ms
    /// (at most 5 s of waiting): the registry writes a line when it has
    /// answered, a moment after the client saw the answer.
    pub fn requests_settled(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = self.requests_seen();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.requests_seen();
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// The requests answered after the first `from`, summed up by method
    /// and path shape (digests folded, digit runs as `#`), most frequent
    /// first: a
    /// readable picture of what a test made the registry do.
    pub fn access_summary(&self, from: usize) -> String {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for a in self.access_log().into_iter().skip(from) {
            let shape: String = a
                .path
                .split('/')
                .enumerate()
                .map(|(i, seg)| {
                    if seg.starts_with("sha256:") {
                        "<digest>".to_owned()
                    } else if i == 1 {
                        seg.to_owned()
                    } else {
                        fold_digits(seg)
                    }
                })
                .collect::<Vec<_>>()
                .join("/");
            let shape = shape.split('?').next().unwrap_or_default().to_owned();
            *counts
                .entry(format!("{} {} {}", a.method, shape, a.status))
                .or_default() += 1;
        }
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v.iter()
            .take(12)
            .map(|(k, n)| format!("{n:>7}  {k}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `seg` with every run of digits replaced by one `#` (`x86_64_t17` →
/// `x#_#_t#`).
fn fold_digits(seg: &str) -> String {
    let mut out = String::new();
    for c in seg.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('#') {
            out.push('#');
        }
    }
    out
}

// === archmerge's file descriptors ===

/// How many file descriptors process `pid` has open right now (0 when it
/// is gone).
pub fn open_fds_of(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

impl Archmerge {
    /// How many file descriptors archmerge has open right now.
    pub fn open_fds(&self) -> usize {
        open_fds_of(self.pid())
    }

    /// archmerge's open-file limit (soft, hard) from `/proc/PID/limits`.
    pub fn nofile_limit(&self) -> (String, String) {
        let pid = self.pid();
        let limits = fs::read_to_string(format!("/proc/{pid}/limits"))
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/limits: {e}"));
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or_else(|| panic!("no `Max open files` in /proc/{pid}/limits:\n{limits}"));
        let mut f = line["Max open files".len()..].split_whitespace();
        (
            f.next().unwrap_or_default().to_owned(),
            f.next().unwrap_or_default().to_owned(),
        )
    }
}

/// Samples a process's open file descriptors every `every` on its own
/// thread until [`FdSampler::stop`], keeping the peak.
pub struct FdSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    samples: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl FdSampler {
    /// Starts sampling process `pid`.
    pub fn start(pid: u32, every: Duration) -> FdSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(AtomicUsize::new(0));
        let (s, p, n) = (stop.clone(), peak.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(open_fds_of(pid), Ordering::Relaxed);
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(every);
            }
        });
        FdSampler {
            stop,
            peak,
            samples,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns (peak, number of samples taken).
    pub fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.peak.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FdSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// === archmerge's log ===

/// `text` without ANSI escape sequences (`ESC [ … letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
