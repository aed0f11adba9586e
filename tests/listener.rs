//! The client listener's connection path: whatever a client does with its
//! connection (TLS or plain, HTTP/1.1 or HTTP/2), it makes progress or is
//! closed, and a client past the connection limit reads a 503 it can parse.
//!
//! archmerge runs in front of the real registry. TLS clients verify
//! archmerge's certificate against a CA made in the test
//! (`support::certs`); HTTP/2 and HTTP/1.1 are chosen by ALPN.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use support::*;

// === TLS clients ===

/// Which protocol a TLS client offers by ALPN.
#[derive(Clone, Copy, Debug)]
enum Alpn {
    H2,
    Http11,
}

/// A rustls client whose only root is the test CA.
fn client_tls(ca_der: &[u8], alpn: Option<Alpn>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .expect("adding the test CA");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = match alpn {
        Some(Alpn::H2) => vec![b"h2".to_vec()],
        Some(Alpn::Http11) => vec![b"http/1.1".to_vec()],
        None => Vec::new(),
    };
    config
}

/// A TLS connection to 127.0.0.1:`port`, handshake done, nothing sent.
async fn tls_connect(port: u16, ca_der: &[u8]) -> TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(ca_der, None)));
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connecting to archmerge");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector
        .connect(name, tcp)
        .await
        .expect("the TLS handshake with archmerge")
}

/// GET `url` over verified TLS with one fresh connection, offering only
/// `alpn`: (HTTP version, status, body), or what went wrong.
async fn tls_get(
    url: &str,
    ca_der: &[u8],
    alpn: Alpn,
) -> Result<(http::Version, u16, Bytes), String> {
    let tls = client_tls(ca_der, None);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = match alpn {
        Alpn::H2 => builder.enable_http2().build(),
        Alpn::Http11 => builder.enable_http1().build(),
    };
    let mut client = Client::builder(TokioExecutor::new());
    client.pool_max_idle_per_host(0);
    if matches!(alpn, Alpn::H2) {
        client.http2_only(true);
    }
    let client: Client<_, Empty<Bytes>> = client.build(connector);
    let req = http::Request::get(url).body(Empty::new()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let version = resp.version();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e:?}"))?
        .to_bytes();
    Ok((version, status, body))
}

/// archmerge serving TLS with the test CA's certificate, plus `toml`.
fn spawn_tls(ca: &TestCa, registry: &Registry, args: &[&str], toml: &str) -> Archmerge {
    let mut all = vec![
        "--tls-cert".to_owned(),
        ca.cert_pem().display().to_string(),
        "--tls-key".to_owned(),
        ca.key_pem().display().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    spawn_archmerge_tls(
        &registry.url(),
        ArchmergeOpts {
            args: all,
            config_toml: Some(toml.to_owned()),
            ..Default::default()
        },
    )
}

/// Reads from `conn` until the server closes it (EOF, close_notify or a
/// reset) or `limit` passes: when it closed, counted from `since`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    conn: &mut S,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    let deadline = since + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

// === TLS: bounded before the request, and a readable 503 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_sends_nothing_after_its_handshake_or_trickles_the_preface_is_cut_off() {
    let ca = TestCa::new();
    let registry = spawn_registry();
    let proxy = spawn_tls(&ca, &registry, &[], "[timeouts]\nheader_read_secs = 2\n");
    let port = proxy.port();

    // Handshake, then silence.
    let started = Instant::now();
    let mut silent = tls_connect(port, &ca.ca_der).await;
    let cut = closed_within(&mut silent, started, Duration::from_secs(8)).await;
    assert!(
        cut.is_some_and(|d| d < Duration::from_secs(5)),
        "a TLS connection that sent nothing after its handshake was not cut off by \
         header_read_secs = 2 (still open after 8 s: {cut:?})"
    );

    // Handshake, then the HTTP/2 preface one byte every 400 ms.
    let started = Instant::now();
    let mut slow = tls_connect(port, &ca.ca_der).await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut sent = 0;
    let mut cut = None;
    while started.elapsed() < Duration::from_secs(12) {
        if sent < preface.len() {
            if slow.write_all(&preface[sent..=sent]).await.is_err() {
                cut = Some(started.elapsed());
                break;
            }
            sent += 1;
        }
        if let Some(d) = closed_within(&mut slow, Instant::now(), Duration::from_millis(400)).await
        {
            cut = Some(started.elapsed() - Duration::from_millis(400) + d);
            break;
        }
    }
    assert!(
        cut.is_some_and(|d| d < Duration::from_secs(5)),
        "a TLS client trickling the HTTP/2 preface ({sent} of {} bytes sent) was not cut \
         off by header_read_secs = 2: {cut:?}",
        preface.len()
    );

    // Clients that do speak are served, on either protocol.
    let url = format!("{}/v2/", proxy.https_url());
    for alpn in [Alpn::H2, Alpn::Http11] {
        let (_, status, body) = tls_get(&url, &ca.ca_der, alpn).await.unwrap();
        assert_eq!(status, 200, "{alpn:?}: {}", String::from_utf8_lossy(&body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_limit_a_tls_client_reads_a_503_over_tls_on_h2_and_http11() {
    let ca = TestCa::new();
    let registry = spawn_registry();
    let proxy = spawn_tls(&ca, &registry, &["--max-connections", "1"], "");
    let port = proxy.port();
    let url = format!("{}/v2/", proxy.https_url());

    // One client holds the only slot: a served HTTP/1.1 keep-alive
    // connection, left open.
    let mut held = tls_connect(port, &ca.ca_der).await;
    held.write_all(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    held.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "the holding client was not served");

    for alpn in [Alpn::H2, Alpn::Http11, Alpn::H2] {
        let answer = tls_get(&url, &ca.ca_der, alpn).await;
        let (version, status, body) = answer.unwrap_or_else(|e| {
            panic!("a TLS client ({alpn:?}) past the limit got no readable answer: {e}")
        });
        assert_eq!(status, 503, "{alpn:?}: {}", String::from_utf8_lossy(&body));
        assert_eq!(oci_error_codes(&body), ["TOO_MANY_REQUESTS"], "{alpn:?}");
        let want = match alpn {
            Alpn::H2 => http::Version::HTTP_2,
            Alpn::Http11 => http::Version::HTTP_11,
        };
        assert_eq!(version, want, "{alpn:?}");
    }

    // The slot comes free: served again.
    drop(held);
    let served = eventually(Duration::from_secs(5), || {
        let url = url.clone();
        let ca = ca.ca_der.clone();
        async move {
            tls_get(&url, &ca, Alpn::H2)
                .await
                .is_ok_and(|(_, status, _)| status == 200)
        }
    })
    .await;
    assert!(served, "still refused after the holding client left");
}
