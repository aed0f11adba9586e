//! What every spawner shares: a free loopback port, the readiness probe
//! (`GET /v2/` over a plain socket), log files a child writes to, and
//! stopping a child.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// The `User-Agent` of the harness's readiness probe; [`super::FakeUpstream`]
/// leaves such requests out of what it reports.
pub const PROBE_AGENT: &str = "archmerge-test-probe";

/// How long a registry or archmerge has to answer `GET /v2/` after start.
pub(super) const STARTUP: Duration = Duration::from_secs(10);

/// A loopback port nothing listens on right now. The OS may hand it to
/// someone else before the caller binds it; the spawners retry on that.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Sends `GET /v2/` over plain HTTP/1.1 to 127.0.0.1:`port` and returns
/// the status code, or `None` when nothing answered. Blocking and
/// dependency-free on purpose: the spawners run inside and outside tokio
/// runtimes alike.
pub fn v2_status(port: u16) -> Option<u16> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: {PROBE_AGENT}\r\n\
         Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    let line = std::str::from_utf8(&head).ok()?;
    line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

/// Waits until `GET /v2/` on `port` gets an HTTP answer whose status
/// `ready` accepts from the child's own listener, or the child exits, or
/// [`STARTUP`] passes.
pub(super) fn wait_for(
    child: &mut Child,
    port: u16,
    ready: impl Fn(u16) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("exited early with {status}"));
        }
        match v2_status(port) {
            // Only the child's own listener counts: one that lost `port` to
            // another test's process between `free_port` and its bind gets
            // that process's answer while it is still on its way to failing.
            Some(code) if ready(code) && listens_on(child.id(), port) => return Ok(()),
            _ if Instant::now() > deadline => {
                return Err(format!("no answer on GET /v2/ within {STARTUP:?}"))
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Whether process `pid` holds the socket listening on loopback `port`:
/// the listening socket's inode (`/proc/net/tcp`, `tcp6`) is among the
/// process's open files.
fn listens_on(pid: u32, port: u16) -> bool {
    let port = format!(":{port:04X}");
    let listening: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    // local address, state (0A: LISTEN), inode
                    let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
                    (local.ends_with(&port) && *state == "0A").then(|| format!("socket:[{inode}]"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .any(|target| listening.iter().any(|l| target.as_os_str() == l.as_str()))
}

pub(super) fn read_log(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<could not read {}: {e}>", path.display()))
}

pub(super) fn log_file(path: &Path) -> (File, File) {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let g = f.try_clone().expect("cloning log file handle");
    (f, g)
}

pub(super) fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
