//! A small scripted HTTP/1.1 server, for answers a real registry cannot be
//! told to give (a `Location` with odd escapes, a 307 to storage, a slow or
//! broken upstream), and to see exactly what archmerge sent upstream.
//!
//! Blocking std networking, one thread per connection, `Connection: close`
//! on every answer. Stops on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One request as the fake upstream received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// `GET`, `PUT`, …
    pub method: String,
    /// The request target, path and query as sent.
    pub target: String,
    /// Header lines in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every header line named `name`, in order.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What the fake upstream answers.
#[derive(Clone, Debug)]
pub struct FakeResponse {
    /// Status code.
    pub status: u16,
    /// Header lines (Content-Length is added).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl FakeResponse {
    /// A response with `status`, no headers and no body.
    pub fn new(status: u16) -> FakeResponse {
        FakeResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header line.
    pub fn header(mut self, name: &str, value: &str) -> FakeResponse {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> FakeResponse {
        self.body = body.into();
        self
    }
}

type Handler = dyn Fn(&RecordedRequest, u16) -> FakeResponse + Send + Sync;

/// The running fake server.
pub struct FakeUpstream {
    port: u16,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeUpstream {
    /// Starts a server on a free loopback port; `handler` gets each request
    /// and the server's own port (to build absolute URLs) and says what to
    /// answer.
    pub fn start(
        handler: impl Fn(&RecordedRequest, u16) -> FakeResponse + Send + Sync + 'static,
    ) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake upstream");
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (reqs, stopping) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (reqs, handler) = (reqs.clone(), handler.clone());
                std::thread::spawn(move || serve_one(conn, port, &reqs, &*handler));
            }
        });
        FakeUpstream {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The requests received so far, less the harness's readiness probes
    /// (`User-Agent: archmerge-test-probe`, forwarded by archmerge).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.header("user-agent") != Some(super::PROBE_AGENT))
            .cloned()
            .collect()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(
    conn: TcpStream,
    port: u16,
    requests: &Mutex<Vec<RecordedRequest>>,
    handler: &Handler,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().expect("cloning the socket"));
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let mut req = RecordedRequest {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        req.body = read_chunked(&mut reader);
    } else if let Some(n) = req.header("content-length").and_then(|v| v.parse().ok()) {
        let mut body = vec![0; n];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        req.body = body;
    }
    requests.lock().unwrap().push(req.clone());
    let res = handler(&req, port);
    let mut out = format!("HTTP/1.1 {} Fake\r\n", res.status);
    for (k, v) in &res.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if req.method != "HEAD"
        || !res
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        out.push_str(&format!("Content-Length: {}\r\n", res.body.len()));
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut conn = conn;
    let _ = conn.write_all(out.as_bytes());
    if req.method != "HEAD" {
        let _ = conn.write_all(&res.body);
    }
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Both);
}

fn read_chunked(reader: &mut impl BufRead) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        if reader.read_line(&mut size).unwrap_or(0) == 0 {
            return body;
        }
        let size =
            usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        if size == 0 {
            // Trailers, then the empty line.
            let mut l = String::new();
            while reader.read_line(&mut l).unwrap_or(0) > 0 && l.trim() != "" {
                l.clear();
            }
            return body;
        }
        let mut chunk = vec![0; size + 2];
        if reader.read_exact(&mut chunk).is_err() {
            return body;
        }
        body.extend_from_slice(&chunk[..size]);
    }
}
