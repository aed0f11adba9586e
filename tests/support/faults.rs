//! What the reliability tests need beyond the base harness: a registry
//! brought back where it was (same port, same storage) after
//! [`Registry::kill`], and HTTP/1.1 spoken byte for byte over a raw socket
//! for requests no client library sends (dot segments, `%2e%2e`, a header
//! trickled one byte a second, a connection that never speaks). And
//! [`eventually`], the one poll-until-it-holds every test file uses for
//! what happens in the background (a webhook's merge, a registry back up).
//!
//! Nothing here changes how the other spawners behave.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::hex;
use super::process::{log_file, read_log, wait_for};
use super::registry::REGISTRY_BIN;
use super::Registry;

// === a registry that comes back ===

impl Registry {
    /// Starts the registry again after [`Registry::kill`], on the same port,
    /// with the same `config.yml` and the same storage, as an operator's
    /// `systemctl start` would: what was pushed before is still there.
    /// (Environment given through `RegistryOpts::env` at the first start is
    /// not repeated; the plain and htpasswd registries need none.) Panics,
    /// with the registry's log, when it does not come up.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "the registry still runs: kill() it first"
        );
        let config = self.dir.path().join("config.yml");
        assert!(
            config.is_file(),
            "no config.yml in {}",
            self.dir.path().display()
        );
        let log = self.dir.path().join("registry.log");
        // Keep what the first run logged; append to it.
        let (out, err) = log_file(&log);
        // The old process's socket may linger for a moment; retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("cloning the log handle"))
                .stderr(err.try_clone().expect("cloning the log handle"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start `{REGISTRY_BIN}` ({e})"));
            match wait_for(&mut child, self.port, |c| c == 200 || c == 401) {
                Ok(()) => {
                    self.child = Some(child);
                    return;
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let text = read_log(&log);
                    if !text.contains("address already in use") || Instant::now() > deadline {
                        panic!(
                            "the registry did not come back on port {}: {why}\n{text}",
                            self.port
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

// === raw HTTP/1.1 ===

/// An answer read off a raw socket.
#[derive(Clone, Debug)]
pub struct RawAnswer {
    /// The status code (0 when the server closed without answering).
    pub status: u16,
    /// The header block, as sent (status line included).
    pub head: String,
    /// The body (as many bytes as arrived; not de-chunked).
    pub body: Vec<u8>,
}

impl RawAnswer {
    /// A header's value (first of that name, any case).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// The body as text, for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` (exact bytes: request line, headers, body) to
/// 127.0.0.1:`port` and reads the answer until the server closes or the
/// declared `Content-Length` arrived, bounded by `limit`. Send
/// `Connection: close` to make the end unambiguous.
pub fn raw_exchange(port: u16, request: &[u8], limit: Duration) -> RawAnswer {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // A server may answer and close before taking a long request whole.
    let _ = s.write_all(request);
    read_answer(&mut s, limit)
}

/// Reads one answer from `s` (see [`raw_exchange`]). What arrives after the
/// answer in the same read is dropped: for answers to pipelined requests,
/// read each with [`read_hashed_answer`].
pub fn read_answer(s: &mut TcpStream, limit: Duration) -> RawAnswer {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    loop {
        if let Some(answer) = complete_answer(&buf) {
            return answer;
        }
        if Instant::now() > deadline {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    parse_answer(&buf)
}

/// The answer in `buf` when its head and `Content-Length` body are whole.
fn complete_answer(buf: &[u8]) -> Option<RawAnswer> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let answer = parse_answer(buf);
    let len: usize = answer.header("content-length")?.parse().ok()?;
    (buf.len() >= end + len).then_some(answer)
}

fn parse_answer(buf: &[u8]) -> RawAnswer {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    RawAnswer {
        status,
        head,
        body: buf[end..].to_vec(),
    }
}

/// A response read off a raw connection: its head, and its body's length
/// and digest (the body itself is hashed as it arrives, not kept).
#[derive(Debug)]
pub struct HashedAnswer {
    /// The status code.
    pub status: u16,
    /// The header block, status line included.
    pub head: String,
    /// How many body bytes came.
    pub len: usize,
    /// The body's digest, `sha256:…`.
    pub digest: String,
}

/// Reads one response, its body by `Content-Length` (hashed as it comes, for
/// bodies of any size); an error when the connection ended first, with how much of the body had come.
pub fn read_hashed_answer(conn: &mut TcpStream) -> Result<HashedAnswer, (String, usize)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return Err((String::from_utf8_lossy(&head).into_owned(), 0)),
        }
    }
    let head = String::from_utf8(head).unwrap();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no Content-Length: {head}"));
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < length {
        let want = buf.len().min(length - got);
        match conn.read(&mut buf[..want]) {
            Ok(0) | Err(_) => return Err((head, got)),
            Ok(n) => {
                hash.update(&buf[..n]);
                got += n;
            }
        }
    }
    Ok(HashedAnswer {
        status,
        head,
        len: got,
        digest: format!("sha256:{}", hex(&hash.finalize())),
    })
}

/// What became of a connection fed slowly by [`trickle`].
#[derive(Clone, Debug)]
pub struct Trickled {
    /// How many bytes were sent before the server closed (or the end).
    pub sent: usize,
    /// When the server closed the connection, counted from connect; `None`
    /// when it was still open at the end.
    pub closed_after: Option<Duration>,
    /// What the server sent, if anything (e.g. a 408).
    pub received: Vec<u8>,
}

/// Connects to 127.0.0.1:`port` and sends `bytes` one at a time, one every
/// `every`, watching for the server to close the connection; gives up (and
/// closes) after `limit`. An empty `bytes` is a client that connects and
/// never says anything. Blocking: run it on its own thread.
pub fn trickle(port: u16, bytes: &[u8], every: Duration, limit: Duration) -> Trickled {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(every)).unwrap();
    let mut sent = 0;
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    while started.elapsed() < limit {
        if sent < bytes.len() {
            if s.write_all(&bytes[sent..=sent]).is_err() {
                return Trickled {
                    sent,
                    closed_after: Some(started.elapsed()),
                    received,
                };
            }
            sent += 1;
        }
        // The read doubles as the pause between two bytes.
        match s.read(&mut chunk) {
            Ok(0) => {
                return Trickled {
                    sent,
                    closed_after: Some(started.elapsed()),
                    received,
                }
            }
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                return Trickled {
                    sent,
                    closed_after: Some(started.elapsed()),
                    received,
                }
            }
        }
    }
    Trickled {
        sent,
        closed_after: None,
        received,
    }
}

// === waiting ===

/// Polls `check` every 50 ms until it says true or `limit` passes; whether
/// it did.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
