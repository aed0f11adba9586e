//! Zero-copy blob uploads: on a plaintext HTTP/1.1 client connection, the
//! body of a blob upload (`POST`, `PATCH` or `PUT` on
//! `/v2/<name>/blobs/uploads/…` with a `Content-Length` of at least
//! [`MIN_SPLICED`], or chunked, as docker sends a layer) goes from the
//! client's socket to the registry's through a pipe with `splice(2)`;
//! archmerge never copies a byte of its data.
//!
//! A chunked body goes to the registry as the client framed it. archmerge
//! follows the framing ([`Chunks`]) by peeking at each line of it on the
//! socket, without taking it, and splices it with the chunk's data that
//! follows: nothing past the body's end is taken, and framing that a
//! lenient reader could read another way never reaches the registry. A
//! small chunked body that came whole with its head is hyper's, read the
//! ordinary way (a pipe and a connection of its own would cost more).
//!
//! hyper still reads every request head, but the client connection's reader
//! ([`Framer`]) sees the bytes first. It follows the connection's message
//! boundaries as long as every request is framed by `Content-Length`, has
//! no body, or is an upload it splices (the rest of a connection that sends
//! anything else, a chunked manifest say, is hyper's alone). When a head
//! announces an upload body to splice, hyper is handed the same head with
//! `Content-Length: 0`, and the body is left on the socket for that
//! request: hyper calls the service as it reads a head, before it reads
//! another, and there the body ([`Uplink::take`]) goes into the request's
//! [`ClientBody`]. The handler takes the socket with it; the reader gives
//! hyper nothing more until the body is through, and hyper writes nothing
//! meanwhile (it answers one request after another). A body that is not
//! through (the client stopped, the registry failed, the framing broke)
//! leaves the connection unusable: its answer says `Connection: close`.
//!
//! The registry is asked on a connection of archmerge's own, made for the
//! upload (a pooled one might have been closed by the registry meanwhile,
//! and a body cannot be sent twice); afterwards it serves zero-copy
//! downloads. Bounded like the copying path: the client has
//! `body_progress_secs` between two pieces of its body, the registry
//! `upstream_headers_secs` to take the next piece and, once the body is
//! through, to answer.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use rustix::pipe::SpliceFlags;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::chunks::{ChunkError, Chunks};
use super::{pipe, read_head, request_head, response, Answer, Downloads, MAX_SMALL_BODY};
use crate::body::{self, Body, ClientBody};
use crate::error::ProxyError;
use crate::forward::{self, ClientSide};
use crate::route::{self, Route};

/// Smallest upload body spliced; a smaller one is read the ordinary way,
/// where a pipe and a connection of its own would cost more than copying.
const MIN_SPLICED: u64 = 256 * 1024;

/// Longest request head the reader looks at; past it, the connection is
/// hyper's alone (hyper judges the head by its own limits).
const MAX_HEAD: usize = 64 * 1024;

/// Most headers in a head the reader looks at (hyper's own limit).
const MAX_HEADERS: usize = 100;

/// Most bytes of a chunked body looked at in one peek: a line of framing,
/// mostly, and the first bytes of the chunk after it.
const PEEK: usize = 64;

/// Most bytes looked at in one peek where the chunks run small (the last
/// one ended within this many bytes of its line of framing): many lines of
/// framing in one look, so tiny chunks cost a look and a splice per
/// 16 KiB, not per chunk.
const PEEK_SMALL: usize = 16 * 1024;

/// How a spliced body's end is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `Content-Length`: this many bytes.
    Length(u64),
    /// Chunked: the framing as followed so far.
    Chunked(Chunks),
}

// === reading the client's request heads ===

/// What a request head at the front of the bytes says about the bytes
/// after it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Head {
    /// Not all of the head has come yet.
    Partial,
    /// A request of `len` bytes of head and no body.
    Bare { len: usize },
    /// A head of `len` bytes and a body of `length` bytes, both for hyper.
    Sized { len: usize, length: u64 },
    /// A blob upload whose body, of that framing, is spliced: hyper gets
    /// `head`, the same head with `Content-Length: 0`, in place of the
    /// `len` bytes of the client's.
    Spliced {
        len: usize,
        framing: Framing,
        head: Bytes,
    },
    /// Framing the reader does not follow (chunked, an upgrade, HTTP/1.0,
    /// a malformed head): the rest of the connection is hyper's alone.
    Opaque,
}

/// Reads the request head at the front of `buf`.
pub(crate) fn classify(buf: &[u8]) -> Head {
    // Slots left uninitialised: zeroing a hundred for every head cost more
    // than parsing a small one.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Opaque,
    };
    if req.version != Some(1) || req.method == Some("CONNECT") {
        return Head::Opaque;
    }
    let mut length = None;
    let mut chunked = false;
    let mut expects = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding") {
            // `chunked` alone, once: any other coding is hyper's to refuse.
            if chunked || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Head::Opaque;
            }
            chunked = true;
        }
        if name.eq_ignore_ascii_case("upgrade") {
            return Head::Opaque;
        }
        if name.eq_ignore_ascii_case("content-length") {
            match (length, decimal(h.value)) {
                (None, Some(n)) => length = Some(n),
                _ => return Head::Opaque,
            }
        }
        expects |= name.eq_ignore_ascii_case("expect");
    }
    let upload = || {
        matches!(req.method, Some("POST" | "PATCH" | "PUT")) && req.path.is_some_and(is_upload_path)
    };
    // hyper answers an `Expect: 100-continue` itself when it reads the
    // body; such a body is read its way.
    let framing = match length {
        Some(_) if chunked => return Head::Opaque,
        None if chunked && (expects || !upload()) => return Head::Opaque,
        None if chunked => Framing::Chunked(Chunks::default()),
        None | Some(0) => return Head::Bare { len },
        Some(length) if expects || length < MIN_SPLICED || !upload() => {
            return Head::Sized { len, length }
        }
        Some(length) => Framing::Length(length),
    };
    // The head for hyper: the same, with `Content-Length: 0` in place of
    // the header that framed the body.
    let mut head = Vec::with_capacity(len);
    let line_end = buf[..len]
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(0);
    head.extend_from_slice(&buf[..line_end + 2]);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length")
            || h.name.eq_ignore_ascii_case("transfer-encoding")
        {
            head.extend_from_slice(b"Content-Length: 0\r\n");
            continue;
        }
        head.extend_from_slice(h.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Head::Spliced {
        len,
        framing,
        head: head.into(),
    }
}

/// A `Content-Length` value: digits only, as hyper reads it.
fn decimal(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Whether a request target names an upload session: origin form, of
/// bytes any URI parser takes (so hyper takes the head and its handler
/// takes the body).
fn is_upload_path(target: &str) -> bool {
    let plain = target
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&b));
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    plain && path.starts_with("/v2/") && matches!(route::parse(path), Ok(Route::Upload { .. }))
}

/// Where the reader is in the connection's messages.
enum State {
    /// At the start of a request head.
    Head,
    /// Inside a body hyper reads: this many bytes to go.
    Body(u64),
    /// A spliced body is on its way: nothing for hyper until it is through.
    Spliced,
    /// A spliced body broke off: nothing more for hyper, whose answer
    /// closes the connection.
    Broken,
    /// Not following: every byte goes to hyper as it comes.
    Opaque,
}

/// A plaintext HTTP/1.1 client connection that may splice uploads: the
/// reader that hands hyper its bytes, looking at each request head first.
/// The socket itself is in the [`Uplink`], from where the handler of a
/// spliced upload takes it while it splices the body.
pub(crate) struct Framer {
    link: Arc<Uplink>,
    state: State,
    /// Bytes read from the client and not yet handed to hyper.
    pending: BytesMut,
    /// A head to hand to hyper before anything else.
    out: Bytes,
    /// Bound on a head that comes in pieces: hyper's own header timeout
    /// starts only once it sees a byte, and it sees none of such a head
    /// until the head is whole.
    header_read: Duration,
    /// Runs from the first piece of a head that is not whole yet.
    head_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Framer {
    /// The connection on `tcp`, whose first bytes (read to tell HTTP/1
    /// from HTTP/2) are `prefix`; `link` goes with each of its requests. A
    /// head must come whole within `header_read` of its first piece.
    pub(crate) fn new(
        tcp: TcpStream,
        link: Arc<Uplink>,
        prefix: &[u8],
        header_read: Duration,
    ) -> Framer {
        link.lock().tcp = Some(tcp);
        Framer {
            link,
            state: State::Head,
            pending: BytesMut::from(prefix),
            out: Bytes::new(),
            header_read,
            head_timer: None,
        }
    }

    /// Runs `io` on the socket: at once, or once the handler of a spliced
    /// upload has given it back. (hyper writes nothing while a handler
    /// runs: it answers one request after another.)
    pub(crate) fn poll_io<R>(
        &self,
        cx: &mut Context<'_>,
        io: impl FnOnce(&mut Context<'_>, &mut TcpStream) -> Poll<R>,
    ) -> Poll<R> {
        let mut shared = self.link.lock();
        match &mut shared.tcp {
            Some(tcp) => io(cx, tcp),
            None => {
                shared.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// hyper's read of the connection.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.out.is_empty() {
                let n = self.out.len().min(buf.remaining());
                buf.put_slice(&self.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            let mut shared = self.link.lock();
            if let State::Spliced = self.state {
                if shared.splicing {
                    shared.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                self.state = if shared.through {
                    State::Head
                } else {
                    State::Broken
                };
            }
            let shared = &mut *shared;
            let Some(tcp) = &mut shared.tcp else {
                shared.waker = Some(cx.waker().clone());
                return Poll::Pending;
            };
            match self.state {
                // The body broke off: hyper gets nothing more, and closes
                // the connection after the answer.
                State::Broken | State::Spliced => return Poll::Pending,
                State::Opaque => {
                    if self.pending.is_empty() {
                        return Pin::new(tcp).poll_read(cx, buf);
                    }
                    self.out = self.pending.split().freeze();
                }
                State::Body(left) => {
                    if !self.pending.is_empty() {
                        let n = (self.pending.len() as u64).min(left) as usize;
                        self.out = self.pending.split_to(n).freeze();
                        self.state = after_body(left, n);
                        continue;
                    }
                    let start = buf.filled().len();
                    ready!(Pin::new(tcp).poll_read(cx, buf))?;
                    let got = buf.filled().len() - start;
                    // Past this body: the next head, kept to look at.
                    let n = (got as u64).min(left) as usize;
                    if n < got {
                        self.pending.extend_from_slice(&buf.filled()[start + n..]);
                        buf.set_filled(start + n);
                    }
                    // Nothing read: the client closed, and hyper sees it.
                    self.state = after_body(left, n);
                    return Poll::Ready(Ok(()));
                }
                State::Head if self.pending.is_empty() => {
                    // Most heads come whole, in one read: read into hyper's
                    // buffer and look at them there.
                    let start = buf.filled().len();
                    ready!(Pin::new(tcp).poll_read(cx, buf))?;
                    let got = &buf.filled()[start..];
                    if got.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    match classify(got) {
                        Head::Bare { len } if len == got.len() => return Poll::Ready(Ok(())),
                        Head::Sized { len, length } if (got.len() - len) as u64 <= length => {
                            self.state = after_body(length, got.len() - len);
                            return Poll::Ready(Ok(()));
                        }
                        Head::Opaque => {
                            self.state = State::Opaque;
                            return Poll::Ready(Ok(()));
                        }
                        _ => {
                            self.pending.extend_from_slice(got);
                            buf.set_filled(start);
                        }
                    }
                }
                State::Head => match classify(&self.pending) {
                    Head::Partial if self.pending.len() >= MAX_HEAD => self.state = State::Opaque,
                    Head::Partial => {
                        let limit = self.header_read;
                        let timer = self
                            .head_timer
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                        if timer.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("no whole request head within {limit:?}"),
                            )));
                        }
                        if ready!(read_more(cx, tcp, &mut self.pending))? == 0 {
                            // The client closed mid-head: hyper gets what
                            // came, then the end.
                            self.state = State::Opaque;
                        }
                    }
                    Head::Bare { len } => {
                        self.head_timer = None;
                        self.out = self.pending.split_to(len).freeze();
                    }
                    Head::Sized { len, length } => {
                        self.head_timer = None;
                        self.out = self.pending.split_to(len).freeze();
                        self.state = State::Body(length);
                    }
                    Head::Spliced {
                        len,
                        mut framing,
                        head,
                    } => {
                        self.head_timer = None;
                        let came = &self.pending[len..];
                        let have = match &mut framing {
                            Framing::Length(length) => {
                                Ok((came.len() as u64).min(*length) as usize)
                            }
                            Framing::Chunked(chunks) => chunks.feed(came),
                        };
                        // A chunked body that came whole: hyper reads it as
                        // it came.
                        if let (Ok(n), Framing::Chunked(chunks)) = (&have, &framing) {
                            if chunks.done() {
                                self.out = self.pending.split_to(len + n).freeze();
                                continue;
                            }
                        }
                        let _ = self.pending.split_to(len);
                        let rest = match have {
                            Ok(n) => self.pending.split_to(n).freeze(),
                            Err(_) => Bytes::new(),
                        };
                        shared.claim = Some((have.map(|_| framing), rest));
                        shared.splicing = true;
                        self.out = head;
                        self.state = State::Spliced;
                    }
                    Head::Opaque => self.state = State::Opaque,
                },
            }
        }
    }
}

/// The state once `n` more bytes of a body with `left` to go are hyper's.
fn after_body(left: u64, n: usize) -> State {
    match left - n as u64 {
        0 => State::Head,
        left => State::Body(left),
    }
}

/// Reads more of a head that comes in pieces into `pending`.
fn read_more(
    cx: &mut Context<'_>,
    tcp: &mut TcpStream,
    pending: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let mut piece = [0u8; 4096];
    let mut read = ReadBuf::new(&mut piece);
    ready!(Pin::new(tcp).poll_read(cx, &mut read))?;
    pending.extend_from_slice(read.filled());
    Poll::Ready(Ok(read.filled().len()))
}

// === between the reader and the handler ===

/// What a client connection's reader and the handler of its request in
/// flight share: the socket, and the upload body left on it.
#[derive(Default)]
pub(crate) struct Uplink {
    inner: Mutex<Shared>,
}

#[derive(Default)]
struct Shared {
    /// The client's socket; `None` while a handler splices from it.
    tcp: Option<TcpStream>,
    /// A body for the handler of the next request: its framing and the
    /// part of it the reader already had (framing followed through it), or
    /// how the framing broke in that part.
    claim: Option<(Result<Framing, ChunkError>, Bytes)>,
    /// A spliced body is on its way (from its head until its handler is
    /// done): the reader gives hyper nothing.
    splicing: bool,
    /// Whether the last spliced body got through.
    through: bool,
    /// The connection, waiting for the socket or for the body.
    waker: Option<Waker>,
}

impl Uplink {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body the reader left on the socket for the request whose head
    /// hyper just read (with the socket), if it did.
    pub(crate) fn take(self: &Arc<Self>) -> Option<Upload> {
        let mut shared = self.lock();
        let (framing, rest) = shared.claim.take()?;
        Some(Upload {
            framing,
            rest,
            tcp: shared.tcp.take(),
            link: self.clone(),
            through: false,
        })
    }
}

/// A spliced upload body, taken by its handler with the client's socket.
/// Dropped, it gives the socket back: the connection reads on once the
/// body is through, and never again when it broke off (its answer closes
/// the connection).
pub(crate) struct Upload {
    /// How the body's end is found, followed through `rest`; or how its
    /// chunked framing broke there (nothing of it is sent).
    framing: Result<Framing, ChunkError>,
    /// What of the body the reader had read with its head.
    rest: Bytes,
    tcp: Option<TcpStream>,
    link: Arc<Uplink>,
    through: bool,
}

impl Drop for Upload {
    fn drop(&mut self) {
        let mut shared = self.link.lock();
        if let Some(tcp) = self.tcp.take() {
            shared.tcp = Some(tcp);
        }
        shared.splicing = false;
        shared.through = self.through;
        if let Some(waker) = shared.waker.take() {
            waker.wake();
        }
    }
}

// === the registry's side ===

/// Why a spliced body did not get through.
#[derive(Debug)]
enum Broke {
    ClientStalled,
    /// The client closed first; with how many bytes to go, where known.
    ClientClosed(Option<u64>),
    Client(io::Error),
    /// The body's chunked framing broke.
    Framing(ChunkError),
    RegistryStalled,
    Registry(io::Error),
    /// No pipe to be had (archmerge is out of file descriptors).
    Pipe(io::Error),
}

impl Downloads {
    /// Whether blob uploads may be spliced (a plaintext registry, zero-copy
    /// on).
    pub(crate) fn splices_uploads(&self) -> bool {
        self.authority.is_some() && self.uploads
    }

    /// Sends a spliced upload to the registry and answers with the
    /// registry's answer. An answer whose body did not get through says
    /// `Connection: close`.
    pub(crate) async fn upload(
        &self,
        upstream: &crate::upstream::Upstream,
        req: Request<ClientBody>,
        mut upload: Upload,
        client: &ClientSide,
    ) -> Response<Body> {
        let method = req.method().clone();
        let answered = self.send_upload(upstream, &req, &mut upload, client).await;
        let mut resp = answered.unwrap_or_else(|e| e.into_response(&method, "upload"));
        if !upload.through {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    async fn send_upload(
        &self,
        upstream: &crate::upstream::Upstream,
        req: &Request<ClientBody>,
        upload: &mut Upload,
        client: &ClientSide,
    ) -> Result<Response<Body>, ProxyError> {
        let authority = self
            .authority
            .as_deref()
            .ok_or_else(|| ProxyError::UpstreamUnreachable("zero-copy is off".into()))?;
        let unreachable = |e: io::Error| ProxyError::UpstreamUnreachable(e.to_string());
        let framing = upload.framing.clone().map_err(|e| malformed(&e))?;
        let head = request_head(upstream, req, client, authority, Some(&framing));
        let started = Instant::now();
        self.count(req.method());
        let mut conn = tokio::time::timeout(self.connect, TcpStream::connect(authority))
            .await
            .map_err(|_| ProxyError::UpstreamUnreachable("connect timed out".into()))?
            .map_err(unreachable)?;
        conn.set_nodelay(true).map_err(unreachable)?;
        let write = async {
            conn.write_all(&head).await?;
            conn.write_all(&upload.rest).await
        };
        match tokio::time::timeout(self.headers, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(unreachable(e)),
            Err(_) => return Err(ProxyError::UpstreamTimeout(self.headers)),
        }
        let ahead = match framing {
            Framing::Length(length) => Ahead {
                known: length - upload.rest.len() as u64,
                chunks: None,
                small: false,
            },
            Framing::Chunked(chunks) => Ahead {
                known: 0,
                chunks: Some(chunks),
                small: false,
            },
        };
        let limit = req.body().limit();
        let Some(tcp) = &upload.tcp else {
            return Err(ProxyError::UploadBroken(
                "the client's socket is gone".into(),
            ));
        };
        match self.pump(tcp, &conn, ahead, limit).await {
            Ok(()) => upload.through = true,
            Err(Broke::ClientStalled) => return Err(ProxyError::ClientStalled(limit)),
            Err(Broke::ClientClosed(Some(left))) => {
                return Err(ProxyError::UploadBroken(format!(
                    "the client closed with {left} bytes to go"
                )))
            }
            Err(Broke::ClientClosed(None)) => {
                return Err(ProxyError::UploadBroken(
                    "the client closed before the body's last chunk".into(),
                ))
            }
            Err(Broke::Framing(e)) => return Err(malformed(&e)),
            Err(Broke::Client(e)) => return Err(ProxyError::UploadBroken(e.to_string())),
            Err(Broke::RegistryStalled) => return Err(ProxyError::UpstreamTimeout(self.headers)),
            Err(Broke::Pipe(e)) => {
                tracing::warn!(error = %e, "no pipe for a zero-copy upload");
                return Err(ProxyError::Busy("no pipe for a zero-copy upload"));
            }
            Err(Broke::Registry(e)) => {
                // A registry that refuses a body may answer before it has
                // read it all, and close: that answer is the client's.
                let early = tokio::time::timeout(EARLY_ANSWER, answer(&mut conn)).await;
                return match early {
                    Ok(Ok((resp, _))) => Ok(forward::downstream_body(resp, upstream, client)),
                    _ => Err(ProxyError::UpstreamUnreachable(format!(
                        "the registry broke off an upload: {e}"
                    ))),
                };
            }
        }
        let answered = tokio::time::timeout(self.headers, answer(&mut conn)).await;
        self.metrics
            .upstream_seconds
            .observe(started.elapsed().as_secs_f64());
        let (resp, keep) = match answered {
            Ok(Ok(answered)) => answered,
            Ok(Err(e)) => return Err(unreachable(e)),
            Err(_) => return Err(ProxyError::UpstreamTimeout(self.headers)),
        };
        if keep {
            self.pool.put(conn);
        }
        Ok(forward::downstream_body(resp, upstream, client))
    }

    /// Moves the rest of a body from the client's socket to the
    /// registry's, `ahead` of it known to belong.
    async fn pump(
        &self,
        client: &TcpStream,
        registry: &TcpStream,
        mut ahead: Ahead,
        client_limit: Duration,
    ) -> Result<(), Broke> {
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        let (pipe_read, pipe_write, pipe_size) = pipe().map_err(Broke::Pipe)?;
        let mut in_pipe = 0usize;
        let mut clock = Clock {
            timer: Box::pin(tokio::time::sleep(client_limit)),
            waiting: None,
        };
        let wait = |clock: &mut Clock, cx: &mut Context<'_>, on_client: bool| {
            let limit = if on_client {
                client_limit
            } else {
                self.headers
            };
            match clock.wait(cx, on_client, limit) {
                Poll::Ready(()) if on_client => Poll::Ready(Err(Broke::ClientStalled)),
                Poll::Ready(()) => Poll::Ready(Err(Broke::RegistryStalled)),
                Poll::Pending => Poll::Pending,
            }
        };
        let mut over = false;
        poll_fn(|cx| 'pump: loop {
            // The pipe is filled while the client has bytes of the body for
            // it (a chunked body's chunks, one after another), then drained
            // to the registry.
            'fill: {
                if in_pipe == pipe_size || over {
                    break 'fill;
                }
                if ahead.known == 0 {
                    match ahead.follow(cx, client) {
                        Poll::Ready(Ok(0)) => {
                            over = true;
                            continue 'pump;
                        }
                        Poll::Ready(Ok(_)) => clock.waiting = None,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending if in_pipe == 0 => return wait(&mut clock, cx, true),
                        // Nothing more yet: what is in the pipe goes on.
                        Poll::Pending => break 'fill,
                    }
                }
                match client.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Broke::Client(e))),
                    Poll::Pending if in_pipe == 0 => return wait(&mut clock, cx, true),
                    Poll::Pending => break 'fill,
                }
                let want = ahead.known.min((pipe_size - in_pipe) as u64) as usize;
                let splice_in = || {
                    Ok(rustix::pipe::splice(
                        client,
                        None,
                        &pipe_write,
                        None,
                        want,
                        flags,
                    )?)
                };
                // A splice into a pipe that holds something may fail for want
                // of a free slot as one from a socket with nothing to read
                // does; only a splice into an empty pipe says the socket is
                // empty (and clears its readiness), or archmerge would wait
                // for bytes that are already there.
                let filled = if in_pipe == 0 {
                    client.try_io(Interest::READABLE, splice_in)
                } else {
                    splice_in()
                };
                match filled {
                    Ok(0) => return Poll::Ready(Err(Broke::ClientClosed(ahead.to_go()))),
                    Ok(n) => {
                        in_pipe += n;
                        ahead.known -= n as u64;
                        clock.waiting = None;
                        // All it asked for: more may be there.
                        if n == want {
                            continue 'pump;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && in_pipe == 0 => {
                        continue 'pump
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(Broke::Client(e))),
                }
            }
            if in_pipe == 0 {
                // Only once the body is over does the pipe stay empty here.
                return Poll::Ready(Ok(()));
            }
            match registry.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Broke::Registry(e))),
                Poll::Pending => return wait(&mut clock, cx, false),
            }
            let sent = registry.try_io(Interest::WRITABLE, || {
                Ok(rustix::pipe::splice(
                    &pipe_read, None, registry, None, in_pipe, flags,
                )?)
            });
            match sent {
                Ok(n) => {
                    in_pipe -= n;
                    self.metrics.spliced_upload_bytes.inc_by(n as u64);
                    clock.waiting = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(Broke::Registry(e))),
            }
        })
        .await
    }
}

/// What of a spliced body on the client's socket is known to belong to it.
struct Ahead {
    /// Bytes on the socket that belong to the body, to splice.
    known: u64,
    /// A chunked body's framing, followed through the `known` bytes.
    chunks: Option<Chunks>,
    /// Whether its chunks run small: the next look takes in more.
    small: bool,
}

impl Ahead {
    /// Once the `known` bytes are spliced: how many more belong to the body
    /// (0 when it is over), from its framing, peeking at the socket where
    /// the framing goes on.
    fn follow(&mut self, cx: &mut Context<'_>, client: &TcpStream) -> Poll<Result<u64, Broke>> {
        let Some(chunks) = &mut self.chunks else {
            return Poll::Ready(Ok(0));
        };
        self.known = chunks.take_data();
        if self.known == 0 && !chunks.done() {
            // Uninitialised: zeroing 16 KiB for each 32 KiB chunk would cost
            // more than the look.
            let mut peeked = [std::mem::MaybeUninit::<u8>::uninit(); PEEK_SMALL];
            let len = if self.small { PEEK_SMALL } else { PEEK };
            let mut buf = ReadBuf::uninit(&mut peeked[..len]);
            match ready!(client.poll_peek(cx, &mut buf)) {
                Ok(0) => return Poll::Ready(Err(Broke::ClientClosed(None))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Broke::Client(e))),
            }
            let n = chunks.feed(buf.filled()).map_err(Broke::Framing)?;
            // With the rest of a chunk whose data starts among them.
            self.known = n as u64 + chunks.take_data();
            self.small = self.known < PEEK_SMALL as u64;
        }
        Poll::Ready(Ok(self.known))
    }

    /// Bytes of the body to go, where its framing says.
    fn to_go(&self) -> Option<u64> {
        match self.chunks {
            None => Some(self.known),
            Some(_) => None,
        }
    }
}

/// The answer to a chunked body whose framing broke.
fn malformed(e: &ChunkError) -> ProxyError {
    ProxyError::UploadBroken(format!("the body's chunked framing is malformed: {e}"))
}

/// The stall timer of a spliced body: it runs while archmerge waits for
/// one side (the client to send, the registry to take), from the start of
/// that wait; progress stops it.
struct Clock {
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Whom the timer runs for: the client (`true`) or the registry.
    waiting: Option<bool>,
}

impl Clock {
    /// Ready once the side has been waited for `limit` in a row.
    fn wait(&mut self, cx: &mut Context<'_>, on_client: bool, limit: Duration) -> Poll<()> {
        if self.waiting != Some(on_client) {
            self.waiting = Some(on_client);
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + limit);
        }
        self.timer.as_mut().poll(cx)
    }
}

/// How long a registry that broke off an upload has to say why.
const EARLY_ANSWER: Duration = Duration::from_secs(1);

/// Reads the registry's answer to an upload, its small body whole, and
/// whether the connection may serve again.
async fn answer(conn: &mut TcpStream) -> io::Result<(Response<Body>, bool)> {
    let Answer {
        status,
        headers,
        mut rest,
    } = read_head(conn).await?;
    let mut keep = !super::closes(&headers);
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let too_long = || io::Error::other("the registry's answer to an upload is too long");
    let body = if no_body {
        Bytes::new()
    } else if headers.contains_key(header::TRANSFER_ENCODING) {
        // Chunked: read through the last chunk, keep the data.
        let mut data = BytesMut::new();
        loop {
            match httparse::parse_chunk_size(&rest) {
                Ok(httparse::Status::Complete((at, 0))) => {
                    // The last chunk, then (trailers and) an empty line.
                    while !rest[at..].windows(2).any(|w| w == b"\r\n") {
                        read_into(conn, &mut rest).await?;
                    }
                    keep = false;
                    break;
                }
                Ok(httparse::Status::Complete((at, size))) => {
                    let size = size as usize;
                    if data.len() + size > MAX_SMALL_BODY {
                        return Err(too_long());
                    }
                    while rest.len() < at + size + 2 {
                        read_into(conn, &mut rest).await?;
                    }
                    data.extend_from_slice(&rest[at..at + size]);
                    let _ = rest.split_to(at + size + 2);
                }
                Ok(httparse::Status::Partial) => read_into(conn, &mut rest).await?,
                Err(_) => {
                    return Err(io::Error::other(
                        "the registry's chunked answer is malformed",
                    ))
                }
            }
        }
        data.freeze()
    } else if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if length > MAX_SMALL_BODY {
            return Err(too_long());
        }
        while rest.len() < length {
            read_into(conn, &mut rest).await?;
        }
        keep &= rest.len() == length;
        rest.split_to(length).freeze()
    } else {
        // Until the registry closes.
        keep = false;
        loop {
            if rest.len() > MAX_SMALL_BODY {
                return Err(too_long());
            }
            if conn.read_buf(&mut rest).await? == 0 {
                break;
            }
        }
        rest.freeze()
    };
    Ok((response(status, headers, body::full(body)), keep))
}

/// Reads more of an answer; the registry closing first is an error.
async fn read_into(conn: &mut TcpStream, buf: &mut BytesMut) -> io::Result<()> {
    if buf.len() > MAX_SMALL_BODY + 4096 {
        return Err(io::Error::other(
            "the registry's answer to an upload is too long",
        ));
    }
    if conn.read_buf(buf).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the registry closed mid-answer",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPLOAD: &str = "/v2/team/app/blobs/uploads/4c1e?_state=abc";

    fn head(method: &str, target: &str, headers: &str) -> String {
        format!("{method} {target} HTTP/1.1\r\nHost: a\r\n{headers}\r\n")
    }

    #[test]
    fn a_large_upload_body_is_spliced_and_hyper_sees_length_zero() {
        let h = head(
            "PATCH",
            UPLOAD,
            "Content-Type: application/octet-stream\r\nContent-Length: 1048576\r\n",
        );
        let mut bytes = h.clone().into_bytes();
        bytes.extend_from_slice(b"body bytes");
        let Head::Spliced {
            len,
            framing,
            head: rewritten,
        } = classify(&bytes)
        else {
            panic!("not spliced: {:?}", classify(&bytes));
        };
        assert_eq!(len, h.len());
        assert_eq!(framing, Framing::Length(1 << 20));
        assert_eq!(
            std::str::from_utf8(&rewritten).unwrap(),
            format!(
                "PATCH {UPLOAD} HTTP/1.1\r\nHost: a\r\n\
                 Content-Type: application/octet-stream\r\nContent-Length: 0\r\n\r\n"
            )
        );
        for method in ["PUT", "POST"] {
            let h = head(method, UPLOAD, "Content-Length: 262144\r\n");
            assert!(
                matches!(classify(h.as_bytes()), Head::Spliced { .. }),
                "{method}"
            );
        }
    }

    #[test]
    fn a_chunked_upload_body_is_spliced_and_hyper_sees_length_zero() {
        let h = head(
            "PATCH",
            UPLOAD,
            "Transfer-Encoding:  Chunked \r\nContent-Type: application/octet-stream\r\n",
        );
        let Head::Spliced {
            len,
            framing,
            head: rewritten,
        } = classify(h.as_bytes())
        else {
            panic!("not spliced: {:?}", classify(h.as_bytes()));
        };
        assert_eq!(len, h.len());
        assert_eq!(framing, Framing::Chunked(Chunks::default()));
        assert_eq!(
            std::str::from_utf8(&rewritten).unwrap(),
            format!(
                "PATCH {UPLOAD} HTTP/1.1\r\nHost: a\r\n\
                 Content-Length: 0\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
        );
        // Not an upload, or one hyper reads its way: the connection is
        // hyper's from there.
        for (method, target, extra) in [
            ("PUT", "/v2/team/app/manifests/v1", ""),
            ("PATCH", UPLOAD, "Expect: 100-continue\r\n"),
            ("PATCH", UPLOAD, "Transfer-Encoding: gzip, chunked\r\n"),
            ("PATCH", UPLOAD, "Transfer-Encoding: chunked\r\n"),
            ("PATCH", UPLOAD, "Content-Length: 0\r\n"),
        ] {
            let h = head(
                method,
                target,
                &format!("Transfer-Encoding: chunked\r\n{extra}"),
            );
            assert_eq!(
                classify(h.as_bytes()),
                Head::Opaque,
                "{method} {target} {extra:?}"
            );
        }
    }

    #[test]
    fn other_bodies_are_hypers_with_their_boundaries_followed() {
        let small = head("PATCH", UPLOAD, "Content-Length: 262143\r\n");
        assert_eq!(
            classify(small.as_bytes()),
            Head::Sized {
                len: small.len(),
                length: 262_143
            }
        );
        let manifest = head(
            "PUT",
            "/v2/team/app/manifests/v1",
            "Content-Length: 9000000\r\n",
        );
        assert!(matches!(classify(manifest.as_bytes()), Head::Sized { .. }));
        let expects = head(
            "PATCH",
            UPLOAD,
            "Expect: 100-continue\r\nContent-Length: 9000000\r\n",
        );
        assert!(matches!(classify(expects.as_bytes()), Head::Sized { .. }));
        let absolute = head(
            "PATCH",
            "http://a/v2/team/app/blobs/uploads/4c1e",
            "Content-Length: 9000000\r\n",
        );
        assert!(matches!(classify(absolute.as_bytes()), Head::Sized { .. }));
        let odd = head(
            "PATCH",
            "/v2/team/app/blobs/uploads/4c1e?a={|}",
            "Content-Length: 9000000\r\n",
        );
        assert!(matches!(classify(odd.as_bytes()), Head::Sized { .. }));
        let get = head("GET", "/v2/team/app/manifests/v1", "Accept: */*\r\n");
        assert_eq!(classify(get.as_bytes()), Head::Bare { len: get.len() });
        let zero = head("PUT", UPLOAD, "Content-Length: 0\r\n");
        assert_eq!(classify(zero.as_bytes()), Head::Bare { len: zero.len() });
    }

    #[test]
    fn framing_the_reader_does_not_follow_leaves_the_connection_to_hyper() {
        for extra in [
            "Transfer-Encoding: gzip\r\n",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Upgrade: h2c\r\nConnection: upgrade\r\n",
        ] {
            let h = head("PATCH", UPLOAD, extra);
            assert_eq!(classify(h.as_bytes()), Head::Opaque, "{extra:?}");
        }
        let old = "PATCH / HTTP/1.0\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(classify(old.as_bytes()), Head::Opaque);
        assert_eq!(classify(b"\x00\x01garbage\r\n\r\n"), Head::Opaque);
        assert_eq!(classify(b"GET /v2/ HTTP/1.1\r\nHo"), Head::Partial);
    }
}
