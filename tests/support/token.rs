//! Registry token auth (distribution's `auth: token`), for the one fault of
//! scope a real registry gives: a token that covers the repository a client
//! pushes to, and not another one.
//!
//! [`TokenIssuer`] is a throwaway token service: an ES256 key and a
//! self-signed certificate made at test time, the `REGISTRY_AUTH_TOKEN_*`
//! settings that make a registry trust them, and tokens minted with exactly
//! the repository scopes a test grants — as GitLab, Harbor or docker/auth
//! would issue them for `docker push` of one repository
//! (`repository:<name>:pull,push`). Tests mint the token up front and send
//! it as `Authorization: Bearer` ([`http_bearer`]); nobody calls the realm,
//! except where archmerge's own identity must fetch its tokens: [`Realm`]
//! serves them then, for one user, and counts what it was asked.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rcgen::{CertificateParams, DnType, KeyPair, SigningKey};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde_json::json;
use tempfile::TempDir;

/// The `service` (the tokens' audience) the registry is told it is.
pub const TOKEN_SERVICE: &str = "archmerge-test-registry";
/// The issuer the registry trusts.
pub const TOKEN_ISSUER: &str = "archmerge-test-token-service";

/// A signing key and the certificate bundle a registry trusts it by.
pub struct TokenIssuer {
    /// Holds the certificate bundle.
    dir: TempDir,
    key: KeyPair,
    /// The certificate, DER, sent in each token's `x5c` header.
    cert_der: Vec<u8>,
}

impl TokenIssuer {
    /// A fresh key and self-signed certificate.
    pub fn new() -> TokenIssuer {
        let dir = tempfile::Builder::new()
            .prefix("archmerge-token-")
            .tempdir()
            .expect("creating the token temp dir");
        let key = KeyPair::generate().expect("generating the token key (P-256)");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("cert params");
        params
            .distinguished_name
            .push(DnType::CommonName, "archmerge test token issuer");
        let cert = params.self_signed(&key).expect("self-signing");
        fs::write(dir.path().join("bundle.pem"), cert.pem()).expect("writing the bundle");
        TokenIssuer {
            dir,
            key,
            cert_der: cert.der().to_vec(),
        }
    }

    /// The certificate bundle, for `auth.token.rootcertbundle`.
    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle.pem")
    }

    /// Environment that turns on token auth in a registry
    /// ([`super::RegistryOpts::env`]). The realm is never called (tests
    /// mint tokens themselves), so it points at a port nobody serves.
    pub fn registry_env(&self) -> Vec<(String, String)> {
        self.registry_env_with_realm("http://127.0.0.1:9/token")
    }

    /// [`TokenIssuer::registry_env`] with the challenge naming `realm`.
    pub fn registry_env_with_realm(&self, realm: &str) -> Vec<(String, String)> {
        [
            ("REGISTRY_AUTH", "token".to_owned()),
            ("REGISTRY_AUTH_TOKEN_REALM", realm.to_owned()),
            ("REGISTRY_AUTH_TOKEN_SERVICE", TOKEN_SERVICE.to_owned()),
            ("REGISTRY_AUTH_TOKEN_ISSUER", TOKEN_ISSUER.to_owned()),
            (
                "REGISTRY_AUTH_TOKEN_ROOTCERTBUNDLE",
                self.bundle().display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// A token valid for an hour granting, per repository, the listed
    /// actions (`pull`, `push`).
    pub fn token(&self, access: &[(&str, &[&str])]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(&self.cert_der)],
        });
        let claims = json!({
            "iss": TOKEN_ISSUER,
            "sub": "ci",
            "aud": TOKEN_SERVICE,
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + 3600,
            "jti": format!("archmerge-test-{now}-{}", access.len()),
            "access": access.iter().map(|(name, actions)| json!({
                "type": "repository",
                "name": name,
                "actions": actions,
            })).collect::<Vec<_>>(),
        });
        let signing_input = format!(
            "{}.{}",
            b64url.encode(serde_json::to_vec(&header).unwrap()),
            b64url.encode(serde_json::to_vec(&claims).unwrap())
        );
        let der = self.key.sign(signing_input.as_bytes()).expect("signing");
        format!("{signing_input}.{}", b64url.encode(raw_es256(&der)))
    }
}

/// A token service on a free loopback port: `GET /token?service=…&scope=…`
/// with the right HTTP Basic credentials gets a token granting every scope
/// asked for, with `expires_in` as set; anything else gets 401. Stops on
/// drop.
pub struct Realm {
    port: u16,
    /// The `scope` of every token issued, in order.
    asked: Arc<Mutex<Vec<String>>>,
    expires_in: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Realm {
    /// Serves tokens signed by `issuer` to `user`:`password`, valid for
    /// `expires_in` seconds.
    pub async fn start(
        issuer: Arc<TokenIssuer>,
        user: &str,
        password: &str,
        expires_in: u64,
    ) -> Realm {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the token realm");
        let port = listener.local_addr().unwrap().port();
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let asked = Arc::new(Mutex::new(Vec::new()));
        let expires = Arc::new(AtomicU64::new(expires_in));
        let (log, exp) = (asked.clone(), expires.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (issuer, basic, log, exp) =
                    (issuer.clone(), basic.clone(), log.clone(), exp.clone());
                tokio::spawn(async move {
                    let _ = answer(sock, &issuer, &basic, &log, &exp).await;
                });
            }
        });
        Realm {
            port,
            asked,
            expires_in: expires,
            task,
        }
    }

    /// `http://127.0.0.1:PORT/token`, for the registry's challenge.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The scope of every token issued so far, in order.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }

    /// The `expires_in` of the tokens issued from now on.
    pub fn set_expires_in(&self, secs: u64) {
        self.expires_in.store(secs, Ordering::SeqCst);
    }
}

impl Drop for Realm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers one request on `sock` and closes it.
async fn answer(
    mut sock: tokio::net::TcpStream,
    issuer: &TokenIssuer,
    basic: &str,
    asked: &Mutex<Vec<String>>,
    expires_in: &AtomicU64,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let authorized = head.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.eq_ignore_ascii_case("authorization") && v.trim() == basic)
    });
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let scopes: Vec<String> = query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("scope="))
        .map(|v| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let (status, body) = if target.starts_with("/token?") && authorized {
        // `repository:<name>:<actions>`, several separated by spaces.
        let grants: Vec<(String, Vec<String>)> = scopes
            .iter()
            .flat_map(|s| s.split(' '))
            .filter_map(|s| {
                let rest = s.strip_prefix("repository:")?;
                let (name, actions) = rest.rsplit_once(':')?;
                Some((
                    name.to_owned(),
                    actions.split(',').map(str::to_owned).collect(),
                ))
            })
            .collect();
        let borrowed: Vec<(&str, Vec<&str>)> = grants
            .iter()
            .map(|(n, a)| (n.as_str(), a.iter().map(String::as_str).collect()))
            .collect();
        let access: Vec<(&str, &[&str])> =
            borrowed.iter().map(|(n, a)| (*n, a.as_slice())).collect();
        asked.lock().unwrap().push(scopes.join(" "));
        let token = issuer.token(&access);
        let body = json!({
            "token": token,
            "expires_in": expires_in.load(Ordering::SeqCst),
        });
        ("200 OK", body.to_string())
    } else {
        ("401 Unauthorized", "{}".to_owned())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(resp.as_bytes()).await?;
    sock.shutdown().await
}

/// An ECDSA signature as DER `SEQUENCE { INTEGER r, INTEGER s }` (what ring
/// makes for X.509) → the 64 bytes `r ‖ s` that JWS ES256 wants.
fn raw_es256(der: &[u8]) -> Vec<u8> {
    assert_eq!(der[0], 0x30, "not a DER sequence");
    // P-256 signatures are short enough for one-byte lengths.
    let mut at = 2;
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        assert_eq!(der[at], 0x02, "not a DER integer");
        let len = der[at + 1] as usize;
        let int = &der[at + 2..at + 2 + len];
        let int = &int[int.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        at += 2 + len;
    }
    out
}

/// A client like [`super::http`] that sends `Authorization: Bearer <token>`
/// on every request.
pub fn http_bearer(token: &str) -> reqwest::Client {
    let mut headers = HeaderMap::new();
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).expect("a header value");
    v.set_sensitive(true);
    headers.insert(AUTHORIZATION, v);
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(5))
        .default_headers(headers)
        .build()
        .expect("building the HTTP client")
}
