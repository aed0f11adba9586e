//! Bounded work, whoever asks (spec §5 serve mode, §9): what one client's
//! request, one webhook envelope or one stalled body may cost, measured from
//! outside.
//!
//! Each test starts its own `docker-registry` (CNCF distribution 2.8) and
//! archmerge in front of it, and measures from the registry's side: the
//! registry writes one access-log line per request it answered (combined log
//! format, see `tests/support/observe.rs`), so the requests archmerge made
//! between two points of a test are the lines added in between. archmerge's
//! own cost is read from `/proc/PID`: its open file descriptors and its peak
//! resident memory (`VmHWM`).
//!
//! The stories:
//! 1. serve mode never hands one identity's failed load to another;
//! 2. serve mode answers random digests 404 for a handful of registry
//!    requests each, and still finds a real index digest on a fresh replica;
//! 3. a DELETE by digest in a repository of 2,000 arch tags runs in a
//!    bounded number of file descriptors and never reads a failed lookup as
//!    "this digest is in no index";
//! 4. a webhook envelope of 10,000 forged events costs the registry a
//!    bounded number of requests, and an admin listener off loopback needs
//!    a token;
//! 5. 40 stalled manifest bodies of almost 4 MiB do not grow archmerge's
//!    memory past a budget, nor lock other pushes out.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use reqwest::Method;

use support::*;

const OCI_MANIFEST: &str = media::OCI_MANIFEST;

/// What docker sends when it wants a multi-arch answer: both index types on
/// one `Accept` line.
const ACCEPT_INDEXES: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";

const MIB: u64 = 1024 * 1024;

/// `--mode <m>`.
fn mode(m: &str) -> ArchmergeOpts {
    ArchmergeOpts {
        args: vec!["--mode".into(), m.into()],
        ..ArchmergeOpts::default()
    }
}

/// A digest no registry holds: sha256 of a counter and the clock.
fn random_digest() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos();
    digest_of(format!("archmerge-bounds-{n}-{nanos}").as_bytes())
}

/// The arch of the alias table named `alias`.
fn arch(alias: &str) -> ArchSpec {
    *EIGHT_ARCHES
        .iter()
        .find(|a| a.alias == alias)
        .unwrap_or_else(|| panic!("no arch {alias}"))
}

/// PUTs the manifest `bytes` (already stored with its blobs) at every tag
/// of `tags` in `repo` at `base`, `jobs` at a time; panics unless each is
/// 201. Seeds big repositories fast: one manifest, many tags.
async fn tag_many(base: &str, repo: &str, manifest: &[u8], tags: Vec<String>, jobs: usize) {
    let c = http();
    let puts = futures_util::stream::iter(tags.into_iter().map(|tag| {
        let c = c.clone();
        async move {
            let res = put_manifest(&c, base, repo, &tag, OCI_MANIFEST, manifest).await;
            let status = res.status().as_u16();
            let body = res.text().await.unwrap_or_default();
            assert_eq!(status, 201, "PUT {repo}:{tag} at {base}: {body}");
        }
    }))
    .buffer_unordered(jobs);
    puts.collect::<Vec<()>>().await;
}

/// The entries of `repo:tag` as stored in the registry (read straight from
/// it), or the status it answered instead.
async fn stored_entries(registry: &str, repo: &str, tag: &str) -> Result<Entries, String> {
    let a = get_any_manifest(&http(), registry, repo, tag).await;
    if a.status != 200 {
        return Err(format!("{} {}", a.status, a.text()));
    }
    Ok(a.entries())
}

type Entries = BTreeSet<(String, String)>;

// === 1. serve mode: no cross-identity effects ===

/// The only user the htpasswd registry knows.
fn ci() -> Creds {
    Creds::new("ci-builder", "Bq4-pass-0815-secret")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_mode_answers_an_authorized_client_every_time_while_anonymous_clients_poll_the_same_tag(
) {
    // Guards: "no client's answer depends on another identity's requests; a
    // load that failed for one caller is never handed to another" (§5). An
    // anonymous caller's load of `sec/app:v1` fails (the registry says 401
    // to its tags list); if that failed load is shared with, or cached for,
    // the authorized client asking at the same moment, the authorized
    // client gets 404 MANIFEST_UNKNOWN for an index that exists.
    let htpasswd = Htpasswd::new(&[&ci()]);
    let registry = spawn_registry_with(RegistryOpts {
        htpasswd: Some(htpasswd.path()),
        ..RegistryOpts::default()
    });
    // Whatever the cache's staleness, the answer must not depend on who
    // else asked; a short one makes a load start on nearly every request
    // (instead of once a second), so an authorized request meets an
    // anonymous load in flight many times in 200 tries.
    let proxy = spawn_archmerge_with(
        &registry.url(),
        ArchmergeOpts {
            config_toml: Some("[cache]\nstaleness_ms = 10\n".into()),
            ..mode("serve")
        },
    );
    let via = proxy.url();
    let authed = http_as(Some(&ci()));
    let amd = push_image(
        &authed,
        &via,
        "sec/app",
        "x86_64_v1",
        &arch("x86_64").image(101),
    )
    .await;
    let arm = push_image(
        &authed,
        &via,
        "sec/app",
        "aarch64_v1",
        &arch("aarch64").image(102),
    )
    .await;
    let want: Entries = [
        (arch("x86_64").platform(), amd.digest.clone()),
        (arch("aarch64").platform(), arm.digest.clone()),
    ]
    .into_iter()
    .collect();

    // Three anonymous clients poll the target as fast as they can.
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = (0..3)
        .map(|_| {
            let (stop, via) = (stop.clone(), via.clone());
            tokio::spawn(async move {
                let c = http();
                let mut seen = BTreeMap::<u16, usize>::new();
                let mut wrong = None;
                while !stop.load(Ordering::Relaxed) {
                    let a = ask_manifest(&c, Method::GET, &via, "sec/app", "v1", &[ACCEPT_INDEXES])
                        .await;
                    *seen.entry(a.status).or_default() += 1;
                    if a.status != 401 && wrong.is_none() {
                        wrong = Some(format!("{} {}", a.status, a.text()));
                    }
                }
                (seen, wrong)
            })
        })
        .collect();

    // Meanwhile the authorized client asks 200 times, one after the other.
    let mut failures = Vec::new();
    for i in 0..200 {
        let a = ask_manifest(
            &authed,
            Method::GET,
            &via,
            "sec/app",
            "v1",
            &[ACCEPT_INDEXES],
        )
        .await;
        let ok = a.status == 200
            && serde_json::from_slice::<serde_json::Value>(&a.body)
                .is_ok_and(|j| index_entries(&j) == want);
        if !ok {
            failures.push(format!("#{i}: {} {}", a.status, a.text()));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut anonymous = BTreeMap::<u16, usize>::new();
    let mut anonymous_wrong = Vec::new();
    for p in pollers {
        let (seen, wrong) = p.await.expect("an anonymous poller panicked");
        for (status, n) in seen {
            *anonymous.entry(status).or_default() += n;
        }
        anonymous_wrong.extend(wrong);
    }
    eprintln!(
        "authorized: {} of 200 GETs wrong; anonymous answers by status: {anonymous:?}",
        failures.len()
    );

    assert!(
        failures.is_empty(),
        "{} of 200 authorized GETs of sec/app:v1 did not get the index {want:?} while \
         anonymous clients polled it (anonymous answers: {anonymous:?}); first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        anonymous_wrong.is_empty(),
        "an anonymous client got something else than 401: {anonymous_wrong:?} \
         (answers: {anonymous:?})"
    );
    assert!(
        anonymous.get(&401).copied().unwrap_or(0) >= 30,
        "the anonymous clients barely asked ({anonymous:?}): the test did not test"
    );
}

// === 2. serve mode: random digests are cheap ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_mode_answers_random_digests_404_for_a_few_registry_requests_and_still_finds_a_real_index(
) {
    // Guards: "repeated lookups are cached (negative answers too)" and
    // "every client request costs the registry a bounded number of
    // requests, whatever the repository's size or the client's intent"
    // (§9). A GET of `repo@<digest>` in serve mode may name a synthesized
    // index; working out that it names none must not cost a tags list plus
    // a HEAD of every arch tag on every request, or anyone can make the
    // registry do 200 requests for one of theirs.
    let registry = spawn_registry();
    let reg = registry.url();
    let repo = "wide/app";
    // 50 targets × 4 arches, pushed straight to the registry. x86_64 has
    // its own image per target (so each target's index has its own
    // digest); the three others share one image each.
    let c = http();
    for t in 0..50u64 {
        push_image(
            &c,
            &reg,
            repo,
            &format!("x86_64_t{t}"),
            &arch("x86_64").image(2000 + t),
        )
        .await;
    }
    for (n, alias) in ["aarch64", "armv7l", "riscv64"].into_iter().enumerate() {
        let first = push_image(
            &c,
            &reg,
            repo,
            &format!("{alias}_t0"),
            &arch(alias).image(3000 + n as u64),
        )
        .await;
        let tags = (1..50).map(|t| format!("{alias}_t{t}")).collect();
        tag_many(&reg, repo, &first.manifest, tags, 8).await;
    }
    let proxy = spawn_archmerge_with(&reg, mode("serve"));
    let via = proxy.url();

    // Warm-up: the first lookup may pay for filling caches.
    let warm = get_any_manifest(&c, &via, repo, &random_digest()).await;
    assert_eq!(warm.status, 404, "warm-up: {}", warm.text());

    // 200 random digests, one after the other (bounded to 40 s, so today's
    // cost shows as a number rather than a hang).
    let before = registry.requests_settled();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut done = 0usize;
    let mut wrong = Vec::new();
    while done < 200 && Instant::now() < deadline {
        let digest = random_digest();
        let a = get_any_manifest(&c, &via, repo, &digest).await;
        let codes = serde_json::from_slice::<serde_json::Value>(&a.body)
            .ok()
            .and_then(|j| {
                j["errors"].as_array().map(|e| {
                    e.iter()
                        .map(|e| e["code"].as_str().unwrap_or("?").to_owned())
                        .collect::<Vec<_>>()
                })
            });
        if a.status != 404 || codes.as_deref() != Some(&["MANIFEST_UNKNOWN".to_owned()][..]) {
            wrong.push(format!("{digest}: {} {}", a.status, a.text()));
        }
        done += 1;
    }
    let after = registry.requests_settled();
    let per_get = (after - before) as f64 / done as f64;
    eprintln!(
        "{done} random-digest GETs cost the registry {} requests, {per_get:.1} per GET:\n{}",
        after - before,
        registry.access_summary(before)
    );
    assert!(
        wrong.is_empty(),
        "{} of {done} GETs of a random digest were not 404 MANIFEST_UNKNOWN; first: {:?}",
        wrong.len(),
        wrong.first()
    );
    assert_eq!(
        done, 200,
        "only {done} of 200 random-digest GETs answered within 40 s ({per_get:.1} registry \
         requests per GET)"
    );
    assert!(
        per_get <= 5.0,
        "a GET of a random digest cost the registry {per_get:.1} requests on average over \
         {done} GETs (at most 5 allowed); what it asked:\n{}",
        registry.access_summary(before)
    );

    // A real index digest is still found, even by a replica that never
    // served the index by tag.
    let by_tag = get_any_manifest(&c, &via, repo, "t7").await;
    assert_index_answer(&by_tag);
    let digest = by_tag
        .digest_header()
        .expect("checked by assert_index_answer");
    let fresh = spawn_archmerge_with(&reg, mode("serve"));
    let by_digest = get_any_manifest(&c, &fresh.url(), repo, &digest).await;
    assert_index_answer(&by_digest);
    assert_eq!(by_digest.digest_header().as_deref(), Some(digest.as_str()));
    assert_eq!(
        by_digest.body, by_tag.body,
        "the index by digest differs from the one by tag"
    );
}

// === 3. write mode: DELETE by digest, bounded, never "no" on failure ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_mode_delete_by_digest_among_2000_arch_tags_stays_within_128_fds_and_updates_the_index(
) {
    // Guards: "fan-out has a concurrency limit" and "a lookup that fails is
    // retried or fails the merge loudly; it never counts as 'not affected'"
    // (§9). A DELETE by digest must find which arch tags point at the
    // digest; in a repository of 2,000 arch tags, asking for all of them at
    // once takes thousands of sockets. Under an open-file limit of 1,024
    // that fails, and a failed lookup read as "in no index" leaves the
    // deleted manifest listed in its target's index.
    let registry = spawn_registry();
    let reg = registry.url();
    let repo = "many/app";
    let c = http();
    // 2,000 arch tags of 2,000 targets, straight to the registry: four
    // images, each tagged 500 times.
    for n in 0..4u64 {
        let first = push_image(
            &c,
            &reg,
            repo,
            &format!("x86_64_t{n}"),
            &arch("x86_64").image(4000 + n),
        )
        .await;
        let tags = (4..2000)
            .filter(|t| t % 4 == n)
            .map(|t| format!("x86_64_t{t}"))
            .collect();
        tag_many(&reg, repo, &first.manifest, tags, 8).await;
    }
    let proxy = spawn_archmerge_with(
        &reg,
        ArchmergeOpts {
            nofile: Some(1024),
            ..ArchmergeOpts::default()
        },
    );
    assert_eq!(
        proxy.nofile_limit(),
        ("1024".to_owned(), "1024".to_owned()),
        "archmerge does not run under the open-file limit the test set"
    );
    let via = proxy.url();

    // Ten targets pushed through archmerge, so their indexes exist.
    let mut targets = Vec::new();
    for i in 0..10u64 {
        let amd = push_image(
            &c,
            &via,
            repo,
            &format!("x86_64_v{i}"),
            &arch("x86_64").image(5000 + i),
        )
        .await;
        let arm = push_image(
            &c,
            &via,
            repo,
            &format!("aarch64_v{i}"),
            &arch("aarch64").image(6000 + i),
        )
        .await;
        targets.push((i, amd.digest, arm.digest));
    }
    for (i, amd, arm) in &targets {
        let want: Entries = [
            (arch("x86_64").platform(), amd.clone()),
            (arch("aarch64").platform(), arm.clone()),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            stored_entries(&reg, repo, &format!("v{i}")).await,
            Ok(want),
            "{repo}:v{i} after its two pushes through archmerge"
        );
    }

    // Delete each target's aarch64 manifest by digest, through archmerge,
    // sampling its open file descriptors all along.
    let before = registry.requests_settled();
    let fds = FdSampler::start(proxy.pid(), Duration::from_millis(2));
    let phase = Instant::now();
    let mut problems = Vec::new();
    for (i, amd, arm) in &targets {
        let started = Instant::now();
        let res = tokio::time::timeout(
            Duration::from_secs(20),
            c.delete(format!("{via}/v2/{repo}/manifests/{arm}")).send(),
        )
        .await;
        let res = match res {
            Err(_) => {
                problems.push(format!("v{i}: DELETE {arm} did not answer within 20 s"));
                break;
            }
            Ok(Err(e)) => {
                problems.push(format!("v{i}: DELETE {arm}: {e}"));
                continue;
            }
            Ok(Ok(res)) => res,
        };
        let status = res.status().as_u16();
        let body = res.text().await.unwrap_or_default();
        let took = started.elapsed();
        if status != 202 {
            problems.push(format!("v{i}: DELETE {arm} answered {status} {body}"));
            continue;
        }
        // As soon as the DELETE returned, the index no longer lists it.
        let want: Entries = [(arch("x86_64").platform(), amd.clone())]
            .into_iter()
            .collect();
        let stored = stored_entries(&reg, repo, &format!("v{i}")).await;
        if stored.as_ref() != Ok(&want) {
            problems.push(format!(
                "v{i}: right after DELETE of the aarch64 manifest {arm} answered 202 \
                 (in {took:?}), {repo}:v{i} is {stored:?}, not {want:?}"
            ));
        }
        if phase.elapsed() > Duration::from_secs(60) {
            problems.push("the deletes took over 60 s; stopped there".into());
            break;
        }
    }
    let (peak, samples) = fds.stop();
    let took = phase.elapsed();
    let cost = registry.requests_settled() - before;
    eprintln!(
        "10 deletes by digest among 2,000 arch tags: {took:?}, peak {peak} open fds \
         ({samples} samples), {cost} registry requests (10 of them the test's own reads):\n{}",
        registry.access_summary(before)
    );
    let log = proxy.log_text();
    let emfile = log
        .lines()
        .filter(|l| l.contains("Too many open files"))
        .count();
    assert!(
        problems.is_empty(),
        "{} problem(s) deleting by digest (peak {peak} fds; {emfile} log lines say \
         `Too many open files`):\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(
        samples >= 10,
        "only {samples} fd samples: the test did not test"
    );
    assert!(
        peak <= 128,
        "archmerge held up to {peak} file descriptors while deleting by digest among \
         2,000 arch tags (at most 128 allowed; {emfile} log lines say `Too many open files`)"
    );
}

// === 4. the webhook is bounded ===

/// An envelope of `n` forged push events: `forged/r<i>:x86_64_v1` at
/// random digests, in repositories that do not exist. Kept small per event
/// (about 250 bytes) so 10,000 fit the admin listener's 4 MiB body limit.
fn forged_envelope(n: usize) -> String {
    let events: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "id": format!("f{i}"),
                "action": "push",
                "target": {
                    "mediaType": OCI_MANIFEST,
                    "digest": random_digest(),
                    "repository": format!("forged/r{i}"),
                    "tag": "x86_64_v1",
                    "size": 500,
                },
            })
        })
        .collect();
    serde_json::json!({ "events": events }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_envelope_of_10000_forged_push_events_costs_the_registry_at_most_2000_requests() {
    // Guards: "every webhook event costs the registry a bounded number of
    // requests" (§9). Whoever holds the admin token (or a registry gone
    // wild) can post 10,000 events in one envelope; each one waiting for
    // its tag (HEAD after HEAD for seconds) and then rebuilding its target
    // turns one POST into hundreds of thousands of registry requests that
    // go on long after the POST returned. archmerge may take part of the
    // work (202/200) or refuse it (503 with Retry-After), but what it does
    // must be bounded and must end.
    let registry = spawn_registry();
    let reg = registry.url();
    let token = "hook-bounds-91c2";
    let proxy = spawn_archmerge_with(
        &reg,
        ArchmergeOpts {
            env: vec![("ARCHMERGE_ADMIN_TOKEN".into(), token.into())],
            ..ArchmergeOpts::default()
        },
    );
    let envelope = forged_envelope(10_000);
    assert!(
        envelope.len() < 4 * MIB as usize,
        "{} bytes",
        envelope.len()
    );

    let before = registry.requests_settled();
    let posted = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(15),
        http()
            .post(format!("{}/events", proxy.admin_url()))
            .header("authorization", format!("Bearer {token}"))
            .header(
                "content-type",
                "application/vnd.docker.distribution.events.v1+json",
            )
            .body(envelope)
            .send(),
    )
    .await
    .expect("POST /events did not answer within 15 s")
    .expect("POST /events");
    let status = res.status().as_u16();
    let retry_after = header(&res, "retry-after");
    let body = res.text().await.unwrap_or_default();
    eprintln!(
        "POST /events of 10,000 forged events: {status} (Retry-After {retry_after:?}) {body}"
    );
    assert!(
        matches!(status, 200 | 202) || (status == 503 && retry_after.is_some()),
        "POST /events answered {status} (Retry-After {retry_after:?}): {body}"
    );

    // 15 s after the POST, then a quiet window from 20 s to 23 s.
    let at = |secs| posted + Duration::from_secs(secs);
    tokio::time::sleep_until(at(15).into()).await;
    let by_15s = registry.requests_seen() - before;
    tokio::time::sleep_until(at(20).into()).await;
    let by_20s = registry.requests_seen() - before;
    tokio::time::sleep_until(at(23).into()).await;
    let by_23s = registry.requests_seen() - before;
    eprintln!(
        "registry requests after the envelope: {by_15s} by 15 s, {by_20s} by 20 s, \
         {by_23s} by 23 s:\n{}",
        registry.access_summary(before)
    );
    assert!(
        by_15s <= 2000,
        "10,000 forged events cost the registry {by_15s} requests within 15 s of the POST \
         (at most 2,000 allowed; {by_23s} by 23 s); what archmerge asked:\n{}",
        registry.access_summary(before)
    );
    assert_eq!(
        by_20s, by_23s,
        "archmerge still works on the forged events 20 s after the POST \
         ({by_20s} registry requests by 20 s, {by_23s} by 23 s)"
    );
    assert!(
        by_23s <= 2000,
        "10,000 forged events cost the registry {by_23s} requests in all (at most 2,000)"
    );

    // And archmerge still does its job: a normal push merges at once.
    let c = http();
    let via = proxy.url();
    let amd = push_image(
        &c,
        &via,
        "after/app",
        "x86_64_v1",
        &arch("x86_64").image(71),
    )
    .await;
    let arm = push_image(
        &c,
        &via,
        "after/app",
        "aarch64_v1",
        &arch("aarch64").image(72),
    )
    .await;
    let want: Entries = [
        (arch("x86_64").platform(), amd.digest),
        (arch("aarch64").platform(), arm.digest),
    ]
    .into_iter()
    .collect();
    let (r, w) = (&reg, &want);
    let merged = eventually(Duration::from_secs(5), move || async move {
        stored_entries(r, "after/app", "v1").await.as_ref() == Ok(w)
    })
    .await;
    assert!(
        merged,
        "after/app:v1 is {:?} 5 s after its pushes, following the forged envelope",
        stored_entries(&reg, "after/app", "v1").await
    );
}

/// Runs `archmerge serve` with `args` (and no `ARCHMERGE_*` from the test's
/// environment) and waits up to 10 s for it to exit. Returns its exit code
/// and stderr; panics if it started serving instead (killing it).
fn serve_must_refuse(listen_port: u16, args: &[String]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let err_path = dir.path().join("stderr");
    let err = std::fs::File::create(&err_path).expect("creating the stderr file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_archmerge"));
    cmd.arg("serve").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("ARCHMERGE_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("running archmerge");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("waiting for archmerge") {
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            return (status.code(), stderr);
        }
        let serving = v2_status(listen_port).is_some();
        if serving || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            panic!(
                "archmerge serve {args:?} started ({}) instead of refusing an admin \
                 listener off loopback without admin_token\n--- stderr ---\n{stderr}",
                if serving {
                    "it answers GET /v2/"
                } else {
                    "still running after 10 s"
                }
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_admin_listener_off_loopback_without_an_admin_token_refuses_to_start() {
    // Guards: the admin listener takes `POST /events` and `/reconcile`;
    // open on every interface with no token, anyone on the network could
    // make archmerge work on the registry (§7, §9). Whether the address
    // comes from a flag or the config file, that is a bad config: exit 64
    // and say what to set.
    let registry = spawn_registry();
    let listen = free_port();
    let admin = free_port();
    let common = vec![
        "--listen".to_owned(),
        format!("127.0.0.1:{listen}"),
        "--upstream".to_owned(),
        registry.url(),
    ];

    let mut by_flag = common.clone();
    by_flag.extend(["--admin-listen".to_owned(), format!("0.0.0.0:{admin}")]);
    let (code, stderr) = serve_must_refuse(listen, &by_flag);
    assert_eq!(code, Some(64), "--admin-listen 0.0.0.0: stderr:\n{stderr}");
    assert!(
        stderr.contains("admin_token"),
        "--admin-listen 0.0.0.0: stderr does not name admin_token:\n{stderr}"
    );

    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("archmerge.toml");
    std::fs::write(&file, format!("admin_listen = \"0.0.0.0:{admin}\"\n"))
        .expect("writing the config file");
    let mut by_file = common;
    by_file.extend(["--config".to_owned(), file.display().to_string()]);
    let (code, stderr) = serve_must_refuse(listen, &by_file);
    assert_eq!(
        code,
        Some(64),
        "admin_listen in the file: stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("admin_token"),
        "admin_listen in the file: stderr does not name admin_token:\n{stderr}"
    );
}

// === 5. memory before authentication is bounded ===

/// How a small push through archmerge went: pushed, refused with 503 and
/// `Retry-After` (allowed under pressure), or anything else (a failure).
#[derive(Debug)]
enum PushOutcome {
    Pushed,
    Busy(String),
    Failed(String),
}

/// Pushes a small image (config, layer, manifest) at `repo:tag` through
/// `base` (support's [`try_push`]), and says how it went.
async fn push_outcome(base: &str, repo: &str, tag: &str, spec: &ImageSpec) -> PushOutcome {
    match try_push(base, repo, tag, spec, false).await {
        Ok(_) => PushOutcome::Pushed,
        Err(f) if f.status == Some(503) && f.retry_after.is_some() => {
            PushOutcome::Busy(f.to_string())
        }
        Err(f) => PushOutcome::Failed(f.to_string()),
    }
}

/// What one stalled client managed before it was told to let go.
#[derive(Debug)]
struct Stalled {
    /// Body bytes written (chunk framing not counted).
    sent: usize,
    /// Why writing stopped early, if it did (archmerge closed, or stopped
    /// reading for 10 s).
    stopped: Option<String>,
}

/// Opens a chunked manifest PUT on 127.0.0.1:`port`, writes `body_len`
/// bytes of body in 64 KiB chunks, then sends nothing more until `release`
/// (the socket stays open), and closes. Blocking: run it on its own thread.
fn stall_a_manifest_body(port: u16, body_len: usize, release: Arc<AtomicBool>) -> Stalled {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port}: {e}"));
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "PUT /v2/mem/app/manifests/x86_64_v1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: {OCI_MANIFEST}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let mut stopped = s.write_all(head.as_bytes()).err().map(|e| e.to_string());
    let chunk = vec![b' '; 64 * 1024];
    let mut sent = 0;
    while stopped.is_none() && sent < body_len {
        let n = chunk.len().min(body_len - sent);
        let mut frame = format!("{n:x}\r\n").into_bytes();
        frame.extend_from_slice(&chunk[..n]);
        frame.extend_from_slice(b"\r\n");
        match s.write_all(&frame) {
            Ok(()) => sent += n,
            Err(e) => stopped = Some(e.to_string()),
        }
    }
    while !release.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(s);
    Stalled { sent, stopped }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_stalled_manifest_bodies_of_almost_4_mib_keep_memory_under_64_mib_and_others_served()
{
    // Guards: "buffered manifest bytes have a global budget" and "every
    // connection makes progress or is closed" (§9). A manifest PUT is
    // buffered before it is forwarded (archmerge must read it to merge);
    // 4 MiB each is allowed, but 40 anonymous clients sending just under
    // 4 MiB and then stalling must not make archmerge hold 160 MiB or
    // more — before the registry has even said who they are.
    let registry = spawn_registry();
    let reg = registry.url();
    let proxy = spawn_archmerge(&reg);
    let port = proxy.port();
    let via = proxy.url();
    let start_hwm = proxy.peak_rss_bytes();

    let body_len = 4 * MIB as usize - 64 * 1024;
    let release = Arc::new(AtomicBool::new(false));
    let stallers: Vec<_> = (0..40)
        .map(|_| {
            let release = release.clone();
            std::thread::spawn(move || stall_a_manifest_body(port, body_len, release))
        })
        .collect();
    // Let every staller send what it can (a write that archmerge does not
    // take gives up after 10 s), then hold them ~5 s.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = Instant::now();
    let other = tokio::time::timeout(
        Duration::from_secs(10),
        push_outcome(&via, "mem/other", "x86_64_v1", &arch("x86_64").image(81)),
    )
    .await;
    let other_took = during.elapsed();
    let mut hwm = proxy.peak_rss_bytes();
    while during.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        hwm = proxy.peak_rss_bytes();
    }
    release.store(true, Ordering::Relaxed);
    let stalled: Vec<Stalled> = stallers
        .into_iter()
        .map(|t| t.join().expect("a stalling client panicked"))
        .collect();
    let total_sent: usize = stalled.iter().map(|s| s.sent).sum();
    let cut = stalled.iter().filter(|s| s.stopped.is_some()).count();
    eprintln!(
        "40 stalled bodies: {} MiB sent in all, {cut} stopped early; archmerge VmHWM \
         {} MiB (at start {} MiB); the other push: {other:?} in {other_took:?}",
        total_sent as u64 / MIB,
        hwm / MIB,
        start_hwm / MIB
    );

    // After the stalled sockets close, a normal push works.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = tokio::time::timeout(
        Duration::from_secs(10),
        push_outcome(&via, "mem/app", "x86_64_v1", &arch("x86_64").image(82)),
    )
    .await;

    assert!(
        hwm <= 64 * MIB,
        "archmerge's peak RSS reached {} MiB while 40 clients stalled with {} MiB of \
         manifest bodies in all (at most 64 MiB allowed)",
        hwm / MIB,
        total_sent as u64 / MIB
    );
    match other {
        Err(_) => panic!("a small push during the stall hung past 10 s"),
        Ok(PushOutcome::Failed(why)) => {
            panic!("a small push during the stall failed instead of 201 or 503: {why}")
        }
        Ok(PushOutcome::Busy(why)) => eprintln!("the push during the stall was refused: {why}"),
        Ok(PushOutcome::Pushed) => {}
    }
    match after {
        Ok(PushOutcome::Pushed) => {}
        other => panic!("a push after the stalled clients left did not succeed: {other:?}"),
    }
}

// === the harness's own reading ===

#[test]
fn the_access_log_reader_counts_combined_log_lines_only() {
    // The other tests count registry requests by these lines: a reader
    // that missed them (or counted logrus lines too) would make every
    // bound above pass or fail for nothing.
    let line = "127.0.0.1 - - [03/Dec/2026:09:06:15 +0000] \
                \"GET /v2/foo/manifests/bar HTTP/1.1\" 404 93 \"\" \"ua x\"";
    assert_eq!(
        parse_access_line(line),
        Some(Access {
            method: "GET".into(),
            path: "/v2/foo/manifests/bar".into(),
            status: 404,
            agent: "ua x".into(),
        })
    );
    let logrus = "time=\"2026-12-03T09:06:15Z\" level=error msg=\"response completed with \
                  error\" http.request.uri=/v2/foo/manifests/bar http.response.status=404";
    assert_eq!(parse_access_line(logrus), None);

    // And a real registry writes exactly one such line per request.
    let registry = spawn_registry();
    let before = registry.requests_settled();
    for _ in 0..3 {
        assert_eq!(v2_status(registry.port()), Some(200));
    }
    assert_eq!(registry.requests_settled() - before, 3);
}

// === 6. an arch push costs what it costs, whatever the repository's size ===

#[tokio::test]
async fn in_a_repository_of_2000_unrelated_tags_arch_pushes_stop_listing_it_and_miss_nothing() {
    // Guards: a push's work does not grow with the repository (§9). Once a
    // repository's listing has shown it large, a target's arch tags are
    // HEADed by name (every tag a pattern makes of an alias and the target)
    // instead of listing thousands of tags on every push — and what exists
    // of those is exactly what a listing would show, arch tags pushed
    // straight at the registry included.
    let registry = spawn_registry();
    let reg = registry.url();
    let repo = "big/app";
    let c = http();
    let plain = push_image(&c, &reg, repo, "build-0", &arch("x86_64").image(7000)).await;
    let tags = (1..2000).map(|t| format!("build-{t}")).collect();
    tag_many(&reg, repo, &plain.manifest, tags, 8).await;
    let proxy = spawn_archmerge(&reg);
    let via = proxy.url();

    // The first push lists the repository once and learns its size.
    let amd = push_image(&c, &via, repo, "x86_64_v1", &arch("x86_64").image(7001)).await;
    // An arch tag pushed straight at the registry, which archmerge never saw.
    let arm = push_image(&c, &reg, repo, "aarch64_v1", &arch("aarch64").image(7002)).await;

    let before = registry.requests_settled();
    let s390x = push_image(&c, &via, repo, "s390x_v1", &arch("s390x").image(7003)).await;
    let seen: Vec<Access> = registry.access_log().into_iter().skip(before).collect();
    let listings = seen
        .iter()
        .filter(|a| a.path.starts_with(&format!("/v2/{repo}/tags/list")))
        .count();
    assert_eq!(
        listings,
        0,
        "an arch push listed the 2,000-tag repository again: {}",
        registry.access_summary(before)
    );
    // Bounded by the candidates of one target, not by the repository.
    assert!(
        seen.len() <= 200,
        "one arch push cost the registry {} requests: {}",
        seen.len(),
        registry.access_summary(before)
    );
    let want: Entries = [
        ("linux/amd64".to_owned(), amd.digest.clone()),
        ("linux/arm64/v8".to_owned(), arm.digest.clone()),
        ("linux/s390x".to_owned(), s390x.digest.clone()),
    ]
    .into();
    assert_eq!(stored_entries(&reg, repo, "v1").await, Ok(want));
}

// === 7. background retries carry archmerge's own credentials ===

#[tokio::test]
async fn a_merge_that_failed_transiently_is_retried_with_archmerges_own_credentials() {
    // Guards: a client's bearer token expires within minutes, so background
    // work must not depend on it. A token registry (its realm issues
    // archmerge's own identity a token for any scope); a relay in front of
    // it fails the index PUT of the first merge and its inline retries with
    // 503. The retry in the background writes the index — with a token the
    // realm issued to archmerge's own identity, not the CI job's (which the
    // test minted itself and the realm never saw).
    let issuer = std::sync::Arc::new(TokenIssuer::new());
    let realm = Realm::start(issuer.clone(), "archmerge-bot", "bot-pass-61", 300).await;
    let registry = spawn_registry_with(RegistryOpts {
        env: issuer.registry_env_with_realm(&realm.url()),
        ..RegistryOpts::default()
    });
    let relay = Relay::start(&registry.url());
    // The first rebuild and its three inline retries.
    relay.fail("PUT", "/v2/own/app/manifests/v1", 503, 4);
    let proxy = spawn_archmerge_with(
        &relay.url(),
        ArchmergeOpts {
            env: vec![
                ("ARCHMERGE_UPSTREAM_USERNAME".into(), "archmerge-bot".into()),
                ("ARCHMERGE_UPSTREAM_PASSWORD".into(), "bot-pass-61".into()),
            ],
            ..ArchmergeOpts::default()
        },
    );
    let ci = http_bearer(&issuer.token(&[("own/app", &["pull", "push"])]));
    let pushed = push_image(
        &ci,
        &proxy.url(),
        "own/app",
        "x86_64_v1",
        &arch("x86_64").image(7100),
    )
    .await;
    assert_eq!(
        relay.failures_left(),
        0,
        "the first merge did not try the index PUT four times"
    );
    assert!(
        realm.asked().is_empty(),
        "nothing asked the realm before the retry: {:?}",
        realm.asked()
    );

    let reader = http_bearer(&issuer.token(&[("own/app", &["pull"])]));
    let written = eventually(Duration::from_secs(15), || {
        let (reader, reg) = (reader.clone(), registry.url());
        async move {
            get_any_manifest(&reader, &reg, "own/app", "v1")
                .await
                .status
                == 200
        }
    })
    .await;
    assert!(
        written,
        "the background retry never wrote own/app:v1:\n{}",
        proxy.log_text()
    );
    let index = get_any_manifest(&reader, &registry.url(), "own/app", "v1").await;
    let want: Entries = [("linux/amd64".to_owned(), pushed.digest.clone())].into();
    assert_eq!(index.entries(), want, "{}", index.text());
    assert!(
        realm
            .asked()
            .iter()
            .any(|s| s.contains("repository:own/app:") && s.contains("push")),
        "the retry did not carry archmerge's own identity: {:?}",
        realm.asked()
    );
}
