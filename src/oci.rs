//! The distribution API's vocabulary: name, tag and digest grammar, the OCI
//! error codes and the JSON error body.
//!
//! Pure: no I/O. `route` uses the validators before a request reaches the
//! registry; `error` renders [`ErrorBody`] for every answer archmerge makes
//! itself. Error bodies that come from the registry are never rebuilt here:
//! they are passed through untouched by `forward`.

use serde::{Deserialize, Serialize};

/// Largest manifest body archmerge buffers (and the registry accepts by
/// default): 4 MiB.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Media type of the OCI JSON error body.
pub const ERROR_CONTENT_TYPE: &str = "application/json";

/// The error codes of the distribution specification that archmerge emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Invalid repository name.
    NameInvalid,
    /// Invalid tag.
    TagInvalid,
    /// Invalid digest.
    DigestInvalid,
    /// Manifest is not valid (or too large to be one).
    ManifestInvalid,
    /// Manifest not known (e.g. an index type the client does not accept).
    ManifestUnknown,
    /// Content is larger than archmerge accepts.
    SizeInvalid,
    /// The registry is unreachable or failed.
    Unavailable,
    /// Client sent too many requests or too slowly.
    TooManyRequests,
    /// A blob upload's body did not arrive whole.
    BlobUploadInvalid,
}

/// One entry of an OCI error body.
#[derive(Debug, Serialize)]
pub struct ErrorInfo<'a> {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: &'a str,
}

/// `{"errors":[{"code":…,"message":…}]}` as the distribution spec defines it.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    /// The errors; archmerge always sends exactly one.
    pub errors: [ErrorInfo<'a>; 1],
}

impl ErrorBody<'_> {
    /// Renders one error as the JSON body.
    pub fn render(code: ErrorCode, message: &str) -> Vec<u8> {
        let body = ErrorBody {
            errors: [ErrorInfo { code, message }],
        };
        // Serializing a struct of a unit enum and a &str cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// The codes of a registry's OCI error body (`{"errors":[{"code":…}]}`);
/// none for a body that is not one.
pub fn error_codes(body: &[u8]) -> impl Iterator<Item = String> {
    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        errors: Vec<Code>,
    }
    #[derive(Deserialize)]
    struct Code {
        #[serde(default)]
        code: String,
    }
    serde_json::from_slice::<Body>(body)
        .map(|b| b.errors)
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.code)
}

// === grammar ===

/// A repository name as the distribution spec defines it: path components of
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`, at most 255 bytes.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.split('/').all(is_valid_component)
}

fn is_valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn is_valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A digest: `algorithm:encoded`. The algorithm is
/// `[a-z0-9]+([+._-][a-z0-9]+)*`; sha256 and sha512 must have their exact hex
/// length, other algorithms need `[a-zA-Z0-9=_-]+`.
pub fn is_valid_digest(digest: &str) -> bool {
    let Some((alg, enc)) = digest.split_once(':') else {
        return false;
    };
    let alg_ok = !alg.is_empty()
        && alg.split(['+', '.', '_', '-']).all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        });
    if !alg_ok || enc.is_empty() {
        return false;
    }
    let hex = |len: usize| {
        enc.len() == len
            && enc
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    };
    match alg {
        "sha256" => hex(64),
        "sha512" => hex(128),
        _ => enc
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'=' | b'_' | b'-')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("a", true)]
    #[case("library/ubuntu", true)]
    #[case("my-app/x.y__z/a--b", true)]
    #[case("a/b/c/d/e", true)]
    #[case("", false)]
    #[case("Upper", false)]
    #[case("a//b", false)]
    #[case("/a", false)]
    #[case("a/", false)]
    #[case("a/../b", false)]
    #[case("..", false)]
    #[case("a___b", false)]
    #[case("a.-b", false)]
    #[case("-a", false)]
    #[case("a%2eb", false)]
    fn names(#[case] name: &str, #[case] ok: bool) {
        assert_eq!(is_valid_name(name), ok, "{name}");
    }

    #[test]
    fn overlong_name_is_invalid() {
        assert!(!is_valid_name(&"a".repeat(256)));
        assert!(is_valid_name(&"a".repeat(255)));
    }

    #[rstest]
    #[case("latest", true)]
    #[case("aarch64_v1.2", true)]
    #[case("_x", true)]
    #[case("v1-rc.1", true)]
    #[case(".x", false)]
    #[case("-x", false)]
    #[case("a:b", false)]
    #[case("", false)]
    fn tags(#[case] tag: &str, #[case] ok: bool) {
        assert_eq!(is_valid_tag(tag), ok, "{tag}");
        assert!(!is_valid_tag(&"a".repeat(129)));
    }

    #[rstest]
    #[case(&format!("sha256:{}", "a".repeat(64)), true)]
    #[case(&format!("sha512:{}", "0".repeat(128)), true)]
    #[case(&format!("sha256:{}", "A".repeat(64)), false)]
    #[case(&format!("sha256:{}", "a".repeat(63)), false)]
    #[case("sha256:", false)]
    #[case("sha256", false)]
    #[case(
        "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
        true
    )]
    #[case("Sha256:abc", false)]
    fn digests(#[case] d: &str, #[case] ok: bool) {
        assert_eq!(is_valid_digest(d), ok, "{d}");
    }

    #[test]
    fn error_body_shape() {
        let body = ErrorBody::render(ErrorCode::NameInvalid, "bad name");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert_eq!(v["errors"][0]["message"], "bad name");
    }
}
