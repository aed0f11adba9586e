//! When the registry last made progress on a request: the clock of
//! `upstream_headers_secs`.
//!
//! A blob upload takes as long as the client takes to send it, so the
//! registry's time to answer cannot count from the start of the request. It
//! counts from the moment the registry took the last piece of the body (or
//! the whole body), and not at all while the body waits for its own source
//! (the client, whose pace `body_progress_secs` bounds). A registry that stops
//! reading a body, or never answers one it has, still times out.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

use crate::body::{Body, BoxError};

/// Shared between the body (which moves) and `send` (which waits).
#[derive(Debug)]
pub(super) struct Pace {
    /// Guarded by a `std` mutex: held only to read or write the two fields,
    /// never across an `.await`.
    state: Mutex<State>,
}

#[derive(Clone, Copy, Debug)]
struct State {
    /// When the body last handed a piece over, or was asked for one.
    last: Instant,
    /// Whether the body is waiting for its own source right now.
    waiting_for_source: bool,
}

impl Pace {
    pub(super) fn new() -> Arc<Pace> {
        Arc::new(Pace {
            state: Mutex::new(State {
                last: Instant::now(),
                waiting_for_source: false,
            }),
        })
    }

    /// The moment the registry's time runs out, as of now.
    pub(super) fn deadline(&self, limit: std::time::Duration) -> Instant {
        let state = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.waiting_for_source {
            Instant::now() + limit
        } else {
            state.last + limit
        }
    }

    fn record(&self, waiting_for_source: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.last = Instant::now();
        state.waiting_for_source = waiting_for_source;
    }
}

/// A request body that records on [`Pace`] each time the registry's side
/// takes a piece of it.
pub(super) struct Paced {
    pub(super) body: Body,
    pub(super) pace: Arc<Pace>,
}

impl http_body::Body for Paced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        this.pace.record(polled.is_pending());
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Paced {
    fn drop(&mut self) {
        // Sent whole (or abandoned): the registry's time to answer starts.
        self.pace.record(false);
    }
}
