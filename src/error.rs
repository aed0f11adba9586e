//! The request-boundary error: every answer archmerge makes itself instead of
//! the registry's.
//!
//! Each error knows who caused it ([`Fault`]), which status and OCI code it
//! becomes, and renders the OCI error body. It is logged once, where
//! `server` turns it into a response: client faults at debug, upstream
//! faults at warn, internal ones at error. Errors the registry answered with
//! are not [`ProxyError`]s: their responses pass through untouched.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::oci::{ErrorBody, ErrorCode, ERROR_CONTENT_TYPE};
use crate::route::RouteError;

/// Who caused an error; decides its status class and log level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something archmerge refuses (4xx).
    Client,
    /// The registry was unreachable or too slow (502/503/504).
    Upstream,
    /// archmerge is at one of its own bounds under load (503 with
    /// `Retry-After`).
    Overload,
}

/// An error that ends a request with an answer made by archmerge.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The path names an invalid repository, tag or digest.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A manifest body over the limit (checked before the registry is asked).
    #[error("manifest body exceeds the limit of {limit} bytes")]
    ManifestTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The client's body could not be read (reset, or too slow).
    #[error("reading the request body failed: {0}")]
    ClientBody(String),
    /// The client's manifest body did not arrive in time.
    #[error("the manifest body did not arrive within {0:?}")]
    ClientTimeout(Duration),
    /// The client stopped sending its request body.
    #[error("the client sent no body data for {0:?}")]
    ClientStalled(Duration),
    /// A spliced blob upload's body broke off on the client's side (it
    /// closed, or its connection failed).
    #[error("the upload's body broke off: {0}")]
    UploadBroken(String),
    /// archmerge is at a limit of its own (buffered manifest bytes); the
    /// client should retry shortly.
    #[error("archmerge is busy: {0}; retry shortly")]
    Busy(&'static str),
    /// The registry could not be reached.
    #[error("the registry is unreachable: {0}")]
    UpstreamUnreachable(String),
    /// The registry did not start answering in time.
    #[error("the registry did not answer within {0:?}")]
    UpstreamTimeout(Duration),
}

impl ProxyError {
    /// Who caused it.
    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::Route(_)
            | ProxyError::ManifestTooLarge { .. }
            | ProxyError::ClientBody(_)
            | ProxyError::ClientTimeout(_)
            | ProxyError::ClientStalled(_)
            | ProxyError::UploadBroken(_) => Fault::Client,
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamTimeout(_) => Fault::Upstream,
            ProxyError::Busy(_) => Fault::Overload,
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Route(_) | ProxyError::ClientBody(_) | ProxyError::UploadBroken(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::ManifestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientTimeout(_) | ProxyError::ClientStalled(_) => {
                StatusCode::REQUEST_TIMEOUT
            }
            ProxyError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The OCI error code of the answer.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProxyError::Route(e) => e.code,
            ProxyError::ManifestTooLarge { .. } => ErrorCode::SizeInvalid,
            ProxyError::ClientBody(_) | ProxyError::ClientTimeout(_) => ErrorCode::ManifestInvalid,
            ProxyError::ClientStalled(_) | ProxyError::Busy(_) => ErrorCode::TooManyRequests,
            ProxyError::UploadBroken(_) => ErrorCode::BlobUploadInvalid,
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamTimeout(_) => {
                ErrorCode::Unavailable
            }
        }
    }

    /// Logs the error once, at the level its fault calls for, and renders it
    /// as the response.
    pub fn into_response(self, method: &http::Method, route: &'static str) -> Response<Body> {
        let status = self.status().as_u16();
        match self.fault() {
            Fault::Client => tracing::debug!(%method, route, status, error = %self, "refused"),
            Fault::Upstream => {
                tracing::warn!(%method, route, status, error = %self, "upstream failed")
            }
            Fault::Overload => tracing::warn!(%method, route, status, error = %self, "refused"),
        }
        let mut resp = error_response(self.status(), self.code(), &self.to_string());
        if let ProxyError::Busy(_) = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// An OCI error response with the given status, code and message.
pub fn error_response(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    let bytes = Bytes::from(ErrorBody::render(code, message));
    let mut resp = Response::new(body::full(bytes.clone()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(ERROR_CONTENT_TYPE),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_who_caused_it() {
        let too_big = ProxyError::ManifestTooLarge { limit: 4 };
        assert_eq!(too_big.fault(), Fault::Client);
        assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(too_big.code(), ErrorCode::SizeInvalid);
        let down = ProxyError::UpstreamUnreachable("refused".into());
        assert_eq!(down.fault(), Fault::Upstream);
        assert_eq!(down.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(down.code(), ErrorCode::Unavailable);
        let slow = ProxyError::UpstreamTimeout(Duration::from_secs(1));
        assert_eq!(slow.status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
