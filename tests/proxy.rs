//! Issue 2: archmerge in front of a real registry is invisible.
//!
//! Every test starts its own `docker-registry` on a free port with archmerge
//! in front of it and acts as a user of the registry would: push and pull
//! with skopeo, inspect with docker, or speak the distribution API over raw
//! HTTP. What comes back through archmerge must be what the registry would
//! have said, byte for byte — except `Location`, which names archmerge.
//! A scripted fake upstream covers what a real registry cannot be told to do.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

impl Stack {
    /// `http://archmerge/v2/<path>`, a URL through archmerge.
    fn v2_via(&self, path: &str) -> String {
        format!("{}/v2/{path}", self.proxy.url())
    }

    /// `http://registry/v2/<path>`, a URL straight to the registry.
    fn v2_direct(&self, path: &str) -> String {
        format!("{}/v2/{path}", self.registry.url())
    }
}

// === real clients ===

#[test]
fn skopeo_push_and_pull_through_archmerge_are_byte_identical() {
    let s = Stack::new();
    // 3 MiB + 5 MiB of real tar layers.
    let image = build_oci_layout(
        &ImageSpec::new("linux", "amd64")
            .layer(1, 3 << 20)
            .layer(2, 5 << 20),
        "v1",
    );
    let via = format!("{}/demo/app:v1", s.proxy.host());

    let pushed = skopeo_push(&image, &via, Format::Source);
    assert_eq!(
        pushed, image.manifest_digest,
        "skopeo stored another manifest"
    );

    // The registry holds exactly the manifest we built …
    let stored = skopeo_inspect_raw(&format!("{}/demo/app:v1", s.registry.host()));
    assert_eq!(stored, image.manifest);
    // … and archmerge serves those bytes, by tag and by digest.
    assert_eq!(skopeo_inspect_raw(&via), image.manifest);
    let by_digest = format!("{}/demo/app@{}", s.proxy.host(), image.manifest_digest);
    assert_eq!(skopeo_inspect_raw(&by_digest), image.manifest);

    let pulled = skopeo_pull(&via, None);
    assert_eq!(pulled.manifest_digest, image.manifest_digest);
    assert_eq!(pulled.verified_blob_digests(), image.blob_digests());
    for d in image.blob_digests() {
        assert!(
            pulled.blob(&d) == std::fs::read(image.blob_path(&d)).unwrap(),
            "blob {d} differs from what was pushed"
        );
    }
}

#[test]
fn docker_manifest_inspect_through_archmerge_shows_a_schema2_push() {
    let s = Stack::new();
    let image = build_oci_layout(
        &ImageSpec::new("linux", "arm64")
            .variant("v8")
            .layer(3, 64 << 10),
        "v1",
    );
    let via = format!("{}/demo/schema2:v1", s.proxy.host());
    let digest = skopeo_push(&image, &via, Format::V2s2);

    let stored = skopeo_inspect_raw(&format!("{}/demo/schema2:v1", s.registry.host()));
    assert_eq!(digest_of(&stored), digest);
    let stored: Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(stored["mediaType"], media::DOCKER_MANIFEST);

    for reference in [
        via.clone(),
        format!("{}/demo/schema2@{digest}", s.proxy.host()),
    ] {
        let shown = docker_manifest_inspect(&reference);
        assert_eq!(shown["mediaType"], media::DOCKER_MANIFEST, "{reference}");
        assert_eq!(shown["config"], stored["config"], "{reference}");
        assert_eq!(shown["layers"], stored["layers"], "{reference}");
    }
}

// === uploads ===

#[tokio::test]
async fn chunked_upload_with_content_range_then_put_with_digest() {
    let s = Stack::new();
    let c = http();
    let data = Seeded::bytes(10, 300_000);
    let digest = digest_of(&data);

    let res = c
        .post(s.v2_via("chunked/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert!(header(&res, "docker-upload-uuid").is_some());
    let mut url = location(&res);
    let prefix = format!("{}/v2/chunked/app/blobs/uploads/", s.proxy.url());
    assert!(
        url.starts_with(&prefix),
        "Location {url} does not name archmerge"
    );

    for (start, end) in [(0usize, 100_000usize), (100_000, 300_000)] {
        let res = c
            .patch(&url)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header("content-range", format!("{}-{}", start, end - 1))
            .body(data[start..end].to_vec())
            .send()
            .await
            .unwrap();
        let range = header(&res, "range");
        url = location(&res);
        expect_status(res, 202).await;
        assert_eq!(range.as_deref(), Some(&*format!("0-{}", end - 1)));
        assert!(
            url.starts_with(&prefix),
            "Location {url} does not name archmerge"
        );
    }

    let res = c.put(with_digest(&url, &digest)).send().await.unwrap();
    assert_eq!(
        header(&res, "docker-content-digest").as_deref(),
        Some(&*digest)
    );
    let blob_url = location(&res);
    expect_status(res, 201).await;
    assert_eq!(blob_url, s.v2_via(&format!("chunked/app/blobs/{digest}")));

    let back = c.get(&blob_url).send().await.unwrap();
    assert_eq!(expect_status(back, 200).await, data);
}

#[tokio::test]
async fn monolithic_uploads_post_then_put_and_single_post() {
    let s = Stack::new();
    let c = http();

    // POST for a session, then one PUT carrying the whole blob.
    let data = Seeded::bytes(11, 200_000);
    let digest = digest_of(&data);
    let res = c
        .post(s.v2_via("mono/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let url = location(&res);
    expect_status(res, 202).await;
    let res = c
        .put(with_digest(&url, &digest))
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&res, "docker-content-digest").as_deref(),
        Some(&*digest)
    );
    expect_status(res, 201).await;
    let back = c
        .get(s.v2_direct(&format!("mono/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        expect_status(back, 200).await,
        data,
        "the registry stored other bytes"
    );

    // A single POST with ?digest= and the body: distribution 2.8 does not
    // implement it (it opens a session and ignores the body), so archmerge
    // must answer exactly what the registry answers: 202, Range 0-0, and a
    // Location naming archmerge where the upload goes on.
    let data = Seeded::bytes(12, 70_000);
    let digest = digest_of(&data);
    let single = |base: String| {
        c.post(format!("{base}/v2/mono/blobs/uploads/?digest={digest}"))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(data.clone())
            .send()
    };
    let direct = single(s.registry.url()).await.unwrap();
    let res = single(s.proxy.url()).await.unwrap();
    assert_eq!(res.status(), direct.status());
    assert_eq!(header(&res, "range"), header(&direct, "range"));
    if res.status() == StatusCode::ACCEPTED {
        let url = location(&res);
        assert!(url.starts_with(&s.v2_via("mono/blobs/uploads/")), "{url}");
        let res = c
            .put(with_digest(&url, &digest))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        expect_status(res, 201).await;
    } else {
        expect_status(res, 201).await;
    }
    let back = c
        .get(s.v2_via(&format!("mono/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(expect_status(back, 200).await, data);
}

#[tokio::test]
async fn cross_repository_mount_answers_201() {
    let s = Stack::new();
    let c = http();
    let data = Seeded::bytes(13, 50_000);
    let digest = put_blob(&c, &s.proxy.url(), "team/a", &data).await;

    let res = c
        .post(s.v2_via(&format!("team/b/blobs/uploads/?mount={digest}&from=team/a")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&res, "docker-content-digest").as_deref(),
        Some(&*digest)
    );
    let url = location(&res);
    expect_status(res, 201).await;
    assert_eq!(url, s.v2_via(&format!("team/b/blobs/{digest}")));

    let res = c.head(&url).send().await.unwrap();
    assert_eq!(res.status(), 200, "the mounted blob is not in team/b");
}

// === reads ===

#[tokio::test]
async fn range_get_returns_206_with_the_exact_bytes() {
    let s = Stack::new();
    let c = http();
    let data = Seeded::bytes(14, 100_000);
    let digest = put_blob(&c, &s.proxy.url(), "ranges", &data).await;
    let url = s.v2_via(&format!("ranges/blobs/{digest}"));

    let res = c
        .get(&url)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&res, "content-range").as_deref(),
        Some("bytes 1000-1999/100000")
    );
    assert_eq!(expect_status(res, 206).await, data[1000..2000]);

    let res = c
        .get(&url)
        .header("range", "bytes=99000-")
        .send()
        .await
        .unwrap();
    assert_eq!(expect_status(res, 206).await, data[99_000..]);
}

#[tokio::test]
async fn head_blob_has_the_real_content_length_and_no_body() {
    let s = Stack::new();
    let c = http();
    let data = Seeded::bytes(15, 123_457);
    let digest = put_blob(&c, &s.proxy.url(), "heads", &data).await;

    let res = c
        .head(s.v2_via(&format!("heads/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-length").as_deref(), Some("123457"));
    assert_eq!(
        header(&res, "docker-content-digest").as_deref(),
        Some(&*digest)
    );

    // On the wire: the head, then nothing before the server closes.
    let mut sock = tokio::net::TcpStream::connect(s.proxy.host())
        .await
        .unwrap();
    let req = format!(
        "HEAD /v2/heads/blobs/{digest} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        s.proxy.host()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut raw))
        .await
        .expect("archmerge kept the connection open after HEAD with Connection: close")
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    let end = text.find("\r\n\r\n").expect("a complete response head") + 4;
    assert!(
        text.to_ascii_lowercase()
            .contains("content-length: 123457\r\n"),
        "{text}"
    );
    assert_eq!(raw.len(), end, "bytes after the HEAD response head: {text}");
}

#[tokio::test]
async fn manifests_honour_every_accept_line_etags_and_delete() {
    let s = Stack::new();
    let c = http();
    let img = push_small_image(&c, &s.proxy.url(), "accept/app", "v1", "amd64", 16).await;

    // Two Accept lines: distribution only serves an OCI manifest to a
    // client that lists the OCI type, so the second line must arrive.
    let res = c
        .get(s.v2_via("accept/app/manifests/v1"))
        .header("accept", media::DOCKER_MANIFEST)
        .header("accept", media::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&res, "content-type").as_deref(),
        Some(media::OCI_MANIFEST)
    );
    assert_eq!(
        header(&res, "docker-content-digest").as_deref(),
        Some(&*img.digest)
    );
    assert_eq!(expect_status(res, 200).await, img.manifest);

    // HEAD: the real length and digest.
    let res = c
        .head(s.v2_via("accept/app/manifests/v1"))
        .header("accept", media::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        header(&res, "content-length"),
        Some(img.manifest.len().to_string())
    );

    // If-None-Match with the digest → 304, as the registry says.
    let res = c
        .get(s.v2_via("accept/app/manifests/v1"))
        .header("accept", media::OCI_MANIFEST)
        .header("if-none-match", format!("\"{}\"", img.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 304);

    // Delete by digest passes through, and the manifest is gone.
    let res = c
        .delete(s.v2_via(&format!("accept/app/manifests/{}", img.digest)))
        .send()
        .await
        .unwrap();
    expect_status(res, 202).await;
    let res = c
        .get(s.v2_direct(&format!("accept/app/manifests/{}", img.digest)))
        .header("accept", media::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn tags_list_and_catalog_are_the_registrys() {
    let s = Stack::new();
    let c = http();
    let base = s.proxy.url();
    push_small_image(&c, &base, "lists/one", "v1", "amd64", 17).await;
    push_small_image(&c, &base, "lists/one", "v2", "amd64", 18).await;
    push_small_image(&c, &base, "lists/two", "v1", "amd64", 19).await;

    let res = c.get(s.v2_via("lists/one/tags/list")).send().await.unwrap();
    let body = expect_status(res, 200).await;
    let tags: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(tags["name"], "lists/one");
    let mut names: Vec<_> = tags["tags"].as_array().unwrap().iter().collect();
    names.sort_by_key(|v| v.as_str().unwrap().to_owned());
    assert_eq!(names, ["v1", "v2"]);
    let direct = c
        .get(s.v2_direct("lists/one/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(expect_status(direct, 200).await, body);

    for path in ["_catalog", "_catalog?n=1"] {
        let res = c.get(s.v2_via(path)).send().await.unwrap();
        let link = header(&res, "link");
        let body = expect_status(res, 200).await;
        let direct = c.get(s.v2_direct(path)).send().await.unwrap();
        assert_eq!(header(&direct, "link"), link, "{path}: Link differs");
        assert_eq!(expect_status(direct, 200).await, body, "{path}");
    }
    let res = c.get(s.v2_via("_catalog")).send().await.unwrap();
    let catalog: Value = serde_json::from_slice(&expect_status(res, 200).await).unwrap();
    assert_eq!(
        catalog["repositories"],
        serde_json::json!(["lists/one", "lists/two"])
    );
}

// === errors ===

#[tokio::test]
async fn registry_errors_pass_through_unchanged() {
    let s = Stack::new();
    let c = http();
    for (method, path) in [
        ("GET", "nothing/here/manifests/latest"),
        ("GET", "nothing/here/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000"),
        ("GET", "nothing/here/tags/list"),
        ("DELETE", "nothing/here/manifests/sha256:1111111111111111111111111111111111111111111111111111111111111111"),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let via = c.request(m.clone(), s.v2_via(path)).send().await.unwrap();
        let direct = c.request(m, s.v2_direct(path)).send().await.unwrap();
        assert_eq!(via.status(), direct.status(), "{method} {path}");
        assert_eq!(header(&via, "content-type"), header(&direct, "content-type"));
        let (via, direct) = (via.bytes().await.unwrap(), direct.bytes().await.unwrap());
        assert_eq!(via, direct, "{method} {path}: body differs");
    }
    let res = c
        .get(s.v2_via("nothing/here/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(
        oci_error_codes(&res.bytes().await.unwrap()),
        ["MANIFEST_UNKNOWN"]
    );
}

#[tokio::test]
async fn registry_down_gives_502_unavailable() {
    // Nothing listens on the upstream port.
    let proxy = spawn_archmerge(&format!("http://127.0.0.1:{}", free_port()));
    let c = http();
    for path in ["/v2/", "/v2/app/manifests/v1", "/v2/app/tags/list"] {
        let res = c
            .get(format!("{}{path}", proxy.url()))
            .send()
            .await
            .unwrap();
        let body = expect_status(res, 502).await;
        assert_eq!(oci_error_codes(&body), ["UNAVAILABLE"], "{path}");
    }

    // A registry that goes away under a running archmerge.
    let mut s = Stack::new();
    let res = c.get(s.v2_via("")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    s.registry.kill();
    let res = c.get(s.v2_via("app/manifests/v1")).send().await.unwrap();
    let body = expect_status(res, 502).await;
    assert_eq!(oci_error_codes(&body), ["UNAVAILABLE"]);
}

// === headers and Location ===

#[tokio::test]
async fn upload_locations_name_archmerge_or_its_public_url() {
    let s = Stack::new();
    let c = http();
    let res = c.post(s.v2_via("loc/blobs/uploads/")).send().await.unwrap();
    let url = location(&res);
    assert!(url.starts_with(&s.v2_via("loc/blobs/uploads/")), "{url}");
    assert!(
        !url.contains(&s.registry.host()),
        "{url} names the registry"
    );

    let public = spawn_archmerge_with(
        &s.registry.url(),
        ArchmergeOpts {
            args: vec!["--public-url".into(), "https://registry.example.com".into()],
            ..Default::default()
        },
    );
    let res = c
        .post(format!("{}/v2/loc/blobs/uploads/", public.url()))
        .send()
        .await
        .unwrap();
    let url = location(&res);
    assert!(
        url.starts_with("https://registry.example.com/v2/loc/blobs/uploads/"),
        "{url}"
    );
}

#[tokio::test]
async fn a_clients_own_forwarded_header_never_names_the_upload_location() {
    // distribution builds the upload `Location` from RFC 7239 `Forwarded`
    // ahead of `X-Forwarded-*`: a client's own must not reach it, or the
    // registry would send the next PATCH/PUT of the upload somewhere else.
    let s = Stack::new();
    let public = spawn_archmerge_with(
        &s.registry.url(),
        ArchmergeOpts {
            args: vec!["--public-url".into(), "https://registry.example.com".into()],
            ..Default::default()
        },
    );
    let c = http();
    let forged: [&[(&str, &str)]; 3] = [
        &[("forwarded", "host=evil.example;proto=https")],
        &[
            (
                "forwarded",
                r#"for=192.0.2.1;host="evil.example:8443";proto=https"#,
            ),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "8443"),
        ],
        &[
            ("forwarded", "host=evil.example"),
            ("forwarded", "host=evil2.example;proto=https"),
        ],
    ];
    let (ours, theirs) = (s.proxy.url(), public.url());
    for (base, origin) in [
        (&ours, ours.as_str()),
        (&theirs, "https://registry.example.com"),
    ] {
        for headers in forged {
            let mut req = c.post(format!("{base}/v2/fwd/blobs/uploads/"));
            for (name, value) in headers {
                req = req.header(*name, *value);
            }
            let res = req.send().await.unwrap();
            let url = location(&res);
            expect_status(res, 202).await;
            assert!(
                url.starts_with(&format!("{origin}/v2/fwd/blobs/uploads/")),
                "{headers:?} through {base} gave Location {url}"
            );
            assert!(!url.contains("evil"), "{url}");
        }
    }

    // The Location archmerge answered carries the upload on through it.
    let data = Seeded::bytes(12, 1000);
    let digest = digest_of(&data);
    let res = c
        .post(s.v2_via("fwd/blobs/uploads/"))
        .header("forwarded", "host=evil.example;proto=https")
        .send()
        .await
        .unwrap();
    let url = location(&res);
    expect_status(res, 202).await;
    let res = c
        .put(with_digest(&url, &digest))
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    expect_status(res, 201).await;
    let back = c
        .get(s.v2_direct(&format!("fwd/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(expect_status(back, 200).await, data);
}

// === protocol and process ===

#[tokio::test]
async fn http2_with_prior_knowledge_pushes_and_pulls() {
    let s = Stack::new();
    let c = h2c();
    let res = c.get(s.v2_via("")).send().await.unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.status(), 200);

    let img = push_small_image(&c, &s.proxy.url(), "h2/app", "v1", "arm64", 20).await;
    let res = c
        .get(s.v2_via(&format!("h2/app/blobs/{}", img.layer_digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(expect_status(res, 200).await, img.layer);
    let res = c
        .get(s.v2_via("h2/app/manifests/v1"))
        .header("accept", media::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(expect_status(res, 200).await, img.manifest);
}

#[test]
fn sigterm_stops_archmerge_cleanly() {
    let mut s = Stack::new();
    let status = s.proxy.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    s.proxy.restart();
    assert_eq!(
        v2_status(s.proxy.port()),
        Some(200),
        "not back after restart"
    );
}

// === memory ===

/// Size of the blob streamed through archmerge.
const BIG: u64 = 1 << 30;
/// The generator's chunk size.
const CHUNK: usize = 256 << 10;
/// archmerge's peak RSS budget while streaming [`BIG`].
const RSS_BUDGET: u64 = 64 << 20;

/// Chunk `i` of the big blob: a fixed pseudo-random pattern with the chunk
/// number stamped on it, so no two chunks are equal and nothing but one
/// chunk is ever in memory.
fn big_chunk(pattern: &[u8], i: u64) -> Bytes {
    let mut b = BytesMut::from(pattern);
    b[..8].copy_from_slice(&i.to_le_bytes());
    b.freeze()
}

fn big_stream(
    pattern: Arc<Vec<u8>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let chunks = BIG / CHUNK as u64;
    futures_util::stream::iter((0..chunks).map(move |i| Ok(big_chunk(&pattern, i))))
}

/// sha256 of a stream, by `sha256sum` in a child process (the test binary
/// is unoptimised; coreutils hashes a GiB in about a second).
struct Sha256Sum {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    len: u64,
}

impl Sha256Sum {
    fn new() -> Sha256Sum {
        let mut child = tokio::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("running sha256sum");
        let stdin = child.stdin.take().unwrap();
        Sha256Sum {
            child,
            stdin,
            len: 0,
        }
    }

    async fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        self.stdin.write_all(data).await.unwrap();
    }

    async fn finish(self) -> (String, u64) {
        drop(self.stdin);
        let out = self.child.wait_with_output().await.unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let hex = text.split_whitespace().next().unwrap().to_owned();
        (format!("sha256:{hex}"), self.len)
    }
}

#[tokio::test]
async fn a_1_gib_blob_streams_through_in_flat_memory() {
    let s = Stack::new();
    let c = http();
    let pattern = Arc::new(Seeded::bytes(99, CHUNK));
    let started = Instant::now();

    let mut sum = Sha256Sum::new();
    let mut gen = Box::pin(big_stream(pattern.clone()));
    while let Some(chunk) = gen.next().await {
        sum.update(&chunk.unwrap()).await;
    }
    let (digest, len) = sum.finish().await;
    assert_eq!(len, BIG);
    let hashed = started.elapsed();

    // Up: one monolithic PUT, streamed from the generator.
    let res = c.post(s.v2_via("big/blobs/uploads/")).send().await.unwrap();
    let url = location(&res);
    expect_status(res, 202).await;
    let res = c
        .put(with_digest(&url, &digest))
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, BIG)
        .body(reqwest::Body::wrap_stream(big_stream(pattern)))
        .send()
        .await
        .unwrap();
    expect_status(res, 201).await;
    let uploaded = started.elapsed();

    // Down: hash what comes back without keeping it.
    let res = c
        .get(s.v2_via(&format!("big/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-length"), Some(BIG.to_string()));
    let mut sum = Sha256Sum::new();
    let mut body = res.bytes_stream();
    while let Some(chunk) = body.next().await {
        sum.update(&chunk.expect("reading the blob")).await;
    }
    let (back, len) = sum.finish().await;
    assert_eq!(len, BIG, "short read");
    assert_eq!(back, digest, "the blob came back altered");

    let peak = s.proxy.peak_rss_bytes();
    eprintln!(
        "1 GiB through archmerge: hash {:?}, up {:?}, down {:?}; archmerge peak RSS {} MiB",
        hashed,
        uploaded - hashed,
        started.elapsed() - uploaded,
        peak >> 20
    );
    assert!(
        peak < RSS_BUDGET,
        "archmerge peaked at {} MiB while streaming 1 GiB (budget {} MiB)",
        peak >> 20,
        RSS_BUDGET >> 20
    );
}

// === configuration ===

#[tokio::test]
async fn the_example_config_file_is_accepted_and_flags_win_over_it() {
    // config/archmerge.toml names 127.0.0.1:5000 as the upstream; the
    // harness's --upstream, --listen and --admin-listen flags must win.
    let registry = spawn_registry();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/archmerge.toml");
    let proxy = spawn_archmerge_with(
        &registry.url(),
        ArchmergeOpts {
            args: vec!["--config".into(), example.into()],
            ..Default::default()
        },
    );
    let c = http();
    let img = push_small_image(&c, &proxy.url(), "conf/app", "v1", "amd64", 22).await;
    let res = c
        .get(format!("{}/v2/conf/app/manifests/v1", registry.url()))
        .header("accept", media::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(expect_status(res, 200).await, img.manifest);
}

#[tokio::test]
async fn json_logs_when_the_config_file_asks() {
    let registry = spawn_registry();
    let proxy = spawn_archmerge_with(
        &registry.url(),
        ArchmergeOpts {
            config_toml: Some("log_format = \"json\"\n".into()),
            ..Default::default()
        },
    );
    let res = http()
        .get(format!("{}/v2/", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let log = proxy.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "archmerge logged nothing");
    for line in lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
    }
}
