//! Issue 7: archmerge under load, under faults, against bad input, and with
//! credentials — nothing lost, nothing leaked, clear errors.
//!
//! Each test is a user story against the real registry (CNCF distribution
//! 2.8) with archmerge in front of it, and reads what the registry stores
//! straight from the registry: in `write` mode the registry is the source of
//! truth, so "complete" means complete there. Faults a real registry cannot
//! be told to make (an answer that never comes) use the scripted
//! [`FakeUpstream`].
//!
//! Long load and fault runs live in `scripts/stress.sh`; these tests keep to
//! bounded sizes so that `scripts/test.sh` stays quick.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::CONTENT_TYPE;
use reqwest::Method;

use support::*;

/// The targets of the load stories: 8 arches × 6 targets = 48 arch pushes.
const TARGETS: [&str; 6] = ["v1", "v2", "v3", "v4", "v5", "v6"];

/// archmerge's resident memory may not pass this under the load stories:
/// manifests are small and blobs stream, so the number of pushes in flight
/// must not show in memory.
const RSS_BOUND: u64 = 64 * 1024 * 1024;

// === the stack ===

/// archmerge with `toml` as its config file.
fn config(toml: &str) -> ArchmergeOpts {
    ArchmergeOpts {
        config_toml: Some(toml.to_owned()),
        ..ArchmergeOpts::default()
    }
}

// === pushing as CI jobs do ===

/// One arch push as a CI job makes it with its own client (support's
/// [`try_push`], blobs uploaded without asking first), its failure said in
/// a line: under a kill some pushes must fail, and the test wants to know
/// which.
async fn ci_push(base: &str, repo: &str, tag: &str, spec: &ImageSpec) -> Result<TriedPush, String> {
    try_push(base, repo, tag, spec, false)
        .await
        .map_err(|e| e.to_string())
}

/// `<alias>_<target>`.
fn arch_tag(a: &ArchSpec, target: &str) -> String {
    format!("{}_{target}", a.alias)
}

/// The result of one arch push of a load run.
struct PushResult {
    target: &'static str,
    arch: ArchSpec,
    result: Result<TriedPush, String>,
}

/// Every arch of every target pushed at once, the pushes spread over
/// `bases` round robin (a load balancer in front of replicas). `done`
/// counts the pushes that have returned, for a test that strikes midway.
async fn push_everything_at_once(
    bases: Vec<String>,
    repo: &'static str,
    seed: u64,
    done: Arc<AtomicUsize>,
) -> Vec<PushResult> {
    let mut tasks = Vec::new();
    for (t, &target) in TARGETS.iter().enumerate() {
        for (i, a) in EIGHT_ARCHES.iter().enumerate() {
            let n = t * EIGHT_ARCHES.len() + i;
            let base = bases[n % bases.len()].clone();
            let (a, done) = (*a, done.clone());
            tasks.push(tokio::spawn(async move {
                let result = ci_push(
                    &base,
                    repo,
                    &arch_tag(&a, target),
                    &a.image(seed + n as u64),
                )
                .await;
                done.fetch_add(1, Ordering::SeqCst);
                PushResult {
                    target,
                    arch: a,
                    result,
                }
            }));
        }
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("a push task panicked"));
    }
    out
}

/// What the registry stores at `repo:tag`: the (platform, digest) entries
/// of an index, `None` when there is no such tag.
async fn stored_entries(
    registry: &str,
    repo: &str,
    tag: &str,
) -> Option<BTreeSet<(String, String)>> {
    let a = get_any_manifest(&http(), registry, repo, tag).await;
    match a.status {
        404 => None,
        200 => Some(a.entries()),
        s => panic!("{}: {s} {}", a.asked, a.text()),
    }
}

/// The digest the registry has at `repo:tag`, if the tag exists.
async fn stored_digest(registry: &str, repo: &str, tag: &str) -> Option<String> {
    let a = ask_manifest(
        &http(),
        Method::HEAD,
        registry,
        repo,
        tag,
        &[ACCEPT_ANY_MANIFEST],
    )
    .await;
    (a.status == 200).then(|| a.digest_header().expect("a digest on HEAD"))
}

/// Asserts that after a load run every push succeeded with no merge warning
/// and that every target in the registry lists exactly its 8 arches.
async fn assert_every_target_complete(registry: &str, repo: &str, results: &[PushResult]) {
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.result.as_ref().err().cloned())
        .collect();
    assert!(failed.is_empty(), "pushes failed under load: {failed:#?}");
    let warned: Vec<String> = results
        .iter()
        .filter_map(|r| r.result.as_ref().ok()?.warning.clone())
        .collect();
    assert!(warned.is_empty(), "merges failed under load: {warned:#?}");

    let mut want: BTreeMap<&str, BTreeSet<(String, String)>> = BTreeMap::new();
    for r in results {
        let digest = r.result.as_ref().unwrap().digest.clone();
        want.entry(r.target)
            .or_default()
            .insert((r.arch.platform(), digest));
    }
    for target in TARGETS {
        let got = stored_entries(registry, repo, target).await;
        assert_eq!(
            got.as_ref(),
            Some(&want[target]),
            "{repo}:{target} in the registry"
        );
    }
    // Nothing else was written: 48 arch tags and 6 targets.
    let tags = list_tags(&http(), registry, repo).await;
    assert_eq!(tags.len(), 48 + TARGETS.len(), "{tags:?}");
}

// === 1. load ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_eight_arch_pushes_at_once_through_one_archmerge_all_land_in_bounded_memory() {
    let s = Stack::new();
    let repo = "load/one";
    let started = Instant::now();
    let results = push_everything_at_once(vec![s.proxy.url()], repo, 1000, Arc::default()).await;
    let took = started.elapsed();
    assert_every_target_complete(&s.registry.url(), repo, &results).await;
    let peak = s.proxy.peak_rss_bytes();
    eprintln!(
        "48 pushes through one archmerge: {took:?}, peak RSS {} KiB",
        peak / 1024
    );
    assert!(peak < RSS_BOUND, "peak RSS {peak} bytes under 48 pushes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_eight_arch_pushes_at_once_through_three_replicas_all_land() {
    let s = Stack::new();
    let second = spawn_archmerge(&s.registry.url());
    let third = spawn_archmerge(&s.registry.url());
    let repo = "load/three";
    let bases = vec![s.proxy.url(), second.url(), third.url()];
    let results = push_everything_at_once(bases, repo, 2000, Arc::default()).await;
    assert_every_target_complete(&s.registry.url(), repo, &results).await;
    for p in [&s.proxy, &second, &third] {
        let peak = p.peak_rss_bytes();
        assert!(peak < RSS_BOUND, "a replica's peak RSS is {peak} bytes");
    }
}

// === 2. kill -9 in the middle of pushes ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_in_the_middle_of_pushes_then_reconcile_heals_every_target() {
    let mut s = Stack::new();
    let repo = "crash/load";
    let registry = s.registry.url();
    let done = Arc::new(AtomicUsize::new(0));
    let pushes = tokio::spawn(push_everything_at_once(
        vec![s.proxy.url()],
        repo,
        3000,
        done.clone(),
    ));
    // Strike once a few pushes have returned and most are in flight.
    let struck = eventually(Duration::from_secs(60), || {
        let n = done.load(Ordering::SeqCst);
        async move { n >= 6 }
    })
    .await;
    assert!(struck, "no push returned within 60 s");
    s.proxy.kill_9();
    let results = pushes.await.unwrap();
    let failed = results.iter().filter(|r| r.result.is_err()).count();
    eprintln!("kill -9 with pushes in flight: {failed} of 48 failed");
    assert!(failed > 0, "the kill came after every push had returned");

    // The registry is the truth: whatever arch tags it took (including
    // pushes whose client saw a failure), the index must list exactly them.
    s.proxy.restart();
    let out = archmerge_command(&["reconcile", "--upstream", &registry], &[]);
    assert!(out.status.success(), "reconcile: {}", shown(&out));
    let tags = list_tags(&http(), &registry, repo).await;
    for target in TARGETS {
        let mut want = BTreeSet::new();
        for a in &EIGHT_ARCHES {
            let tag = arch_tag(a, target);
            if tags.contains(&tag) {
                let digest = stored_digest(&registry, repo, &tag).await.unwrap();
                want.insert((a.platform(), digest));
            }
        }
        let got = stored_entries(&registry, repo, target).await;
        if want.is_empty() {
            assert_eq!(got, None, "{target}: an index without arch tags");
        } else {
            assert_eq!(got, Some(want), "{target} after reconcile");
        }
    }

    // The jobs whose push failed push again, through the restarted
    // archmerge: every target is complete.
    let mut all = Vec::new();
    for r in results {
        let result = match r.result {
            Ok(p) => Ok(p),
            Err(_) => {
                let tag = arch_tag(&r.arch, r.target);
                let seed = 3900 + all.len() as u64;
                ci_push(&s.proxy.url(), repo, &tag, &r.arch.image(seed)).await
            }
        };
        all.push(PushResult { result, ..r });
    }
    assert_every_target_complete(&registry, repo, &all).await;
}

// === 3. the registry goes away and comes back ===

/// `GET url`: (status, body), or panics when nothing answers.
async fn get(url: &str) -> (u16, String) {
    let res = http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = res.status().as_u16();
    (status, res.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_stopped_mid_stream_fails_the_download_promptly_and_comes_back_without_a_restart(
) {
    let mut s = Stack::new();
    let (proxy, admin) = (s.proxy.url(), s.proxy.admin_url());
    let repo = "outage/app";
    let amd = &EIGHT_ARCHES[0];
    let first = ci_push(&proxy, repo, "x86_64_v1", &amd.image(4000))
        .await
        .unwrap();
    let pid = s.proxy.pid();

    // A large layer, pulled through archmerge by a slow client.
    let big = Seeded::bytes(4001, 64 << 20);
    let digest = put_blob(&http(), &s.registry.url(), repo, &big).await;
    let mut res = http()
        .get(format!("{proxy}/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut got = 0usize;
    while got < 1 << 20 {
        got += res
            .chunk()
            .await
            .unwrap()
            .expect("the body ended early")
            .len();
    }

    // The registry dies under the stream.
    s.registry.kill();
    let killed = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match res.chunk().await {
                Ok(Some(b)) => got += b.len(),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let ended = ended.expect("the client still waits 10 s after the registry died");
    eprintln!(
        "download ended {:?} after the kill, at {got} of {} bytes: {ended:?}",
        killed.elapsed(),
        big.len()
    );
    assert!(
        ended.is_err() || got < big.len(),
        "a truncated download looked complete"
    );
    assert!(
        got < big.len(),
        "the whole blob arrived: the kill came too late"
    );

    // archmerge stays up, says the registry is gone, and is not ready.
    assert_eq!(s.proxy.pid(), pid);
    assert_eq!(get(&format!("{admin}/healthz")).await.0, 200);
    let (status, body) = get(&format!("{admin}/readyz")).await;
    assert_eq!(status, 503, "readyz with the registry down: {body}");
    let (status, body) = get(&format!("{proxy}/v2/")).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(oci_error_codes(body.as_bytes()), ["UNAVAILABLE"]);

    // The registry comes back on its port with its storage: the same
    // archmerge pushes and merges again.
    s.registry.start_again();
    let ready = eventually(Duration::from_secs(5), || {
        let admin = admin.clone();
        async move { get(&format!("{admin}/readyz")).await.0 == 200 }
    })
    .await;
    assert!(
        ready,
        "readyz never came back: {:?}",
        get(&format!("{admin}/readyz")).await
    );
    let arm = &EIGHT_ARCHES[1];
    let second = ci_push(&proxy, repo, "aarch64_v1", &arm.image(4002))
        .await
        .expect("the first push after the registry came back");
    assert_eq!(second.warning, None);
    assert_eq!(
        stored_entries(&s.registry.url(), repo, "v1").await,
        Some(BTreeSet::from([
            (amd.platform(), first.digest),
            (arm.platform(), second.digest),
        ]))
    );
    let whole = http()
        .get(format!("{proxy}/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(whole == big, "the blob came back altered");
    assert_eq!(s.proxy.pid(), pid, "archmerge was restarted");
}

// === 4. a slow registry, a refusing registry ===

#[tokio::test]
async fn a_slow_registry_gets_504_quickly_and_a_refusing_one_502() {
    // A registry that takes 5 s to answer anything but the harness's probe.
    let slow = FakeUpstream::start(|req, _| {
        if req.header("user-agent") != Some(PROBE_AGENT) {
            std::thread::sleep(Duration::from_secs(5));
        }
        FakeResponse::new(200)
            .header("content-type", "application/json")
            .body("{}")
    });
    let proxy = spawn_archmerge_with(
        &slow.url(),
        config("[timeouts]\nupstream_headers_secs = 1\n"),
    );
    let c = http();
    let image = build_oci_layout(&EIGHT_ARCHES[0].image(5000), "x86_64_v1");
    let asks = [
        (Method::GET, "/v2/app/manifests/v1", Vec::new()),
        (Method::GET, "/v2/app/tags/list", Vec::new()),
        (
            Method::PUT,
            "/v2/app/manifests/x86_64_v1",
            image.manifest.clone(),
        ),
    ];
    for (method, path, body) in asks {
        let started = Instant::now();
        let res = c
            .request(method.clone(), format!("{}{path}", proxy.url()))
            .header(CONTENT_TYPE, media::OCI_MANIFEST)
            .body(body)
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        let body = expect_status(res, 504).await;
        assert_eq!(oci_error_codes(&body), ["UNAVAILABLE"], "{method} {path}");
        assert!(
            took < Duration::from_secs(3),
            "{method} {path} took {took:?}"
        );
    }

    // Nothing listens where the registry should be.
    let proxy = spawn_archmerge(&format!("http://127.0.0.1:{}", free_port()));
    for (method, path) in [
        (Method::GET, "/v2/app/manifests/v1"),
        (Method::PUT, "/v2/app/manifests/x86_64_v1"),
    ] {
        let started = Instant::now();
        let res = c
            .request(method.clone(), format!("{}{path}", proxy.url()))
            .header(CONTENT_TYPE, media::OCI_MANIFEST)
            .body(image.manifest.clone())
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        let body = expect_status(res, 502).await;
        assert_eq!(oci_error_codes(&body), ["UNAVAILABLE"], "{method} {path}");
        assert!(
            took < Duration::from_secs(2),
            "{method} {path} took {took:?}"
        );
    }
}

// === 5. slow and silent clients ===

/// GETs `url` every 100 ms until `until`; every latency seen.
async fn keep_asking(url: String, until: Instant) -> Vec<Duration> {
    let c = http();
    let mut seen = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        let res = c
            .get(&url)
            .send()
            .await
            .expect("a well-behaved client's GET");
        assert_eq!(res.status(), 200, "a well-behaved client was refused");
        let _ = res.bytes().await;
        seen.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_off_by_the_header_timeout_while_others_are_served() {
    let s = Stack::with(config("[timeouts]\nheader_read_secs = 2\n"));
    let port = s.proxy.port();
    // Eight clients sending a request head one byte a second; a
    // well-behaved client meanwhile must never wait anywhere near the
    // 2 s header timeout (1 s allows for a loaded CI machine).
    let head = format!(
        "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: {}",
        "a".repeat(60)
    );
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let head = head.clone();
            std::thread::spawn(move || {
                trickle(
                    port,
                    head.as_bytes(),
                    Duration::from_secs(1),
                    Duration::from_secs(15),
                )
            })
        })
        .collect();
    let latencies = keep_asking(
        format!("{}/v2/", s.proxy.url()),
        Instant::now() + Duration::from_secs(5),
    )
    .await;
    for t in slow {
        let t = t.join().unwrap();
        let after = t.closed_after.unwrap_or_else(|| {
            panic!(
                "a slowloris client was still connected after 15 s ({} bytes sent)",
                t.sent
            )
        });
        assert!(
            after < Duration::from_secs(5),
            "cut off only after {after:?}"
        );
    }
    let worst = latencies.iter().max().unwrap();
    eprintln!(
        "{} requests of a well-behaved client during slowloris; worst {worst:?}",
        latencies.len()
    );
    assert!(latencies.len() >= 20, "{latencies:?}");
    assert!(*worst < Duration::from_secs(1), "{latencies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_a_byte_is_cut_off_and_frees_its_slot() {
    // The connection limit makes the gap visible: two clients that connect
    // and say nothing must not lock everybody else out for good.
    let s = Stack::with(ArchmergeOpts {
        args: vec!["--max-connections".into(), "2".into()],
        config_toml: Some("[timeouts]\nheader_read_secs = 2\n".into()),
        ..ArchmergeOpts::default()
    });
    let port = s.proxy.port();
    let silent: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                trickle(
                    port,
                    b"",
                    Duration::from_millis(200),
                    Duration::from_secs(8),
                )
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let answer = raw_exchange(
        port,
        b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let cut: Vec<_> = silent
        .into_iter()
        .map(|t| t.join().unwrap().closed_after)
        .collect();
    assert!(
        cut.iter()
            .all(|c| c.is_some_and(|d| d < Duration::from_secs(5))),
        "silent connections were not cut off by header_read_secs = 2: {cut:?}; \
         5 s later a client got {} {}",
        answer.status,
        answer.text()
    );
    assert_eq!(answer.status, 200, "{}", answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_preface_sent_byte_by_byte_is_cut_off_by_the_header_timeout() {
    let s = Stack::with(config("[timeouts]\nheader_read_secs = 2\n"));
    let port = s.proxy.port();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let t = tokio::task::spawn_blocking(move || {
        trickle(
            port,
            preface,
            Duration::from_millis(400),
            Duration::from_secs(12),
        )
    })
    .await
    .unwrap();
    assert!(
        t.closed_after.is_some_and(|d| d < Duration::from_secs(5)),
        "an HTTP/2 client trickling its preface ({} of {} bytes sent) was not cut off by \
         header_read_secs = 2: {:?}",
        t.sent,
        preface.len(),
        t.closed_after
    );
}

// === 6. the connection limit ===

#[tokio::test]
async fn past_the_connection_limit_a_client_gets_503_too_many_requests_until_one_closes() {
    let s = Stack::with(ArchmergeOpts {
        args: vec!["--max-connections".into(), "4".into()],
        ..ArchmergeOpts::default()
    });
    let port = s.proxy.port();
    // Four keep-alive connections, each served once and then held idle.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(&mut conn, b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let a = read_answer(&mut conn, Duration::from_secs(5));
        assert_eq!(a.status, 200, "{}", a.head);
        held.push(conn);
    }
    // A fifth is refused, clearly and at once.
    let started = Instant::now();
    let refused = raw_exchange(
        port,
        b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(refused.status, 503, "{}{}", refused.head, refused.text());
    assert_eq!(oci_error_codes(&refused.body), ["TOO_MANY_REQUESTS"]);
    assert!(refused.header("retry-after").is_some(), "{}", refused.head);
    assert!(started.elapsed() < Duration::from_secs(1));

    // They close: the next clients are served.
    drop(held);
    let served = eventually(Duration::from_secs(5), || {
        let url = format!("{}/v2/", s.proxy.url());
        async move {
            http()
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    assert!(served, "still refused after the held connections closed");
    let img = ci_push(
        &s.proxy.url(),
        "limit/app",
        "x86_64_v1",
        &EIGHT_ARCHES[0].image(6000),
    )
    .await;
    assert!(img.is_ok(), "{img:?}");
}

#[tokio::test]
async fn a_refused_client_library_reads_the_503_instead_of_a_broken_connection() {
    // archmerge writes its 503 as soon as it accepts a connection over the
    // limit, before the client has sent its request. A raw socket (and
    // curl) still read it; a client library that sees an answer on a
    // connection it has not yet written to reports a protocol error, not a
    // 503 (hyper: `UnexpectedMessage`; Go's net/http, i.e. docker and
    // skopeo, logs "Unsolicited response received on idle HTTP channel").
    let s = Stack::with(ArchmergeOpts {
        args: vec!["--max-connections".into(), "1".into()],
        ..ArchmergeOpts::default()
    });
    let port = s.proxy.port();
    // The one slot may still be held for a moment by the harness's own
    // readiness connection: take it as soon as it is free.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let held = loop {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(&mut c, b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let status = read_answer(&mut c, Duration::from_secs(5)).status;
        if status == 200 {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the only connection slot never came free (last answer {status})"
        );
        drop(c);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut seen = Vec::new();
    for _ in 0..20 {
        let answer = match http().get(format!("{}/v2/", s.proxy.url())).send().await {
            Ok(res) => {
                let status = res.status().as_u16();
                let codes = oci_error_codes(&res.bytes().await.unwrap());
                format!("{status} {codes:?}")
            }
            Err(e) => format!("error: {e:?}"),
        };
        seen.push(answer);
    }
    drop(held);
    assert!(
        seen.iter().all(|a| a == "503 [\"TOO_MANY_REQUESTS\"]"),
        "a client past the limit did not get the 503:\n{}",
        seen.join("\n")
    );
}

// === 7. bad input ===

/// What must not change when archmerge refuses something.
#[derive(Debug, PartialEq)]
struct Snapshot {
    tags: Vec<String>,
    index: Option<String>,
    repositories: String,
}

async fn snapshot(registry: &str, repo: &str) -> Snapshot {
    Snapshot {
        tags: list_tags(&http(), registry, repo).await,
        index: stored_digest(registry, repo, "v1").await,
        repositories: get(&format!("{registry}/v2/_catalog")).await.1,
    }
}

/// A raw `PUT path` of `body` as an OCI manifest.
fn raw_put(path: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        media::OCI_MANIFEST,
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_with_an_oci_body_and_writes_nothing() {
    let s = Stack::new();
    let (proxy, registry) = (s.proxy.url(), s.registry.url());
    let repo = "bad/app";
    let c = http();
    ci_push(&proxy, repo, "x86_64_v1", &EIGHT_ARCHES[0].image(7000))
        .await
        .unwrap();
    // An arm64 image whose blobs are in the registry but whose manifest is
    // not: every refused PUT below would otherwise have made it an entry.
    let arm = build_oci_layout(&EIGHT_ARCHES[1].image(7001), "aarch64_v1");
    for d in arm.blob_digests() {
        put_blob(
            &c,
            &registry,
            repo,
            &std::fs::read(arm.blob_path(&d)).unwrap(),
        )
        .await;
    }
    let before = snapshot(&registry, repo).await;
    assert_eq!(before.tags, ["v1", "x86_64_v1"]);

    // Malformed JSON on an arch tag: the registry's own refusal, as it
    // sent it.
    let broken = &arm.manifest[..arm.manifest.len() / 2];
    let through = put_manifest(&c, &proxy, repo, "aarch64_v1", media::OCI_MANIFEST, broken).await;
    let straight = put_manifest(
        &c,
        &registry,
        repo,
        "aarch64_v1",
        media::OCI_MANIFEST,
        broken,
    )
    .await;
    let (status, straight_status) = (through.status(), straight.status());
    let (body, straight_body) = (
        through.bytes().await.unwrap(),
        straight.bytes().await.unwrap(),
    );
    assert!(status.is_client_error(), "{status}");
    assert_eq!(
        (status, &body),
        (straight_status, &straight_body),
        "not the registry's answer"
    );
    oci_error_codes(&body);

    // Wrong media types: a Content-Type that is no manifest type, and one
    // that contradicts the body's `mediaType`.
    for content_type in ["text/plain", media::OCI_INDEX, media::DOCKER_LIST] {
        let res = put_manifest(&c, &proxy, repo, "aarch64_v1", content_type, &arm.manifest).await;
        let status = res.status();
        let body = res.bytes().await.unwrap();
        assert!(status.is_client_error(), "{content_type}: {status}");
        oci_error_codes(&body);
    }

    // Over 4 MiB.
    let mut huge = arm.manifest.clone();
    huge.truncate(huge.len() - 1);
    huge.extend(format!(",\"annotations\":{{\"pad\":\"{}\"}}}}", "x".repeat(4 << 20)).bytes());
    let res = put_manifest(&c, &proxy, repo, "aarch64_v1", media::OCI_MANIFEST, &huge).await;
    assert_eq!(res.status(), 413);
    assert_eq!(
        oci_error_codes(&res.bytes().await.unwrap()),
        ["SIZE_INVALID"]
    );

    // Invalid names, tags and digests, and path tricks in every position
    // that names a repository or a reference. Raw bytes: a client library
    // would normalise `..` away before sending.
    let long_name = "a".repeat(9000);
    let many = vec!["a"; 300].join("/");
    let cases: Vec<(String, &str)> = vec![
        ("/v2/Bad/App/manifests/aarch64_v1".into(), "NAME_INVALID"),
        (format!("/v2/{repo}/manifests/.aarch64_v1"), "TAG_INVALID"),
        (
            format!("/v2/{repo}/manifests/{}", "t".repeat(129)),
            "TAG_INVALID",
        ),
        (format!("/v2/{repo}/manifests/sha256:zz"), "DIGEST_INVALID"),
        (
            format!("/v2/{repo}/manifests/sha256:{}", "A".repeat(64)),
            "DIGEST_INVALID",
        ),
        ("/v2/../bad/app/manifests/aarch64_v1".into(), "NAME_INVALID"),
        (
            "/v2/bad/../bad/app/manifests/aarch64_v1".into(),
            "NAME_INVALID",
        ),
        (
            "/v2/bad/app/manifests/../manifests/aarch64_v1".into(),
            "NAME_INVALID",
        ),
        ("/v2/./bad/app/manifests/aarch64_v1".into(), "NAME_INVALID"),
        (
            "/v2/%2e%2e/bad/app/manifests/aarch64_v1".into(),
            "NAME_INVALID",
        ),
        (
            "/v2/bad/%2E%2E/bad/app/manifests/aarch64_v1".into(),
            "NAME_INVALID",
        ),
        ("/v2/bad%2fapp/manifests/aarch64_v1".into(), "NAME_INVALID"),
        (format!("/v2/{repo}/manifests/%2e%2e"), "TAG_INVALID"),
        (format!("/v2/{repo}/manifests/aarch64%5Fv1"), "TAG_INVALID"),
        ("/v2//bad/app/manifests/aarch64_v1".into(), "NAME_INVALID"),
        ("/v2/bad//app/manifests/aarch64_v1".into(), "NAME_INVALID"),
        (
            format!("/v2/{long_name}/manifests/aarch64_v1"),
            "NAME_INVALID",
        ),
        (format!("/v2/{many}/manifests/aarch64_v1"), "NAME_INVALID"),
    ];
    for (path, code) in &cases {
        let a = raw_exchange(
            s.proxy.port(),
            &raw_put(path, &arm.manifest),
            Duration::from_secs(10),
        );
        let shown = &path[..path.len().min(80)];
        assert_eq!(a.status, 400, "PUT {shown}: {}{}", a.head, a.text());
        assert_eq!(oci_error_codes(&a.body), [*code], "PUT {shown}");
    }

    // A request line over hyper's limit (64 KiB) is refused by hyper itself
    // (414, no body: it never becomes a request archmerge could answer).
    let a = raw_exchange(
        s.proxy.port(),
        &raw_put(
            &format!("/v2/{}/manifests/aarch64_v1", "a".repeat(70_000)),
            &arm.manifest,
        ),
        Duration::from_secs(10),
    );
    assert!((400..500).contains(&a.status), "{}", a.head);

    assert_eq!(
        snapshot(&registry, repo).await,
        before,
        "a refused request wrote something"
    );
    assert!(
        s.registry
            .log_text()
            .lines()
            .all(|l| !l.contains("PUT /v2/bad/app/manifests/aarch64_v1 HTTP/1.1\" 201")),
        "the registry stored the arm64 manifest"
    );
}

#[tokio::test]
async fn dot_segments_and_empty_segments_anywhere_under_v2_get_400_with_an_oci_body() {
    // Paths whose dots and slashes are not in a name or reference position:
    // archmerge passes them on as "other", and distribution answers a
    // bodiless 301 to the cleaned path. Nothing is written either way (see
    // the test above); this one asks for the clear 4xx of SPEC §8.
    let s = Stack::new();
    let body = build_oci_layout(&EIGHT_ARCHES[1].image(7100), "aarch64_v1").manifest;
    let mut wrong = Vec::new();
    for path in [
        "/v2/../x",
        "/v2/bad/app/manifests/aarch64_v1/.",
        "/v2/bad/app/manifests/aarch64_v1/..",
        "/v2/bad/app/manifests/aarch64_v1/",
        "//v2/bad/app/manifests/aarch64_v1",
    ] {
        let a = raw_exchange(
            s.proxy.port(),
            &raw_put(path, &body),
            Duration::from_secs(10),
        );
        let oci = serde_json::from_slice::<serde_json::Value>(&a.body)
            .is_ok_and(|v| v["errors"][0]["code"].is_string());
        assert!(
            !(200..300).contains(&a.status),
            "PUT {path} was stored: {}",
            a.head
        );
        if !(400..500).contains(&a.status) || !oci {
            wrong.push(format!(
                "PUT {path} → {}",
                a.head.lines().next().unwrap_or("")
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "not a 4xx with an OCI error body:\n{}",
        wrong.join("\n")
    );
}

// === 8. credentials ===

/// The CI job's credentials.
fn ci() -> Creds {
    Creds::new("ci-builder", "Tr4ce-me-1f-you-can")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_reach_archmerges_log_even_at_trace() {
    let htpasswd = Htpasswd::new(&[&ci()]);
    let registry = spawn_registry_with(RegistryOpts {
        htpasswd: Some(htpasswd.path()),
        ..RegistryOpts::default()
    });
    let proxy = spawn_archmerge_with(
        &registry.url(),
        ArchmergeOpts {
            env: vec![("RUST_LOG".into(), "trace".into())],
            ..ArchmergeOpts::default()
        },
    );
    let (base, repo) = (proxy.url(), "secret/app");
    let ci_client = http_as(Some(&ci()));
    let wrong = ci().with_password("n0t-the-Right-one");
    let mut pushed = BTreeSet::new();
    for (i, a) in EIGHT_ARCHES[..2].iter().enumerate() {
        let p = push_image(
            &ci_client,
            &base,
            repo,
            &arch_tag(a, "v1"),
            &a.image(8000 + i as u64),
        )
        .await;
        pushed.insert((a.platform(), p.digest));
    }
    // Pulls: the index, a child, a blob; a wrong password; anonymous.
    let index = get_any_manifest(&ci_client, &base, repo, "v1")
        .await
        .expect(200);
    assert_eq!(index.entries(), pushed);
    for (who, client) in [
        ("ci", &ci_client),
        ("wrong", &http_as(Some(&wrong))),
        ("anonymous", &http_as(None)),
    ] {
        for (platform, digest) in &pushed {
            let a = get_any_manifest(client, &base, repo, digest).await;
            assert_eq!(
                a.status,
                if who == "ci" { 200 } else { 401 },
                "{who} {platform}"
            );
        }
    }
    let log = proxy.log_text();
    assert!(
        log.contains("TRACE"),
        "RUST_LOG=trace logged no trace line:\n{log}"
    );
    assert!(
        log.contains("status=201") && log.contains("status=401"),
        "the requests were not logged"
    );
    for c in [ci(), wrong] {
        for secret in [c.password.clone(), c.basic_token(), c.authorization()] {
            if let Some(at) = log.find(&secret) {
                let from = log[..at].rfind('\n').map_or(0, |n| n + 1);
                let line = log[from..].lines().next().unwrap_or_default();
                panic!("a credential reached the log: {line}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_a_wrong_password_makes_archmerge_write_nothing() {
    // distribution's htpasswd auth is all or nothing: a known user may do
    // everything, so "may pull but not push" is the token test below; here
    // a wrong password stands for a client without push rights.
    let htpasswd = Htpasswd::new(&[&ci()]);
    let registry = spawn_registry_with(RegistryOpts {
        htpasswd: Some(htpasswd.path()),
        ..RegistryOpts::default()
    });
    let proxy = spawn_archmerge(&registry.url());
    let (base, repo) = (proxy.url(), "secret/app");
    let ci_client = http_as(Some(&ci()));
    let amd = &EIGHT_ARCHES[0];
    let first = push_image(&ci_client, &base, repo, "x86_64_v1", &amd.image(8100)).await;
    // The arm64 blobs are there; only the manifest PUT is the wrong user's.
    let arm = build_oci_layout(&EIGHT_ARCHES[1].image(8101), "aarch64_v1");
    for d in arm.blob_digests() {
        put_blob(
            &ci_client,
            &registry.url(),
            repo,
            &std::fs::read(arm.blob_path(&d)).unwrap(),
        )
        .await;
    }
    let intruder = http_as(Some(&ci().with_password("guessed")));
    for tag in ["aarch64_v1", "aarch64", "x86_64_v2"] {
        let res = put_manifest(
            &intruder,
            &base,
            repo,
            tag,
            media::OCI_MANIFEST,
            &arm.manifest,
        )
        .await;
        assert_eq!(res.status(), 401, "{tag}");
        assert!(header(&res, "warning").is_none());
    }
    let res = intruder
        .delete(format!("{base}/v2/{repo}/manifests/{}", first.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        list_tags(&ci_client, &registry.url(), repo).await,
        ["v1", "x86_64_v1"]
    );
    assert_eq!(
        get_any_manifest(&ci_client, &registry.url(), repo, "v1")
            .await
            .expect(200)
            .entries(),
        BTreeSet::from([(amd.platform(), first.digest)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_may_pull_but_not_push_cannot_make_archmerge_write() {
    let issuer = TokenIssuer::new();
    let registry = spawn_registry_with(RegistryOpts {
        env: issuer.registry_env(),
        ..RegistryOpts::default()
    });
    let proxy = spawn_archmerge(&registry.url());
    let (base, repo) = (proxy.url(), "perm/app");
    let ci_client = http_bearer(&issuer.token(&[(repo, &["pull", "push"])]));
    let reader = http_bearer(&issuer.token(&[(repo, &["pull"])]));
    let amd = &EIGHT_ARCHES[0];
    let first = push_image(&ci_client, &base, repo, "x86_64_v1", &amd.image(8200)).await;
    let index = get_any_manifest(&reader, &base, repo, "v1")
        .await
        .expect(200);
    let arm = build_oci_layout(&EIGHT_ARCHES[1].image(8201), "aarch64_v1");
    for d in arm.blob_digests() {
        put_blob(
            &ci_client,
            &registry.url(),
            repo,
            &std::fs::read(arm.blob_path(&d)).unwrap(),
        )
        .await;
    }

    // The reader may pull, but each write is refused and nothing merges:
    // a new arch tag, a re-push of the existing one, an index-shaped PUT at
    // the target, and deletes by tag and by digest.
    let writes = [
        ("aarch64_v1", media::OCI_MANIFEST, arm.manifest.clone()),
        ("x86_64_v1", media::OCI_MANIFEST, first.manifest.clone()),
        ("v1", media::OCI_INDEX, index.body.to_vec()),
    ];
    for (tag, content_type, body) in writes {
        let res = put_manifest(&reader, &base, repo, tag, content_type, &body).await;
        assert!(
            matches!(res.status().as_u16(), 401 | 403),
            "PUT {tag}: {}",
            res.status()
        );
    }
    for reference in ["x86_64_v1", first.digest.as_str()] {
        let res = reader
            .delete(format!("{base}/v2/{repo}/manifests/{reference}"))
            .send()
            .await
            .unwrap();
        assert!(
            matches!(res.status().as_u16(), 401 | 403),
            "DELETE {reference}: {}",
            res.status()
        );
    }
    assert_eq!(
        list_tags(&ci_client, &registry.url(), repo).await,
        ["v1", "x86_64_v1"]
    );
    let after = get_any_manifest(&ci_client, &registry.url(), repo, "v1")
        .await
        .expect(200);
    assert!(
        after.body == index.body,
        "the index changed: {}",
        after.text()
    );
    assert_eq!(
        after.entries(),
        BTreeSet::from([(amd.platform(), first.digest)])
    );
}

// === the long run (scripts/stress.sh) ===

/// A setting of the long run from the environment, or its default.
fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `p`-th percentile of sorted `v`.
fn percentile(v: &[Duration], p: usize) -> Duration {
    v.get((v.len() * p / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// The long load and fault run that `scripts/stress.sh` starts (ignored in
/// the normal test run): `STRESS_ARCHES` (≤ 8) × `STRESS_TARGETS` arch
/// pushes through `STRESS_REPLICAS` replicas, `STRESS_CONCURRENCY` at a time;
/// halfway through, replica 0 is killed with SIGKILL and restarted
/// (`STRESS_KILL=0` to leave it alone); the jobs whose push failed push
/// again, as CI retries; then `archmerge reconcile`, and every target must
/// list exactly its arch tags. Prints a summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: run scripts/stress.sh"]
async fn stress_many_targets_through_replicas_with_a_kill_9_then_reconcile() {
    let arches = setting("STRESS_ARCHES", 8).clamp(1, 8);
    let targets = setting("STRESS_TARGETS", 50);
    let replicas = setting("STRESS_REPLICAS", 3).max(1);
    let concurrency = setting("STRESS_CONCURRENCY", 32).max(1);
    let kill = setting("STRESS_KILL", 1) == 1;
    let total = arches * targets;
    let started = Instant::now();

    let registry = spawn_registry();
    let mut proxies: Vec<Archmerge> = (0..replicas)
        .map(|_| spawn_archmerge(&registry.url()))
        .collect();
    let bases: Vec<String> = proxies.iter().map(Archmerge::url).collect();
    let repo = "stress/app";
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..targets {
        for (i, a) in EIGHT_ARCHES[..arches].iter().enumerate() {
            let n = t * arches + i;
            let (base, a, gate, done) =
                (bases[n % replicas].clone(), *a, gate.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                let target = format!("t{t}");
                let began = Instant::now();
                let result = ci_push(
                    &base,
                    repo,
                    &arch_tag(&a, &target),
                    &a.image(90_000 + n as u64),
                )
                .await;
                done.fetch_add(1, Ordering::SeqCst);
                (target, a, result, began.elapsed())
            }));
        }
    }
    let mut killed_at = None;
    if kill {
        let half = eventually(Duration::from_secs(600), || {
            let n = done.load(Ordering::SeqCst);
            async move { n >= total / 2 }
        })
        .await;
        assert!(half, "half the pushes did not return within 600 s");
        killed_at = Some(started.elapsed());
        proxies[0].kill_9();
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxies[0].restart();
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("a push task panicked"));
    }
    let mut latencies: Vec<Duration> = results.iter().map(|r| r.3).collect();
    latencies.sort();
    let failed: Vec<usize> = (0..results.len())
        .filter(|&i| results[i].2.is_err())
        .collect();
    let warnings = results
        .iter()
        .filter(|r| r.2.as_ref().is_ok_and(|p| p.warning.is_some()))
        .count();

    // CI retries what failed (through any replica).
    let mut retry_failures = 0;
    for (k, &i) in failed.iter().enumerate() {
        let (target, a, _, _) = &results[i];
        let base = &bases[k % replicas];
        let again = ci_push(
            base,
            repo,
            &arch_tag(a, target),
            &a.image(190_000 + i as u64),
        )
        .await;
        if again.is_err() {
            retry_failures += 1;
        }
        results[i].2 = again;
    }
    let out = archmerge_command(&["reconcile", "--json", "--upstream", &registry.url()], &[]);
    assert!(out.status.success(), "reconcile: {}", shown(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();

    // Verify: every target lists exactly the arch tags the registry has.
    let tags: BTreeSet<String> = list_tags(&http(), &registry.url(), repo)
        .await
        .into_iter()
        .collect();
    let mut wrong = Vec::new();
    for t in 0..targets {
        let target = format!("t{t}");
        let mut want = BTreeSet::new();
        for a in &EIGHT_ARCHES[..arches] {
            let tag = arch_tag(a, &target);
            if tags.contains(&tag) {
                let d = stored_digest(&registry.url(), repo, &tag).await.unwrap();
                want.insert((a.platform(), d));
            }
        }
        let got = stored_entries(&registry.url(), repo, &target)
            .await
            .unwrap_or_default();
        if got != want || want.len() != arches {
            wrong.push(format!(
                "{target}: {} of {arches} listed, {} arch tags",
                got.len(),
                want.len()
            ));
        }
    }
    // (The replica that was killed counts from its restart.)
    let peaks: Vec<u64> = proxies.iter().map(|p| p.peak_rss_bytes() / 1024).collect();
    println!(
        "\n==> stress summary\n\
         pushes:        {total} ({arches} arches x {targets} targets) through {replicas} replicas, {concurrency} at a time\n\
         kill -9:       {}\n\
         failed:        {} (retried; {retry_failures} failed again)\n\
         merge warnings:{warnings}\n\
         push latency:  p50 {:?}  p95 {:?}  max {:?}\n\
         peak RSS:      {} KiB (max over replicas)\n\
         reconcile:     {}\n\
         targets wrong: {}\n\
         elapsed:       {:?}",
        killed_at.map_or("no".to_owned(), |t| format!("replica 0 at {t:?}")),
        failed.len(),
        percentile(&latencies, 50),
        percentile(&latencies, 95),
        latencies.last().copied().unwrap_or_default(),
        peaks.iter().max().unwrap_or(&0),
        summary,
        if wrong.is_empty() { "none".to_owned() } else { wrong.join("; ") },
        started.elapsed(),
    );
    assert_eq!(retry_failures, 0, "pushes failed again on retry");
    assert!(
        wrong.is_empty(),
        "targets incomplete after reconcile: {wrong:#?}"
    );
    assert!(
        peaks.iter().all(|&k| k * 1024 < RSS_BOUND),
        "peak RSS {peaks:?} KiB"
    );
}
