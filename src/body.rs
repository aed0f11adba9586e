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

use bytes::Bytes;
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
