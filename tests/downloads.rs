//! Blob downloads: whichever way archmerge moves a blob's bytes (spliced
//! from socket to socket on a plaintext HTTP/1.1 connection, copied for
//! HTTP/2, TLS or when zero-copy is off), the client gets the registry's
//! bytes exactly, its connection serves on, and a registry that stalls or
//! breaks off mid-blob ends the download instead of hanging it.
//!
//! archmerge runs in front of the real registry; the client speaks raw
//! HTTP/1.1 over a socket, so what is on the wire is what is checked.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

/// The blob: large enough to need many pipe-fulls, not a multiple of one.
const SIZE: usize = 24 * 1024 * 1024 + 12_345;

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes()
}

/// A manifest GET, accepting what [`media::OCI_MANIFEST`] images are.
fn get_manifest(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {}\r\n\r\n",
        media::OCI_MANIFEST
    )
    .into_bytes()
}

fn connect(port: u16) -> TcpStream {
    let conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn
}

/// One GET on a fresh connection, read whole.
async fn download(port: u16, path: String) -> HashedAnswer {
    tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        conn.write_all(&get(&path)).unwrap();
        read_hashed_answer(&mut conn)
    })
    .await
    .unwrap()
    .unwrap_or_else(cut_off)
}

fn cut_off((head, got): (String, usize)) -> HashedAnswer {
    panic!("cut off after {got} body bytes: {head}")
}

/// Answers read whole, or a panic that says where one was cut off.
fn whole(answers: Vec<Result<HashedAnswer, (String, usize)>>) -> Vec<HashedAnswer> {
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(cut_off))
        .collect()
}

/// A blob of [`SIZE`] pushed straight to the registry; its digest.
async fn pushed_blob(s: &Stack, repo: &str, seed: u64) -> String {
    put_blob(&http(), &s.registry.url(), repo, &Seeded::bytes(seed, SIZE)).await
}

const SPLICED: &str = "archmerge_spliced_bytes_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_is_spliced_to_a_plain_http11_client_byte_for_byte_and_the_connection_serves_on() {
    let s = Stack::new();
    let first = pushed_blob(&s, "dl/app", 1).await;
    let second = pushed_blob(&s, "dl/app", 2).await;
    let small = put_blob(&http(), &s.registry.url(), "dl/app", b"a small blob").await;
    let port = s.proxy.port();
    let unknown = format!("sha256:{}", "0".repeat(64));

    let (a, b, c) = (first.clone(), second.clone(), small.clone());
    let answers = tokio::task::spawn_blocking(move || {
        let (first, second, small) = (a, b, c);
        let mut conn = connect(port);
        // One at a time, then three pipelined in one write: a blob, an
        // unknown blob (the registry's 404 passes as it is), another blob,
        // then the API root on the same connection.
        conn.write_all(&get(&format!("/v2/dl/app/blobs/{first}")))
            .unwrap();
        let mut answers = vec![read_hashed_answer(&mut conn)];
        let mut pipelined = get(&format!("/v2/dl/app/blobs/{small}"));
        pipelined.extend(get(&format!("/v2/dl/app/blobs/{unknown}")));
        pipelined.extend(get(&format!("/v2/dl/app/blobs/{second}")));
        pipelined.extend(get("/v2/"));
        conn.write_all(&pipelined).unwrap();
        for _ in 0..4 {
            answers.push(read_hashed_answer(&mut conn));
        }
        answers
    })
    .await
    .unwrap();
    let answers = whole(answers);
    for (a, digest) in [(&answers[0], &first), (&answers[3], &second)] {
        assert_eq!(a.status, 200, "{}", a.head);
        assert_eq!(a.len, SIZE, "{}", a.head);
        assert_eq!(&a.digest, digest, "the blob came back altered");
        assert!(
            a.head
                .to_ascii_lowercase()
                .contains(&format!("docker-content-digest: {digest}")),
            "{}",
            a.head
        );
    }
    assert_eq!(answers[1].status, 200, "{}", answers[1].head);
    assert_eq!(answers[1].digest, small);
    assert_eq!(answers[2].status, 404, "{}", answers[2].head);
    assert_eq!(answers[4].status, 200, "{}", answers[4].head);

    // Spliced, not copied: all but what came with the registry's head.
    let spliced = s.metric(SPLICED).await;
    assert!(
        spliced >= 2.0 * (SIZE - 64 * 1024) as f64 && spliced <= 2.0 * SIZE as f64,
        "{spliced} bytes spliced for two blobs of {SIZE}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_get_takes_the_zero_copy_way_too_and_comes_back_exactly() {
    let s = Stack::new();
    let registry = s.registry.url();
    let image = push_small_image(&http(), &registry, "dl/man", "small", "amd64", 7).await;
    // A manifest far larger than what comes with the registry's head, so
    // most of it is spliced.
    let mut big: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
    big["annotations"] = serde_json::json!({ "org.example.filler": "f".repeat(900_000) });
    let big = serde_json::to_vec(&big).unwrap();
    let res = put_manifest(
        &http(),
        &registry,
        "dl/man",
        "big",
        media::OCI_MANIFEST,
        &big,
    )
    .await;
    assert_eq!(
        res.status(),
        201,
        "{}",
        res.text().await.unwrap_or_default()
    );
    let big_digest = digest_of(&big);
    let port = s.proxy.port();

    let by_digest = big_digest.clone();
    let answers = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        let mut pipelined = get_manifest("/v2/dl/man/manifests/big");
        pipelined.extend(get_manifest("/v2/dl/man/manifests/small"));
        pipelined.extend(get_manifest("/v2/dl/man/manifests/unknown"));
        pipelined.extend(get_manifest(&format!("/v2/dl/man/manifests/{by_digest}")));
        pipelined.extend(get("/v2/"));
        conn.write_all(&pipelined).unwrap();
        (0..5)
            .map(|_| read_hashed_answer(&mut conn))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let answers = whole(answers);
    for (a, bytes) in [
        (&answers[0], &big),
        (&answers[1], &image.manifest),
        (&answers[3], &big),
    ] {
        let digest = digest_of(bytes);
        assert_eq!(a.status, 200, "{}", a.head);
        assert_eq!((a.len, &a.digest), (bytes.len(), &digest), "{}", a.head);
        let head = a.head.to_ascii_lowercase();
        assert!(
            head.contains(&format!("docker-content-digest: {digest}")),
            "{head}"
        );
        assert!(
            head.contains(&format!("content-type: {}", media::OCI_MANIFEST)),
            "{head}"
        );
    }
    assert_eq!(answers[2].status, 404, "{}", answers[2].head);
    assert_eq!(answers[4].status, 200, "{}", answers[4].head);

    // Spliced, not copied: all but what came with the registry's head.
    let spliced = s.metric(SPLICED).await;
    assert!(
        spliced >= 2.0 * (big.len() - 64 * 1024) as f64 && spliced <= 2.0 * big.len() as f64,
        "{spliced} bytes spliced for two manifests of {}",
        big.len()
    );

    // A HEAD goes the ordinary way and says the same.
    let head = http()
        .head(format!("{}/v2/dl/man/manifests/big", s.proxy.url()))
        .header("accept", media::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-length"), Some(big.len().to_string()));
    assert_eq!(header(&head, "docker-content-digest"), Some(big_digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_zero_copy_downloads_off_or_over_http2_the_same_bytes_are_copied() {
    let s = Stack::with(ArchmergeOpts {
        config_toml: Some("zero_copy_downloads = false\n".into()),
        ..ArchmergeOpts::default()
    });
    let digest = pushed_blob(&s, "dl/off", 3).await;
    let port = s.proxy.port();
    let a = download(port, format!("/v2/dl/off/blobs/{digest}")).await;
    assert_eq!((a.status, a.len), (200, SIZE), "{}", a.head);
    assert_eq!(a.digest, digest);
    assert_eq!(
        s.metric(SPLICED).await,
        0.0,
        "spliced with zero_copy_downloads = false"
    );

    // HTTP/2 (prior knowledge) on an archmerge that splices HTTP/1.1.
    let s = Stack::new();
    let digest = pushed_blob(&s, "dl/h2", 4).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let res = h2
        .get(format!("{}/v2/dl/h2/blobs/{digest}", s.proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    let body = res.bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
    assert_eq!(s.metric(SPLICED).await, 0.0, "spliced over HTTP/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_stalls_mid_blob_ends_the_download_after_upstream_headers_secs() {
    stalled_download("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_stalls_mid_blob_ends_a_copied_download_too() {
    stalled_download("zero_copy_downloads = false\n").await;
}

/// A download whose registry stops after the first MiB (with `toml` in
/// archmerge's config) ends within a few seconds, short; the blob then
/// comes whole.
async fn stalled_download(toml: &str) {
    let s = Stack::with(ArchmergeOpts {
        config_toml: Some(format!("{toml}[timeouts]\nupstream_headers_secs = 2\n")),
        ..ArchmergeOpts::default()
    });
    let digest = pushed_blob(&s, "dl/stall", 5).await;
    let port = s.proxy.port();
    let registry = s.registry.pid();
    let path = format!("/v2/dl/stall/blobs/{digest}");
    let (outcome, stalled_for) = tokio::task::spawn_blocking(move || {
        let mut conn = connect(port);
        conn.write_all(&get(&path)).unwrap();
        // Read the head and a first MiB, then stop the registry: what the
        // kernel holds of its writes still arrives, then nothing does.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            conn.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let mut first = vec![0u8; 1 << 20];
        conn.read_exact(&mut first).unwrap();
        signal(registry, "STOP");
        let stopped = Instant::now();
        let mut rest = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        let outcome = loop {
            match conn.read(&mut buf) {
                Ok(0) => break Ok(rest),
                Ok(n) => rest += n,
                Err(e) => break Err(e.kind()),
            }
        };
        let stalled_for = stopped.elapsed();
        signal(registry, "CONT");
        (outcome, stalled_for)
    })
    .await
    .unwrap();
    let got =
        outcome.unwrap_or_else(|e| panic!("the download was neither ended nor finished: {e:?}"));
    assert!(
        got + (1 << 20) < SIZE,
        "the whole blob came although the registry was stopped ({got} bytes after the first MiB)"
    );
    assert!(
        stalled_for < Duration::from_secs(8),
        "a stalled registry held the download {stalled_for:?} (upstream_headers_secs = 2)"
    );
    // The registry, running again, serves the blob whole through archmerge.
    let port = s.proxy.port();
    let again = download(port, format!("/v2/dl/stall/blobs/{digest}")).await;
    assert_eq!(again.digest, digest);
}

fn signal(pid: u32, which: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{which}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{which} {pid}");
}
