//! Blob uploads: whichever way archmerge moves an upload's bytes (spliced
//! from socket to socket for a `Content-Length` or chunked body on a
//! plaintext HTTP/1.1 connection, copied for HTTP/2, a body that came whole
//! with its head, or when zero-copy is off), the registry stores the client's bytes exactly and the
//! connection serves on; a client that stalls or a registry that refuses
//! mid-body gets a clear answer and a closed connection, never a success
//! for what the registry did not store.
//!
//! archmerge runs in front of the real registry; the client speaks raw
//! HTTP/1.1 over a socket, so what is on the wire is what is checked.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

/// The blob: many pipe-fulls, not a multiple of one.
const SIZE: usize = 24 * 1024 * 1024 + 12_345;

const SPLICED: &str = "archmerge_spliced_upload_bytes_total";

fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).unwrap()
}

/// The path and query of an upload's `Location` (archmerge's origin
/// checked).
fn session(answer: &RawAnswer, port: u16) -> String {
    let location = answer
        .header("location")
        .unwrap_or_else(|| panic!("no Location: {}", answer.head));
    let origin = format!("http://127.0.0.1:{port}");
    location
        .strip_prefix(&origin)
        .unwrap_or_else(|| panic!("Location {location} is not on archmerge's origin {origin}"))
        .to_owned()
}

/// The next answer on a connection whose requests were pipelined: read to
/// its end and no further (its body is not kept).
fn next_answer(conn: &mut TcpStream) -> RawAnswer {
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    match read_hashed_answer(conn) {
        Ok(answer) => RawAnswer {
            status: answer.status,
            head: answer.head,
            body: Vec::new(),
        },
        Err((head, got)) => panic!("the connection ended {got} bytes into an answer: {head}"),
    }
}

fn start_upload(conn: &mut TcpStream, port: u16, repo: &str) -> String {
    conn.write_all(
        format!(
            "POST /v2/{repo}/blobs/uploads/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let answer = read_answer(conn, Duration::from_secs(10));
    assert_eq!(answer.status, 202, "{}{}", answer.head, answer.text());
    session(&answer, port)
}

fn with_digest(at: &str, digest: &str) -> String {
    let sep = if at.contains('?') { '&' } else { '?' };
    format!("{at}{sep}digest={digest}")
}

/// Closes the upload session `patched` names with a PUT of `digest`, and
/// reads the answer.
fn close_upload(conn: &mut TcpStream, port: u16, patched: &RawAnswer, digest: &str) -> RawAnswer {
    let at = session(patched, port);
    conn.write_all(&head("PUT", &with_digest(&at, digest), port, 0))
        .unwrap();
    read_answer(conn, Duration::from_secs(10))
}

fn head(method: &str, target: &str, port: u16, len: usize) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
    )
    .into_bytes()
}

fn get_root(port: u16) -> Vec<u8> {
    format!("GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").into_bytes()
}

/// A PATCH of a blob of [`SIZE`] took all of it, the requests that
/// followed it on the connection were answered, and the PUT that closed the
/// session stored it.
fn assert_through(patched: &RawAnswer, followed: &[RawAnswer], put: &RawAnswer) {
    assert_eq!(patched.status, 202, "{}{}", patched.head, patched.text());
    assert_eq!(
        patched.header("range").as_deref(),
        Some(format!("0-{}", SIZE - 1).as_str()),
        "{}",
        patched.head
    );
    for answer in followed {
        assert_eq!(answer.status, 200, "after the body: {}", answer.head);
    }
    assert_eq!(put.status, 201, "{}{}", put.head, put.text());
}

/// The blob as the registry serves it, straight from the registry.
async fn stored(s: &Stack, repo: &str, digest: &str) -> Option<String> {
    let res = http()
        .get(format!("{}/v2/{repo}/blobs/{digest}", s.registry.url()))
        .send()
        .await
        .unwrap();
    if res.status() == 404 {
        return None;
    }
    assert_eq!(res.status(), 200);
    Some(digest_of(&res.bytes().await.unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_body_is_spliced_to_the_registry_byte_for_byte_and_the_connection_serves_on() {
    let s = Stack::new();
    let port = s.proxy.port();
    let first = Seeded::bytes(11, SIZE);
    let second = Seeded::bytes(12, SIZE);
    let small = Seeded::bytes(10, 100_000);
    let small_digest = digest_of(&small);
    let (first_digest, second_digest) = (digest_of(&first), digest_of(&second));
    let (d1, d2) = (first_digest.clone(), second_digest.clone());
    let answers = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        // The docker way: POST, one PATCH with the whole body, PUT with
        // the digest. In one write: a small PATCH to another upload (its
        // body read the ordinary way), then the PATCH, its body followed
        // at once by two more requests on the connection.
        let at_small = start_upload(&mut conn, port, "up/app");
        let at = start_upload(&mut conn, port, "up/app");
        let mut pipelined = head("PATCH", &at_small, port, small.len());
        pipelined.extend_from_slice(&small);
        pipelined.extend(head("PATCH", &at, port, first.len()));
        pipelined.extend_from_slice(&first);
        pipelined.extend(get_root(port));
        pipelined.extend(get_root(port));
        conn.write_all(&pipelined).unwrap();
        let small_patched = next_answer(&mut conn);
        let patched = next_answer(&mut conn);
        let roots = [next_answer(&mut conn), next_answer(&mut conn)];
        let at = session(&patched, port);
        conn.write_all(&head("PUT", &with_digest(&at, &d1), port, 0))
            .unwrap();
        let put = read_answer(&mut conn, Duration::from_secs(10));
        let at = session(&small_patched, port);
        let small_digest = digest_of(&small);
        conn.write_all(&head("PUT", &with_digest(&at, &small_digest), port, 0))
            .unwrap();
        let small_put = read_answer(&mut conn, Duration::from_secs(10));
        // A monolithic upload: the body with the closing PUT.
        let at = start_upload(&mut conn, port, "up/app");
        let mut mono = head("PUT", &with_digest(&at, &d2), port, second.len());
        mono.extend_from_slice(&second);
        conn.write_all(&mono).unwrap();
        let mono = read_answer(&mut conn, Duration::from_secs(20));
        conn.write_all(&get_root(port)).unwrap();
        let last = read_answer(&mut conn, Duration::from_secs(5));
        (small_put, patched, roots, put, mono, last)
    })
    .await
    .unwrap();
    let (small_put, patched, roots, put, mono, last) = answers;
    assert_eq!(
        small_put.status,
        201,
        "{}{}",
        small_put.head,
        small_put.text()
    );
    assert_through(&patched, &roots, &put);
    assert_eq!(mono.status, 201, "{}{}", mono.head, mono.text());
    assert_eq!(
        mono.header("docker-content-digest").as_deref(),
        Some(second_digest.as_str())
    );
    assert!(
        mono.header("location")
            .is_some_and(|l| l.starts_with(&format!("http://127.0.0.1:{port}/v2/up/app/blobs/"))),
        "{}",
        mono.head
    );
    assert_eq!(last.status, 200, "{}", last.head);
    assert_eq!(
        stored(&s, "up/app", &small_digest).await,
        Some(small_digest)
    );
    assert_eq!(
        stored(&s, "up/app", &first_digest).await,
        Some(first_digest)
    );
    assert_eq!(
        stored(&s, "up/app", &second_digest).await,
        Some(second_digest)
    );

    // Spliced, not copied: all but what came with the request's head.
    let spliced = s.metric(SPLICED).await;
    assert!(
        spliced >= 2.0 * (SIZE - 256 * 1024) as f64 && spliced <= 2.0 * SIZE as f64,
        "{spliced} bytes spliced for two uploads of {SIZE}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_mid_upload_gets_408_its_connection_closed_and_nothing_stored() {
    let s = Stack::with(ArchmergeOpts {
        config_toml: Some("[timeouts]\nbody_progress_secs = 1\n".into()),
        ..ArchmergeOpts::default()
    });
    let port = s.proxy.port();
    let blob = Seeded::bytes(13, 4 << 20);
    let digest = digest_of(&blob);
    let d = digest.clone();
    let (answer, took, closed) = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        let at = start_upload(&mut conn, port, "up/stall");
        // A monolithic PUT that sends a quarter of its body, then nothing.
        conn.write_all(&head("PUT", &with_digest(&at, &d), port, blob.len()))
            .unwrap();
        conn.write_all(&blob[..blob.len() / 4]).unwrap();
        let started = Instant::now();
        let answer = read_answer(&mut conn, Duration::from_secs(10));
        let took = started.elapsed();
        // Then the connection ends: nothing more is read from it.
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let closed = matches!(
            std::io::Read::read(&mut conn, &mut [0u8; 64]),
            Ok(0) | Err(_)
        );
        (answer, took, closed)
    })
    .await
    .unwrap();
    assert_eq!(answer.status, 408, "{}{}", answer.head, answer.text());
    assert_eq!(oci_error_codes(&answer.body), ["TOO_MANY_REQUESTS"]);
    assert_eq!(
        answer.header("connection").map(|c| c.to_ascii_lowercase()),
        Some("close".into()),
        "{}",
        answer.head
    );
    assert!(took < Duration::from_secs(5), "the 408 came after {took:?}");
    assert!(
        closed,
        "the connection stayed open after its body broke off"
    );
    assert_eq!(stored(&s, "up/stall", &digest).await, None);

    // archmerge serves on: the same upload, sent whole, is stored.
    let blob = Seeded::bytes(13, 4 << 20);
    put_blob(&http(), &s.proxy.url(), "up/stall", &blob).await;
    assert_eq!(stored(&s, "up/stall", &digest).await, Some(digest));
    assert!(s.metric(SPLICED).await >= (4 << 20) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registrys_refusal_of_a_spliced_upload_reaches_the_client() {
    let s = Stack::new();
    let port = s.proxy.port();
    let registry_port = s.registry.port();
    let blob = Seeded::bytes(14, 8 << 20);
    let wrong = format!("sha256:{}", "0".repeat(64));
    let (mismatch, unknown, direct) = tokio::task::spawn_blocking(move || {
        // A digest that is not the body's: the registry reads it all and
        // says so.
        let mut conn = connect(port);
        let at = start_upload(&mut conn, port, "up/refused");
        let mut put = head("PUT", &with_digest(&at, &wrong), port, blob.len());
        put.extend_from_slice(&blob);
        conn.write_all(&put).unwrap();
        let mismatch = read_answer(&mut conn, Duration::from_secs(20));
        // An upload session the registry never opened, through archmerge
        // and straight to the registry.
        let unknown_session = |port: u16| {
            let mut conn = connect(port);
            let mut writer = conn.try_clone().unwrap();
            let target = "/v2/up/refused/blobs/uploads/6b4d1f5e-0000-4000-8000-000000000000";
            let mut patch = head("PATCH", target, port, blob.len());
            patch.extend_from_slice(&blob);
            let sender = std::thread::spawn(move || {
                let _ = writer.write_all(&patch);
            });
            let answer = read_answer(&mut conn, Duration::from_secs(20));
            drop(conn);
            let _ = sender.join();
            answer
        };
        (
            mismatch,
            unknown_session(port),
            unknown_session(registry_port),
        )
    })
    .await
    .unwrap();
    assert_eq!(mismatch.status, 400, "{}{}", mismatch.head, mismatch.text());
    assert_eq!(oci_error_codes(&mismatch.body), ["DIGEST_INVALID"]);
    assert!(direct.status >= 400, "{}{}", direct.head, direct.text());
    assert_eq!(
        (unknown.status, oci_error_codes(&unknown.body)),
        (direct.status, oci_error_codes(&direct.body)),
        "through archmerge: {}{}",
        unknown.head,
        unknown.text()
    );
}

/// A chunked PATCH of `body` to `at`, then a GET on the same connection.
fn chunked_patch(conn: &mut TcpStream, port: u16, at: &str, body: &[u8]) -> (RawAnswer, RawAnswer) {
    let mut req = format!(
        "PATCH {at} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(32 * 1024) {
        req.extend(format!("{:x}\r\n", chunk.len()).into_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req.extend(get_root(port));
    conn.write_all(&req).unwrap();
    (next_answer(conn), next_answer(conn))
}

/// A chunked body of `body` that a lenient reader and a strict one read
/// alike, with what a client may send: chunks of many sizes (one byte, one
/// of 100,000, docker's 32 KiB), upper- and lower-case hex, an extension,
/// and a trailer field.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (first, rest) = body.split_at(1);
    let (second, rest) = rest.split_at(100_000);
    out.extend_from_slice(b"1;name=value\r\n");
    out.extend_from_slice(first);
    out.extend_from_slice(b"\r\n");
    out.extend(format!("{:X}\r\n", second.len()).into_bytes());
    out.extend_from_slice(second);
    out.extend_from_slice(b"\r\n");
    for chunk in rest.chunks(32 * 1024) {
        out.extend(format!("{:x}\r\n", chunk.len()).into_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\nX-Trailer: done\r\n\r\n");
    out
}

fn chunked_head(method: &str, target: &str, port: u16) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_is_spliced_framing_and_all_and_the_connection_serves_on() {
    // How docker sends a layer: one chunked PATCH. Its first 200,000 bytes
    // come in writes of 1,000, so lines of framing break across pieces;
    // two requests follow it on the connection.
    let s = Stack::new();
    let port = s.proxy.port();
    let blob = Seeded::bytes(24, SIZE);
    let digest = digest_of(&blob);
    let d = digest.clone();
    let (patched, roots, put) = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        conn.set_nodelay(true).unwrap();
        let at = start_upload(&mut conn, port, "up/chunked");
        let mut req = chunked_head("PATCH", &at, port);
        req.extend(chunked(&blob));
        req.extend(get_root(port));
        req.extend(get_root(port));
        let (pieces, whole) = req.split_at(200_000);
        for piece in pieces.chunks(1000) {
            conn.write_all(piece).unwrap();
        }
        conn.write_all(whole).unwrap();
        let patched = next_answer(&mut conn);
        let roots = [next_answer(&mut conn), next_answer(&mut conn)];
        let put = close_upload(&mut conn, port, &patched, &d);
        (patched, roots, put)
    })
    .await
    .unwrap();
    assert_through(&patched, &roots, &put);
    assert_eq!(stored(&s, "up/chunked", &digest).await, Some(digest));
    let spliced = s.metric(SPLICED).await;
    assert!(
        spliced >= (SIZE - 256 * 1024) as f64,
        "only {spliced} bytes of a chunked body of {SIZE} spliced"
    );
}

/// Ends of a chunked body after a good first MiB: a size that is not hex,
/// data longer than its size, and the client ending its side in the middle
/// of a chunk.
const BROKEN_ENDINGS: [(&str, &[u8]); 3] = [
    ("a size that is not hex", b"zz\r\nhello\r\n0\r\n\r\n"),
    ("data past its size", b"2\r\nhello\r\n0\r\n\r\n"),
    ("an end mid-chunk", b"100000\r\nhello"),
];

/// A chunked PATCH of the first MiB of `blob`, then `ending`: the answer,
/// and whether the connection was closed after it.
async fn broken_chunked_upload(port: u16, blob: &[u8], ending: &'static [u8]) -> (RawAnswer, bool) {
    let good = blob[..1 << 20].to_vec();
    tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        let at = start_upload(&mut conn, port, "up/broken");
        let mut req = chunked_head("PATCH", &at, port);
        req.extend(format!("{:x}\r\n", good.len()).into_bytes());
        req.extend_from_slice(&good);
        req.extend_from_slice(b"\r\n");
        conn.write_all(&req).unwrap();
        // The good part is on its way to the registry before the rest
        // comes.
        std::thread::sleep(Duration::from_millis(200));
        conn.write_all(ending).unwrap();
        if ending.ends_with(b"hello") {
            conn.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let answer = read_answer(&mut conn, Duration::from_secs(10));
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let closed = matches!(
            std::io::Read::read(&mut conn, &mut [0u8; 64]),
            Ok(0) | Err(_)
        );
        (answer, closed)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_of_tiny_chunks_is_spliced_whole() {
    // Chunks of 1 to 13 bytes: many lines of framing in each look at the
    // socket, and the body still ends where it ends.
    let s = Stack::new();
    let port = s.proxy.port();
    let blob = Seeded::bytes(27, 1 << 20);
    let digest = digest_of(&blob);
    let d = digest.clone();
    let (patched, root, put) = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        let at = start_upload(&mut conn, port, "up/tiny");
        let mut req = chunked_head("PATCH", &at, port);
        let mut rest = &blob[..];
        let mut size = 0;
        while !rest.is_empty() {
            size = size % 13 + 1;
            let (chunk, after) = rest.split_at(size.min(rest.len()));
            req.extend(format!("{:x}\r\n", chunk.len()).into_bytes());
            req.extend_from_slice(chunk);
            req.extend_from_slice(b"\r\n");
            rest = after;
        }
        req.extend_from_slice(b"0\r\n\r\n");
        req.extend(get_root(port));
        conn.write_all(&req).unwrap();
        let patched = next_answer(&mut conn);
        let root = next_answer(&mut conn);
        let put = close_upload(&mut conn, port, &patched, &d);
        (patched, root, put)
    })
    .await
    .unwrap();
    assert_eq!(patched.status, 202, "{}{}", patched.head, patched.text());
    assert_eq!(root.status, 200, "{}", root.head);
    assert_eq!(put.status, 201, "{}{}", put.head, put.text());
    assert_eq!(stored(&s, "up/tiny", &digest).await, Some(digest));
    assert!(s.metric(SPLICED).await >= (1 << 20) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_chunked_upload_whose_framing_breaks_gets_400_too_and_nothing_stored() {
    // The copying path (zero_copy_uploads = false, as for TLS): the client's
    // broken body is the client's fault, not an unreachable registry.
    let s = Stack::with(ArchmergeOpts {
        config_toml: Some("zero_copy_uploads = false\n".into()),
        ..ArchmergeOpts::default()
    });
    let blob = Seeded::bytes(26, 2 << 20);
    for (what, ending) in BROKEN_ENDINGS {
        let (answer, closed) = broken_chunked_upload(s.proxy.port(), &blob, ending).await;
        assert_eq!(
            (answer.status, oci_error_codes(&answer.body)),
            (400, vec!["BLOB_UPLOAD_INVALID".to_owned()]),
            "{what}: {}{}",
            answer.head,
            answer.text()
        );
        assert!(closed, "{what}: the connection stayed open");
    }
    assert_eq!(stored(&s, "up/broken", &digest_of(&blob)).await, None);
    assert_eq!(s.metric(SPLICED).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_whose_framing_breaks_gets_400_its_connection_closed_and_nothing_stored() {
    let s = Stack::new();
    let port = s.proxy.port();
    let blob = Seeded::bytes(25, 2 << 20);
    let digest = digest_of(&blob);
    for (what, ending) in BROKEN_ENDINGS {
        let (answer, closed) = broken_chunked_upload(port, &blob, ending).await;
        assert_eq!(
            answer.status,
            400,
            "{what}: {}{}",
            answer.head,
            answer.text()
        );
        assert_eq!(
            oci_error_codes(&answer.body),
            ["BLOB_UPLOAD_INVALID"],
            "{what}"
        );
        assert_eq!(
            answer.header("connection").map(|c| c.to_ascii_lowercase()),
            Some("close".into()),
            "{what}: {}",
            answer.head
        );
        assert!(closed, "{what}: the connection stayed open");
    }
    assert_eq!(stored(&s, "up/broken", &digest).await, None);
    assert!(
        s.metric(SPLICED).await >= (3 * ((1 << 20) - 64 * 1024)) as f64,
        "the good first MiBs were not spliced"
    );

    // Framing that breaks in what came with the head: refused before the
    // registry is asked.
    let early = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        let at = start_upload(&mut conn, port, "up/broken");
        let mut req = chunked_head("PATCH", &at, port);
        req.extend_from_slice(b"5\r\nhello\r\nzz\r\n");
        conn.write_all(&req).unwrap();
        read_answer(&mut conn, Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert_eq!(
        (early.status, oci_error_codes(&early.body)),
        (400, vec!["BLOB_UPLOAD_INVALID".to_owned()]),
        "{}{}",
        early.head,
        early.text()
    );
    assert!(early.text().contains("not hexadecimal"), "{}", early.text());

    // archmerge serves on: the same blob, chunked, is stored.
    let b = blob.clone();
    let (patched, put) = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        let at = start_upload(&mut conn, port, "up/broken");
        let (patched, _) = chunked_patch(&mut conn, port, &at, &b);
        let put = close_upload(&mut conn, port, &patched, &digest_of(&b));
        (patched, put)
    })
    .await
    .unwrap();
    assert_eq!(patched.status, 202, "{}{}", patched.head, patched.text());
    assert_eq!(put.status, 201, "{}{}", put.head, put.text());
    assert_eq!(stored(&s, "up/broken", &digest).await, Some(digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_chunked_http2_and_zero_copy_off_uploads_are_copied_and_stored_the_same() {
    // A small chunked body that comes whole with its head (docker's image
    // config): read the ordinary way, and the connection serves on.
    let s = Stack::new();
    let port = s.proxy.port();
    let blob = Seeded::bytes(15, 1199);
    let digest = digest_of(&blob);
    let (b, d) = (blob.clone(), digest.clone());
    let (patched, root, put) = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        let at = start_upload(&mut conn, port, "up/chunked");
        let (patched, root) = chunked_patch(&mut conn, port, &at, &b);
        let put = close_upload(&mut conn, port, &patched, &d);
        (patched, root, put)
    })
    .await
    .unwrap();
    assert_eq!(patched.status, 202, "{}{}", patched.head, patched.text());
    assert_eq!(root.status, 200, "{}", root.head);
    assert_eq!(put.status, 201, "{}{}", put.head, put.text());
    assert_eq!(
        stored(&s, "up/chunked", &digest).await,
        Some(digest.clone())
    );
    assert_eq!(
        s.metric(SPLICED).await,
        0.0,
        "a small chunked body was spliced"
    );

    // HTTP/2 (prior knowledge) on an archmerge that splices HTTP/1.1.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let blob = Seeded::bytes(16, 3 << 20);
    let digest = put_blob(&h2, &s.proxy.url(), "up/h2", &blob).await;
    assert_eq!(stored(&s, "up/h2", &digest).await, Some(digest));
    assert_eq!(s.metric(SPLICED).await, 0.0, "spliced over HTTP/2");

    // zero_copy_uploads = false.
    let s = Stack::with(ArchmergeOpts {
        config_toml: Some("zero_copy_uploads = false\n".into()),
        ..ArchmergeOpts::default()
    });
    let blob = Seeded::bytes(17, 3 << 20);
    let digest = put_blob(&http(), &s.proxy.url(), "up/off", &blob).await;
    assert_eq!(stored(&s, "up/off", &digest).await, Some(digest));
    assert_eq!(
        s.metric(SPLICED).await,
        0.0,
        "spliced with zero_copy_uploads = false"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_pipelined_behind_a_download_waits_for_it_and_both_arrive_whole() {
    let s = Stack::new();
    let port = s.proxy.port();
    let pulled = Seeded::bytes(18, SIZE);
    let pulled_digest = put_blob(&http(), &s.registry.url(), "up/pipe", &pulled).await;
    let pushed = Seeded::bytes(19, SIZE);
    let pushed_digest = digest_of(&pushed);
    let (pd, d) = (pulled_digest.clone(), pushed_digest.clone());
    let (download, patched, put) = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        let at = start_upload(&mut conn, port, "up/pipe");
        // A blob GET (spliced to the client while its answer is written)
        // and, in the same write, a PATCH whose body is spliced the other
        // way: the PATCH's head arrives while the GET's answer is on its
        // way.
        let mut both =
            format!("GET /v2/up/pipe/blobs/{pd} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
                .into_bytes();
        both.extend(head("PATCH", &at, port, pushed.len()));
        both.extend_from_slice(&pushed);
        let mut writer = conn.try_clone().unwrap();
        let sender = std::thread::spawn(move || writer.write_all(&both));
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let download = read_hashed_answer(&mut conn);
        let patched = next_answer(&mut conn);
        sender.join().unwrap().unwrap();
        let at = session(&patched, port);
        conn.write_all(&head("PUT", &with_digest(&at, &d), port, 0))
            .unwrap();
        (
            download,
            patched,
            read_answer(&mut conn, Duration::from_secs(10)),
        )
    })
    .await
    .unwrap();
    let download = download.unwrap_or_else(|(head, got)| panic!("cut off after {got}: {head}"));
    assert_eq!(download.status, 200, "{}", download.head);
    assert_eq!(download.len, SIZE);
    assert_eq!(download.digest, pulled_digest);
    assert_eq!(patched.status, 202, "{}{}", patched.head, patched.text());
    assert_eq!(put.status, 201, "{}{}", put.head, put.text());
    assert_eq!(
        stored(&s, "up/pipe", &pushed_digest).await,
        Some(pushed_digest)
    );
    assert!(s.metric(SPLICED).await >= (SIZE - 256 * 1024) as f64);
    assert!(s.metric("archmerge_spliced_bytes_total").await >= (SIZE - 64 * 1024) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pushes_a_layer_spliced_and_the_merged_tag_pulls_it_back_whole() {
    // skopeo (containers/image, as podman and buildah) sends each blob with
    // its length: spliced. (docker sends chunked PATCHes, spliced too: see
    // `a_chunked_upload_is_spliced_framing_and_all_and_the_connection_serves_on`.)
    let s = Stack::new();
    let layout = build_oci_layout(
        &ImageSpec::new("linux", "amd64").layer(21, 3 << 20),
        "x86_64_v1",
    );
    let host = s.proxy.host();
    let pushed = {
        let dest = format!("{host}/up/skopeo:x86_64_v1");
        let layout = &layout;
        tokio::task::block_in_place(|| skopeo_push(layout, &dest, Format::Source))
    };
    for digest in layout.blob_digests() {
        assert_eq!(
            stored(&s, "up/skopeo", &digest).await,
            Some(digest.clone()),
            "a blob skopeo pushed is not stored as it was"
        );
    }
    let spliced = s.metric(SPLICED).await;
    assert!(
        spliced >= ((3 << 20) - 256 * 1024) as f64,
        "only {spliced} bytes of a 3 MiB layer spliced"
    );
    // The merged tag serves the pushed image to an amd64 pull.
    let pulled = tokio::task::block_in_place(|| {
        skopeo_pull(
            &format!("{host}/up/skopeo:v1"),
            Some(("linux", "amd64", None)),
        )
    });
    assert_eq!(pulled.manifest_digest, pushed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_sent_in_many_small_writes_is_spliced_whole() {
    // Thousands of small segments: the body arrives in as many pieces as
    // the kernel keeps apart, and still goes through whole.
    let s = Stack::new();
    let port = s.proxy.port();
    let blob = Seeded::bytes(22, 2 << 20);
    let digest = digest_of(&blob);
    let d = digest.clone();
    let (patched, put) = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        conn.set_nodelay(true).unwrap();
        let at = start_upload(&mut conn, port, "up/small-writes");
        conn.write_all(&head("PATCH", &at, port, blob.len()))
            .unwrap();
        for piece in blob.chunks(200) {
            conn.write_all(piece).unwrap();
        }
        let patched = next_answer(&mut conn);
        let at = session(&patched, port);
        conn.write_all(&head("PUT", &with_digest(&at, &d), port, 0))
            .unwrap();
        (patched, next_answer(&mut conn))
    })
    .await
    .unwrap();
    assert_eq!(patched.status, 202, "{}", patched.head);
    assert_eq!(put.status, 201, "{}", put.head);
    assert_eq!(stored(&s, "up/small-writes", &digest).await, Some(digest));
    assert!(s.metric(SPLICED).await >= ((2 << 20) - 256 * 1024) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ends_its_body_early_gets_400_and_nothing_is_stored() {
    let s = Stack::new();
    let port = s.proxy.port();
    let blob = Seeded::bytes(23, 4 << 20);
    let digest = digest_of(&blob);
    let d = digest.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        let at = start_upload(&mut conn, port, "up/short");
        // A monolithic PUT that sends half its body, then ends its side of
        // the connection (and waits for the answer).
        conn.write_all(&head("PUT", &with_digest(&at, &d), port, blob.len()))
            .unwrap();
        conn.write_all(&blob[..blob.len() / 2]).unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        read_answer(&mut conn, Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert_eq!(answer.status, 400, "{}{}", answer.head, answer.text());
    assert_eq!(oci_error_codes(&answer.body), ["BLOB_UPLOAD_INVALID"]);
    assert_eq!(
        answer.header("connection").map(|c| c.to_ascii_lowercase()),
        Some("close".into()),
        "{}",
        answer.head
    );
    assert_eq!(stored(&s, "up/short", &digest).await, None);
}
