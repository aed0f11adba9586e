//! The one body type that flows through archmerge in both directions.
//!
//! A streamed [`hyper::body::Incoming`] (from the client or the registry) and
//! a small buffered manifest both become [`Body`], so `forward` can hand any
//! of them to the upstream client or back to the client without collecting
//! a streamed body. Boxing costs one allocation per request, not per chunk.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

/// Error type carried by every body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body: streamed or buffered.
pub type Body = BoxBody<Bytes, BoxError>;

/// A streamed body, passed on frame by frame with backpressure.
pub fn stream(incoming: hyper::body::Incoming) -> Body {
    incoming.map_err(BoxError::from).boxed()
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
