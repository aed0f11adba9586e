//! What archmerge sends upstream and answers on the wire, against a
//! scripted fake upstream (tests/support/fake.rs): the cases a real registry
//! cannot be told to produce, and checks that need to see exactly what
//! reached the registry — or that nothing did.

mod support;

use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

#[tokio::test]
async fn a_single_post_upload_reaches_a_registry_that_supports_it() {
    // Registries that implement the single-POST upload (zot, newer
    // distribution) answer 201 with the blob's Location.
    let fake = FakeUpstream::start(|req, port| {
        let digest = req
            .target
            .split("digest=")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        FakeResponse::new(201)
            .header(
                "Location",
                &format!("http://127.0.0.1:{port}/v2/one/blobs/{digest}"),
            )
            .header("Docker-Content-Digest", &digest)
    });
    let proxy = spawn_archmerge(&fake.url());
    let data = Seeded::bytes(21, 300_000);
    let digest = digest_of(&data);
    let res = http()
        .post(format!(
            "{}/v2/one/blobs/uploads/?digest={digest}",
            proxy.url()
        ))
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        location(&res),
        format!("{}/v2/one/blobs/{digest}", proxy.url())
    );
    expect_status(res, 201).await;
    let sent = fake.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].target,
        format!("/v2/one/blobs/uploads/?digest={digest}")
    );
    assert!(sent[0].body == data, "the blob arrived altered");
}

#[tokio::test]
async fn invalid_names_tags_and_digests_are_refused_before_the_registry_is_asked() {
    // A fake upstream that would answer 200 to anything, and records.
    let fake = FakeUpstream::start(|_, _| FakeResponse::new(200).body("{}"));
    let proxy = spawn_archmerge(&fake.url());
    let c = http();
    let long_tag = "t".repeat(129);
    let cases = [
        (
            "GET",
            "/v2/Upper/app/manifests/latest".to_owned(),
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/-lead/manifests/latest".to_owned(),
            "NAME_INVALID",
        ),
        ("PUT", "/v2/app/manifests/.hidden".to_owned(), "TAG_INVALID"),
        (
            "GET",
            format!("/v2/app/manifests/{long_tag}"),
            "TAG_INVALID",
        ),
        (
            "GET",
            "/v2/app/blobs/sha256:xyz".to_owned(),
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/app/manifests/sha256:abc".to_owned(),
            "DIGEST_INVALID",
        ),
        ("HEAD", "/v2/app/blobs/not-a-digest".to_owned(), ""),
    ];
    for (method, path, code) in &cases {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let res = c
            .request(m, format!("{}{path}", proxy.url()))
            .header(CONTENT_TYPE, media::OCI_MANIFEST)
            .body(if *method == "PUT" { "{}" } else { "" })
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{method} {path}");
        if !code.is_empty() {
            let body = res.bytes().await.unwrap();
            assert_eq!(oci_error_codes(&body), [*code], "{method} {path}");
        }
    }
    let asked: Vec<_> = fake.requests().into_iter().map(|r| r.target).collect();
    assert!(asked.is_empty(), "the registry was asked: {asked:?}");
}

#[tokio::test]
async fn a_manifest_over_4_mib_gets_413_and_never_reaches_the_registry() {
    let fake = FakeUpstream::start(|_, _| FakeResponse::new(201));
    let proxy = spawn_archmerge(&fake.url());
    let limit = 4 << 20;
    let over = padded_manifest(limit + 1);

    // With Content-Length, and chunked (archmerge finds out while reading).
    for chunked in [false, true] {
        let (status, body) =
            put_like_a_go_client(&proxy.host(), "/v2/big/manifests/v1", &over, chunked).await;
        assert_eq!(
            status,
            413,
            "chunked={chunked}: {}",
            String::from_utf8_lossy(&body)
        );
        // An OCI error body with a code (archmerge says SIZE_INVALID).
        oci_error_codes(&body);
    }
    assert!(
        fake.requests().is_empty(),
        "an oversized manifest reached the registry"
    );

    // Exactly 4 MiB is allowed, and arrives intact.
    let at_limit = padded_manifest(limit);
    let res = http()
        .put(format!("{}/v2/big/manifests/v3", proxy.url()))
        .header(CONTENT_TYPE, media::OCI_MANIFEST)
        .body(at_limit.clone())
        .send()
        .await
        .unwrap();
    expect_status(res, 201).await;
    // `v3` may be a target (a push there becomes its new base), so archmerge
    // reads the repository's tags after the PUT; the manifest itself reached
    // the registry once, intact.
    let got: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .collect();
    assert_eq!(got.len(), 1);
    assert!(
        got[0].body == at_limit,
        "the 4 MiB manifest arrived altered"
    );
}

/// PUTs `body` over a raw connection the way Go's net/http and curl do:
/// when the server answers early and stops reading, the failed write is
/// ignored and the answer already sent is read. (hyper's client, hence
/// reqwest, gives up with a broken pipe instead and loses the answer.)
async fn put_like_a_go_client(
    host: &str,
    path: &str,
    body: &[u8],
    chunked: bool,
) -> (u16, Vec<u8>) {
    let mut sock = tokio::net::TcpStream::connect(host).await.unwrap();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {}", body.len())
    };
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {}\r\n{framing}\r\n\r\n",
        media::OCI_MANIFEST
    );
    let mut wire = head.into_bytes();
    if chunked {
        for c in body.chunks(64 << 10) {
            wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
    } else {
        wire.extend_from_slice(body);
    }
    // A write error here is the server having answered and closed.
    let _ = sock.write_all(&wire).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 8192];
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
            if response_complete(&raw) {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let end = text
        .find("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {text:?}"));
    let status = text[9..12]
        .parse()
        .unwrap_or_else(|_| panic!("bad status line: {text}"));
    (status, raw[end + 4..].to_vec())
}

/// Whether `raw` holds a whole response with a Content-Length body.
fn response_complete(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let len = text[..end]
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    raw.len() >= end + 4 + len
}

/// An OCI manifest padded with spaces to exactly `len` bytes.
fn padded_manifest(len: usize) -> Vec<u8> {
    let mut m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"sha256:{}","size":2}},"layers":[]}}"#,
        media::OCI_MANIFEST,
        media::OCI_CONFIG,
        "4".repeat(64)
    )
    .into_bytes();
    m.resize(len, b' ');
    m
}

/// An upload state with every escape a registry may use.
const STATE: &str = "_state=AbC%2Fd-e_f%3D%3D&x=a+b&y=%7E%20";

#[tokio::test]
async fn location_rewrite_keeps_path_and_query_byte_for_byte() {
    let fake = FakeUpstream::start(|req, port| {
        let storage = "http://storage.invalid/bucket/blob?X-Amz-Signature=ab%2Fc";
        match (req.method.as_str(), req.target.as_str()) {
            ("POST", "/v2/a/blobs/uploads/") => FakeResponse::new(202).header(
                "Location",
                &format!("http://127.0.0.1:{port}/v2/a/blobs/uploads/u-1?{STATE}"),
            ),
            ("POST", "/v2/rel/blobs/uploads/") => {
                FakeResponse::new(202).header("Location", &format!("/v2/rel/blobs/uploads/u-2?{STATE}"))
            }
            ("GET", t) if t.starts_with("/v2/a/blobs/sha256:") => {
                FakeResponse::new(307).header("Location", storage)
            }
            ("GET", "/v2/auth/manifests/v1") => FakeResponse::new(401)
                .header(
                    "WWW-Authenticate",
                    &format!(r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake",scope="repository:auth:pull""#),
                )
                .header("Content-Type", "application/json")
                .body(r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#),
            ("GET", "/v2/plain/tags/list") => FakeResponse::new(500)
                .header("Content-Type", "text/plain")
                .body("oops, not json\n"),
            _ => FakeResponse::new(404),
        }
    });
    let proxy = spawn_archmerge(&fake.url());
    let c = http();

    let res = c
        .post(format!("{}/v2/a/blobs/uploads/", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(
        location(&res),
        format!("{}/v2/a/blobs/uploads/u-1?{STATE}", proxy.url())
    );

    // A relative Location already resolves against archmerge.
    let res = c
        .post(format!("{}/v2/rel/blobs/uploads/", proxy.url()))
        .send()
        .await
        .unwrap();
    let rel = format!("/v2/rel/blobs/uploads/u-2?{STATE}");
    let got = location(&res);
    assert!(
        got == rel || got == format!("{}{rel}", proxy.url()),
        "{got}"
    );

    // A redirect to storage elsewhere is passed on untouched.
    let blob = format!("{}/v2/a/blobs/sha256:{}", proxy.url(), "5".repeat(64));
    let res = c.get(&blob).send().await.unwrap();
    assert_eq!(res.status(), 307);
    assert_eq!(
        location(&res),
        "http://storage.invalid/bucket/blob?X-Amz-Signature=ab%2Fc"
    );

    // Authorization goes up; WWW-Authenticate and the body come back.
    let res = c
        .get(format!("{}/v2/auth/manifests/v1", proxy.url()))
        .header("authorization", "Bearer abc.def")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        header(&res, "www-authenticate").unwrap(),
        format!(
            r#"Bearer realm="{}/token",service="fake",scope="repository:auth:pull""#,
            fake.url()
        )
    );
    assert_eq!(
        res.text().await.unwrap(),
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#
    );

    // A non-JSON error body is kept too.
    let res = c
        .get(format!("{}/v2/plain/tags/list", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(header(&res, "content-type").as_deref(), Some("text/plain"));
    assert_eq!(res.text().await.unwrap(), "oops, not json\n");

    let sent = fake.requests();
    let auth = sent
        .iter()
        .find(|r| r.target == "/v2/auth/manifests/v1")
        .unwrap();
    assert_eq!(auth.header("authorization"), Some("Bearer abc.def"));
    let first = &sent[0];
    assert_eq!(first.header("x-forwarded-host"), Some(&*proxy.host()));
    assert_eq!(first.header("x-forwarded-proto"), Some("http"));
    assert_eq!(first.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        first.header("forwarded"),
        Some(&*format!(
            r#"for=127.0.0.1;host="{}";proto=http"#,
            proxy.host()
        ))
    );
}

#[tokio::test]
async fn every_accept_line_goes_up_and_hop_by_hop_headers_do_not() {
    let fake = FakeUpstream::start(|_, _| FakeResponse::new(200).body("{}"));
    let proxy = spawn_archmerge(&fake.url());

    let mut sock = tokio::net::TcpStream::connect(proxy.host()).await.unwrap();
    let req = format!(
        "GET /v2/app/manifests/v1 HTTP/1.1\r\nHost: {}\r\n\
         Accept: {}\r\nAccept: {}, {}\r\n\
         Connection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n\
         X-End-To-End: kept\r\n\r\n",
        proxy.host(),
        media::OCI_INDEX,
        media::OCI_MANIFEST,
        media::DOCKER_MANIFEST,
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut raw))
        .await
        .expect("no answer")
        .unwrap();
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );

    let sent = fake.requests();
    assert_eq!(sent.len(), 1);
    let up = &sent[0];
    let accepts: Vec<&str> = up
        .headers_named("accept")
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    assert_eq!(
        accepts,
        [
            media::OCI_INDEX,
            media::OCI_MANIFEST,
            media::DOCKER_MANIFEST
        ]
    );
    assert_eq!(up.header("x-end-to-end"), Some("kept"));
    assert_eq!(
        up.header("x-hop"),
        None,
        "a header named in Connection went up"
    );
    assert_eq!(up.header("keep-alive"), None, "Keep-Alive went up");
}

// === retries of what is safe to repeat (SPEC §9) ===

#[tokio::test]
async fn a_get_the_registry_fails_transiently_is_tried_again_and_nothing_else_is() {
    // distribution answers 500 to a blob HEAD that races a parallel push of
    // the same layer. A GET or HEAD is safe to repeat; an upload is not.
    use std::sync::atomic::{AtomicUsize, Ordering};
    let gets = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = gets.clone();
    let fake =
        FakeUpstream::start(
            move |req, _| match (req.method.as_str(), req.target.as_str()) {
                ("GET", t) if t.starts_with("/v2/flaky/") => {
                    if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                        FakeResponse::new(500).body("storage hiccup")
                    } else {
                        FakeResponse::new(200).body("the blob")
                    }
                }
                ("GET", t) if t.starts_with("/v2/down/") => {
                    FakeResponse::new(503).body("still down")
                }
                _ => FakeResponse::new(500).body("upload failed"),
            },
        );
    let proxy = spawn_archmerge(&fake.url());
    let c = http();
    let digest = digest_of(b"x");

    let res = c
        .get(format!("{}/v2/flaky/blobs/{digest}", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "the blob");
    assert_eq!(
        gets.load(Ordering::SeqCst),
        2,
        "the 500 was not retried once"
    );

    // A registry that keeps failing: tried a bounded number of times, then
    // its own answer goes back.
    let res = c
        .get(format!("{}/v2/down/blobs/{digest}", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.text().await.unwrap(), "still down");
    let down = |r: &RecordedRequest| r.target.starts_with("/v2/down/");
    assert_eq!(fake.requests().iter().filter(|r| down(r)).count(), 3);

    // An upload is never repeated.
    let res = c
        .post(format!("{}/v2/flaky/blobs/uploads/", proxy.url()))
        .body("data")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    let posts = fake
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 1, "an upload was sent twice");
}

#[tokio::test]
async fn a_manifest_put_refused_for_blobs_that_exist_is_sent_again_once_they_prove_to() {
    // distribution 2.8, racing in its own storage, now and then answers 400
    // MANIFEST_BLOB_UNKNOWN for a manifest whose blobs it has.
    use std::sync::atomic::{AtomicUsize, Ordering};
    let puts = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = puts.clone();
    let unknown = r#"{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:…"}]}"#;
    let fake =
        FakeUpstream::start(
            move |req, _| match (req.method.as_str(), req.target.as_str()) {
                ("PUT", t) if t.contains("/racy/") && seen.fetch_add(1, Ordering::SeqCst) == 0 => {
                    FakeResponse::new(400)
                        .header("Content-Type", "application/json")
                        .body(unknown)
                }
                ("PUT", t) if t.contains("/missing/") => FakeResponse::new(400)
                    .header("Content-Type", "application/json")
                    .body(unknown),
                ("PUT", _) => FakeResponse::new(201),
                ("HEAD", t) if t.starts_with("/v2/racy/blobs/") => FakeResponse::new(200),
                ("HEAD", t) if t.starts_with("/v2/missing/blobs/") => FakeResponse::new(404),
                _ => FakeResponse::new(404),
            },
        );
    let proxy = spawn_archmerge(&fake.url());
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(b"c"), "size": 1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest_of(b"l"), "size": 1}],
    }))
    .unwrap();
    let put = |repo: &str| {
        http()
            .put(format!(
                "{}/v2/{repo}/manifests/sha256:{}",
                proxy.url(),
                sha256_hex(&manifest)
            ))
            .header(CONTENT_TYPE, media::OCI_MANIFEST)
            .body(manifest.clone())
            .send()
    };

    // The blobs exist: the same bytes go again, and the push succeeds.
    let res = put("racy").await.unwrap();
    assert_eq!(res.status(), 201);
    let racy: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.target.contains("/racy/"))
        .collect();
    assert_eq!(racy.len(), 2);
    assert!(
        racy.iter().all(|r| r.body == manifest),
        "a retry sent other bytes"
    );

    // A blob really is missing: the registry's refusal goes back as it was.
    let res = put("missing").await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.text().await.unwrap(), unknown);
    let missing = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.target.contains("/missing/"))
        .count();
    assert_eq!(missing, 1, "a manifest with a missing blob was sent again");
}
