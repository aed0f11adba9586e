//! Zero-copy downloads: on a plaintext HTTP/1.1 client connection, the body
//! of a blob or manifest GET goes from the registry's socket to the
//! client's through a pipe with `splice(2)`, so the kernel moves the pages
//! and archmerge never copies a byte of it. A manifest mostly arrives whole
//! with the registry's head and is passed on as read; it takes this way
//! because a request here costs a fifth fewer instructions than one
//! through the pooled client (`scripts/bench.sh`, instructions phase).
//!
//! hyper still writes the response: status line, headers, framing and
//! keep-alive are its own. The body it is handed ([`Spliced`]) is a run of
//! *placeholder* chunks, slices of one block of zeros, as long as the blob.
//! The client connection's writer ([`crate::listener`]) knows a placeholder
//! by its address ([`is_placeholder`]) and, where hyper writes one, splices
//! that many bytes from the connection's [`Downlink`] instead. A
//! placeholder's own bytes never reach a client: one that meets a
//! connection with nothing to splice fails the connection.
//!
//! The registry is asked on a connection of archmerge's own ([`Downloads`]:
//! the request is the one [`forward`] would send, written by hand, its
//! answer's head parsed with `httparse`), since the pooled client keeps its
//! sockets to itself. Only a plain `200` with a `Content-Length` is
//! spliced; a small answer of another kind (a redirect to a storage
//! backend, a 401, a 404) is passed on as read, and anything else (a 5xx,
//! chunked framing, a failed connection) goes the ordinary way, with its
//! retries. TLS on either side and HTTP/2 take the ordinary, copying path.
//!
//! Bounded like the copying path: the registry's connection has
//! `upstream_headers_secs` to answer and, once the body flows, the same
//! time between two pieces of it; a client that stops reading holds its
//! own connection only, as it would anyway.
//!
//! Upload bodies are spliced the other way, beneath hyper's reader
//! ([`upload`]); both share the registry connections made here.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use rustix::fd::OwnedFd;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::body::{self, Body, BoxError, ClientBody};
use crate::config::Config;
use crate::forward::{self, ClientSide};
use crate::metrics::Metrics;
use crate::upstream::UpstreamError;

mod chunks;
mod upload;

pub(crate) use upload::{Framer, Uplink, Upload};

/// One placeholder chunk at most, and the pipe's size when the kernel
/// allows it (`/proc/sys/fs/pipe-max-size` is 1 MiB by default).
const CHUNK: usize = 1 << 20;

/// Largest response head read from the registry.
const MAX_HEAD: usize = 64 * 1024;

/// Largest answer other than a blob that is passed on as read (redirects,
/// error bodies); a longer one goes the ordinary way.
const MAX_SMALL_BODY: usize = 64 * 1024;

/// Idle registry connections kept for the next download.
const POOL: usize = 32;

// === placeholders ===

/// The block placeholders are cut from. Allocated zeroed and never read
/// or written, so its pages are never touched (no resident memory).
fn zeros() -> &'static Bytes {
    static ZEROS: OnceLock<Bytes> = OnceLock::new();
    ZEROS.get_or_init(|| Bytes::from(vec![0u8; CHUNK]))
}

/// Whether `buf` is (part of) a placeholder: it lies in the block.
pub(crate) fn is_placeholder(buf: &[u8]) -> bool {
    let block = zeros().as_ptr_range();
    !buf.is_empty() && block.contains(&buf.as_ptr())
}

/// A response body of `head` (the body bytes read with the registry's
/// head, real ones), then placeholders for the `left` bytes spliced.
pub(crate) struct Spliced {
    head: Bytes,
    left: u64,
}

impl http_body::Body for Spliced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if !this.head.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut this.head)))));
        }
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let n = this.left.min(CHUNK as u64) as usize;
        this.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(zeros().slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.head.len() as u64 + self.left)
    }
}

// === the client connection's side ===

/// What one client connection splices from: at most one registry body at a
/// time (HTTP/1.1 writes one response after another).
#[derive(Default)]
pub(crate) struct Downlink {
    source: Mutex<Option<Source>>,
}

impl Downlink {
    fn is_free(&self) -> bool {
        self.lock().is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Source>> {
        self.source.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where hyper writes a placeholder of `max` bytes: splices up to that
    /// many from the registry to `client`, and says how many went.
    pub(crate) fn poll_splice(
        &self,
        cx: &mut Context<'_>,
        client: &TcpStream,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        let mut slot = self.lock();
        let Some(source) = slot.as_mut() else {
            return Poll::Ready(Err(io::Error::other(
                "a placeholder reached a connection with nothing to splice",
            )));
        };
        let polled = source.poll_splice(cx, client, max);
        match &polled {
            Poll::Ready(Ok(_)) if source.done() => {
                if let Some(source) = slot.take() {
                    source.finish();
                }
            }
            Poll::Ready(Err(e)) => {
                tracing::warn!(error = %e, "a zero-copy download broke off");
                *slot = None;
            }
            _ => {}
        }
        polled
    }
}

/// A registry body on its way: the registry's socket, the pipe, and how
/// much is still to come.
struct Source {
    upstream: TcpStream,
    pipe_read: OwnedFd,
    pipe_write: OwnedFd,
    /// The pipe's capacity.
    pipe_size: usize,
    /// Bytes in the pipe, not yet at the client.
    in_pipe: usize,
    /// Bytes still to come from the registry.
    left: u64,
    /// Most time between two pieces from the registry.
    stall: Duration,
    timer: Pin<Box<Sleep>>,
    /// Whether the timer runs: set while the pipe is empty and the
    /// registry's socket has nothing (time spent waiting for the client
    /// does not count).
    waiting: bool,
    /// Where the connection goes once the body is through; `None` when
    /// the registry said it closes it.
    pool: Option<Arc<Pool>>,
    metrics: Arc<Metrics>,
}

impl Source {
    fn done(&self) -> bool {
        self.left == 0 && self.in_pipe == 0
    }

    /// The body is through: the registry's connection may serve another.
    fn finish(self) {
        if let Some(pool) = &self.pool {
            pool.put(self.upstream);
        }
    }

    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        client: &TcpStream,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        loop {
            if self.in_pipe == 0 {
                if self.left == 0 {
                    return Poll::Ready(Err(io::Error::other(
                        "more placeholder bytes than the registry's body",
                    )));
                }
                if self.upstream.poll_read_ready(cx)?.is_pending() {
                    if !self.waiting {
                        self.waiting = true;
                        let deadline = tokio::time::Instant::now() + self.stall;
                        self.timer.as_mut().reset(deadline);
                    }
                    if self.timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the registry sent no body data for {:?}", self.stall),
                        )));
                    }
                    return Poll::Pending;
                }
                let want = self.left.min(self.pipe_size as u64) as usize;
                let filled = self.upstream.try_io(Interest::READABLE, || {
                    Ok(rustix::pipe::splice(
                        &self.upstream,
                        None,
                        &self.pipe_write,
                        None,
                        want,
                        flags,
                    )?)
                });
                match filled {
                    Ok(0) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the registry closed with {} bytes to go", self.left),
                        )))
                    }
                    Ok(n) => {
                        self.in_pipe = n;
                        self.left -= n as u64;
                        self.waiting = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            ready!(client.poll_write_ready(cx))?;
            let want = self.in_pipe.min(max);
            let sent = client.try_io(Interest::WRITABLE, || {
                Ok(rustix::pipe::splice(
                    &self.pipe_read,
                    None,
                    client,
                    None,
                    want,
                    flags,
                )?)
            });
            match sent {
                Ok(n) => {
                    self.in_pipe -= n;
                    self.metrics.spliced_bytes.inc_by(n as u64);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

// === the registry's side ===

/// archmerge's own registry connections for zero-copy downloads (and
/// uploads: [`upload`]), and how they are made.
pub(crate) struct Downloads {
    /// `host:port` of a plaintext registry; `None` when the registry speaks
    /// TLS (nothing is spliced) or the path is turned off.
    authority: Option<String>,
    /// Whether blob uploads are spliced too.
    uploads: bool,
    connect: Duration,
    headers: Duration,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Pool {
    idle: Mutex<Vec<TcpStream>>,
}

impl Pool {
    fn put(&self, conn: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < POOL {
            idle.push(conn);
        }
    }

    /// An idle connection the registry has not closed meanwhile.
    fn take(&self) -> Option<TcpStream> {
        loop {
            let conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            // Readable while idle means closed (or talking out of turn).
            if let Err(e) = conn.try_read(&mut [0u8; 1]) {
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Some(conn);
                }
            }
        }
    }
}

/// What became of a blob GET tried the zero-copy way.
pub(crate) enum Download {
    /// Answered: spliced, or a small answer passed on as read.
    Answered(Response<Body>),
    /// The registry did not answer within `upstream_headers_secs` (the
    /// ordinary path would not try again either).
    TimedOut(Duration),
    /// For the ordinary path, untouched. `failed` says why the attempt made
    /// here failed, when it did: it counts as the first of the ordinary
    /// path's tries.
    Declined {
        /// The client's request.
        req: Request<ClientBody>,
        /// `status_5xx` or `unreachable`, as the retry metric counts them.
        failed: Option<&'static str>,
    },
}

impl Downloads {
    pub(crate) fn new(config: &Config, metrics: Arc<Metrics>) -> Downloads {
        let plain = config.upstream.scheme == http::uri::Scheme::HTTP;
        Downloads {
            authority: (plain && config.zero_copy_downloads)
                .then(|| config.upstream.authority.to_string()),
            uploads: config.zero_copy_uploads,
            connect: config.timeouts.connect,
            headers: config.timeouts.upstream_headers,
            pool: Arc::default(),
            metrics,
        }
    }

    /// Answers a blob or manifest GET by splicing when it can; otherwise
    /// hands the request back, untouched, for the ordinary path.
    pub(crate) async fn get(
        &self,
        upstream: &crate::upstream::Upstream,
        req: Request<ClientBody>,
        client: &ClientSide,
    ) -> Download {
        use http_body::Body as _;
        let declined = |req| Download::Declined { req, failed: None };
        let Some(authority) = &self.authority else {
            return declined(req);
        };
        let eligible = req.method() == Method::GET
            && req.version() == Version::HTTP_11
            && !req.headers().contains_key(header::RANGE)
            && req.body().is_end_stream();
        let Some(link) = req.extensions().get::<Arc<Downlink>>().cloned() else {
            return declined(req);
        };
        if !eligible || !link.is_free() {
            return declined(req);
        }
        let head = request_head(upstream, &req, client, authority, None);
        let answer = self.timed(self.ask(&Method::GET, authority, &head)).await;
        let (conn, answer) = match answer {
            Ok(Ok(answered)) => answered,
            Ok(Err(_)) => {
                return Download::Declined {
                    req,
                    failed: Some("unreachable"),
                }
            }
            Err(_) => return Download::TimedOut(self.headers),
        };
        if answer.status.is_server_error() {
            return Download::Declined {
                req,
                failed: Some("status_5xx"),
            };
        }
        match self.respond(conn, answer, &link) {
            Some(resp) => Download::Answered(forward::downstream_body(resp, upstream, client)),
            None => declined(req),
        }
    }

    /// Sends `head` on a pooled connection (once more on a fresh one if the
    /// pooled one turns out closed before any answer) and reads the head of
    /// the answer.
    async fn ask(
        &self,
        method: &Method,
        authority: &str,
        head: &[u8],
    ) -> io::Result<(TcpStream, Answer)> {
        self.count(method);
        let mut tried_pooled = false;
        if let Some(mut conn) = self.pool.take() {
            if let Ok(answer) = exchange(&mut conn, head).await {
                return Ok((conn, answer));
            }
            tried_pooled = true;
        }
        let mut conn = tokio::time::timeout(self.connect, TcpStream::connect(authority))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        conn.set_nodelay(true)?;
        if tried_pooled {
            self.count(method);
        }
        let answer = exchange(&mut conn, head).await?;
        Ok((conn, answer))
    }

    /// A request archmerge makes itself (`GET` or `HEAD`, no body) on these
    /// connections, its answer read whole: status, headers and a body of at
    /// most [`MAX_SMALL_BODY`], within `upstream_headers_secs`. `None` when
    /// it cannot go this way (a TLS registry, zero-copy downloads off, an
    /// answer framed otherwise or larger): the caller asks through the
    /// pooled client. It skips that client's checkout, connection task and
    /// client-side parse, which serve mode's authorization probe, made for
    /// every GET, would otherwise pay.
    pub(crate) async fn small(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<Result<Response<Body>, UpstreamError>> {
        let authority = self.authority.as_deref()?;
        if !matches!(*method, Method::GET | Method::HEAD) {
            return None;
        }
        let head = head_bytes(method, path, headers, authority);
        let answer = self
            .timed(async {
                let (mut conn, answer) = self.ask(method, authority, &head).await?;
                let whole = read_small_body(&mut conn, answer, method == Method::HEAD).await?;
                Ok((conn, whole))
            })
            .await;
        let (conn, whole) = match answer {
            Ok(Ok(answered)) => answered,
            Ok(Err(e)) => return Some(Err(UpstreamError::Unreachable(e.to_string()))),
            Err(_) => return Some(Err(UpstreamError::Timeout(self.headers))),
        };
        let (status, headers, body) = whole?;
        if !closes(&headers) {
            self.pool.put(conn);
        }
        Some(Ok(response(status, headers, body::full(body))))
    }

    /// `exchange` within `upstream_headers_secs`, its time observed with
    /// every other registry call's.
    async fn timed<T>(
        &self,
        exchange: impl Future<Output = io::Result<T>>,
    ) -> Result<io::Result<T>, tokio::time::error::Elapsed> {
        let started = Instant::now();
        let answer = tokio::time::timeout(self.headers, exchange).await;
        self.metrics
            .upstream_seconds
            .observe(started.elapsed().as_secs_f64());
        answer
    }

    /// One request sent to the registry, counted with every other request.
    fn count(&self, method: &Method) {
        self.metrics
            .upstream_requests
            .get_or_create(&crate::metrics::MethodLabels {
                method: crate::metrics::method_label(method),
            })
            .inc();
    }

    /// The client's response for the registry's answer, or `None` for the
    /// ordinary path.
    fn respond(&self, conn: TcpStream, answer: Answer, link: &Downlink) -> Option<Response<Body>> {
        let Answer {
            status,
            headers,
            mut rest,
        } = answer;
        let length = fixed_length(&headers)?;
        if (rest.len() as u64) > length {
            // More than one answer to one request: not a registry to trust
            // with a pooled connection.
            return None;
        }
        let keep = !closes(&headers);
        let left = length - rest.len() as u64;
        if status != StatusCode::OK {
            if left > 0 || length as usize > MAX_SMALL_BODY {
                return None;
            }
            if keep {
                self.pool.put(conn);
            }
            return Some(response(status, headers, body::full(rest.split().freeze())));
        }
        let body = Spliced {
            head: rest.split().freeze(),
            left,
        };
        let pool = keep.then(|| self.pool.clone());
        if left == 0 {
            if let Some(pool) = pool {
                pool.put(conn);
            }
        } else {
            // Without a file descriptor for a pipe, the ordinary path asks
            // again.
            let (pipe_read, pipe_write, pipe_size) = pipe().ok()?;
            *link.lock() = Some(Source {
                upstream: conn,
                pipe_read,
                pipe_write,
                pipe_size,
                in_pipe: 0,
                left,
                stall: self.headers,
                timer: Box::pin(tokio::time::sleep(self.headers)),
                waiting: false,
                pool,
                metrics: self.metrics.clone(),
            });
        }
        Some(response(status, headers, body::stream(body)))
    }
}

/// A non-blocking pipe (read end, write end) and its capacity: [`CHUNK`]
/// when the kernel allows it.
fn pipe() -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    let size = rustix::pipe::fcntl_setpipe_size(&write, CHUNK)
        .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))
        .unwrap_or(64 * 1024);
    Ok((read, write, size))
}

fn response(status: StatusCode, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// The length of an answer's body framed by `Content-Length` alone; `None`
/// for chunked framing or no readable length.
fn fixed_length(headers: &HeaderMap) -> Option<u64> {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return None;
    }
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Whether the registry closes the connection after this answer.
fn closes(headers: &HeaderMap) -> bool {
    forward::connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("close"))
}

/// The head of the registry's answer, and the body bytes read with it.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    rest: BytesMut,
}

/// The rest of a small answer's body, read; `None` for an answer framed
/// otherwise (chunked, no `Content-Length`) or longer than
/// [`MAX_SMALL_BODY`], whose connection is then dropped.
async fn read_small_body(
    conn: &mut TcpStream,
    answer: Answer,
    head_only: bool,
) -> io::Result<Option<(StatusCode, HeaderMap, Bytes)>> {
    let Answer {
        status,
        headers,
        mut rest,
    } = answer;
    if head_only {
        return Ok(rest.is_empty().then(|| (status, headers, Bytes::new())));
    }
    let length = fixed_length(&headers).and_then(|l| usize::try_from(l).ok());
    let Some(length) = length.filter(|&l| l <= MAX_SMALL_BODY && rest.len() <= l) else {
        return Ok(None);
    };
    while rest.len() < length {
        if conn.read_buf(&mut rest).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the registry closed mid-answer",
            ));
        }
        if rest.len() > length {
            // More than one answer to one request.
            return Ok(None);
        }
    }
    Ok(Some((status, headers, rest.freeze())))
}

/// Writes a request head and reads the answer's head.
async fn exchange(conn: &mut TcpStream, head: &[u8]) -> io::Result<Answer> {
    conn.write_all(head).await?;
    read_head(conn).await
}

/// Reads the head of the registry's answer.
async fn read_head(conn: &mut TcpStream) -> io::Result<Answer> {
    let mut buf = BytesMut::with_capacity(MAX_HEAD);
    loop {
        if conn.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the registry closed before answering",
            ));
        }
        if let Some(answer) = parse_head(&mut buf)? {
            return Ok(answer);
        }
        if buf.len() >= MAX_HEAD {
            return Err(io::Error::other("the registry's answer head is too long"));
        }
    }
}

/// The answer's head once `buf` holds all of it; the body bytes stay in
/// `buf`. The header values are slices of the head's bytes, not copies.
fn parse_head(buf: &mut BytesMut) -> io::Result<Option<Answer>> {
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 64];
    let mut parsed = httparse::Response::new(&mut []);
    let parsing = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    );
    let len = match parsing.map_err(bad_answer)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    if parsed.version != Some(1) {
        return Err(bad_answer("not HTTP/1.1"));
    }
    let status = StatusCode::from_u16(parsed.code.unwrap_or(0)).map_err(bad_answer)?;
    // Names now, values once the head is split off and shared.
    let base = buf.as_ptr() as usize;
    let mut fields = Vec::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let start = h.value.as_ptr() as usize - base;
        fields.push((header_name(h.name)?, start..start + h.value.len()));
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(value)).map_err(bad_answer)?;
        headers.append(name, value);
    }
    Ok(Some(Answer {
        status,
        headers,
        rest: std::mem::take(buf),
    }))
}

/// Names a registry sends that `HeaderName` does not know, made once: each
/// would otherwise be lowercased into an allocation of its own per answer.
const REGISTRY_NAMES: [HeaderName; 3] = [
    HeaderName::from_static("docker-content-digest"),
    HeaderName::from_static("docker-distribution-api-version"),
    HeaderName::from_static("x-content-type-options"),
];

fn header_name(raw: &str) -> io::Result<HeaderName> {
    if let Some(known) = REGISTRY_NAMES
        .iter()
        .find(|known| known.as_str().eq_ignore_ascii_case(raw))
    {
        return Ok(known.clone());
    }
    HeaderName::from_bytes(raw.as_bytes()).map_err(bad_answer)
}

fn bad_answer(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("the registry's answer: {e}"))
}

/// The request [`forward`] would send, as HTTP/1.1 bytes, written straight
/// from the client's headers (no rewritten copy of them is made): the
/// registry's `Host` (`authority` when [`crate::upstream::Upstream::host`]
/// has none), the client's headers but those [`forward::StaysBehind`]
/// holds back, and archmerge's [`forward::forwarding`] headers; with a
/// spliced `body`'s framing (which hyper saw as `Content-Length: 0`), its
/// `Content-Length` or `Transfer-Encoding: chunked` in place of hyper's.
fn request_head<B>(
    upstream: &crate::upstream::Upstream,
    req: &Request<B>,
    client: &ClientSide,
    authority: &str,
    body: Option<&upload::Framing>,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    request_line(&mut head, req.method(), path);
    let host = upstream
        .host()
        .map_or(authority.as_bytes(), |h| h.as_bytes());
    header_line(&mut head, header::HOST.as_str(), host);
    let stays = forward::StaysBehind::of(req.headers());
    for (name, value) in req.headers() {
        let replaced = body.is_some() && *name == header::CONTENT_LENGTH;
        if !replaced && !stays.contains(name) {
            header_line(&mut head, name.as_str(), value.as_bytes());
        }
    }
    for (name, value) in forward::forwarding(client).iter().flatten() {
        header_line(&mut head, name.as_str(), value.as_bytes());
    }
    match body {
        Some(upload::Framing::Length(length)) => {
            let mut digits = itoa::Buffer::new();
            header_line(
                &mut head,
                header::CONTENT_LENGTH.as_str(),
                digits.format(*length).as_bytes(),
            );
        }
        Some(upload::Framing::Chunked(_)) => {
            header_line(&mut head, header::TRANSFER_ENCODING.as_str(), b"chunked");
        }
        None => {}
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// An HTTP/1.1 request head; `host` is `authority` unless `headers` has one.
fn head_bytes(method: &Method, path: &str, headers: &HeaderMap, authority: &str) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    request_line(&mut head, method, path);
    if !headers.contains_key(header::HOST) {
        header_line(&mut head, header::HOST.as_str(), authority.as_bytes());
    }
    for (name, value) in headers {
        header_line(&mut head, name.as_str(), value.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn request_line(head: &mut Vec<u8>, method: &Method, path: &str) {
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
}

fn header_line(head: &mut Vec<u8>, name: &str, value: &[u8]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    #[test]
    fn a_spliced_body_is_its_head_then_placeholders_as_long_as_the_blob() {
        let mut body = Spliced {
            head: Bytes::from_static(b"real"),
            left: CHUNK as u64 + 5,
        };
        assert_eq!(body.size_hint().exact(), Some(4 + CHUNK as u64 + 5));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut chunks = Vec::new();
        while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
            chunks.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(chunks[0], Bytes::from_static(b"real"));
        assert!(!is_placeholder(&chunks[0]));
        assert_eq!(chunks[1].len(), CHUNK);
        assert_eq!(chunks[2].len(), 5);
        assert!(chunks[1..].iter().all(|c| is_placeholder(c)));
        assert!(body.is_end_stream());
    }

    #[test]
    fn only_the_block_is_a_placeholder() {
        let copy = zeros().to_vec();
        assert!(!is_placeholder(&copy));
        assert!(!is_placeholder(&[]));
        assert!(is_placeholder(&zeros()[CHUNK - 1..]));
    }

    #[test]
    fn an_answer_head_is_parsed_and_its_body_bytes_kept() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nDocker-Content-Digest: sha256:x\r\nX-Other: 1\r\n\r\nhello"[..],
        );
        let answer = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.headers["content-length"], "10");
        assert_eq!(answer.headers["docker-content-digest"], "sha256:x");
        assert_eq!(answer.headers["x-other"], "1");
        assert_eq!(answer.headers.len(), 3);
        assert_eq!(&answer.rest[..], b"hello");
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_head(&mut partial).unwrap().is_none());
        let mut bad = BytesMut::from(&b"HTTP/1.1 2x0 OK\r\n\r\n"[..]);
        assert!(parse_head(&mut bad).is_err());
    }

    /// The head as [`forward::upstream_request`] rewrites the client's
    /// request, in lines: the request line, then the header lines sorted.
    fn forwarded_head(
        upstream: &crate::upstream::Upstream,
        req: &Request<()>,
        client: &ClientSide,
        body: Option<&upload::Framing>,
    ) -> Vec<String> {
        let (parts, ()) = req.clone().into_parts();
        let mut out = forward::upstream_request(upstream, parts, body::empty(), client);
        // What the pooled client adds for a body of that framing.
        match body {
            Some(upload::Framing::Length(length)) => {
                out.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(*length));
            }
            Some(upload::Framing::Chunked(_)) => {
                out.headers_mut().remove(header::CONTENT_LENGTH);
                out.headers_mut().insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
            None => {}
        }
        let path = out.uri().path_and_query().map_or("/", |p| p.as_str());
        lines(&head_bytes(out.method(), path, out.headers(), "unused"))
    }

    fn lines(head: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(head).unwrap();
        let text = text
            .strip_suffix("\r\n\r\n")
            .expect("a head ends with an empty line");
        let mut lines: Vec<String> = text.split("\r\n").map(str::to_owned).collect();
        lines[1..].sort();
        lines
    }

    #[test]
    fn the_head_written_straight_is_the_request_forward_would_send() {
        let settings = crate::config::Settings {
            upstream: Some("http://127.0.0.1:5000".into()),
            ..Default::default()
        };
        let config = Config::from_toml(&settings, "").unwrap();
        let upstream = crate::upstream::Upstream::new(&config, Arc::new(Metrics::new())).unwrap();
        let client = ClientSide {
            public_origin: "http://reg.example:5000".into(),
            forwarded_host: "reg.example:5000".into(),
            forwarded_proto: "http",
            peer: "10.0.0.7:40000".parse().unwrap(),
        };
        let plain: &[(&str, &str)] = &[
            ("host", "reg.example:5000"),
            ("user-agent", "docker/27.5"),
            ("accept", "application/vnd.oci.image.index.v1+json"),
            ("accept", "application/vnd.oci.image.manifest.v1+json"),
            ("authorization", "Basic eA=="),
        ];
        let hostile: &[(&str, &str)] = &[
            ("host", "evil.example"),
            ("connection", "keep-alive, X-Custom"),
            ("x-custom", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic eQ=="),
            ("expect", "100-continue"),
            ("forwarded", "for=192.0.2.1;host=evil.example"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-prefix", "/evil"),
            ("x-real-ip", "192.0.2.1"),
            ("content-length", "7"),
            ("content-type", "application/octet-stream"),
            ("docker-content-digest", "sha256:x"),
        ];
        for headers in [plain, hostile, &[]] {
            let framings = [
                (Method::GET, None),
                (Method::PUT, Some(upload::Framing::Length(1 << 30))),
                (
                    Method::PATCH,
                    Some(upload::Framing::Chunked(Default::default())),
                ),
            ];
            for (method, body) in &framings {
                let mut req = Request::new(());
                *req.method_mut() = method.clone();
                *req.uri_mut() = "/v2/a/b/blobs/uploads/u?_state=x%2By&digest=sha256:1"
                    .parse()
                    .unwrap();
                for (name, value) in headers {
                    req.headers_mut().append(
                        HeaderName::from_static(name),
                        HeaderValue::from_static(value),
                    );
                }
                let straight = lines(&request_head(
                    &upstream,
                    &req,
                    &client,
                    "unused",
                    body.as_ref(),
                ));
                assert_eq!(
                    straight,
                    forwarded_head(&upstream, &req, &client, body.as_ref())
                );
                assert!(
                    straight.contains(&"host: 127.0.0.1:5000".to_owned()),
                    "{straight:?}"
                );
            }
        }
    }

    #[test]
    fn connection_close_is_seen_among_other_tokens() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Close"),
        );
        assert!(closes(&h));
        assert!(!closes(&HeaderMap::new()));
    }
}
