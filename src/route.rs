//! Which part of the distribution API a request path addresses.
//!
//! Pure: parses `/v2/<name>/(manifests|blobs|tags|referrers)/…` from the
//! right, because repository names contain `/`. Called once per request by
//! `server`; the result decides between the transparent pass-through and the
//! manifest interception, and labels metrics. It never touches the query
//! string, which `forward` passes on byte for byte.

use crate::oci::{is_valid_digest, is_valid_name, is_valid_tag, ErrorCode};

/// A manifest reference: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    /// `…/manifests/<tag>`.
    Tag(String),
    /// `…/manifests/<digest>`.
    Digest(String),
}

/// A parsed request path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/` — the API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest {
        /// Repository name.
        name: String,
        /// Tag or digest.
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob {
        /// Repository name.
        name: String,
    },
    /// `/v2/<name>/blobs/uploads/` and `/v2/<name>/blobs/uploads/<id>`.
    Upload {
        /// Repository name.
        name: String,
    },
    /// `/v2/<name>/tags/list`.
    Tags {
        /// Repository name.
        name: String,
    },
    /// `/v2/<name>/referrers/<digest>`.
    Referrers {
        /// Repository name.
        name: String,
    },
    /// Anything else: passed through for the registry to answer.
    Other,
}

impl Route {
    /// A bounded label for metrics and logs (never a repository name).
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::Upload { .. } => "upload",
            Route::Tags { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::Other => "other",
        }
    }
}

/// Why a path was refused before it reached the registry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RouteError {
    /// The OCI error code to answer with.
    pub code: ErrorCode,
    /// What was wrong, for the client.
    pub message: String,
}

impl RouteError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RouteError {
            code,
            message: message.into(),
        }
    }
}

/// Parses a request path (without the query string).
///
/// Paths outside `/v2/` and unknown shapes under it are [`Route::Other`];
/// a path that names a repository, tag or digest that the grammar refuses is
/// an error. Percent-encoded bytes and dot segments never form a valid name,
/// so `..` or `%2e%2e` in a repository position is `NAME_INVALID`.
pub fn parse(path: &str) -> Result<Route, RouteError> {
    check_segments(path)?;
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Ok(if path == "/v2" {
            Route::Base
        } else {
            Route::Other
        });
    };
    if rest.is_empty() {
        return Ok(Route::Base);
    }
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    // From the right: the last one or two components say what is
    // addressed, and the name is what comes before them.
    let mut from_right = rest.rsplitn(4, '/');
    let last = from_right.next().unwrap_or_default();
    let (Some(second), Some(third)) = (from_right.next(), from_right.next()) else {
        return Ok(Route::Other);
    };
    let fourth = from_right.next();
    // `rest` without its last `k` components (and their `/`).
    let name_of = |k: usize| -> Result<String, RouteError> {
        let dropped = match k {
            2 => second.len() + last.len() + 2,
            _ => third.len() + second.len() + last.len() + 3,
        };
        let name = &rest[..rest.len() - dropped];
        if is_valid_name(name) {
            Ok(name.to_owned())
        } else {
            Err(RouteError::new(
                ErrorCode::NameInvalid,
                format!("invalid repository name {name:?}"),
            ))
        }
    };
    match (third, second, last) {
        (_, "manifests", r) => {
            let name = name_of(2)?;
            let reference = if r.contains(':') {
                if !is_valid_digest(r) {
                    return Err(RouteError::new(
                        ErrorCode::DigestInvalid,
                        format!("invalid digest {r:?}"),
                    ));
                }
                Reference::Digest(r.to_owned())
            } else {
                if !is_valid_tag(r) {
                    return Err(RouteError::new(
                        ErrorCode::TagInvalid,
                        format!("invalid tag {r:?}"),
                    ));
                }
                Reference::Tag(r.to_owned())
            };
            Ok(Route::Manifest { name, reference })
        }
        ("blobs", "uploads", _) if fourth.is_some() => Ok(Route::Upload { name: name_of(3)? }),
        // `/blobs/uploads` without the trailing slash.
        (_, "blobs", "uploads") => Ok(Route::Upload { name: name_of(2)? }),
        (_, "blobs", d) => {
            let name = name_of(2)?;
            check_digest(d)?;
            Ok(Route::Blob { name })
        }
        (_, "tags", "list") => Ok(Route::Tags { name: name_of(2)? }),
        (_, "referrers", d) => {
            let name = name_of(2)?;
            check_digest(d)?;
            Ok(Route::Referrers { name })
        }
        _ => Ok(Route::Other),
    }
}

/// Refuses dot segments (`.`, `..`, also percent-encoded) and empty
/// segments anywhere in the path: the registry would answer them with a
/// redirect to a cleaned path, and a proxy must not let them address
/// something else than they appear to. A trailing `/` is only part of
/// `/v2/` and `…/blobs/uploads/`; the reference after `manifests/`,
/// `blobs/` or `referrers/` is left to its own grammar (`TAG_INVALID`, …).
fn check_segments(path: &str) -> Result<(), RouteError> {
    let trailing_ok = path == "/v2/" || path.ends_with("/blobs/uploads/");
    let inner = path.strip_prefix('/').unwrap_or(path);
    let inner = match inner.strip_suffix('/') {
        Some(i) if trailing_ok => i,
        _ => inner,
    };
    // Which segments are dots (decoded, with no allocation: a dot
    // segment is at most `%2e%2e`), and whether one that is may stand as
    // a reference, the last segment after `manifests`, `blobs` or
    // `referrers`.
    let dot = |seg: &str| {
        seg.len() <= 6 && {
            let mut decoded = percent_encoding::percent_decode_str(seg);
            matches!(
                (decoded.next(), decoded.next(), decoded.next()),
                (Some(b'.'), None, _) | (Some(b'.'), Some(b'.'), None)
            )
        }
    };
    let mut segments = inner.split('/').peekable();
    let mut previous = None;
    let mut bad = false;
    while let Some(seg) = segments.next() {
        let reference = segments.peek().is_none()
            && matches!(previous, Some("manifests" | "blobs" | "referrers"));
        bad |= seg.is_empty() || (!reference && dot(seg));
        previous = Some(seg);
    }
    if bad && !inner.is_empty() {
        return Err(RouteError::new(
            ErrorCode::NameInvalid,
            format!("path {path:?} has empty or dot segments"),
        ));
    }
    Ok(())
}

fn check_digest(d: &str) -> Result<(), RouteError> {
    if is_valid_digest(d) {
        Ok(())
    } else {
        Err(RouteError::new(
            ErrorCode::DigestInvalid,
            format!("invalid digest {d:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const D: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn manifest(name: &str, r: Reference) -> Route {
        Route::Manifest {
            name: name.into(),
            reference: r,
        }
    }

    #[rstest]
    #[case("/v2/", Route::Base)]
    #[case("/v2", Route::Base)]
    #[case("/v2/_catalog", Route::Catalog)]
    #[case("/v2/app/manifests/v1", manifest("app", Reference::Tag("v1".into())))]
    #[case("/v2/org/team/app/manifests/aarch64_v1.2", manifest("org/team/app", Reference::Tag("aarch64_v1.2".into())))]
    #[case(&format!("/v2/a/manifests/{D}"), manifest("a", Reference::Digest(D.into())))]
    #[case("/v2/manifests/manifests/x", manifest("manifests", Reference::Tag("x".into())))]
    #[case(&format!("/v2/a/b/blobs/{D}"), Route::Blob { name: "a/b".into() })]
    #[case("/v2/a/blobs/uploads/", Route::Upload { name: "a".into() })]
    #[case("/v2/a/blobs/uploads", Route::Upload { name: "a".into() })]
    #[case("/v2/a/b/blobs/uploads/0f3a-11", Route::Upload { name: "a/b".into() })]
    #[case("/v2/blobs/blobs/uploads/", Route::Upload { name: "blobs".into() })]
    #[case("/v2/a/tags/list", Route::Tags { name: "a".into() })]
    #[case(&format!("/v2/a/referrers/{D}"), Route::Referrers { name: "a".into() })]
    #[case("/healthz", Route::Other)]
    #[case("/v2/a/unknown/x", Route::Other)]
    fn parses(#[case] path: &str, #[case] want: Route) {
        assert_eq!(parse(path).unwrap(), want);
    }

    #[rstest]
    #[case("/v2/UPPER/manifests/v1", ErrorCode::NameInvalid)]
    #[case("/v2/../manifests/v1", ErrorCode::NameInvalid)]
    #[case("/v2/a/../b/manifests/v1", ErrorCode::NameInvalid)]
    #[case("/v2/%2e%2e/manifests/v1", ErrorCode::NameInvalid)]
    #[case("/v2//a/manifests/v1", ErrorCode::NameInvalid)]
    #[case("/v2/a//b/tags/list", ErrorCode::NameInvalid)]
    #[case("/v2/a/manifests/-bad", ErrorCode::TagInvalid)]
    #[case("/v2/a/manifests/sha256:abc", ErrorCode::DigestInvalid)]
    #[case("/v2/a/blobs/notadigest", ErrorCode::DigestInvalid)]
    #[case("/v2/a/referrers/sha256:zz", ErrorCode::DigestInvalid)]
    fn refuses(#[case] path: &str, #[case] code: ErrorCode) {
        assert_eq!(parse(path).unwrap_err().code, code, "{path}");
    }

    #[rstest]
    #[case("/v2/../x")]
    #[case("//v2/a/tags/list")]
    #[case("/v2/a/manifests/v1/.")]
    #[case("/v2/a/manifests/v1/..")]
    #[case("/v2/a/manifests/v1//")]
    #[case("/v2/a/%2E%2e/tags/list")]
    #[case("/x/../v2/")]
    #[case("/v2/a/manifests/v1/")]
    #[case("/v2/a/tags/list/")]
    fn refuses_dot_and_empty_segments(#[case] path: &str) {
        assert_eq!(
            parse(path).unwrap_err().code,
            ErrorCode::NameInvalid,
            "{path}"
        );
    }

    #[test]
    fn overlong_name_is_refused() {
        let path = format!("/v2/{}/tags/list", "a/".repeat(200) + "a");
        assert_eq!(parse(&path).unwrap_err().code, ErrorCode::NameInvalid);
    }

    #[test]
    fn kinds_are_bounded_labels() {
        assert_eq!(parse("/v2/a/tags/list").unwrap().kind(), "tags");
        assert_eq!(Route::Other.kind(), "other");
    }
}
