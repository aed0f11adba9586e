//! Issue 4: serve mode, and several replicas behind one load balancer.
//!
//! In `--mode serve` archmerge writes nothing to the registry: a GET or
//! HEAD of `repo:<target>` (or of the index's digest) is answered by
//! archmerge itself with the index write mode would have stored. Each test
//! starts its own `docker-registry` (CNCF distribution 2.8) with archmerge
//! in front of it and acts as CI and its users would: arch pushes, then
//! pulls with skopeo or raw distribution API requests.
//!
//! "The index write mode would store" is checked literally: the same pushes
//! go through a write-mode archmerge in front of a second registry, and the
//! bytes served must equal the bytes that registry stored.
//!
//! Replicas: three archmerge processes in front of one registry, arch pushes
//! spread round-robin over them at once. In serve mode every replica must
//! serve every arch pushed more than a second earlier, through any replica
//! or straight to the registry; in write mode the registry itself must hold
//! complete indexes once every push has returned.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;

use support::*;

const OCI_MANIFEST: &str = media::OCI_MANIFEST;
const DOCKER_MANIFEST: &str = media::DOCKER_MANIFEST;
const OCI_INDEX: &str = media::OCI_INDEX;
const DOCKER_LIST: &str = media::DOCKER_LIST;

// === the stack ===

impl Stack {
    /// archmerge in `--mode serve`.
    fn serve() -> Stack {
        Stack::with(mode("serve"))
    }

    /// archmerge in its default mode, write.
    fn write() -> Stack {
        Stack::new()
    }
}

/// `--mode <m>`.
fn mode(m: &str) -> ArchmergeOpts {
    ArchmergeOpts {
        args: vec!["--mode".into(), m.into()],
        ..ArchmergeOpts::default()
    }
}

/// The arch tag of `alias` for `target` under the default patterns:
/// `{arch}_{tag}`, and the bare `{arch}` for `latest`.
fn arch_tag(alias: &str, target: &str) -> String {
    if target == "latest" {
        alias.to_owned()
    } else {
        format!("{alias}_{target}")
    }
}

fn arches(aliases: &[&str]) -> Vec<ArchSpec> {
    aliases
        .iter()
        .map(|a| {
            *EIGHT_ARCHES
                .iter()
                .find(|s| s.alias == *a)
                .unwrap_or_else(|| panic!("no arch {a}"))
        })
        .collect()
}

/// Pushes `arch`'s image built from `seed` at `repo:<arch tag of target>`
/// through every base in `bases` (the same bytes to each); returns
/// (platform, digest) as the index must list it.
async fn push_arch(
    bases: &[&str],
    repo: &str,
    target: &str,
    arch: ArchSpec,
    seed: u64,
) -> (String, String) {
    let tag = arch_tag(arch.alias, target);
    let mut digest = String::new();
    for base in bases {
        digest = push_image(&http(), base, repo, &tag, &arch.image(seed))
            .await
            .digest;
    }
    (arch.platform(), digest)
}

/// 8 arches × `targets`, every push at once, spread round-robin over
/// `bases` as a load balancer would. Returns target → (platform, digest)
/// of every push, once every push has returned.
async fn push_round_robin(
    bases: &[String],
    repo: &'static str,
    targets: &[&'static str],
    seed: u64,
) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let mut tasks = Vec::new();
    let mut n = 0;
    for (t, &target) in targets.iter().enumerate() {
        for (i, a) in EIGHT_ARCHES.iter().enumerate() {
            let base = bases[n % bases.len()].clone();
            n += 1;
            let (a, seed) = (*a, seed + (t * 10 + i) as u64);
            tasks.push(tokio::spawn(async move {
                let pushed = push_arch(&[&base], repo, target, a, seed).await;
                (target.to_owned(), pushed)
            }));
        }
    }
    let mut want: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for t in tasks {
        let (target, pushed) = t.await.expect("a push task panicked");
        want.entry(target).or_default().insert(pushed);
    }
    want
}

// === 1. serve mode answers what write mode would store ===

#[tokio::test]
async fn serve_mode_answers_the_index_write_mode_would_store_and_writes_nothing() {
    let serve = Stack::serve();
    let write = Stack::write();
    let c = http();
    let repo = "serve/app";
    let mut want = BTreeSet::new();
    for (i, a) in arches(&["x86_64", "aarch64", "armv7l"])
        .into_iter()
        .enumerate()
    {
        let bases = [serve.proxy.url(), write.proxy.url()];
        let bases: Vec<&str> = bases.iter().map(String::as_str).collect();
        want.insert(push_arch(&bases, repo, "v1.2", a, 10 + i as u64).await);
    }

    // Write mode stored an index in its registry; serve mode answers the
    // very same bytes.
    let stored = get_any_manifest(&c, &write.registry.url(), repo, "v1.2")
        .await
        .expect(200);
    let served = get_any_manifest(&c, &serve.proxy.url(), repo, "v1.2").await;
    assert_index_answer(&served);
    assert_eq!(served.entries(), want, "{}", served.text());
    assert!(
        served.body == stored.body,
        "serve mode's index differs from what write mode stored\nserved: {}\nstored: {}",
        served.text(),
        stored.text()
    );
    assert_eq!(served.content_type(), stored.content_type());
    assert_eq!(served.content_type().as_deref(), Some(OCI_INDEX));
    let digest = served.digest_header().unwrap();
    assert_eq!(stored.digest_header().as_deref(), Some(digest.as_str()));

    // HEAD says what GET says, with no body; by digest gives the same bytes.
    for reference in ["v1.2", digest.as_str()] {
        let head = ask_manifest(
            &c,
            Method::HEAD,
            &serve.proxy.url(),
            repo,
            reference,
            &[ACCEPT_ANY_MANIFEST],
        )
        .await
        .expect(200);
        assert!(head.body.is_empty(), "HEAD {reference} sent a body");
        assert_eq!(
            head.content_type(),
            served.content_type(),
            "HEAD {reference}"
        );
        assert_eq!(
            head.digest_header(),
            served.digest_header(),
            "HEAD {reference}"
        );
        assert_eq!(
            head.content_length(),
            served.content_length(),
            "HEAD {reference}"
        );
    }
    let by_digest = get_any_manifest(&c, &serve.proxy.url(), repo, &digest).await;
    assert_index_answer(&by_digest);
    assert!(by_digest.body == served.body, "{}", by_digest.text());
    assert_eq!(by_digest.content_type(), served.content_type());

    // Nothing was written upstream: the registry has no target tag and no
    // index, only the three arch tags.
    let reg = serve.registry.url();
    get_any_manifest(&c, &reg, repo, "v1.2").await.expect(404);
    get_any_manifest(&c, &reg, repo, &digest).await.expect(404);
    assert_eq!(
        list_tags(&c, &reg, repo).await,
        ["aarch64_v1.2", "armv7l_v1.2", "x86_64_v1.2"]
    );
    let mut puts = serve.manifest_puts(repo);
    puts.sort();
    assert_eq!(puts, ["aarch64_v1.2", "armv7l_v1.2", "x86_64_v1.2"]);
    // (and write mode did write: the comparison above is not vacuous)
    assert!(write.manifest_puts(repo).iter().any(|r| r == "v1.2"));
}

#[tokio::test]
async fn a_replica_that_never_served_the_tag_answers_by_the_index_digest() {
    let s = Stack::serve();
    let c = http();
    let repo = "serve/bydigest";
    for (i, a) in arches(&["x86_64", "s390x"]).into_iter().enumerate() {
        push_arch(&[&s.proxy.url()], repo, "v3", a, 20 + i as u64).await;
    }
    let served = get_any_manifest(&c, &s.proxy.url(), repo, "v3").await;
    assert_index_answer(&served);
    let digest = served.digest_header().unwrap();

    // A pull that resolved the tag on one replica fetches the digest from
    // another: it rebuilds the repository's targets to find it.
    let other = s.replica(mode("serve"));
    let head = ask_manifest(
        &c,
        Method::HEAD,
        &other.url(),
        repo,
        &digest,
        &[ACCEPT_ANY_MANIFEST],
    )
    .await
    .expect(200);
    assert_eq!(head.digest_header().as_deref(), Some(digest.as_str()));
    assert_eq!(head.content_length(), Some(served.body.len() as u64));
    let third = s.replica(mode("serve"));
    let got = get_any_manifest(&c, &third.url(), repo, &digest).await;
    assert_index_answer(&got);
    assert!(got.body == served.body, "{}", got.text());

    // A digest nobody serves is still the registry's 404.
    let unknown = digest_of(b"no such index");
    let missing = get_any_manifest(&c, &other.url(), repo, &unknown)
        .await
        .expect(404);
    assert_eq!(oci_error_codes(&missing.body), ["MANIFEST_UNKNOWN"]);
}

#[test]
fn skopeo_pulls_the_right_image_for_each_platform_through_serve_mode() {
    let s = Stack::serve();
    let repo = "serve/skopeo";
    let classic = arches(&["x86_64", "aarch64", "armv7l", "armhf"]);
    let mut pushed = Vec::new();
    for (i, a) in classic.iter().enumerate() {
        let layout = build_oci_layout(&a.image(30 + i as u64), "build");
        let tag = arch_tag(a.alias, "v2");
        let digest = skopeo_push(&layout, &s.via(&format!("{repo}:{tag}")), Format::Source);
        assert_eq!(digest, layout.manifest_digest);
        pushed.push((*a, digest));
    }
    let raw = skopeo_inspect_raw(&s.via(&format!("{repo}:v2")));
    let index: serde_json::Value = serde_json::from_slice(&raw).expect("an index");
    assert_eq!(index["mediaType"], OCI_INDEX, "{index}");
    assert_eq!(
        index_entries(&index),
        pushed
            .iter()
            .map(|(a, d)| (a.platform(), d.clone()))
            .collect::<BTreeSet<_>>()
    );
    for (a, digest) in &pushed {
        let pulled = skopeo_pull(
            &s.via(&format!("{repo}:v2")),
            Some(("linux", a.arch, a.variant)),
        );
        assert_eq!(
            &pulled.manifest_digest,
            digest,
            "{} got another image",
            a.platform()
        );
        pulled.verified_blob_digests();
        assert_eq!(pulled.config_json()["architecture"], a.arch);
    }
}

#[tokio::test]
async fn a_real_tag_at_the_target_is_amended_as_write_mode_would() {
    let serve = Stack::serve();
    let write = Stack::write();
    let c = http();
    let repo = "serve/amend";
    // Someone pushed a plain s390x image at v4, straight to the registry.
    let s390x = arches(&["s390x"])[0].image(40);
    let mut original = None;
    for reg in [serve.registry.url(), write.registry.url()] {
        original = Some(push_image(&c, &reg, repo, "v4", &s390x).await);
    }
    let original = original.unwrap();
    let amd = arches(&["x86_64"])[0];
    let (_, amd_digest) = push_arch(
        &[&serve.proxy.url(), &write.proxy.url()],
        repo,
        "v4",
        amd,
        41,
    )
    .await;

    let served = get_any_manifest(&c, &serve.proxy.url(), repo, "v4").await;
    assert_index_answer(&served);
    assert_eq!(
        served.entries(),
        BTreeSet::from([
            ("linux/amd64".to_owned(), amd_digest),
            ("linux/s390x".to_owned(), original.digest.clone()),
        ]),
        "{}",
        served.text()
    );
    let stored = get_any_manifest(&c, &write.registry.url(), repo, "v4")
        .await
        .expect(200);
    assert!(
        served.body == stored.body,
        "served: {}\nstored: {}",
        served.text(),
        stored.text()
    );
    // The registry's own tag is untouched.
    let direct = get_any_manifest(&c, &serve.registry.url(), repo, "v4")
        .await
        .expect(200);
    assert!(direct.body == original.manifest, "{}", direct.text());
    assert_eq!(direct.content_type().as_deref(), Some(OCI_MANIFEST));
}

// === 2. content negotiation ===

#[tokio::test]
async fn an_index_the_client_does_not_accept_is_manifest_unknown() {
    let s = Stack::serve();
    let c = http();
    let base = s.proxy.url();
    let repo = "serve/accept";
    for (i, a) in arches(&["x86_64", "aarch64"]).into_iter().enumerate() {
        push_arch(&[&base], repo, "v5", a, 50 + i as u64).await;
    }
    let served = get_any_manifest(&c, &base, repo, "v5").await;
    assert_index_answer(&served);
    assert_eq!(served.content_type().as_deref(), Some(OCI_INDEX));

    // OCI children make an OCI index: a client that lists no index type,
    // or only the Docker list, is told there is no such manifest.
    let refused: [&[&str]; 3] = [
        &[OCI_MANIFEST, DOCKER_MANIFEST],
        &[&format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}")],
        &[DOCKER_LIST],
    ];
    for accept in refused {
        for method in [Method::GET, Method::HEAD] {
            let a = ask_manifest(&c, method.clone(), &base, repo, "v5", accept).await;
            assert_eq!(a.status, 404, "{method} Accept {accept:?}: {}", a.text());
            assert_eq!(a.digest_header(), None, "{method} Accept {accept:?}");
            if method == Method::GET {
                assert_eq!(oci_error_codes(&a.body), ["MANIFEST_UNKNOWN"]);
                assert!(!a.text().contains("sha256:"), "{}", a.text());
            }
        }
    }
    // No Accept line at all (reqwest always sends one, so raw HTTP here).
    let (status, head, body) = raw_get(s.proxy.port(), &format!("/v2/{repo}/manifests/v5"));
    assert_eq!(status, 404, "GET without Accept: {head}\n{body}");
    assert_eq!(oci_error_codes(body.as_bytes()), ["MANIFEST_UNKNOWN"]);
    assert!(
        !head.to_ascii_lowercase().contains("docker-content-digest"),
        "{head}"
    );

    // `*/*`, or the index type on any one of several Accept lines: served.
    let accepted: [&[&str]; 3] = [
        &["*/*"],
        &[OCI_MANIFEST, &format!("{OCI_INDEX}; q=0.5")],
        &[&format!("{DOCKER_MANIFEST}, {OCI_INDEX}")],
    ];
    for accept in accepted {
        let a = ask_manifest(&c, Method::GET, &base, repo, "v5", accept).await;
        assert_index_answer(&a);
        assert!(a.body == served.body, "Accept {accept:?}");
    }
}

#[test]
fn schema2_children_make_a_docker_list_that_list_only_clients_get() {
    let s = Stack::serve();
    let repo = "serve/schema2";
    for (i, a) in arches(&["x86_64", "aarch64"]).into_iter().enumerate() {
        let layout = build_oci_layout(&a.image(60 + i as u64), "build");
        let dest = s.via(&format!("{repo}:{}", arch_tag(a.alias, "v6")));
        skopeo_push(&layout, &dest, Format::V2s2);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = http();
        let base = s.proxy.url();
        let list = ask_manifest(&c, Method::GET, &base, repo, "v6", &[DOCKER_LIST]).await;
        assert_index_answer(&list);
        assert_eq!(list.content_type().as_deref(), Some(DOCKER_LIST));
        assert_eq!(list.entries().len(), 2, "{}", list.text());
        // The same list for every client that accepts it …
        let any = get_any_manifest(&c, &base, repo, "v6").await;
        assert!(any.body == list.body);
        // … and none for one that accepts only OCI indexes (rewriting the
        // list as an OCI index would change its digest).
        for accept in [&[OCI_INDEX][..], &[DOCKER_MANIFEST]] {
            let a = ask_manifest(&c, Method::GET, &base, repo, "v6", accept).await;
            assert_eq!(a.status, 404, "Accept {accept:?}: {}", a.text());
            assert_eq!(oci_error_codes(&a.body), ["MANIFEST_UNKNOWN"]);
        }
    });
}

/// `GET <path>` over raw HTTP/1.1 with no `Accept` header: (status, head,
/// body).
fn raw_get(port: u16, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reading the answer");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

// === 3. everything else stays the registry's ===

#[tokio::test]
async fn plain_tags_pass_untouched_in_serve_mode() {
    let s = Stack::serve();
    let c = http();
    let repo = "serve/plain";
    let mut pushed = Vec::new();
    for (i, tag) in ["v9", "latest"].into_iter().enumerate() {
        let img = push_image(
            &c,
            &s.proxy.url(),
            repo,
            tag,
            &ImageSpec::new("linux", "amd64").layer(70 + i as u64, 1024),
        )
        .await;
        pushed.push((tag, img));
    }
    for (tag, img) in &pushed {
        for reference in [*tag, img.digest.as_str()] {
            for method in [Method::GET, Method::HEAD] {
                let via = ask_manifest(
                    &c,
                    method.clone(),
                    &s.proxy.url(),
                    repo,
                    reference,
                    &[ACCEPT_ANY_MANIFEST],
                )
                .await
                .expect(200);
                let direct = ask_manifest(
                    &c,
                    method.clone(),
                    &s.registry.url(),
                    repo,
                    reference,
                    &[ACCEPT_ANY_MANIFEST],
                )
                .await
                .expect(200);
                assert!(via.body == direct.body, "{method} {reference}");
                for h in [
                    "content-type",
                    "docker-content-digest",
                    "content-length",
                    "etag",
                ] {
                    assert_eq!(via.header(h), direct.header(h), "{method} {reference}: {h}");
                }
                if method == Method::GET {
                    assert!(via.body == img.manifest, "{reference}");
                }
            }
        }
    }
    assert_eq!(
        list_tags(&c, &s.registry.url(), repo).await,
        ["latest", "v9"]
    );
    let mut puts = s.manifest_puts(repo);
    puts.sort();
    assert_eq!(puts, ["latest", "v9"]);
}

// === 4. staleness: a second at most, across replicas ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_straight_to_the_registry_is_served_within_a_second() {
    let s = Stack::serve();
    let c = http();
    let base = s.proxy.url();
    let repo = "serve/fresh";
    let (amd, arm) = (arches(&["x86_64"])[0], arches(&["aarch64"])[0]);
    let first = push_arch(&[&base], repo, "v2", amd, 80).await;
    let before = get_any_manifest(&c, &base, repo, "v2").await;
    assert_index_answer(&before);
    assert_eq!(before.entries(), BTreeSet::from([first.clone()]));

    // A client keeps pulling v2 through the replica (keeping its cache as
    // warm as it can be) while the arm64 build is pushed straight to the
    // registry, bypassing archmerge.
    let done: Arc<Mutex<Option<Instant>>> = Arc::default();
    let poll = {
        let (done, base) = (done.clone(), base.clone());
        tokio::spawn(async move {
            let c = http();
            let mut seen = Vec::new();
            loop {
                let sent = Instant::now();
                if done
                    .lock()
                    .unwrap()
                    .is_some_and(|d| sent > d + Duration::from_secs(2))
                {
                    return seen;
                }
                let a = get_any_manifest(&c, &base, repo, "v2").await;
                assert_index_answer(&a);
                seen.push((sent, a.entries()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = push_arch(&[&s.registry.url()], repo, "v2", arm, 81).await;
    let pushed_at = Instant::now();
    *done.lock().unwrap() = Some(pushed_at);
    let seen = poll.await.expect("the polling client panicked");

    let both = BTreeSet::from([first, second]);
    let late: Vec<_> = seen
        .iter()
        .filter(|(sent, _)| *sent > pushed_at + Duration::from_secs(1))
        .collect();
    assert!(
        late.len() > 5,
        "too few pulls after the bound: {}",
        late.len()
    );
    for (sent, entries) in &late {
        assert_eq!(
            entries,
            &both,
            "a pull sent {:?} after the direct push still misses it",
            sent.duration_since(pushed_at)
        );
    }
    assert!(
        seen.iter()
            .any(|(sent, e)| *sent < pushed_at && e.len() == 1),
        "the replica never served v2 before the push"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_serve_replicas_serve_every_arch_pushed_through_any_of_them() {
    let s = Stack::serve();
    let replicas = [s.replica(mode("serve")), s.replica(mode("serve"))];
    let bases = vec![s.proxy.url(), replicas[0].url(), replicas[1].url()];
    let repo = "replicas/serve";
    let targets = ["v1", "v2.0", "latest"];

    // Clients keep pulling every target from every replica while the pushes
    // land, so each replica holds (soon stale) aggregates of its own.
    let stop = Arc::new(AtomicBool::new(false));
    let poll = {
        let (stop, bases) = (stop.clone(), bases.clone());
        tokio::spawn(async move {
            let c = http();
            let mut pulls = 0;
            while !stop.load(Ordering::Relaxed) {
                for base in &bases {
                    for target in targets {
                        let a = get_any_manifest(&c, base, repo, target).await;
                        match a.status {
                            200 => assert_index_answer(&a),
                            404 => {}
                            _ => panic!("{}: {} {}", a.asked, a.status, a.text()),
                        }
                        pulls += 1;
                    }
                }
            }
            pulls
        })
    };
    let want = push_round_robin(&bases, repo, &targets, 900).await;
    stop.store(true, Ordering::Relaxed);
    let pulls = poll.await.expect("a pulling client saw an error");
    assert!(pulls > 0);

    // Just over a second later, every replica serves every arch.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let c = http();
    for target in targets {
        let mut bytes = None;
        for base in &bases {
            let a = get_any_manifest(&c, base, repo, target).await;
            assert_index_answer(&a);
            assert_eq!(a.entries().len(), 8, "{base} {target}: {}", a.text());
            assert_eq!(a.entries(), want[target], "{base} {target}: {}", a.text());
            if let Some(b) = &bytes {
                assert!(a.body == *b, "replicas serve different bytes for {target}");
            }
            bytes = Some(a.body);
        }
    }
    // Still nothing written upstream.
    let tags = list_tags(&c, &s.registry.url(), repo).await;
    assert_eq!(tags.len(), 24, "{tags:?}");
    assert!(
        targets.iter().all(|t| !tags.iter().any(|x| x == t)),
        "{tags:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_write_replicas_leave_every_target_complete_in_the_registry() {
    let s = Stack::write();
    let replicas = [
        s.replica(ArchmergeOpts::default()),
        s.replica(ArchmergeOpts::default()),
    ];
    let bases = vec![s.proxy.url(), replicas[0].url(), replicas[1].url()];
    let repo = "replicas/write";
    let targets = ["v1", "v2.0", "latest"];
    let want = push_round_robin(&bases, repo, &targets, 950).await;

    // Every push has returned: the registry itself holds every arch.
    let c = http();
    for target in targets {
        let stored = get_any_manifest(&c, &s.registry.url(), repo, target).await;
        assert_index_answer(&stored);
        assert_eq!(
            stored.entries(),
            want[target],
            "{target}: {}",
            stored.text()
        );
        for base in &bases {
            let via = get_any_manifest(&c, base, repo, target).await;
            assert!(via.body == stored.body, "{base} {target}");
        }
    }
}
