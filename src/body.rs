//! The one body type that flows through archmerge in both directions, and
//! the client's request body as handlers get it.
//!
//! A streamed body (the client's [`ClientBody`] or the registry's
//! [`hyper::body::Incoming`]) and a small buffered manifest all become
//! [`Body`], so `forward` can hand any of them to the upstream client or back
//! to the client without collecting a streamed body. Boxing costs one
//! allocation per request, not per chunk.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

/// Error type carried by every body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body: streamed or buffered.
pub type Body = BoxBody<Bytes, BoxError>;

/// A streamed body, passed on frame by frame with backpressure.
pub fn stream<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// A buffered body with an exact length.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Frames smaller than this are gathered ([`Gathered`]).
const SMALL_FRAME: usize = 16 * 1024;

/// Most bytes gathered into one frame.
const GATHER: usize = 64 * 1024;

/// A client's body on its way to the registry on the copying path, its
/// small frames gathered into frames of up to [`GATHER`] bytes. hyper makes
/// a frame of each chunk of a chunked body and the pooled client writes
/// each frame it is handed at once: a body of 7-byte chunks cost a `writev`
/// per chunk. Frames of [`SMALL_FRAME`] or more pass as they are; gathered
/// bytes wait for more, the body's end, trailers or an error, never for
/// the registry, so the client's stall timer is the only clock on them.
pub struct Gathered<B: http_body::Body> {
    inner: B,
    held: BytesMut,
    /// What came after the gathered bytes, yielded next.
    after: Option<Option<Result<Frame<Bytes>, B::Error>>>,
}

impl<B: http_body::Body<Data = Bytes>> Gathered<B> {
    /// `inner`, its small frames gathered.
    pub fn new(inner: B) -> Gathered<B> {
        Gathered {
            inner,
            held: BytesMut::new(),
            after: None,
        }
    }
}

impl<B> http_body::Body for Gathered<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(next) = this.after.take() {
            return Poll::Ready(next);
        }
        loop {
            let next = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if this.held.is_empty() && data.len() >= SMALL_FRAME => {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(data) => {
                        this.held.extend_from_slice(&data);
                        if this.held.len() < GATHER {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(this.held.split().freeze()))));
                    }
                    Err(trailers) => Some(Ok(trailers)),
                },
                Poll::Ready(other) => other,
                Poll::Pending => return Poll::Pending,
            };
            if this.held.is_empty() {
                return Poll::Ready(next);
            }
            this.after = Some(next);
            return Poll::Ready(Some(Ok(Frame::data(this.held.split().freeze()))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.after.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.len() as u64;
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint.set_lower(inner.lower() + held);
        hint
    }
}

// === the client's request body ===

/// A client's request body: hyper's, failing with
/// [`ClientBodyError::Stalled`] when the client sends nothing for the body
/// progress timeout while archmerge waits for it. A slow upload goes on as
/// long as it takes; a stalled one ends, and frees its connection.
///
/// Only time spent waiting for the client counts: while the reader (say the
/// registry, through backpressure) does not ask for the next frame, the
/// clock does not run. A registry's response body that archmerge passes on
/// or copies is wrapped the same way ([`ClientBody::registry`]): a registry
/// that stops sending mid-blob ends the download instead of hanging it.
pub struct ClientBody {
    incoming: hyper::body::Incoming,
    limit: Duration,
    /// Made at the first wait, reset at each later one (one allocation per
    /// body that ever waits, none for a body that is already complete).
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer runs for the current wait.
    waiting: bool,
    /// How the body failed, for a reader that only sees the error through
    /// another (the upstream client's); made on request.
    failed: Option<Arc<Failed>>,
    /// Whether the registry sends this body (not the client).
    from_registry: bool,
    /// The body left on the client's socket to be spliced, when the
    /// connection's reader did that (hyper then reads none of it). Boxed:
    /// every request's body carries the field.
    spliced: Option<Box<crate::splice::Upload>>,
}

/// Why a client's request body ended early.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// No byte of the body arrived within the body progress timeout.
    #[error("the client sent no body data for {0:?}")]
    Stalled(Duration),
    /// No byte of a registry's body arrived within its time.
    #[error("the registry sent no body data for {0:?}")]
    RegistryStalled(Duration),
    /// The connection failed or the body was malformed.
    #[error(transparent)]
    Read(#[from] hyper::Error),
}

impl ClientBody {
    /// `incoming`, failing when no frame arrives within `limit` of asking.
    pub fn new(incoming: hyper::body::Incoming, limit: Duration) -> ClientBody {
        ClientBody {
            incoming,
            limit,
            timer: None,
            waiting: false,
            failed: None,
            from_registry: false,
            spliced: None,
        }
    }

    /// This body is `upload`, left on the socket for splicing.
    pub(crate) fn set_spliced(&mut self, upload: crate::splice::Upload) {
        self.spliced = Some(Box::new(upload));
    }

    /// The body to splice, if it is one.
    pub(crate) fn take_spliced(&mut self) -> Option<crate::splice::Upload> {
        self.spliced.take().map(|upload| *upload)
    }

    /// A registry's body, failing with [`ClientBodyError::RegistryStalled`]
    /// when the registry sends nothing for `limit` while archmerge waits.
    pub fn registry(incoming: hyper::body::Incoming, limit: Duration) -> ClientBody {
        ClientBody {
            from_registry: true,
            ..ClientBody::new(incoming, limit)
        }
    }

    /// The body progress timeout.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// What this body's failure, if it fails, will be recorded in.
    pub fn failure(&mut self) -> Arc<Failed> {
        self.failed.get_or_insert_with(Arc::default).clone()
    }
}

/// How a client's body failed, as its reader saw it.
#[derive(Debug, Default)]
pub struct Failed {
    stalled: AtomicBool,
    broken: OnceLock<String>,
}

impl Failed {
    /// Whether the body failed with [`ClientBodyError::Stalled`].
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Why the client's connection broke off mid-body or its framing was
    /// malformed, if it did or was.
    pub fn broken(&self) -> Option<&str> {
        self.broken.get().map(String::as_str)
    }
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.incoming).poll_frame(cx) {
            this.waiting = false;
            if let (Some(Err(e)), Some(failed)) = (&frame, &this.failed) {
                let _ = failed.broken.set(e.to_string());
            }
            return Poll::Ready(frame.map(|f| f.map_err(ClientBodyError::Read)));
        }
        let deadline = Instant::now() + this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !this.waiting {
            timer.as_mut().reset(deadline);
            this.waiting = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                if let Some(failed) = &this.failed {
                    failed.stalled.store(true, Ordering::Relaxed);
                }
                Poll::Ready(Some(Err(if this.from_registry {
                    ClientBodyError::RegistryStalled(this.limit)
                } else {
                    ClientBodyError::Stalled(this.limit)
                })))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    type Frames = Vec<Result<Frame<Bytes>, &'static str>>;

    /// What `Gathered` yields from a body of these frames, all ready.
    async fn gathered(frames: Frames) -> Vec<Result<Frame<Bytes>, &'static str>> {
        let mut body = Gathered::new(StreamBody::new(futures_util::stream::iter(frames)));
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            out.push(frame);
        }
        assert!(body.held.is_empty() && body.after.is_none());
        out
    }

    fn data(n: usize, byte: u8) -> Result<Frame<Bytes>, &'static str> {
        Ok(Frame::data(Bytes::from(vec![byte; n])))
    }

    fn lens(frames: &[Result<Frame<Bytes>, &'static str>]) -> Vec<Result<usize, &'static str>> {
        frames
            .iter()
            .map(|f| match f {
                Ok(f) => Ok(f.data_ref().map_or(usize::MAX, Bytes::len)),
                Err(e) => Err(*e),
            })
            .collect()
    }

    #[tokio::test]
    async fn small_frames_are_gathered_and_large_ones_pass_as_they_are() {
        // 20,000 frames of 7 bytes: 140,000 bytes in frames of at most 64 KiB
        // (plus the last small one), in order.
        let mut frames: Frames = (0..20_000).map(|i| data(7, i as u8)).collect();
        frames.push(data(SMALL_FRAME, 0xAA));
        let out = gathered(frames).await;
        let mut bytes = Vec::new();
        for f in &out {
            bytes.extend_from_slice(f.as_ref().unwrap().data_ref().unwrap());
        }
        let mut want: Vec<u8> = (0..20_000).flat_map(|i| [i as u8; 7]).collect();
        want.extend(vec![0xAA; SMALL_FRAME]);
        assert_eq!(bytes, want);
        assert!(out.len() <= 4, "{:?}", lens(&out));
        // A large frame with nothing held passes as it is.
        let out = gathered(vec![data(SMALL_FRAME, 1), data(GATHER * 2, 2)]).await;
        assert_eq!(lens(&out), [Ok(SMALL_FRAME), Ok(GATHER * 2)]);
    }

    #[tokio::test]
    async fn trailers_errors_and_the_end_come_after_the_bytes_gathered_before_them() {
        let trailers = Ok(Frame::trailers(http::HeaderMap::new()));
        let out = gathered(vec![data(5, 1), data(5, 2), trailers]).await;
        assert_eq!(lens(&out), [Ok(10), Ok(usize::MAX)]);
        assert!(out[1].as_ref().unwrap().is_trailers());
        let out = gathered(vec![data(5, 1), Err("cut off"), data(5, 2)]).await;
        assert_eq!(lens(&out), [Ok(5), Err("cut off"), Ok(5)]);
        assert_eq!(lens(&gathered(vec![data(3, 1)]).await), [Ok(3)]);
        assert!(gathered(Vec::new()).await.is_empty());
    }
}
