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

// === every connection makes progress or is closed ===

/// archmerge with `max_connections` and `toml`, plain HTTP.
fn spawn_limited(registry: &Registry, max_connections: usize, toml: &str) -> Archmerge {
    spawn_archmerge_with(
        &registry.url(),
        ArchmergeOpts {
            args: vec!["--max-connections".into(), max_connections.to_string()],
            config_toml: Some(toml.to_owned()),
            ..Default::default()
        },
    )
}

/// Waits until the harness's own probe connection has left and a plain
/// `GET /v2/` on a fresh connection gets 200 (the slots are free).
async fn served_within(port: u16, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < limit {
        let answer = tokio::task::spawn_blocking(move || {
            raw_exchange(
                port,
                b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                Duration::from_secs(2),
            )
        })
        .await
        .unwrap();
        if answer.status == 200 {
            return Ok(started.elapsed());
        }
        last = format!("{} {}", answer.status, answer.text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}

/// An HTTP/2 (prior knowledge, no TLS) connection that has been served one
/// `GET /v2/`, and is then held open: it answers pings, sends nothing.
struct H2Held {
    /// Kept so the client does not close the connection itself.
    _send: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    /// Ends when archmerge closes the connection.
    conn: tokio::task::JoinHandle<()>,
}

async fn h2_held(port: u16) -> H2Held {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("the h2c handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(format!("http://127.0.0.1:{port}/v2/"))
        .body(Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.expect("GET /v2/ over h2c");
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
    H2Held { _send: send, conn }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_after_idle_secs_and_free_their_slots() {
    const N: usize = 6;
    let registry = spawn_registry();
    // header_read_secs stays at its default: only idle_secs can free them.
    let proxy = spawn_limited(&registry, N, "[timeouts]\nidle_secs = 2\n");
    let port = proxy.port();
    served_within(port, Duration::from_secs(5))
        .await
        .expect("archmerge never served a first client");

    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..N {
        held.push(h2_held(port).await);
    }
    // All N slots are taken: the next client is refused.
    let refused = tokio::task::spawn_blocking(move || {
        raw_exchange(
            port,
            b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            Duration::from_secs(2),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        refused.status, 503,
        "the {N} h2c connections did not fill the limit"
    );

    let served = served_within(port, Duration::from_secs(8)).await;
    assert!(
        served.is_ok(),
        "{N} idle h2c connections still held every slot {:?} after they went idle \
         (idle_secs = 2): {served:?}",
        started.elapsed()
    );
    for (i, h) in held.into_iter().enumerate() {
        let closed = tokio::time::timeout(Duration::from_secs(3), h.conn).await;
        assert!(closed.is_ok(), "idle h2c connection {i} is still open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_peer_that_never_answers_a_ping_is_closed_after_h2_keepalive_secs() {
    let registry = spawn_registry();
    // Neither the idle nor the header timeout may close it first.
    let proxy = spawn_limited(
        &registry,
        16,
        "[timeouts]\nidle_secs = 600\nheader_read_secs = 600\nh2_keepalive_secs = 1\n",
    );
    let started = Instant::now();
    let mut raw = TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    // The preface and an empty SETTINGS frame, then nothing: archmerge's
    // SETTINGS and PINGs are read, never acknowledged.
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let cut = closed_within(&mut raw, started, Duration::from_secs(10)).await;
    assert!(
        cut.is_some_and(|d| d < Duration::from_secs(6)),
        "an HTTP/2 peer that never answers a ping was not closed by h2_keepalive_secs = 1 \
         (idle_secs = 600): {cut:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_http11_connections_are_closed_after_idle_secs_and_free_their_slots() {
    const N: usize = 6;
    let registry = spawn_registry();
    let proxy = spawn_limited(
        &registry,
        N,
        "[timeouts]\nidle_secs = 2\nheader_read_secs = 600\n",
    );
    let port = proxy.port();
    served_within(port, Duration::from_secs(5))
        .await
        .expect("archmerge never served a first client");

    let started = Instant::now();
    let held: Vec<_> = (0..N)
        .map(|_| {
            let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            std::io::Write::write_all(&mut conn, b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .unwrap();
            let a = read_answer(&mut conn, Duration::from_secs(5));
            assert_eq!(a.status, 200, "{}", a.head);
            conn
        })
        .collect();
    let served = served_within(port, Duration::from_secs(8)).await;
    assert!(
        served.is_ok(),
        "{N} idle keep-alive connections still held every slot {:?} after they went idle \
         (idle_secs = 2): {served:?}",
        started.elapsed()
    );
    for (i, mut conn) in held.into_iter().enumerate() {
        let a = read_answer(&mut conn, Duration::from_secs(2));
        assert!(
            a.head.is_empty(),
            "idle connection {i} got an answer it did not ask for: {}",
            a.head
        );
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let eof = std::io::Read::read(&mut conn, &mut [0u8; 16]);
        assert!(
            matches!(eof, Ok(0) | Err(_))
                && !matches!(&eof, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "idle connection {i} is still open: {eof:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_the_limit_that_says_nothing_is_dropped_within_header_read_secs() {
    // A refused connection is cheaper than a served one, but it still
    // holds a task and a file descriptor: it gets no longer to speak than
    // a connection within the limit.
    let registry = spawn_registry();
    let proxy = spawn_limited(&registry, 1, "[timeouts]\nheader_read_secs = 1\n");
    let port = proxy.port();
    served_within(port, Duration::from_secs(5))
        .await
        .expect("archmerge never served a first client");

    let mut holder = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    holder
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    holder.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "the holding client was not served");

    // The one slot is held by a keep-alive connection: the next is refused.
    let started = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let closed = closed_within(&mut silent, started, Duration::from_secs(6)).await;
    assert!(
        closed.is_some_and(|d| d < Duration::from_secs(3)),
        "a refused client that sent nothing was held {closed:?} (header_read_secs = 1)"
    );
    drop(holder);
}

/// `POST /v2/<repo>/blobs/uploads/` on its own connection: the upload's
/// `Location`.
fn start_upload(port: u16, repo: &str) -> String {
    let answer = raw_exchange(
        port,
        format!(
            "POST /v2/{repo}/blobs/uploads/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
        Duration::from_secs(5),
    );
    assert_eq!(answer.status, 202, "{}{}", answer.head, answer.text());
    let location = answer.header("location").expect("a Location");
    match location.find("/v2/") {
        Some(at) => location[at..].to_owned(),
        None => panic!("odd Location {location}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_body_stalls_are_ended_after_body_progress_secs_and_free_their_slots() {
    const N: usize = 6;
    let registry = spawn_registry();
    // Only body_progress_secs can end them.
    let proxy = spawn_limited(
        &registry,
        N,
        "[timeouts]\nbody_progress_secs = 2\nidle_secs = 600\nheader_read_secs = 600\n",
    );
    let port = proxy.port();
    served_within(port, Duration::from_secs(5))
        .await
        .expect("archmerge never served a first client");
    let uploads: Vec<String> = (0..N / 2)
        .map(|_| start_upload(port, "stall/blob"))
        .collect();

    // Half stall a blob chunk (forwarded to the registry as it comes), half
    // a manifest (read by archmerge itself): 10 bytes of the 1000 declared.
    let started = Instant::now();
    let mut heads: Vec<String> = uploads
        .iter()
        .map(|at| {
            format!(
                "PATCH {at} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
                 Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n"
            )
        })
        .collect();
    heads.extend((0..N - N / 2).map(|i| {
        format!(
            "PUT /v2/stall/app/manifests/x86_64_v{i} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 1000\r\n\r\n"
        )
    }));
    let stalled: Vec<_> = heads
        .into_iter()
        .map(|head| {
            std::thread::spawn(move || {
                let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                std::io::Write::write_all(&mut conn, head.as_bytes()).unwrap();
                std::io::Write::write_all(&mut conn, b"0123456789").unwrap();
                let answer = read_answer(&mut conn, Duration::from_secs(12));
                (started.elapsed(), answer)
            })
        })
        .collect();
    // While they stall, every slot is taken.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = tokio::task::spawn_blocking(move || {
        raw_exchange(
            port,
            b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            Duration::from_secs(2),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        refused.status, 503,
        "the {N} stalled uploads did not fill the limit"
    );

    let served = served_within(port, Duration::from_secs(8)).await;
    assert!(
        served.is_ok(),
        "{N} stalled request bodies still held every slot {:?} later \
         (body_progress_secs = 2): {served:?}",
        started.elapsed()
    );
    for (i, t) in stalled.into_iter().enumerate() {
        let (after, answer) = t.join().unwrap();
        assert!(
            after < Duration::from_secs(6),
            "a stalled body was ended only after {after:?} (answer {} {})",
            answer.status,
            answer.text()
        );
        // The client's fault, said as such: 408 for a forwarded blob
        // chunk, a 4xx for a manifest archmerge reads itself.
        if i < N / 2 {
            assert_eq!(answer.status, 408, "{}{}", answer.head, answer.text());
            assert_eq!(oci_error_codes(&answer.body), ["TOO_MANY_REQUESTS"]);
        } else {
            assert!(
                (400..500).contains(&answer.status),
                "{}{}",
                answer.head,
                answer.text()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_that_keeps_sending_outlives_body_progress_secs() {
    let registry = spawn_registry();
    let proxy = spawn_limited(&registry, 16, "[timeouts]\nbody_progress_secs = 1\n");
    let port = proxy.port();
    let at = start_upload(port, "slow/blob");
    // 5 s of upload, a 64 KiB piece every 400 ms: longer than the timeout
    // in all, shorter between any two pieces.
    let piece = vec![7u8; 64 * 1024];
    let pieces = 12;
    let digest = digest_of(&piece.repeat(pieces));
    let started = Instant::now();
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let head = format!(
        "PUT {at}{sep}digest={digest} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        sep = if at.contains('?') { '&' } else { '?' },
        len = piece.len() * pieces,
    );
    std::io::Write::write_all(&mut conn, head.as_bytes()).unwrap();
    for _ in 0..pieces {
        std::thread::sleep(Duration::from_millis(400));
        std::io::Write::write_all(&mut conn, &piece).expect("archmerge cut a progressing upload");
    }
    let answer = read_answer(&mut conn, Duration::from_secs(10));
    assert!(started.elapsed() > Duration::from_secs(4));
    assert_eq!(answer.status, 201, "{}{}", answer.head, answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_outlives_upstream_headers_secs_which_counts_from_the_end_of_the_body() {
    let registry = spawn_registry();
    let proxy = spawn_limited(&registry, 16, "[timeouts]\nupstream_headers_secs = 1\n");
    let port = proxy.port();
    let at = start_upload(port, "slow/blob");
    let piece = vec![7u8; 64 * 1024];
    let pieces = 10;
    let digest = digest_of(&piece.repeat(pieces));
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let head = format!(
            "PUT {at}{sep}digest={digest} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n\
             Connection: close\r\n\r\n",
            sep = if at.contains('?') { '&' } else { '?' },
            len = piece.len() * pieces,
        );
        std::io::Write::write_all(&mut conn, head.as_bytes()).unwrap();
        for _ in 0..pieces {
            std::thread::sleep(Duration::from_millis(300));
            if std::io::Write::write_all(&mut conn, &piece).is_err() {
                break;
            }
        }
        read_answer(&mut conn, Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert!(started.elapsed() > Duration::from_secs(3));
    assert_eq!(answer.status, 201, "{}{}", answer.head, answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_stops_reading_an_upload_still_times_out_with_504() {
    // A "registry" that accepts connections and never reads a byte.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("http://{}", hole.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for conn in hole.incoming().take(4) {
            conns.push(conn);
        }
        std::thread::sleep(Duration::from_secs(20));
    });
    let proxy = spawn_archmerge_with(
        &upstream,
        ArchmergeOpts {
            config_toml: Some("[timeouts]\nupstream_headers_secs = 1\n".into()),
            ..Default::default()
        },
    );
    let port = proxy.port();
    let len = 64 << 20;
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut writer = conn.try_clone().unwrap();
        let head = format!(
            "PATCH /v2/hole/blobs/uploads/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n\
             Connection: close\r\n\r\n"
        );
        std::thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut writer, head.as_bytes());
            let piece = vec![0u8; 1 << 20];
            for _ in 0..64 {
                if std::io::Write::write_all(&mut writer, &piece).is_err() {
                    break;
                }
            }
        });
        read_answer(&mut conn, Duration::from_secs(15))
    })
    .await
    .unwrap();
    let took = started.elapsed();
    drop(held);
    assert_eq!(answer.status, 504, "{}{}", answer.head, answer.text());
    assert!(took < Duration::from_secs(6), "the 504 took {took:?}");
}
