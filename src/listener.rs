//! The one accept loop and connection-serving path, shared by the client
//! listener ([`crate::server`]) and the admin listener ([`crate::admin`]):
//! accept → connection limit → TLS handshake (when configured) → first
//! bytes → hyper-util's auto builder (HTTP/1.1 or HTTP/2 on one port) →
//! graceful shutdown.
//!
//! The caller brings the builder (its timeouts and window sizes) and a
//! handler that turns a request and its [`Peer`] into a response; nothing
//! here knows what the requests mean. What this path bounds, beyond
//! hyper's header timeout: the TLS handshake and the first bytes
//! (`header_read`), a connection with no request in flight (`idle`), and a
//! request body that stops sending ([`ClientBody`], `body_progress`).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::body::{Body, BoxError, ClientBody};
use crate::splice::{self, Downlink, Framer, Uplink};

/// How long in-flight requests may run after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The other end of a connection, as the handler sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer {
    /// The client's address.
    pub(crate) addr: SocketAddr,
    /// Whether the connection speaks TLS.
    pub(crate) tls: bool,
}

/// How a listener serves the connections it accepts.
pub(crate) struct Listener {
    /// `client` or `admin`, in log lines.
    pub(crate) name: &'static str,
    /// HTTP/1.1 and HTTP/2 settings.
    pub(crate) builder: Builder<TokioExecutor>,
    /// Speak TLS first, when set.
    pub(crate) tls: Option<TlsAcceptor>,
    /// Bound on the TLS handshake and on the first bytes of a request.
    pub(crate) header_read: Duration,
    /// Most connections served at once; past it a connection is answered
    /// 503 and closed. `None`: no limit.
    pub(crate) max_connections: Option<usize>,
    /// A connection with no request in flight this long is closed.
    pub(crate) idle: Duration,
    /// A request body that sends nothing this long while it is read fails.
    pub(crate) body_progress: Duration,
    /// Whether plaintext HTTP/1.1 connections may splice blob bodies
    /// ([`crate::splice`]): each request of one carries its [`Downlink`].
    pub(crate) zero_copy: bool,
    /// Whether plaintext HTTP/1.1 connections may splice blob upload bodies
    /// ([`crate::splice`]): such a request's body is then left on the
    /// socket, and its [`ClientBody`] says so.
    pub(crate) zero_copy_uploads: bool,
}

impl Listener {
    /// Serves connections on `listener` with `handler` until `shutdown`
    /// completes, then lets in-flight requests finish (bounded by a drain
    /// timeout).
    pub(crate) async fn run<H, F>(
        self,
        listener: TcpListener,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()>
    where
        H: Fn(Request<ClientBody>, Peer) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let this = Arc::new(self);
        // Every connection holds a receiver: the signal to close, and (once
        // all are dropped) the sign that every connection has ended.
        let (stop, _) = watch::channel(false);
        let limit = this.max_connections.map(|n| Arc::new(Semaphore::new(n)));
        let refusal = Arc::new(Refusal::new(this.tls.clone(), this.header_read));
        tokio::pin!(shutdown);
        loop {
            let (stream, addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, don't spin.
                        tracing::warn!(listener = this.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let permit = match &limit {
                None => None,
                Some(limit) => match limit.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    // Past the connection limit a client gets a clear 503,
                    // not a hang.
                    Err(_) => {
                        let refusal = refusal.clone();
                        tokio::spawn(async move { refusal.refuse(stream, addr).await });
                        continue;
                    }
                },
            };
            let (this, handler, stop) = (this.clone(), handler.clone(), stop.subscribe());
            tokio::spawn(async move {
                this.serve(stream, addr, handler, stop).await;
                drop(permit);
            });
        }
        tracing::info!(
            listener = this.name,
            "shutting down; draining in-flight requests"
        );
        let _ = stop.send(true);
        if tokio::time::timeout(DRAIN_TIMEOUT, stop.closed())
            .await
            .is_err()
        {
            tracing::warn!(
                listener = this.name,
                "drain timeout passed; closing remaining connections"
            );
        }
        Ok(())
    }

    /// One connection, from the TLS handshake to its end. The handshake and
    /// the first bytes run in the connection's own task, bounded like the
    /// request headers, so a slow client holds up nobody.
    async fn serve<H, F>(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
        handler: H,
        mut stop: watch::Receiver<bool>,
    ) where
        H: Fn(Request<ClientBody>, Peer) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let peer = Peer {
            addr,
            tls: self.tls.is_some(),
        };
        let stream = match &self.tls {
            None => Stream::Plain(stream),
            Some(acceptor) => {
                match tokio::time::timeout(self.header_read, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => Stream::Tls(Box::new(s)),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, peer = %addr, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %addr, "TLS handshake timed out");
                        return;
                    }
                }
            }
        };
        // After the handshake, as on a plain connection: nothing bounds the
        // protocol detection but this.
        let Some(mut conn) = first_bytes(stream, self.header_read).await else {
            tracing::debug!(peer = %addr, "no request within the header timeout");
            return;
        };
        let plain_h1 = matches!(conn.stream, Stream::Plain(_)) && conn.prefix != PREFACE;
        if self.zero_copy && plain_h1 {
            conn.downlink = Some(Arc::default());
        }
        let mut uplink: Option<Arc<Uplink>> = None;
        if self.zero_copy_uploads && plain_h1 {
            conn = conn.framed(uplink.insert(Arc::default()).clone(), self.header_read);
        }
        let downlink = conn.downlink.clone();
        let activity = Arc::new(Activity::new());
        let body_progress = self.body_progress;
        let service = service_fn({
            let activity = activity.clone();
            move |req: Request<Incoming>| {
                let busy = activity.begin();
                let mut req = req.map(|b| ClientBody::new(b, body_progress));
                if let Some(link) = &downlink {
                    req.extensions_mut().insert(link.clone());
                }
                // hyper calls this as it reads the head, before it reads
                // another: a body the reader left on the socket is this
                // request's.
                if let Some(upload) = uplink.as_ref().and_then(Uplink::take) {
                    req.body_mut().set_spliced(upload);
                }
                let answer = handler(req, peer);
                async move {
                    let resp = answer.await;
                    // Busy until its answer is sent, however long a blob
                    // download takes.
                    Ok::<_, Infallible>(resp.map(|body| Busy { body, _busy: busy }))
                }
            }
        });
        let conn = self.builder.serve_connection(TokioIo::new(conn), service);
        tokio::pin!(conn);
        let idle = tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, peer = %addr, "connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|stop| *stop) => false,
            _ = activity.idle_for(self.idle) => true,
        };
        // HTTP/1.1 closes once the answer in flight is sent; HTTP/2 sends
        // GOAWAY and lets open streams finish.
        conn.as_mut().graceful_shutdown();
        if idle {
            tracing::debug!(peer = %addr, "idle connection closed");
            // Nothing is in flight: a client that does not take the GOAWAY
            // is dropped shortly.
            let _ = tokio::time::timeout(IDLE_GRACE, conn).await;
        } else {
            // Bounded by the drain timeout of `run`.
            let _ = conn.await;
        }
    }
}

/// How long an idle connection may take to close once told to.
const IDLE_GRACE: Duration = Duration::from_secs(5);

// === requests in flight ===

/// The requests in flight on one connection, so that an idle one can be
/// told apart from one that waits for the registry or streams a blob. A
/// request costs two atomic updates and a clock read; only the idle timer
/// ever waits on this, and it wakes once per `idle` period, not once per
/// request.
struct Activity {
    in_flight: AtomicUsize,
    /// When the connection began.
    began: tokio::time::Instant,
    /// When the last request ended, in microseconds after `began`
    /// (rounded up: never earlier than it did).
    last_ended_us: AtomicU64,
}

/// One request in flight, from its head to the end of its answer.
struct InFlight(Arc<Activity>);

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            began: tokio::time::Instant::now(),
            last_ended_us: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Since when nothing has been in flight, if nothing is.
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let us = self.last_ended_us.load(Ordering::SeqCst);
        Some(self.began + Duration::from_micros(us))
    }

    /// Completes once the connection has had no request in flight for
    /// `limit` in a row.
    async fn idle_for(&self, limit: Duration) {
        let mut check = self.began + limit;
        loop {
            tokio::time::sleep_until(check).await;
            let now = tokio::time::Instant::now();
            check = match self.idle_since() {
                Some(since) if since + limit <= now => return,
                Some(since) => since + limit,
                None => now + limit,
            };
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let us = activity.began.elapsed().as_micros() as u64 + 1;
        // Stored before the count drops, so an idle check that sees none in
        // flight sees this end too.
        activity.last_ended_us.fetch_max(us, Ordering::SeqCst);
        activity.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in flight until hyper
/// has sent it (or dropped it with the connection).
struct Busy {
    body: Body,
    _busy: InFlight,
}

impl http_body::Body for Busy {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

// === refusing past the limit ===

/// Longest a refused connection may take, TLS handshake included (and
/// never longer than the header timeout: a refused client gets no more time
/// to speak than a served one).
const REFUSAL_TIME: Duration = Duration::from_secs(5);

/// Most refusals in flight: a refusal costs a task and, on TLS, a
/// handshake, so past this a connection is closed at once.
const MAX_REFUSALS: usize = 256;

/// Answers connections over the limit: the TLS handshake when the
/// listener speaks TLS, then a 503 with an OCI error body to the first
/// request, in whichever protocol the client chose, then the connection is
/// closed. Bounded in time: a client that does not speak is dropped.
struct Refusal {
    tls: Option<TlsAcceptor>,
    builder: Builder<TokioExecutor>,
    in_flight: Arc<Semaphore>,
    /// The bound on the whole refusal.
    time: Duration,
}

impl Refusal {
    fn new(tls: Option<TlsAcceptor>, header_read: Duration) -> Refusal {
        let time = header_read.min(REFUSAL_TIME);
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(time)
            .keep_alive(false);
        builder.http2().timer(TokioTimer::new());
        Refusal {
            tls,
            builder,
            in_flight: Arc::new(Semaphore::new(MAX_REFUSALS)),
            time,
        }
    }

    async fn refuse(&self, stream: TcpStream, peer: SocketAddr) {
        tracing::warn!(%peer, "connection limit reached; refusing a connection");
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return;
        };
        let _ = tokio::time::timeout(self.time, async {
            let stream = match &self.tls {
                None => Stream::Plain(stream),
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => Stream::Tls(Box::new(s)),
                    Err(_) => return,
                },
            };
            // Answer the first request, then close: HTTP/1.1 by
            // `Connection: close`, HTTP/2 by GOAWAY.
            let answered = Arc::new(tokio::sync::Notify::new());
            let service = service_fn({
                let answered = answered.clone();
                move |_req| {
                    answered.notify_one();
                    async { Ok::<_, Infallible>(too_many_connections()) }
                }
            });
            let conn = self
                .builder
                .serve_connection(TokioIo::new(Conn::new(Bytes::new(), stream)), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = answered.notified() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        })
        .await;
    }
}

/// The 503 of a connection over the limit.
fn too_many_connections() -> Response<Body> {
    let body = crate::oci::ErrorBody::render(
        crate::oci::ErrorCode::TooManyRequests,
        "archmerge is at its connection limit; retry later",
    );
    let mut resp = Response::new(crate::body::full(body));
    *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    resp
}

// === first bytes ===

/// What an HTTP/2 connection starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads, bounded by the header timeout, until the client has sent enough
/// to tell HTTP/1 from HTTP/2, and hands those bytes back in front of the
/// stream: the protocol detection reads before hyper's own header timeout
/// starts, so a client that sends nothing (or trickles the HTTP/2 preface)
/// would otherwise hold its connection forever. `None`: the client closed
/// or the time ran out.
async fn first_bytes(mut stream: Stream, limit: Duration) -> Option<Conn> {
    let wait = async {
        let mut buf = [0u8; PREFACE.len()];
        let mut seen = 0;
        loop {
            match stream.read(&mut buf[seen..]).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => seen += n,
            }
            // Enough to decide: a full preface, or bytes that are not one.
            if seen == PREFACE.len() || buf[..seen] != PREFACE[..seen] {
                return Some(Bytes::copy_from_slice(&buf[..seen]));
            }
        }
    };
    let prefix = tokio::time::timeout(limit, wait).await.ok()??;
    Some(Conn::new(prefix, stream))
}

// === the connection's byte stream ===

/// A client's stream, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Plain, read through a [`Framer`] (which lends the socket to the
    /// handler of a spliced upload).
    Framed(Box<Framer>),
}

/// A client's stream with the bytes already read from it (by the first
/// bytes check) put back in front.
struct Conn {
    prefix: Bytes,
    stream: Stream,
    /// Where placeholder bytes come from, on a connection that splices.
    downlink: Option<Arc<Downlink>>,
}

impl Conn {
    fn new(prefix: Bytes, stream: Stream) -> Conn {
        Conn {
            prefix,
            stream,
            downlink: None,
        }
    }

    /// The same plaintext connection, its reads through a [`Framer`] that
    /// leaves upload bodies on the socket for splicing (with the first
    /// bytes in front).
    fn framed(self, link: Arc<Uplink>, header_read: Duration) -> Conn {
        let Conn {
            prefix,
            stream,
            downlink,
        } = self;
        let stream = match stream {
            Stream::Plain(tcp) => {
                Stream::Framed(Box::new(Framer::new(tcp, link, &prefix, header_read)))
            }
            other => {
                return Conn {
                    prefix,
                    stream: other,
                    downlink,
                }
            }
        };
        Conn {
            prefix: Bytes::new(),
            stream,
            downlink,
        }
    }

    /// Splices in place of a placeholder `hyper` writes; `None` when `buf`
    /// is real bytes. A placeholder on a connection that does not splice
    /// fails it: its zeros are never sent.
    fn poll_placeholder(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Option<Poll<io::Result<usize>>> {
        if !splice::is_placeholder(buf) {
            return None;
        }
        Some(match (&self.downlink, &self.stream) {
            (Some(link), Stream::Plain(tcp)) => link.poll_splice(cx, tcp, buf.len()),
            (Some(link), Stream::Framed(framer)) => {
                framer.poll_io(cx, |cx, tcp| link.poll_splice(cx, tcp, buf.len()))
            }
            _ => Poll::Ready(Err(io::Error::other(
                "a placeholder reached a connection that does not splice",
            ))),
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Framed(f) => f.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, data),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, data),
            Stream::Framed(f) => f.poll_io(cx, |cx, tcp| Pin::new(tcp).poll_write(cx, data)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Framed(f) => {
                f.poll_io(cx, |cx, tcp| Pin::new(tcp).poll_write_vectored(cx, bufs))
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(_) | Stream::Framed(_) => true,
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            // A socket buffers nothing of its own to flush.
            Stream::Framed(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Framed(f) => f.poll_io(cx, |cx, tcp| Pin::new(tcp).poll_shutdown(cx)),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(spliced) = this.poll_placeholder(cx, data) {
            return spliced;
        }
        Pin::new(&mut this.stream).poll_write(cx, data)
    }

    /// Real bytes up to the first placeholder go out as one write; a
    /// placeholder at the front is spliced.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let real = bufs
            .iter()
            .position(|b| splice::is_placeholder(b))
            .unwrap_or(bufs.len());
        if let (0, Some(first)) = (real, bufs.first()) {
            if let Some(spliced) = this.poll_placeholder(cx, first) {
                return spliced;
            }
        }
        Pin::new(&mut this.stream).poll_write_vectored(cx, &bufs[..real])
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When `activity.idle_for(limit)` completes, measured from now.
    async fn idle_after(activity: &Arc<Activity>, limit: Duration) -> Duration {
        let started = tokio::time::Instant::now();
        activity.idle_for(limit).await;
        started.elapsed()
    }

    #[tokio::test]
    async fn a_connection_is_idle_only_a_full_limit_after_its_last_request_ended() {
        let limit = Duration::from_millis(200);
        let activity = Arc::new(Activity::new());
        // A request in flight for three limits, then one short one.
        let requests = {
            let activity = activity.clone();
            async move {
                let long = activity.begin();
                tokio::time::sleep(3 * limit).await;
                drop(long);
                tokio::time::sleep(limit / 2).await;
                drop(activity.begin());
                tokio::time::Instant::now()
            }
        };
        let started = tokio::time::Instant::now();
        let (idle, last_ended) = tokio::join!(idle_after(&activity, limit), requests);
        let last_ended = last_ended - started;
        assert!(
            idle >= last_ended + limit,
            "idle after {idle:?}, though the last request ended at {last_ended:?}"
        );
        assert!(
            idle < last_ended + limit + Duration::from_secs(2),
            "idle only after {idle:?} (last request ended at {last_ended:?})"
        );
    }

    #[tokio::test]
    async fn a_connection_that_never_had_a_request_is_idle_after_the_limit() {
        let limit = Duration::from_millis(200);
        let activity = Arc::new(Activity::new());
        let idle = idle_after(&activity, limit).await;
        assert!(idle >= limit - Duration::from_millis(5) && idle < limit + Duration::from_secs(2));
    }
}
