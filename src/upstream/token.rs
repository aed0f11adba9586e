//! The token flow of registries that answer `WWW-Authenticate: Bearer …`
//! (Harbor, GitLab, distribution with `auth: token`), for archmerge's own
//! identity only: its Basic credentials are exchanged at the realm for a
//! token scoped as the challenge asks, cached until shortly before it
//! expires.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
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

/// Tokens by challenge. A `DashMap` because lookups are per call and
/// concurrent; no guard is held across an await.
#[derive(Clone, Default)]
pub struct Tokens(std::sync::Arc<DashMap<Challenge, (HeaderValue, Instant)>>);

impl Tokens {
    /// A `Bearer …` value for the challenge, from the cache or the realm.
    pub async fn get(
        &self,
        upstream: &Upstream,
        challenge: &Challenge,
        basic: Option<&HeaderValue>,
        own: &Credentials,
    ) -> Result<HeaderValue, UpstreamError> {
        if let Some(entry) = self.0.get(challenge) {
            if entry.1 > Instant::now() {
                return Ok(entry.0.clone());
            }
        }
        let uri: http::Uri = challenge.url().parse().map_err(|e| UpstreamError::Body {
            what: "token realm".into(),
            reason: format!("{e}"),
        })?;
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
            serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Body {
                what: "token".into(),
                reason: e.to_string(),
            })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .ok_or_else(|| UpstreamError::Body {
                what: "token".into(),
                reason: "no token in the realm's answer".into(),
            })?;
        let value = sensitive(&format!("Bearer {token}")).ok_or_else(|| UpstreamError::Body {
            what: "token".into(),
            reason: "token is not a valid header value".into(),
        })?;
        // Refresh a little early; the spec's default lifetime is 60 s.
        let life = Duration::from_secs(parsed.expires_in.unwrap_or(60).saturating_sub(10).max(1));
        self.0
            .insert(challenge.clone(), (value.clone(), Instant::now() + life));
        Ok(value)
    }
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
}
