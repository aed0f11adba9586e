//! The token flow of registries that answer `WWW-Authenticate: Bearer …`
//! (Harbor, GitLab, distribution with `auth: token`), for archmerge's own
//! identity only: its Basic credentials are exchanged at the realm for a
//! token scoped as the challenge asks, cached (bounded, in moka) until
//! shortly before it expires.

use std::time::{Duration, Instant};

use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use moka::future::Cache;
use moka::Expiry;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::{sensitive, Upstream, UpstreamError};
use crate::body;
use crate::config::Credentials;

/// A parsed `Bearer realm="…",service="…",scope="…"` challenge.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Challenge {
    realm: String,
    service: Option<String>,
    scope: Option<String>,
}

impl Challenge {
    /// Parses a Bearer challenge; `None` for any other scheme.
    pub fn parse(header: &str) -> Option<Challenge> {
        let rest = header.trim().strip_prefix("Bearer ")?;
        let mut params = std::collections::HashMap::new();
        let mut chars = rest.chars().peekable();
        loop {
            while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
                chars.next();
            }
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if key.is_empty() {
                break;
            }
            let value: String = if chars.peek() == Some(&'"') {
                chars.next();
                let mut v = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => v.extend(chars.next()),
                        '"' => break,
                        c => v.push(c),
                    }
                }
                v
            } else {
                chars.by_ref().take_while(|c| *c != ',').collect()
            };
            params.insert(key.trim().to_ascii_lowercase(), value);
        }
        Some(Challenge {
            realm: params.remove("realm").filter(|r| !r.is_empty())?,
            service: params.remove("service"),
            scope: params.remove("scope"),
        })
    }

    /// The realm's URI with `service` and `scope` in its query.
    fn uri(&self) -> Result<http::Uri, UpstreamError> {
        self.url()
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::BadUri {
                what: format!("a token realm {:?}", self.realm),
                reason: e.to_string(),
            })
    }

    fn url(&self) -> String {
        let mut url = self.realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        for (k, v) in [("service", &self.service), ("scope", &self.scope)] {
            if let Some(v) = v {
                url.push(sep);
                url.push_str(k);
                url.push('=');
                url.push_str(&encode(v));
                sep = '&';
            }
        }
        url
    }
}

/// What a query value keeps unencoded: RFC 3986's unreserved characters.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a query value (everything but RFC 3986 unreserved).
fn encode(v: &str) -> String {
    utf8_percent_encode(v, QUERY_VALUE).to_string()
}

/// Tokens kept at most: archmerge's own identity asks for one per
/// challenge (per repository scope), so this bounds the memory a registry
/// with many repositories can make the cache take.
const MAX_TOKENS: u64 = 1024;

/// The lifetime assumed when the realm's answer gives none (the token
/// spec's default).
const DEFAULT_LIFETIME_SECS: u64 = 60;

/// How much earlier than the realm said a token is dropped, so that it is
/// not used in a request the registry receives after it expired.
const EARLY_SECS: u64 = 10;

/// A `Bearer …` value, and how long it may be used from the moment it was
/// issued.
#[derive(Clone, Debug)]
struct Token {
    value: HeaderValue,
    life: Duration,
}

/// How long a token from an answer with this `expires_in` may be used:
/// [`EARLY_SECS`] less than the realm said, and at least a second.
fn lifetime(expires_in: Option<u64>) -> Duration {
    Duration::from_secs(
        expires_in
            .unwrap_or(DEFAULT_LIFETIME_SECS)
            .saturating_sub(EARLY_SECS)
            .max(1),
    )
}

/// Each token expires when its own answer says (a moka per-entry expiry);
/// a fresh token for the same challenge restarts the clock.
struct UntilExpiry;

impl Expiry<Challenge, Token> for UntilExpiry {
    fn expire_after_create(&self, _: &Challenge, token: &Token, _: Instant) -> Option<Duration> {
        Some(token.life)
    }

    fn expire_after_update(
        &self,
        _: &Challenge,
        token: &Token,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(token.life)
    }
}

/// Tokens by challenge, each until shortly before it expires, at most
/// [`MAX_TOKENS`] of them. Concurrent calls for one challenge share one
/// request to the realm (moka's `try_get_with`).
#[derive(Clone)]
pub struct Tokens(Cache<Challenge, Token>);

impl Default for Tokens {
    fn default() -> Tokens {
        Tokens(
            Cache::builder()
                .max_capacity(MAX_TOKENS)
                .expire_after(UntilExpiry)
                .build(),
        )
    }
}

impl Tokens {
    /// A `Bearer …` value for the challenge, from the cache or the realm.
    pub async fn get(
        &self,
        upstream: &Upstream,
        challenge: &Challenge,
        basic: Option<&HeaderValue>,
        own: &Credentials,
    ) -> Result<HeaderValue, UpstreamError> {
        self.0
            .try_get_with_by_ref(challenge, fetch(upstream, challenge, basic, own))
            .await
            .map(|token| token.value)
            .map_err(|e| (*e).clone())
    }
}

/// Asks the realm for a token, with archmerge's own Basic credentials.
async fn fetch(
    upstream: &Upstream,
    challenge: &Challenge,
    basic: Option<&HeaderValue>,
    own: &Credentials,
) -> Result<Token, UpstreamError> {
    let uri = challenge.uri()?;
    let mut req = Request::get(uri);
    if let Some(b) = basic {
        req = req.header(header::AUTHORIZATION, b.clone());
    }
    let req = req
        .body(body::empty())
        .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
    let resp = upstream.send(req).await?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), 1024 * 1024)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| UpstreamError::Body {
            what: "token".into(),
            reason: e.to_string(),
        })?;
    if status != StatusCode::OK {
        return Err(UpstreamError::Status {
            what: format!("a token for {}", own.username),
            status,
            body: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
        });
    }
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let parsed: TokenResponse =
        serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Malformed {
            what: "token answer".into(),
            reason: e.to_string(),
        })?;
    let token = parsed
        .token
        .or(parsed.access_token)
        .ok_or_else(|| UpstreamError::Malformed {
            what: "token answer".into(),
            reason: "it holds neither `token` nor `access_token`".into(),
        })?;
    let value = sensitive(&format!("Bearer {token}")).ok_or_else(|| UpstreamError::Malformed {
        what: "token answer".into(),
        reason: "the token is not a valid header value".into(),
    })?;
    Ok(Token {
        value,
        life: lifetime(parsed.expires_in),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_distribution_challenge() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.example/token");
        assert_eq!(c.service.as_deref(), Some("registry.example"));
        assert_eq!(c.scope.as_deref(), Some("repository:a/b:pull,push"));
        assert_eq!(
            c.url(),
            "https://auth.example/token?service=registry.example&scope=repository%3Aa%2Fb%3Apull%2Cpush"
        );
        assert_eq!(encode("a-b.c_d~e f/é+"), "a-b.c_d~e%20f%2F%C3%A9%2B");
        assert_eq!(Challenge::parse(r#"Basic realm="x""#), None);
        assert_eq!(Challenge::parse("Bearer service=x"), None);
    }

    #[test]
    fn a_realm_that_is_no_uri_is_said_to_be_one() {
        let c = Challenge::parse(r#"Bearer realm="https://auth example/token",scope="a""#).unwrap();
        let e = c.uri().unwrap_err();
        assert!(matches!(e, UpstreamError::BadUri { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(r#"the registry sent a token realm "https://auth example/token" that is not a usable URI"#),
            "{e}"
        );
    }

    #[test]
    fn a_token_lives_ten_seconds_less_than_the_realm_says_and_at_least_one() {
        assert_eq!(lifetime(Some(300)), Duration::from_secs(290));
        assert_eq!(lifetime(None), Duration::from_secs(50));
        assert_eq!(lifetime(Some(10)), Duration::from_secs(1));
        assert_eq!(lifetime(Some(0)), Duration::from_secs(1));
        assert_eq!(lifetime(Some(u64::MAX)), Duration::from_secs(u64::MAX - 10));
    }

    fn challenge(scope: &str) -> Challenge {
        Challenge {
            realm: "https://auth.example/token".into(),
            service: Some("registry.example".into()),
            scope: Some(scope.into()),
        }
    }

    fn token(value: &'static str, life: Duration) -> Token {
        Token {
            value: HeaderValue::from_static(value),
            life,
        }
    }

    #[tokio::test]
    async fn a_cached_token_expires_after_its_own_lifetime() {
        let tokens = Tokens::default();
        let short = challenge("repository:a:pull");
        let long = challenge("repository:b:pull");
        tokens
            .0
            .insert(short.clone(), token("Bearer s", Duration::from_millis(150)))
            .await;
        tokens
            .0
            .insert(long.clone(), token("Bearer l", Duration::from_secs(60)))
            .await;
        assert_eq!(
            tokens.0.get(&short).await.map(|t| t.value),
            Some(HeaderValue::from_static("Bearer s"))
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(tokens.0.get(&short).await.is_none(), "expired token served");
        assert_eq!(
            tokens.0.get(&long).await.map(|t| t.value),
            Some(HeaderValue::from_static("Bearer l"))
        );
    }

    #[tokio::test]
    async fn a_fresh_token_restarts_the_clock() {
        let tokens = Tokens::default();
        let c = challenge("repository:a:pull");
        tokens
            .0
            .insert(c.clone(), token("Bearer old", Duration::from_millis(150)))
            .await;
        tokens
            .0
            .insert(c.clone(), token("Bearer new", Duration::from_secs(60)))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            tokens.0.get(&c).await.map(|t| t.value),
            Some(HeaderValue::from_static("Bearer new"))
        );
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let tokens = Tokens::default();
        for i in 0..MAX_TOKENS * 2 {
            tokens
                .0
                .insert(
                    challenge(&format!("repository:r{i}:pull")),
                    token("Bearer x", Duration::from_secs(60)),
                )
                .await;
        }
        tokens.0.run_pending_tasks().await;
        assert!(
            tokens.0.entry_count() <= MAX_TOKENS,
            "{} tokens kept",
            tokens.0.entry_count()
        );
    }
}
