//! A lean HTTP/1.1 client for the load generator: one hyper connection per
//! `Conn`, keep-alive, origin-form request targets, every call bounded in
//! time. The same code talks to the registry and to every proxy in front of
//! it, so whatever it costs is the same for all of them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

/// The request body type: streamed or buffered.
pub type ReqBody = BoxBody<Bytes, Infallible>;

/// What one request may take before the run fails loudly instead of hanging.
pub const SMALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One way to reach the registry: straight, or through one proxy.
#[derive(Clone, Debug)]
pub struct Target {
    /// `direct`, `nginx`, `haproxy`, `socat`, `archmerge`, …
    pub name: &'static str,
    /// Where it listens (loopback).
    pub addr: SocketAddr,
}

/// A buffered body.
pub fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).boxed()
}

/// No body.
pub fn empty() -> ReqBody {
    Empty::new().boxed()
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: http1::SendRequest<ReqBody>,
    host: String,
}

impl Conn {
    /// Connects (TCP_NODELAY, as every registry client does).
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::Builder::new()
            .handshake::<_, ReqBody>(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: addr.to_string(),
        })
    }

    /// Sends one request and returns the response head (the body still
    /// streams). `path` is origin-form (`/v2/...?...`).
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.host)
            .header(header::USER_AGENT, "archmerge-bench");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(body)?;
        self.sender.ready().await.context("connection closed")?;
        Ok(self.sender.send_request(req).await?)
    }

    /// [`Conn::send`] for a small exchange: bounded in time, body read whole.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> anyhow::Result<(http::response::Parts, Bytes)> {
        let what = format!("{method} {path}");
        tokio::time::timeout(SMALL_TIMEOUT, async {
            let resp = self.send(method, path, headers, body).await?;
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await?.to_bytes();
            Ok::<_, anyhow::Error>((parts, bytes))
        })
        .await
        .map_err(|_| anyhow!("{what} took longer than {SMALL_TIMEOUT:?}"))?
        .with_context(|| what.clone())
    }
}

/// Fails unless the status is the one expected, with the body in the error.
pub fn expect(
    what: &str,
    parts: &http::response::Parts,
    body: &[u8],
    want: StatusCode,
) -> anyhow::Result<()> {
    if parts.status != want {
        bail!(
            "{what}: expected {want}, got {}: {}",
            parts.status,
            String::from_utf8_lossy(&body[..body.len().min(400)])
        );
    }
    Ok(())
}

/// The origin-form target of a `Location` header (absolute or not).
pub fn location(parts: &http::response::Parts) -> anyhow::Result<String> {
    let loc = parts
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| anyhow!("no Location header"))?;
    if loc.starts_with('/') {
        return Ok(loc.to_owned());
    }
    let uri: Uri = loc.parse().with_context(|| format!("Location {loc:?}"))?;
    Ok(uri.path_and_query().map_or("/", |p| p.as_str()).to_owned())
}

/// Appends `digest=<d>` to an upload URL.
pub fn with_digest(path: &str, digest: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}digest={digest}")
}

/// Reads a streamed body to the end, counting bytes and dropping them.
pub async fn drain(mut body: Incoming) -> anyhow::Result<u64> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

// === the generated blob ===

/// Size of the random pattern a blob is cut from.
const PATTERN: usize = 4 << 20;
/// Size of one body frame the client hands to hyper.
const CHUNK: usize = 256 << 10;

/// A blob that is never held whole: frames are slices of a per-blob random
/// 4 MiB pattern at offsets that move from frame to frame, so each blob (one
/// seed) has its own content and digest, and the client spends no CPU making
/// it while the clock runs (slicing `Bytes` copies nothing).
#[derive(Clone)]
pub struct Blob {
    pattern: Bytes,
    size: u64,
}

impl Blob {
    /// A blob of `size` bytes for `seed`.
    pub fn new(seed: u64, size: u64) -> Blob {
        let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
        let mut v = Vec::with_capacity(PATTERN);
        while v.len() < PATTERN {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        Blob {
            pattern: Bytes::from(v),
            size,
        }
    }

    /// Its length.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn frame(&self, i: u64, n: usize) -> Bytes {
        let span = (PATTERN - CHUNK) as u64;
        let off = (i.wrapping_mul(2_654_435_761) % span) as usize & !63;
        self.pattern.slice(off..off + n)
    }

    /// `sha256:<hex>` of the blob (computed before the clock starts).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        let mut left = self.size;
        let mut i = 0;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            h.update(self.frame(i, n));
            left -= n as u64;
            i += 1;
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    /// The blob as a streamed request body with an exact size hint.
    pub fn body(&self) -> ReqBody {
        self.framed(None)
    }

    /// The blob as docker sends a layer: a body of unknown length, which
    /// hyper sends chunked, one chunk of [`DOCKER_CHUNK`] bytes per frame.
    pub fn chunked_body(&self) -> ReqBody {
        self.framed(Some(DOCKER_CHUNK))
    }

    fn framed(&self, pieces: Option<usize>) -> ReqBody {
        BlobBody {
            blob: self.clone(),
            left: self.size,
            i: 0,
            pieces,
            frame: Bytes::new(),
        }
        .boxed()
    }
}

/// The chunk size docker's client sends a layer in (Go's `io.Copy`
/// buffer; seen on the wire).
const DOCKER_CHUNK: usize = 32 << 10;

struct BlobBody {
    blob: Blob,
    left: u64,
    i: u64,
    /// Frames of at most this many bytes, and no size hint.
    pieces: Option<usize>,
    /// What is left of the frame being cut into pieces.
    frame: Bytes,
}

impl Body for BlobBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.frame.is_empty() {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            let n = self.left.min(CHUNK as u64) as usize;
            self.frame = self.blob.frame(self.i, n);
            self.left -= n as u64;
            self.i += 1;
        }
        let n = self.pieces.unwrap_or(CHUNK).min(self.frame.len());
        let data = self.frame.split_to(n);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0 && self.frame.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match self.pieces {
            Some(_) => SizeHint::default(),
            None => SizeHint::with_exact(self.left + self.frame.len() as u64),
        }
    }
}
