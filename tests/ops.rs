//! Issue 5: what a person running archmerge beside a registry reaches for on
//! day two — `reconcile`, `inspect`, `check-config`, the admin listener
//! (`/healthz`, `/readyz`, `/metrics`, `POST /reconcile`), the registry's
//! notification webhook (`POST /events`) and JSON logs. TLS is in
//! `tests/tls.rs`.
//!
//! Every test runs the real `docker-registry` (distribution 2.8) and the
//! real `archmerge` binary. Arch tags are pushed *straight to the registry*
//! wherever the story is "a push that bypassed archmerge", and the result is
//! always read back from the registry itself: in `write` mode that is where
//! the truth is.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use support::*;

// === helpers ===

/// `archmerge reconcile --upstream <url> <args…>`.
fn reconcile(upstream: &str, args: &[&str]) -> Output {
    let mut all = vec!["reconcile", "--upstream", upstream];
    all.extend_from_slice(args);
    archmerge_command(&all, &[])
}

/// `archmerge reconcile --json …`, which must succeed: the summary.
fn reconcile_json(upstream: &str, repos: &[&str]) -> Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(repos);
    let out = reconcile(upstream, &args);
    assert!(out.status.success(), "reconcile --json: {}", shown(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("reconcile --json printed no JSON ({e}): {}", shown(&out)))
}

/// `archmerge inspect --upstream <url> [--json] REPO:TAG`, which must
/// succeed: its stdout.
fn inspect(upstream: &str, reference: &str, json: bool) -> String {
    let mut args = vec!["inspect", "--upstream", upstream];
    if json {
        args.push("--json");
    }
    args.push(reference);
    let out = archmerge_command(&args, &[]);
    assert!(out.status.success(), "inspect {reference}: {}", shown(&out));
    String::from_utf8(out.stdout).expect("inspect prints UTF-8")
}

/// The summary's counts: (repositories, created, updated, unchanged, failed).
fn counts(summary: &Value) -> (u64, u64, u64, u64, usize) {
    let n = |k: &str| {
        summary[k]
            .as_u64()
            .unwrap_or_else(|| panic!("summary has no count `{k}`: {summary}"))
    };
    let failed = summary["failed"]
        .as_array()
        .unwrap_or_else(|| panic!("summary has no `failed` list: {summary}"))
        .len();
    (
        n("repositories"),
        n("created"),
        n("updated"),
        n("unchanged"),
        failed,
    )
}

/// (platform, digest) of every entry of the index at `repo:tag` in the
/// registry at `base`; `None` when the tag is absent.
async fn stored_entries(base: &str, repo: &str, tag: &str) -> Option<BTreeSet<(String, String)>> {
    let a = get_any_manifest(&http(), base, repo, tag).await;
    match a.status {
        404 => None,
        200 => Some(a.entries()),
        s => panic!("{}: {s} {}", a.asked, a.text()),
    }
}

/// `Docker-Content-Digest` of `repo:tag` in the registry, if present.
async fn stored_digest(base: &str, repo: &str, tag: &str) -> Option<String> {
    let a = get_any_manifest(&http(), base, repo, tag).await;
    (a.status == 200).then(|| digest_of(&a.body))
}

/// `{(platform, digest)…}` from literals.
fn set<const N: usize>(items: [(&str, &str); N]) -> BTreeSet<(String, String)> {
    items
        .into_iter()
        .map(|(p, d)| (p.to_owned(), d.to_owned()))
        .collect()
}

/// DELETE of a manifest by digest, straight at the registry (which also
/// untags every tag that pointed at it).
async fn delete_straight(base: &str, repo: &str, digest: &str) {
    let res = http()
        .delete(format!("{base}/v2/{repo}/manifests/{digest}"))
        .send()
        .await
        .expect("DELETE manifest");
    expect_status(res, 202).await;
}

/// GET `url`: (status, body).
async fn get(url: &str) -> (u16, String) {
    let res = http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = res.status().as_u16();
    (status, res.text().await.unwrap_or_default())
}

/// POST `url` with an optional `Authorization` value: (status,
/// content-type, body).
async fn post(url: &str, authorization: Option<&str>) -> (u16, String, String) {
    let mut req = http().post(url);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let res = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = res.status().as_u16();
    let ct = header(&res, "content-type").unwrap_or_default();
    (status, ct, res.text().await.unwrap_or_default())
}

// === reconcile ===

#[tokio::test]
async fn reconcile_backfills_repairs_and_removes_indexes_of_arch_tags_pushed_straight_to_the_registry(
) {
    let registry = spawn_registry();
    let reg = registry.url();
    let c = http();
    // Two repositories, two targets, pushed by CI jobs that bypassed archmerge.
    let web_amd = push_small_image(&c, &reg, "shop/web", "x86_64_v1", "amd64", 11).await;
    let web_arm = push_small_image(&c, &reg, "shop/web", "aarch64_v1", "arm64", 12).await;
    let db_amd = push_small_image(&c, &reg, "db", "x86_64", "amd64", 21).await;
    let db_arm = push_small_image(&c, &reg, "db", "armv7l", "arm", 22).await;
    assert_eq!(stored_entries(&reg, "shop/web", "v1").await, None);

    // The whole catalog: both indexes are created.
    let out = reconcile(&reg, &[]);
    assert!(out.status.success(), "reconcile: {}", shown(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("reconciled 2 repositories: 2 created, 0 updated, 0 unchanged, 0 failed"),
        "summary line: {}",
        shown(&out)
    );
    assert_eq!(
        stored_entries(&reg, "shop/web", "v1").await,
        Some(set([
            ("linux/amd64", &web_amd.digest),
            ("linux/arm64/v8", &web_arm.digest)
        ]))
    );
    assert_eq!(
        stored_entries(&reg, "db", "latest").await,
        Some(set([
            ("linux/amd64", &db_amd.digest),
            ("linux/arm/v7", &db_arm.digest)
        ]))
    );
    let web_index = stored_digest(&reg, "shop/web", "v1").await;

    // Again: nothing to do, and nothing rewritten.
    let out = reconcile(&reg, &[]);
    assert!(out.status.success(), "second reconcile: {}", shown(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("2 repositories: 0 created, 0 updated, 2 unchanged, 0 failed"),
        "second run should report both unchanged: {}",
        shown(&out)
    );
    assert_eq!(stored_digest(&reg, "shop/web", "v1").await, web_index);
    assert_eq!(counts(&reconcile_json(&reg, &[])), (2, 0, 0, 2, 0));

    // More arches land in both repositories; reconciling `db` alone
    // touches only `db`.
    let web_s390x = push_small_image(&c, &reg, "shop/web", "s390x_v1", "s390x", 13).await;
    let db_riscv = push_small_image(&c, &reg, "db", "riscv64", "riscv64", 23).await;
    assert_eq!(counts(&reconcile_json(&reg, &["db"])), (1, 0, 1, 0, 0));
    assert_eq!(
        stored_entries(&reg, "db", "latest").await,
        Some(set([
            ("linux/amd64", &db_amd.digest),
            ("linux/arm/v7", &db_arm.digest),
            ("linux/riscv64", &db_riscv.digest)
        ]))
    );
    assert_eq!(
        stored_digest(&reg, "shop/web", "v1").await,
        web_index,
        "reconcile db must not touch shop/web"
    );

    // An arch manifest deleted straight at the registry: its entry goes
    // (and the arch that arrived meanwhile comes in).
    delete_straight(&reg, "shop/web", &web_arm.digest).await;
    assert_eq!(
        counts(&reconcile_json(&reg, &["shop/web"])),
        (1, 0, 1, 0, 0)
    );
    assert_eq!(
        stored_entries(&reg, "shop/web", "v1").await,
        Some(set([
            ("linux/amd64", &web_amd.digest),
            ("linux/s390x", &web_s390x.digest)
        ]))
    );

    // Every arch of `db` deleted: the index goes too.
    for d in [&db_amd.digest, &db_arm.digest, &db_riscv.digest] {
        delete_straight(&reg, "db", d).await;
    }
    let summary = reconcile_json(&reg, &[]);
    assert_eq!(counts(&summary), (2, 0, 1, 1, 0), "{summary}");
    assert_eq!(stored_entries(&reg, "db", "latest").await, None);
    assert!(
        !list_tags(&c, &reg, "db")
            .await
            .contains(&"latest".to_owned()),
        "db:latest should be gone"
    );
}

#[tokio::test]
async fn reconcile_pages_through_a_catalog_larger_than_one_page() {
    // A registry that lists at most two repositories per catalog page (as
    // operators cap it: `catalog: maxentries:`). Three repositories must
    // still all be reconciled, following `Link: rel="next"`.
    let registry = spawn_registry_with(RegistryOpts {
        env: vec![("REGISTRY_CATALOG_MAXENTRIES".into(), "2".into())],
        ..Default::default()
    });
    let reg = registry.url();
    let c = http();
    let mut want = Vec::new();
    for (i, repo) in ["pa", "pb", "pc"].into_iter().enumerate() {
        let seed = 100 + 2 * i as u64;
        let amd = push_small_image(&c, &reg, repo, "x86_64_v1", "amd64", seed).await;
        let arm = push_small_image(&c, &reg, repo, "aarch64_v1", "arm64", seed + 1).await;
        want.push((repo, amd.digest, arm.digest));
    }
    let summary = reconcile_json(&reg, &[]);
    assert_eq!(counts(&summary), (3, 3, 0, 0, 0), "{summary}");
    for (repo, amd, arm) in &want {
        assert_eq!(
            stored_entries(&reg, repo, "v1").await,
            Some(set([("linux/amd64", amd), ("linux/arm64/v8", arm)])),
            "{repo}:v1"
        );
    }
}

#[tokio::test]
async fn reconcile_and_inspect_use_archmerges_own_credentials() {
    let ci = Creds::new("ci", "ci-pw-41d");
    let own = Creds::new("archmerge", "own-pw-9c2");
    let htpasswd = Htpasswd::new(&[&ci, &own]);
    let registry = spawn_registry_with(RegistryOpts {
        htpasswd: Some(htpasswd.path()),
        ..Default::default()
    });
    let reg = registry.url();
    let c = http_as(Some(&ci));
    let amd = push_small_image(&c, &reg, "private", "x86_64_v1", "amd64", 111).await;
    let arm = push_small_image(&c, &reg, "private", "aarch64_v1", "arm64", 112).await;

    // Anonymous: the registry refuses, and reconcile says so and fails.
    let out = reconcile(&reg, &[]);
    assert!(
        !out.status.success(),
        "anonymous reconcile: {}",
        shown(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "the refusal should show: {}",
        shown(&out)
    );

    // `[upstream_auth]` with a password file, as the shipped config shows.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("password");
    fs::write(&secret, format!("{}\n", own.password)).unwrap();
    let config = dir.path().join("archmerge.toml");
    fs::write(
        &config,
        format!(
            "upstream = \"{reg}\"\n[upstream_auth]\nusername = \"{}\"\npassword_file = \"{}\"\n",
            own.user,
            secret.display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let out = archmerge_command(&["reconcile", "--json", "--config", &config], &[]);
    assert!(
        out.status.success(),
        "reconcile with upstream_auth: {}",
        shown(&out)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(counts(&summary), (1, 1, 0, 0, 0), "{summary}");
    let stored = get_any_manifest(&c, &reg, "private", "v1")
        .await
        .expect(200);
    assert_eq!(
        stored.entries(),
        set([
            ("linux/amd64", &amd.digest),
            ("linux/arm64/v8", &arm.digest)
        ])
    );

    // The same identity from the environment, for inspect.
    let out = archmerge_command(
        &["inspect", "--json", "--upstream", &reg, "private:v1"],
        &[
            ("ARCHMERGE_UPSTREAM_USERNAME", own.user.as_str()),
            ("ARCHMERGE_UPSTREAM_PASSWORD", own.password.as_str()),
        ],
    );
    assert!(
        out.status.success(),
        "inspect with env credentials: {}",
        shown(&out)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["state"], "index", "{report}");
    assert_eq!(
        report["digest"],
        digest_of(&stored.body).as_str(),
        "{report}"
    );
}

// === inspect ===

#[tokio::test]
async fn inspect_lists_each_entry_and_reports_a_stale_index() {
    let registry = spawn_registry();
    let reg = registry.url();
    let c = http();
    let amd = push_small_image(&c, &reg, "app", "x86_64_v2", "amd64", 31).await;
    let arm = push_small_image(&c, &reg, "app", "aarch64_v2", "arm64", 32).await;
    assert_eq!(counts(&reconcile_json(&reg, &["app"])), (1, 1, 0, 0, 0));
    let index = stored_digest(&reg, "app", "v2")
        .await
        .expect("app:v2 exists");
    let rows = [
        ("x86_64_v2", "linux/amd64", &amd),
        ("aarch64_v2", "linux/arm64/v8", &arm),
    ];

    // The table: one row per entry with its arch tag, platform, digest, size.
    let text = inspect(&reg, "app:v2", false);
    assert!(text.contains("app:v2"), "{text}");
    assert!(text.contains(&index), "the index digest: {text}");
    assert!(
        !text.contains("STALE"),
        "fresh index shown as stale: {text}"
    );
    for (tag, platform, image) in &rows {
        let row = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(tag))
            .unwrap_or_else(|| panic!("no row for {tag}:\n{text}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert!(cols.contains(platform), "platform in {row:?}");
        assert!(cols.contains(&image.digest.as_str()), "digest in {row:?}");
        let size = image.manifest.len().to_string();
        assert!(cols.contains(&size.as_str()), "size {size} in {row:?}");
    }

    // The same as JSON.
    let report: Value = serde_json::from_str(&inspect(&reg, "app:v2", true)).unwrap();
    assert_eq!(report["reference"], "app:v2", "{report}");
    assert_eq!(report["state"], "index", "{report}");
    assert_eq!(report["digest"], index.as_str(), "{report}");
    assert!(report["expected_digest"].is_null(), "{report}");
    let entries: BTreeSet<(String, String, String, u64)> = report["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries: {report}"))
        .iter()
        .map(|e| {
            (
                e["source_tag"].as_str().unwrap_or("?").to_owned(),
                e["platform"].as_str().unwrap_or("?").to_owned(),
                e["digest"].as_str().unwrap_or("?").to_owned(),
                e["size"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let want: BTreeSet<(String, String, String, u64)> = rows
        .iter()
        .map(|(t, p, i)| {
            (
                t.to_string(),
                p.to_string(),
                i.digest.clone(),
                i.manifest.len() as u64,
            )
        })
        .collect();
    assert_eq!(entries, want, "{report}");

    // An arch pushed straight to the registry afterwards: the stored index
    // is stale, and inspect says so and what reconcile would write.
    let arm7 = push_small_image(&c, &reg, "app", "armv7l_v2", "arm", 33).await;
    let text = inspect(&reg, "app:v2", false);
    assert!(text.contains("STALE"), "{text}");
    assert!(text.contains("armv7l_v2"), "the unlisted arch tag: {text}");
    let report: Value = serde_json::from_str(&inspect(&reg, "app:v2", true)).unwrap();
    let expected = report["expected_digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no expected_digest for a stale index: {report}"))
        .to_owned();
    assert_ne!(expected, index);
    assert!(
        text.contains(&expected),
        "STALE line names {expected}: {text}"
    );
    assert_eq!(report["entries"].as_array().map(Vec::len), Some(2));

    // reconcile writes exactly the index inspect announced.
    assert_eq!(counts(&reconcile_json(&reg, &["app"])), (1, 0, 1, 0, 0));
    assert_eq!(
        stored_digest(&reg, "app", "v2").await.as_deref(),
        Some(expected.as_str())
    );
    let report: Value = serde_json::from_str(&inspect(&reg, "app:v2", true)).unwrap();
    assert!(report["expected_digest"].is_null(), "{report}");
    let digests: BTreeSet<&str> = report["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["digest"].as_str())
        .collect();
    assert!(digests.contains(arm7.digest.as_str()), "{report}");
}

// === check-config ===

/// `archmerge check-config --config <file with text> [extra…]`.
fn check_config(text: &str, extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archmerge.toml");
    fs::write(&path, text).unwrap();
    let path = path.display().to_string();
    let mut args = vec!["check-config", "--config", path.as_str()];
    args.extend_from_slice(extra);
    archmerge_command(&args, &[])
}

/// Asserts exit 64 and that stderr says each of `needles`.
fn assert_refused(text: &str, needles: &[&str]) {
    let out = check_config(text, &[]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "bad config must exit 64:\n{text}\n{}",
        shown(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(
            stderr.contains(n),
            "message should say {n:?} for:\n{text}\n{}",
            shown(&out)
        );
    }
}

#[test]
fn check_config_accepts_the_shipped_file_and_names_key_line_and_column_of_each_problem() {
    // The shipped file is valid as it is (it names an upstream itself; no
    // registry needs to answer).
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/archmerge.toml");
    let out = archmerge_command(&["check-config", "--config", shipped], &[]);
    assert!(out.status.success(), "shipped config: {}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));

    // Without an upstream anywhere the file is incomplete; a flag completes it.
    let no_upstream = "mode = \"write\"\n";
    assert_refused(no_upstream, &["upstream", "required"]);
    let out = check_config(no_upstream, &["--upstream", "http://127.0.0.1:5000"]);
    assert!(out.status.success(), "{}", shown(&out));

    let up = "upstream = \"http://127.0.0.1:5000\"\n";
    assert_refused(
        &format!("{up}bogus_key = 1\n"),
        &["bogus_key", "line 2, column 1"],
    );
    assert_refused(
        &format!("{up}[timeouts]\nconect_secs = 5\n"),
        &["conect_secs", "connect_secs", "line 3, column 1"],
    );
    assert_refused(
        &format!("{up}mode = \"turbo\"\n"),
        &["mode", "turbo", "line 2, column 8"],
    );
    assert_refused(
        &format!("{up}[timeouts]\nconnect_secs = 0\n"),
        &["timeouts.connect_secs", "line 3, column 16"],
    );
    assert_refused(
        &format!("{up}[merge]\npatterns = [\"{{arch}}_{{tag}}\", \"{{tag}}\"]\n"),
        &["merge.patterns", "{tag}", "{arch}", "line 3, column 29"],
    );
    // Malformed TOML: where the parser stopped.
    assert_refused(&format!("{up}mode = \n"), &["line 2, column 8"]);
    assert_refused(
        &format!("{up}[timeouts]\nconnect_secs = \"five\"\n"),
        &["line 3, column 16"],
    );
    // Every problem at once, not just the first.
    assert_refused(
        &format!("{up}mode = \"turbo\"\n[timeouts]\nconnect_secs = 0\n"),
        &[
            "line 2, column 8",
            "timeouts.connect_secs",
            "line 4, column 16",
        ],
    );
    // A config file that is not there.
    let out = archmerge_command(
        &["check-config", "--config", "/nonexistent/archmerge.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(64), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/archmerge.toml"));
}

// === admin listener ===

#[tokio::test]
async fn healthz_is_always_up_and_readyz_follows_the_registry() {
    let mut registry = spawn_registry();
    let port = registry.port();
    let proxy = spawn_archmerge(&registry.url());
    let admin = proxy.admin_url();

    assert_eq!(get(&format!("{admin}/healthz")).await.0, 200);
    let (status, body) = get(&format!("{admin}/readyz")).await;
    assert_eq!(status, 200, "readyz with the registry up: {body}");
    assert_eq!(get(&format!("{admin}/nope")).await.0, 404);

    // The registry goes away: not ready, but still alive.
    registry.kill();
    let (status, body) = get(&format!("{admin}/readyz")).await;
    assert_eq!(status, 503, "readyz with the registry down: {body}");
    assert_eq!(get(&format!("{admin}/healthz")).await.0, 200);

    // A registry comes back on the same port, now requiring credentials:
    // its 401 on /v2/ means it is up, so ready again.
    let htpasswd = Htpasswd::new(&[&Creds::new("u", "p")]);
    let _back = spawn_registry_extra(
        &RegistryOpts {
            htpasswd: Some(htpasswd.path()),
            ..Default::default()
        },
        &RegistryExtra {
            port: Some(port),
            ..Default::default()
        },
    );
    let (status, body) = get(&format!("{admin}/readyz")).await;
    assert_eq!(status, 200, "readyz after the registry came back: {body}");
}

/// The value of the sample `name` (exact, labels included) in a metrics
/// exposition, if present.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

#[tokio::test]
async fn metrics_count_requests_merges_and_skipped_writes_with_bounded_labels() {
    let registry = spawn_registry();
    let proxy = spawn_archmerge(&registry.url());
    let c = http();
    let via = proxy.url();
    push_small_image(&c, &via, "secretproject/web", "x86_64_v9", "amd64", 41).await;
    push_small_image(&c, &via, "secretproject/web", "aarch64_v9", "arm64", 42).await;
    // An identical re-push of an arch tag: the index bytes would not change.
    let again = push_small_image(&c, &via, "secretproject/web", "x86_64_v9", "amd64", 41).await;
    assert!(!again.digest.is_empty());

    let res = c
        .get(format!("{}/metrics", proxy.admin_url()))
        .send()
        .await
        .unwrap();
    let ct = header(&res, "content-type").unwrap_or_default();
    let text = String::from_utf8(expect_status(res, 200).await.to_vec()).unwrap();
    assert!(ct.contains("text"), "content-type {ct}");

    let puts = sample(
        &text,
        "archmerge_requests_total{method=\"PUT\",route=\"manifest\",status=\"201\"}",
    );
    assert_eq!(puts, Some(3.0), "manifest PUTs:\n{text}");
    assert_eq!(
        sample(&text, "archmerge_merges_total{outcome=\"created\"}"),
        Some(1.0),
        "\n{text}"
    );
    assert_eq!(
        sample(&text, "archmerge_merges_total{outcome=\"written\"}"),
        Some(1.0),
        "\n{text}"
    );
    assert_eq!(
        sample(&text, "archmerge_merges_total{outcome=\"unchanged\"}"),
        Some(1.0),
        "\n{text}"
    );
    assert_eq!(
        sample(&text, "archmerge_index_writes_skipped_total"),
        Some(1.0),
        "\n{text}"
    );
    // Every family the issue names is exported, even before it counts.
    for family in [
        "archmerge_requests",
        "archmerge_merges",
        "archmerge_merge_duration_seconds",
        "archmerge_index_writes_skipped",
        "archmerge_platform_mismatches",
        "archmerge_merge_retries",
        "archmerge_upstream_requests",
        "archmerge_upstream_request_duration_seconds",
        "archmerge_cache_hits",
        "archmerge_cache_misses",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {family} "))),
            "no family {family}:\n{text}"
        );
    }
    for family in [
        "archmerge_merge_duration_seconds_count",
        "archmerge_upstream_request_duration_seconds_count",
    ] {
        assert!(
            sample(&text, family).is_some_and(|v| v >= 1.0),
            "{family}:\n{text}"
        );
    }

    // Every registry request is counted by method: the three client PUTs
    // forwarded and the index writes among the PUTs, and at least as many
    // requests in all as got their headers timed.
    let upstream: f64 = text
        .lines()
        .filter(|l| l.starts_with("archmerge_upstream_requests_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    let timed = sample(&text, "archmerge_upstream_request_duration_seconds_count").unwrap_or(0.0);
    assert!(
        upstream >= timed && timed >= 1.0,
        "{upstream} registry requests counted, {timed} timed:\n{text}"
    );
    let upstream_puts = sample(&text, "archmerge_upstream_requests_total{method=\"PUT\"}");
    assert!(
        upstream_puts.is_some_and(|v| v >= 5.0),
        "registry PUTs (3 client PUTs, 2 index writes at least):\n{text}"
    );

    // Bounded labels only: never a repository, tag or digest.
    assert!(
        !text.contains("secretproject"),
        "repository in metrics:\n{text}"
    );
    assert!(!text.contains("v9"), "tag in metrics:\n{text}");
    assert!(!text.contains("sha256"), "digest in metrics:\n{text}");
    let allowed = ["method", "route", "status", "outcome", "cache", "le"];
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(labels) = line.split_once('{').and_then(|(_, r)| r.split_once('}')) else {
            continue;
        };
        for pair in labels.0.split(',').filter(|p| !p.is_empty()) {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            assert!(
                allowed.contains(&key),
                "unexpected label {key:?} in {line:?}"
            );
        }
    }
}

#[tokio::test]
async fn post_reconcile_is_refused_without_a_token_and_runs_with_the_right_one() {
    let registry = spawn_registry();
    let reg = registry.url();
    let c = http();
    let amd = push_small_image(&c, &reg, "backfill", "x86_64_v3", "amd64", 51).await;
    let arm = push_small_image(&c, &reg, "backfill", "aarch64_v3", "arm64", 52).await;

    // No admin_token configured: the endpoint is off.
    let open = spawn_archmerge(&reg);
    let (status, _, body) = post(&format!("{}/reconcile", open.admin_url()), None).await;
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = post(
        &format!("{}/reconcile", open.admin_url()),
        Some("Bearer anything"),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(stored_entries(&reg, "backfill", "v3").await, None);

    // With a token: wrong or missing → 401, right → 200 and the work done.
    let token = "adm-7f3c9e";
    let guarded = spawn_archmerge_with(
        &reg,
        ArchmergeOpts {
            env: vec![("ARCHMERGE_ADMIN_TOKEN".into(), token.into())],
            ..Default::default()
        },
    );
    let url = format!("{}/reconcile?repo=backfill", guarded.admin_url());
    for wrong in [
        None,
        Some("Bearer adm-7f3c9f"),
        Some("Bearer adm-7f3c9"),
        Some("Basic adm-7f3c9e"),
    ] {
        let (status, _, body) = post(&url, wrong).await;
        assert_eq!(status, 401, "Authorization {wrong:?}: {body}");
    }
    assert_eq!(stored_entries(&reg, "backfill", "v3").await, None);
    let (status, _, body) = post(
        &format!("{}/reconcile?repo=BAD", guarded.admin_url()),
        Some(&format!("Bearer {token}")),
    )
    .await;
    assert_eq!(status, 400, "an invalid repository name: {body}");

    let (status, ct, body) = post(&url, Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, 200, "{body}");
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    let summary: Value = serde_json::from_str(&body).expect("summary is JSON");
    assert_eq!(counts(&summary), (1, 1, 0, 0, 0), "{summary}");
    assert_eq!(
        stored_entries(&reg, "backfill", "v3").await,
        Some(set([
            ("linux/amd64", &amd.digest),
            ("linux/arm64/v8", &arm.digest)
        ]))
    );
}

#[tokio::test]
async fn archmerges_own_identity_fetches_a_token_per_scope_and_again_once_it_expires() {
    // A token registry (as Harbor or GitLab): archmerge's own Basic
    // credentials are exchanged at the realm for a token per scope, kept
    // for what the realm's `expires_in` says (less ten seconds), and
    // fetched again after that.
    let issuer = std::sync::Arc::new(TokenIssuer::new());
    let realm = Realm::start(issuer.clone(), "archmerge-bot", "bot-pass-31", 15).await;
    let registry = spawn_registry_with(RegistryOpts {
        env: issuer.registry_env_with_realm(&realm.url()),
        ..RegistryOpts::default()
    });
    let reg = registry.url();
    let ci = http_bearer(&issuer.token(&[("own/app", &["pull", "push"])]));
    let amd = push_small_image(&ci, &reg, "own/app", "x86_64_v1", "amd64", 61).await;
    let arm = push_small_image(&ci, &reg, "own/app", "aarch64_v1", "arm64", 62).await;
    assert!(realm.asked().is_empty(), "the CI job minted its own token");

    let token = "adm-9d2e71";
    let proxy = spawn_archmerge_with(
        &reg,
        ArchmergeOpts {
            env: vec![
                ("ARCHMERGE_ADMIN_TOKEN".into(), token.into()),
                ("ARCHMERGE_UPSTREAM_USERNAME".into(), "archmerge-bot".into()),
                ("ARCHMERGE_UPSTREAM_PASSWORD".into(), "bot-pass-31".into()),
            ],
            ..Default::default()
        },
    );
    let url = format!("{}/reconcile?repo=own/app", proxy.admin_url());
    let bearer = format!("Bearer {token}");
    let reconcile = || async {
        let (status, _, body) = post(&url, Some(&bearer)).await;
        assert_eq!(status, 200, "{body}");
        let summary: Value = serde_json::from_str(&body).expect("summary is JSON");
        counts(&summary)
    };

    let started = Instant::now();
    assert_eq!(reconcile().await, (1, 1, 0, 0, 0));
    let index = get_any_manifest(&ci, &reg, "own/app", "v1")
        .await
        .expect(200);
    assert_eq!(
        index.entries(),
        set([
            ("linux/amd64", &amd.digest),
            ("linux/arm64/v8", &arm.digest)
        ]),
        "{}",
        index.text()
    );
    let first = realm.asked();
    assert!(!first.is_empty(), "archmerge never asked the realm");
    let distinct: BTreeSet<&String> = first.iter().collect();
    assert_eq!(
        distinct.len(),
        first.len(),
        "a scope was fetched twice while its token was valid: {first:?}"
    );
    assert!(
        first.iter().all(|s| s.starts_with("repository:own/app:")),
        "{first:?}"
    );

    // Within the tokens' five seconds: nothing is fetched again.
    assert_eq!(reconcile().await, (1, 0, 0, 1, 0));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "too slow to tell a cached token from a fresh one: {:?}",
        started.elapsed()
    );
    assert_eq!(realm.asked(), first, "valid tokens were fetched again");

    // Past them: every scope used is fetched again.
    tokio::time::sleep(
        Duration::from_secs(5).saturating_sub(started.elapsed()) + Duration::from_millis(500),
    )
    .await;
    assert_eq!(reconcile().await, (1, 0, 0, 1, 0));
    let all = realm.asked();
    assert!(
        all.len() > first.len(),
        "expired tokens were used again: {all:?}"
    );
    let again: BTreeSet<&String> = all[first.len()..].iter().collect();
    assert_eq!(
        again.len(),
        all.len() - first.len(),
        "a scope was fetched twice after expiry: {all:?}"
    );
}

// === the registry's webhook ===

#[tokio::test]
async fn registry_notifications_merge_pushes_and_deletes_made_straight_at_the_registry() {
    // The registry must know archmerge's admin address before archmerge
    // starts, so the test picks it.
    let admin_port = free_port();
    let token = "hook-5b1d";
    let registry = spawn_registry_extra(
        &RegistryOpts::default(),
        &RegistryExtra {
            notify: Some(Notify {
                url: format!("http://127.0.0.1:{admin_port}/events"),
                bearer: Some(token.into()),
            }),
            ..Default::default()
        },
    );
    let reg = registry.url();
    let proxy = spawn_archmerge_with(
        &reg,
        ArchmergeOpts {
            args: vec!["--admin-listen".into(), format!("127.0.0.1:{admin_port}")],
            env: vec![("ARCHMERGE_ADMIN_TOKEN".into(), token.into())],
            ..Default::default()
        },
    );

    // Someone else's envelope, without the token, is refused.
    let (status, _, body) = post(&format!("http://127.0.0.1:{admin_port}/events"), None).await;
    assert_eq!(status, 401, "{body}");

    let c = http();
    let amd = push_small_image(&c, &reg, "hooked", "x86_64_v1", "amd64", 61).await;
    let arm = push_small_image(&c, &reg, "hooked", "aarch64_v1", "arm64", 62).await;
    let want = set([
        ("linux/amd64", &amd.digest),
        ("linux/arm64/v8", &arm.digest),
    ]);
    let (r, w) = (&reg, &want);
    let merged = eventually(Duration::from_secs(10), move || async move {
        stored_entries(r, "hooked", "v1").await.as_ref() == Some(w)
    })
    .await;
    assert!(
        merged,
        "hooked:v1 is {:?} 10 s after pushes straight to the registry\n\
         --- archmerge log ---\n{}\n--- registry log ---\n{}",
        stored_entries(&reg, "hooked", "v1").await,
        proxy.log_text(),
        registry.log_text()
    );

    // An arch manifest deleted straight at the registry leaves the index.
    delete_straight(&reg, "hooked", &arm.digest).await;
    let want = set([("linux/amd64", &amd.digest)]);
    let (r, w) = (&reg, &want);
    let removed = eventually(Duration::from_secs(10), move || async move {
        stored_entries(r, "hooked", "v1").await.as_ref() == Some(w)
    })
    .await;
    assert!(
        removed,
        "hooked:v1 is {:?} 10 s after the arm64 manifest was deleted\n\
         --- archmerge log ---\n{}",
        stored_entries(&reg, "hooked", "v1").await,
        proxy.log_text()
    );

    // And with the last arch gone, the index goes.
    delete_straight(&reg, "hooked", &amd.digest).await;
    let r = &reg;
    let gone = eventually(Duration::from_secs(10), move || async move {
        stored_entries(r, "hooked", "v1").await.is_none()
    })
    .await;
    assert!(
        gone,
        "hooked:v1 is still {:?} after its last arch was deleted\n--- archmerge log ---\n{}",
        stored_entries(&reg, "hooked", "v1").await,
        proxy.log_text()
    );
}

/// A notification envelope as distribution 2.8 sends it for a manifest
/// push of `repo:tag` (`digest`, `size` bytes).
fn push_envelope(registry: &str, repo: &str, tag: &str, digest: &str, size: usize) -> String {
    serde_json::json!({"events": [{
        "id": format!("test-{tag}"),
        "timestamp": "2026-01-01T00:00:00Z",
        "action": "push",
        "target": {
            "mediaType": media::OCI_MANIFEST,
            "size": size,
            "digest": digest,
            "length": size,
            "repository": repo,
            "url": format!("{registry}/v2/{repo}/manifests/{digest}"),
            "tag": tag,
        },
        "request": {"method": "PUT", "useragent": "skopeo"},
        "actor": {},
        "source": {"addr": "registry:5000", "instanceID": "test"},
    }]})
    .to_string()
}

#[tokio::test]
async fn a_push_event_that_arrives_before_the_registry_links_the_tag_still_merges_it() {
    // distribution emits a manifest's push event from its manifest store,
    // *before* its handler links the tag (registry/handlers/manifests.go:
    // `manifests.Put`, then `tags.Tag`). archmerge can therefore get the
    // event for `aarch64_v1` while HEAD of that tag still answers 404, and
    // no second event follows. This test replays that order exactly: the
    // manifest stored by digest, the event delivered, then the tag linked.
    let registry = spawn_registry();
    let reg = registry.url();
    let proxy = spawn_archmerge(&reg);
    let events = format!("{}/events", proxy.admin_url());
    let c = http();
    let deliver = |body: String| {
        let c = c.clone();
        let events = events.clone();
        async move {
            let res = c
                .post(&events)
                .header(
                    "content-type",
                    "application/vnd.docker.distribution.events.v1+json",
                )
                .body(body)
                .send()
                .await
                .expect("POST /events");
            expect_status(res, 200).await;
        }
    };

    // The first arch, pushed and announced normally.
    let amd = push_small_image(&c, &reg, "early", "x86_64_v1", "amd64", 64).await;
    deliver(push_envelope(
        &reg,
        "early",
        "x86_64_v1",
        &amd.digest,
        amd.manifest.len(),
    ))
    .await;
    let r = &reg;
    let created = eventually(Duration::from_secs(10), move || async move {
        stored_entries(r, "early", "v1").await.is_some()
    })
    .await;
    assert!(created, "early:v1 never created\n{}", proxy.log_text());

    // The second: manifest stored, event delivered, tag not linked yet.
    let arm = build_oci_layout(&ImageSpec::new("linux", "arm64").layer(65, 4096), "x");
    for d in arm.blob_digests() {
        put_blob(&c, &reg, "early", &fs::read(arm.blob_path(&d)).unwrap()).await;
    }
    let res = put_manifest(
        &c,
        &reg,
        "early",
        &arm.manifest_digest,
        media::OCI_MANIFEST,
        &arm.manifest,
    )
    .await;
    expect_status(res, 201).await;
    deliver(push_envelope(
        &reg,
        "early",
        "aarch64_v1",
        &arm.manifest_digest,
        arm.manifest.len(),
    ))
    .await;
    // Let archmerge act on the event (its second merge of early:v1) — or
    // give it up to 3 s if it waits for the tag instead.
    let merges = || {
        proxy
            .log_text()
            .lines()
            .filter(|l| l.contains(" merge ") && l.contains("repo=\"early\""))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while merges() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Now the registry links the tag, as its handler does right after.
    let res = put_manifest(
        &c,
        &reg,
        "early",
        "aarch64_v1",
        media::OCI_MANIFEST,
        &arm.manifest,
    )
    .await;
    expect_status(res, 201).await;

    let want = set([
        ("linux/amd64", &amd.digest),
        ("linux/arm64/v8", &arm.manifest_digest),
    ]);
    let w = &want;
    let merged = eventually(Duration::from_secs(10), move || async move {
        stored_entries(r, "early", "v1").await.as_ref() == Some(w)
    })
    .await;
    assert!(
        merged,
        "early:v1 is {:?} 10 s after the aarch64_v1 push event; the event came \
         before the tag was linked, and nothing retried\n--- archmerge log ---\n{}",
        stored_entries(&reg, "early", "v1").await,
        proxy.log_text()
    );
}

// === logs ===

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_method_route_status_and_no_credentials() {
    let creds = Creds::new("ci-bot", "pw-Zq8#secret");
    let htpasswd = Htpasswd::new(&[&creds]);
    let registry = spawn_registry_with(RegistryOpts {
        htpasswd: Some(htpasswd.path()),
        ..Default::default()
    });
    let proxy = spawn_archmerge_with(
        &registry.url(),
        ArchmergeOpts {
            args: vec!["--log-format".into(), "json".into()],
            ..Default::default()
        },
    );
    let via = proxy.url();
    let client = http_as(Some(&creds));
    push_small_image(&client, &via, "logged", "x86_64_v1", "amd64", 71).await;
    push_small_image(&client, &via, "logged", "aarch64_v1", "arm64", 72).await;
    let anonymous = get(&format!("{via}/v2/")).await.0;
    assert_eq!(anonymous, 401);

    let log = proxy.log_text();
    let mut access = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line:?}\n--- log ---\n{log}"));
        assert!(v.is_object(), "not an object: {line}");
        let f = &v["fields"];
        if f["method"].is_string() && f["route"].is_string() && f["status"].is_u64() {
            assert!(
                f["elapsed_ms"].is_u64(),
                "access line without a duration: {line}"
            );
            assert!(
                f["bytes"].is_null() || f["bytes"].is_u64(),
                "bytes is not a count: {line}"
            );
            access.push((
                f["method"].as_str().unwrap().to_owned(),
                f["route"].as_str().unwrap().to_owned(),
                f["status"].as_u64().unwrap(),
            ));
        }
    }
    let has =
        |m: &str, r: &str, s: u64| access.iter().any(|a| a == &(m.to_owned(), r.to_owned(), s));
    assert!(
        has("PUT", "manifest", 201),
        "no PUT manifest 201 line in {access:?}\n{log}"
    );
    assert!(
        has("PUT", "upload", 201),
        "no blob upload line in {access:?}"
    );
    assert!(
        has("GET", "base", 401),
        "no GET /v2/ 401 line in {access:?}"
    );

    for secret in [creds.password.clone(), creds.basic_token()] {
        assert!(!log.contains(&secret), "a credential is in the log:\n{log}");
    }
    assert!(
        !log.contains("Basic "),
        "an Authorization value is in the log:\n{log}"
    );
}
