//! Every write that touches a target leaves it right (SPEC §2, §3): a list
//! or an image pushed *at the target tag*, an artifact pushed at an
//! arch-looking tag, deletes in per-arch repositories, and a delete of the
//! target's index itself — through archmerge, through the registry's
//! webhook, and through `archmerge reconcile`.
//!
//! Every test starts its own `docker-registry` (CNCF distribution 2.8) with
//! archmerge in front of it and pushes with the clients people use for each
//! kind of write: skopeo for images, `buildah manifest push --all` for a
//! list, the PyPI `oras` library for artifacts, raw HTTP for deletes. What
//! a target holds is read *straight from the registry* (in `write` mode the
//! registry is the source of truth), and compared with what archmerge
//! serves where both are read.
//!
//! Facts about the registry these stories rely on, seen on distribution
//! 2.8: it refuses `DELETE /v2/<name>/manifests/<tag>` with
//! `400 DIGEST_INVALID` (only deletes by digest exist), and a delete by
//! digest sends two notification events — `delete` with the repository and
//! digest, then `delete` with the repository and each tag that pointed at
//! it (no digest, no media type).

mod support;

use std::collections::BTreeSet;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use support::*;

/// On every entry archmerge manages: the arch tag it came from.
const ANN_TAG: &str = "io.archmerge.tag";
/// On the index: the digest of what the target held before archmerge wrote
/// there, put back when no arch tag is left.
const ANN_BASE: &str = "io.archmerge.base";
/// The counter of arch tags found holding something that is not a runnable
/// image.
const NON_IMAGE_COUNTER: &str = "archmerge_non_image_arch_tags_total";
/// The log line archmerge writes once per (arch tag, digest) that holds no
/// runnable image.
const NON_IMAGE_LOG: &str = "arch tag holds no runnable image";

/// A per-arch repository rule: `wg/tool-s390x:v2` is the s390x of
/// `wg/tool:v2`.
const WG_RULES: &str = r#"
[[rules]]
repositories = ["wg/**"]
repository_patterns = ["{repo}-{arch}"]
"#;

/// The config media type of an oras push of a tool's own format.
const EXAMPLE_CONFIG: &str = "application/vnd.example.config.v1+json";
/// The `artifactType` of the OCI 1.1 artifacts pushed here.
const SBOM_TYPE: &str = "application/vnd.example.sbom.v1+json";

// === the stack ===

/// The stacks here run archmerge with a rules file (empty for the default
/// patterns: [`Stack::with_rules`]) and, for the webhook stories, the
/// registry's notifications sent to archmerge's `/events`
/// ([`Stack::with_webhook`]).
impl Stack {
    /// Builds the image of `spec` (`seed` makes it unique) and pushes it
    /// with skopeo to `dest` (`host/repo:tag`); returns its digest.
    fn push_to(&self, dest: &str, spec: &ArchSpec, seed: u64) -> String {
        let layout = build_oci_layout(&spec.image(seed), "build");
        let digest = skopeo_push(&layout, dest, Format::Source);
        assert_eq!(
            digest, layout.manifest_digest,
            "skopeo stored another manifest"
        );
        digest
    }

    /// What the registry itself holds at `repo:reference`.
    async fn stored(&self, repo: &str, reference: &str) -> ManifestAnswer {
        get_any_manifest(&http(), &self.registry.url(), repo, reference).await
    }

    /// The index at `repo:tag`, read straight from the registry (it must be
    /// an index whose headers say what its bytes are) and through archmerge
    /// (the same bytes).
    async fn index(&self, repo: &str, tag: &str) -> ManifestAnswer {
        let stored = self.stored(repo, tag).await;
        assert!(
            listed(&stored).is_some(),
            "{repo}:{tag} in the registry should be an index, it is ({}): {}\n\
             --- archmerge log ---\n{}",
            stored.status,
            stored.text(),
            self.proxy_log()
        );
        assert_index_answer(&stored);
        let through = get_any_manifest(&http(), &self.proxy.url(), repo, tag)
            .await
            .expect(200);
        assert_eq!(
            through.body,
            stored.body,
            "archmerge and the registry serve different bytes at {repo}:{tag}\n\
             via archmerge: {}\nregistry:      {}",
            through.text(),
            stored.text()
        );
        stored
    }

    /// Panics unless `repo:tag` is absent, in the registry and through
    /// archmerge.
    async fn assert_absent(&self, repo: &str, tag: &str, why: &str) {
        for base in [self.registry.url(), self.proxy.url()] {
            let a = get_any_manifest(&http(), &base, repo, tag).await;
            assert_eq!(
                a.status,
                404,
                "{why}: {repo}:{tag} should not exist, but {base} serves: {}\n\
                 --- archmerge log ---\n{}",
                a.text(),
                self.proxy_log()
            );
        }
    }

    /// `DELETE /v2/<repo>/manifests/<reference>` sent to `base`.
    async fn delete(&self, base: &str, repo: &str, reference: &str) -> Answer {
        let url = format!("{base}/v2/{repo}/manifests/{reference}");
        let res = http()
            .delete(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DELETE {url}: {e}"));
        Answer {
            status: res.status().as_u16(),
            content_type: header(&res, "content-type"),
            body: res.text().await.unwrap_or_default(),
        }
    }

    /// A DELETE by digest through archmerge, which must answer 202.
    async fn delete_via(&self, repo: &str, digest: &str) {
        let a = self.delete(&self.proxy.url(), repo, digest).await;
        assert_eq!(
            a.status, 202,
            "DELETE {repo}@{digest} through archmerge: {a:?}"
        );
    }

    /// `archmerge inspect --json <reference>` against the registry, with the
    /// stack's rules: the report.
    fn inspect_json(&self, reference: &str) -> Value {
        let (config, registry) = (self.config_path(), self.registry.url());
        let config = config.display().to_string();
        let args = [
            "inspect",
            "--config",
            &config,
            "--upstream",
            &registry,
            "--json",
            reference,
        ];
        let out = archmerge_command(&args, &[]);
        assert!(out.status.success(), "inspect {reference}: {}", shown(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("inspect --json printed no JSON ({e}): {}", shown(&out)))
    }

    /// `archmerge reconcile <repos>` against the registry with the stack's
    /// rules; it must succeed.
    fn reconcile(&self, repos: &[&str]) -> Output {
        let (config, registry) = (self.config_path(), self.registry.url());
        let config = config.display().to_string();
        let mut args = vec!["reconcile", "--config", &config, "--upstream", &registry];
        args.extend_from_slice(repos);
        let out = archmerge_command(&args, &[]);
        assert!(out.status.success(), "reconcile {repos:?}: {}", shown(&out));
        out
    }

    /// How many times archmerge logged that `arch_tag` holding `digest` is no
    /// runnable image (the line names both).
    fn non_image_lines(&self, arch_tag: &str, digest: &str) -> usize {
        self.proxy_log()
            .lines()
            .filter(|l| l.contains(NON_IMAGE_LOG) && l.contains(arch_tag) && l.contains(digest))
            .count()
    }
}

/// A whole answer to a request that is not a manifest GET.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    content_type: Option<String>,
    body: String,
}

/// `{(platform, digest)…}` as [`ManifestAnswer::entries`] gives them.
fn set<const N: usize>(items: [(&str, &str); N]) -> BTreeSet<(String, String)> {
    items
        .into_iter()
        .map(|(p, d)| (p.to_owned(), d.to_owned()))
        .collect()
}

/// The entries of the index `a` holds; `None` when it holds none.
fn listed(a: &ManifestAnswer) -> Option<BTreeSet<(String, String)>> {
    let json: Value = serde_json::from_slice(&a.body).ok()?;
    (a.status == 200 && json["manifests"].is_array()).then(|| index_entries(&json))
}

/// The descriptor of `digest` in the index `json`.
fn entry<'a>(json: &'a Value, digest: &str) -> &'a Value {
    json["manifests"]
        .as_array()
        .and_then(|m| m.iter().find(|e| e["digest"] == digest))
        .unwrap_or_else(|| panic!("no entry {digest} in {json}"))
}

/// The index-level annotation `key`, if any.
fn index_annotation(json: &Value, key: &str) -> Option<String> {
    json["annotations"][key].as_str().map(str::to_owned)
}

/// Checks every 100 ms for `period` that `repo:tag` in the registry still
/// holds exactly `bytes`; panics at the first change.
async fn stays_unchanged(s: &Stack, repo: &str, tag: &str, bytes: &[u8], period: Duration) {
    let start = Instant::now();
    while start.elapsed() < period {
        let now = s.stored(repo, tag).await;
        assert!(
            now.status == 200 && now.body == bytes,
            "{repo}:{tag} changed {:?} after the artifact push: {} {}\nwas: {}\n\
             --- archmerge log ---\n{}",
            start.elapsed(),
            now.status,
            now.text(),
            String::from_utf8_lossy(bytes),
            s.proxy_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A small text file as an oras layer.
fn notes(text: &str) -> [(&str, &str, &str); 1] {
    [("notes.txt", "text/plain", text)]
}

// === 1. a list or an image pushed at the target ===

#[tokio::test]
async fn a_list_pushed_at_the_target_is_amended_before_buildah_returns_and_comes_back_when_the_arch_tags_go(
) {
    let s = Stack::with_rules("");
    // CI pushes the two arches it builds itself.
    let amd = s.push_to(&s.via("app:x86_64_v3"), &AMD64, 101);
    let arm = s.push_to(&s.via("app:aarch64_v3"), &ARM64, 102);
    assert_eq!(
        s.index("app", "v3").await.entries(),
        set([("linux/amd64", &amd), ("linux/arm64/v8", &arm)])
    );

    // Another team builds s390x and ppc64le elsewhere and publishes them
    // with buildah as a list pushed at app:v3, through archmerge.
    let s390 = s.push_to(&s.via("seed/s390x:1"), &S390X, 103);
    let ppc = s.push_to(&s.via("seed/ppc64le:1"), &PPC64LE, 104);
    let b = Buildah::new();
    b.manifest_create("localhost/app-v3");
    b.manifest_add("localhost/app-v3", &s.via("seed/s390x:1"));
    b.manifest_add("localhost/app-v3", &s.via("seed/ppc64le:1"));
    let list = b.manifest_push_all("localhost/app-v3", &s.via("app:v3"));

    // As soon as buildah returns, app:v3 lists the arch tags' images and
    // the list's, and remembers the list as its base.
    let index = s.index("app", "v3").await;
    let json = index.json();
    assert_eq!(
        index.entries(),
        set([
            ("linux/amd64", &amd),
            ("linux/arm64/v8", &arm),
            ("linux/ppc64le", &ppc),
            ("linux/s390x", &s390),
        ]),
        "app:v3 right after buildah pushed the list {list} at it should list the arch \
         tags' amd64 and arm64 plus the list's s390x and ppc64le: {}",
        index.text()
    );
    assert_eq!(
        json["manifests"].as_array().map(Vec::len),
        Some(4),
        "{json}"
    );
    for (digest, tag) in [(&amd, "x86_64_v3"), (&arm, "aarch64_v3")] {
        assert_eq!(entry(&json, digest)["annotations"][ANN_TAG], tag, "{json}");
    }
    for digest in [&s390, &ppc] {
        assert!(
            entry(&json, digest)["annotations"].get(ANN_TAG).is_none(),
            "the list's child {digest} is not archmerge's: {json}"
        );
    }
    assert_eq!(
        index_annotation(&json, ANN_BASE).as_deref(),
        Some(list.as_str()),
        "{ANN_BASE} of app:v3 should be the list buildah pushed: {json}"
    );
    // The list itself stays in the registry, by digest.
    let kept = s.stored("app", &list).await.expect(200);
    assert_eq!(kept.digest_header().as_deref(), Some(list.as_str()));

    // Both arch builds are withdrawn: app:v3 is buildah's list again.
    s.delete_via("app", &amd).await;
    s.delete_via("app", &arm).await;
    let back = s.stored("app", "v3").await;
    assert_eq!(
        (back.status, digest_of(&back.body)),
        (200, list.clone()),
        "app:v3 should be the list buildah pushed once no arch tag is left: {}",
        back.text()
    );
}

#[tokio::test]
async fn a_plain_image_pushed_at_the_target_keeps_its_platform_beside_the_arch_tags() {
    let s = Stack::with_rules("");
    let amd = s.push_to(&s.via("app:x86_64_v5"), &AMD64, 111);
    // Someone pushes a riscv64 image straight at app:v5 with skopeo.
    let riscv = s.push_to(&s.via("app:v5"), &RISCV64, 112);

    // When skopeo returns, app:v5 is an index again: amd64 from the arch
    // tag, riscv64 kept from the image, which is the index's base.
    let index = s.index("app", "v5").await;
    let json = index.json();
    assert_eq!(
        index.entries(),
        set([("linux/amd64", &amd), ("linux/riscv64", &riscv)]),
        "app:v5 after a riscv64 image was pushed at it: {}",
        index.text()
    );
    assert_eq!(entry(&json, &amd)["annotations"][ANN_TAG], "x86_64_v5");
    assert!(entry(&json, &riscv)["annotations"].get(ANN_TAG).is_none());
    assert_eq!(
        index_annotation(&json, ANN_BASE).as_deref(),
        Some(riscv.as_str()),
        "{json}"
    );
}

#[tokio::test]
async fn an_artifact_pushed_at_the_target_is_its_base_but_never_an_entry() {
    let s = Stack::new();
    let amd = s.push_to(&s.via("app:x86_64_v7"), &AMD64, 131);
    // Someone pushes an SBOM artifact with oras straight at the target tag.
    let sbom = Oras::new().push_artifact(
        &s.via("app:v7"),
        SBOM_TYPE,
        &[(
            "sbom.json",
            "application/spdx+json",
            r#"{"spdxVersion":"SPDX-2.3"}"#,
        )],
    );
    assert_eq!(sbom.status, 201, "oras push of app:v7");

    // The target lists the arch tag's image only; the artifact is recorded
    // as what the index amended (so it comes back when the arch tag goes),
    // and keeps a tag of its own.
    let index = s.index("app", "v7").await;
    let json = index.json();
    assert_eq!(
        index.entries(),
        set([("linux/amd64", &amd)]),
        "app:v7 after an artifact {} was pushed at it: {}",
        sbom.digest,
        index.text()
    );
    assert_eq!(
        index_annotation(&json, ANN_BASE).as_deref(),
        Some(sbom.digest.as_str()),
        "{json}"
    );
    let keep = format!(
        "archmerge.keep.{}",
        sbom.digest.trim_start_matches("sha256:")
    );
    let kept = s.stored("app", &keep).await.expect(200);
    assert_eq!(kept.digest_header().as_deref(), Some(sbom.digest.as_str()));
}

#[tokio::test]
async fn a_plain_image_pushed_at_the_target_loses_its_platform_to_the_arch_tag() {
    let s = Stack::with_rules("");
    let amd = s.push_to(&s.via("app:x86_64_v6"), &AMD64, 121);
    // An amd64 image pushed straight at app:v6: the arch tag provides
    // amd64, so the arch tag's image is the one listed.
    let plain = s.push_to(&s.via("app:v6"), &AMD64, 122);

    let index = s.index("app", "v6").await;
    let json = index.json();
    assert_eq!(
        index.entries(),
        set([("linux/amd64", &amd)]),
        "app:v6 after a plain amd64 image {plain} was pushed at it: {}",
        index.text()
    );
    assert_eq!(entry(&json, &amd)["annotations"][ANN_TAG], "x86_64_v6");
    assert_eq!(
        index_annotation(&json, ANN_BASE).as_deref(),
        Some(plain.as_str()),
        "{json}"
    );

    // The amd64 build is withdrawn: app:v6 is the plain image again.
    s.delete_via("app", &amd).await;
    let back = s.stored("app", "v6").await;
    assert_eq!(
        (back.status, back.digest_header()),
        (200, Some(plain.clone())),
        "app:v6 once x86_64_v6 is gone: {}",
        back.text()
    );
}

// === 2. artifacts at arch-looking tags ===

#[tokio::test]
async fn artifacts_at_arch_tags_make_no_index() {
    let s = Stack::with_rules("");
    let oras = Oras::new();
    // oras pushes a file with its tool's own config type at aarch64_v1, and
    // an OCI 1.1 artifact (artifactType, empty config) at x86_64_v1.
    let tool = oras.push_files(
        &s.via("orx/app:aarch64_v1"),
        EXAMPLE_CONFIG,
        r#"{"generator":"example"}"#,
        &notes("release notes for v1\n"),
    );
    let sbom = oras.push_artifact(
        &s.via("orx/app:x86_64_v1"),
        SBOM_TYPE,
        &[(
            "sbom.json",
            "application/spdx+json",
            r#"{"spdxVersion":"SPDX-2.3"}"#,
        )],
    );
    // Both pushes stand, as pushed.
    for (tag, pushed) in [("aarch64_v1", &tool), ("x86_64_v1", &sbom)] {
        assert_eq!(pushed.status, 201, "oras push of orx/app:{tag}");
        let stored = s.stored("orx/app", tag).await.expect(200);
        assert_eq!(
            stored.digest_header().as_deref(),
            Some(pushed.digest.as_str())
        );
    }
    let artifact = s.stored("orx/app", "x86_64_v1").await.json();
    assert_eq!(artifact["artifactType"], SBOM_TYPE, "{artifact}");
    assert_eq!(artifact["config"]["mediaType"], artifact::EMPTY_CONFIG);

    // No index is made of them.
    s.assert_absent("orx/app", "v1", "only artifacts sit at its arch tags")
        .await;

    // Each is counted, and logged once.
    let counted = s.metric(NON_IMAGE_COUNTER).await;
    assert!(
        counted >= 1.0,
        "{NON_IMAGE_COUNTER} is {counted} after two artifacts at arch tags"
    );
    for (tag, pushed) in [("aarch64_v1", &tool), ("x86_64_v1", &sbom)] {
        let n = s.non_image_lines(tag, &pushed.digest);
        assert_eq!(
            n,
            1,
            "\"{NON_IMAGE_LOG}\" for {tag} ({}) logged {n} times\n--- archmerge log ---\n{}",
            pushed.digest,
            s.proxy_log()
        );
    }
}

#[tokio::test]
async fn an_artifact_pushed_over_an_arch_tag_neither_becomes_nor_displaces_its_entry() {
    let s = Stack::with_rules("");
    let oras = Oras::new();
    let amd = s.push_to(&s.via("orx/img:x86_64_v1"), &AMD64, 201);
    let arm = s.push_to(&s.via("orx/img:aarch64_v1"), &ARM64, 202);
    let before = s.index("orx/img", "v1").await;
    assert_eq!(
        before.entries(),
        set([("linux/amd64", &amd), ("linux/arm64/v8", &arm)])
    );

    // An SBOM is pushed at aarch64_v1 by mistake (meant for a referrer).
    let sbom = oras.push_artifact(
        &s.via("orx/img:aarch64_v1"),
        SBOM_TYPE,
        &[(
            "sbom.json",
            "application/spdx+json",
            r#"{"spdxVersion":"SPDX-2.3"}"#,
        )],
    );
    // The push stands: the client got the registry's answer, the tag moved.
    assert_eq!(sbom.status, 201);
    let tag = s.stored("orx/img", "aarch64_v1").await.expect(200);
    assert_eq!(tag.digest_header().as_deref(), Some(sbom.digest.as_str()));
    // The index is byte for byte what it was, the arm64 image still listed.
    let after = s.index("orx/img", "v1").await;
    assert!(
        after.body == before.body,
        "orx/img:v1 changed when an artifact was pushed at aarch64_v1\nbefore: {}\nafter:  {}",
        before.text(),
        after.text()
    );

    // A new amd64 build arrives: the arm64 image stays, the artifact never
    // comes in.
    let amd2 = s.push_to(&s.via("orx/img:x86_64_v1"), &AMD64, 203);
    let index = s.index("orx/img", "v1").await;
    assert_eq!(
        index.entries(),
        set([("linux/amd64", &amd2), ("linux/arm64/v8", &arm)]),
        "orx/img:v1 after a new amd64 build, with an artifact at aarch64_v1: {}",
        index.text()
    );
    assert!(
        !index.text().contains(&sbom.digest),
        "the artifact {} is listed: {}",
        sbom.digest,
        index.text()
    );

    // Every child is an image a client can read, and a pull on arm64
    // straight from the registry gets the arm64 image.
    for (_, digest) in index.entries() {
        let raw = skopeo_inspect_raw(&s.direct(&format!("orx/img@{digest}")));
        let child: Value = serde_json::from_slice(&raw).expect("child manifest is JSON");
        assert_eq!(child["config"]["mediaType"], media::OCI_CONFIG, "{child}");
        assert!(child.get("artifactType").is_none(), "{child}");
    }
    let pulled = skopeo_pull(
        &s.direct("orx/img:v1"),
        Some(("linux", "arm64", Some("v8"))),
    );
    assert_eq!(pulled.manifest_digest, arm);

    // Counted, and logged once for (aarch64_v1, the artifact), though v1
    // was rebuilt after.
    let counted = s.metric(NON_IMAGE_COUNTER).await;
    assert!(counted >= 1.0, "{NON_IMAGE_COUNTER} is {counted}");
    let n = s.non_image_lines("aarch64_v1", &sbom.digest);
    assert_eq!(
        n,
        1,
        "\"{NON_IMAGE_LOG}\" for aarch64_v1 ({}) logged {n} times\n--- archmerge log ---\n{}",
        sbom.digest,
        s.proxy_log()
    );
}

// === 3. deletes under repository patterns ===

#[tokio::test]
async fn a_delete_in_a_per_arch_repository_updates_the_target_before_it_is_answered() {
    let s = Stack::with_rules(WG_RULES);
    let s390 = s.push_to(&s.via("wg/tool-s390x:v2"), &S390X, 301);
    let amd = s.push_to(&s.via("wg/tool-amd64:v2"), &AMD64, 302);
    let before = s.index("wg/tool", "v2").await;
    assert_eq!(
        before.entries(),
        set([("linux/amd64", &amd), ("linux/s390x", &s390)])
    );

    // A delete by tag: distribution 2.8 only deletes by digest. archmerge
    // passes the registry's refusal on as it is, and nothing changes.
    let through = s.delete(&s.proxy.url(), "wg/tool-amd64", "v2").await;
    let straight = s.delete(&s.registry.url(), "wg/tool-amd64", "v2").await;
    assert_eq!(
        straight.status, 400,
        "the registry now deletes by tag ({straight:?}): this story must expect the \
         delete to take effect"
    );
    assert_eq!(
        through, straight,
        "archmerge changed the registry's refusal"
    );
    let unchanged = s.index("wg/tool", "v2").await;
    assert!(unchanged.body == before.body, "{}", unchanged.text());
    let still = s.stored("wg/tool-amd64", "v2").await.expect(200);
    assert_eq!(still.digest_header().as_deref(), Some(amd.as_str()));

    // The s390x build is withdrawn by digest: when the DELETE is answered,
    // wg/tool:v2 lists amd64 only.
    s.delete_via("wg/tool-s390x", &s390).await;
    let index = s.index("wg/tool", "v2").await;
    assert_eq!(
        index.entries(),
        set([("linux/amd64", &amd)]),
        "wg/tool:v2 right after wg/tool-s390x@{s390} was deleted: {}",
        index.text()
    );
}

// === 4. deleting the target's index itself ===

#[tokio::test]
async fn a_deleted_target_index_stays_absent_until_reconcile_or_the_next_arch_push() {
    let s = Stack::with_rules("");
    let amd_layout = build_oci_layout(&AMD64.image(401), "build");
    let amd = skopeo_push(&amd_layout, &s.via("app:x86_64_v4"), Format::Source);
    let arm = s.push_to(&s.via("app:aarch64_v4"), &ARM64, 402);
    let index = s.index("app", "v4").await;
    let built = digest_of(&index.body);
    let both = set([("linux/amd64", &amd), ("linux/arm64/v8", &arm)]);
    assert_eq!(index.entries(), both);

    // A delete by tag is refused by distribution 2.8; archmerge passes the
    // refusal on and the index stays.
    let through = s.delete(&s.proxy.url(), "app", "v4").await;
    let straight = s.delete(&s.registry.url(), "app", "v4").await;
    assert_eq!(straight.status, 400, "{straight:?}");
    assert_eq!(
        through, straight,
        "archmerge changed the registry's refusal"
    );
    assert!(s.index("app", "v4").await.body == index.body);

    // The user deletes the index by digest: it is gone, and stays gone.
    s.delete_via("app", &built).await;
    s.assert_absent("app", "v4", "right after its index was deleted")
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.assert_absent("app", "v4", "3 s after its index was deleted")
        .await;
    for (tag, digest) in [("x86_64_v4", &amd), ("aarch64_v4", &arm)] {
        let a = s.stored("app", tag).await.expect(200);
        assert_eq!(a.digest_header().as_deref(), Some(digest.as_str()), "{tag}");
    }

    // inspect says so, and what reconcile would write.
    let report = s.inspect_json("app:v4");
    assert_eq!(report["state"], "absent", "{report}");
    let arch_tags: BTreeSet<&str> = report["arch_tags"]
        .as_array()
        .unwrap_or_else(|| panic!("no arch_tags: {report}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        arch_tags,
        BTreeSet::from(["aarch64_v4", "x86_64_v4"]),
        "{report}"
    );
    assert_eq!(
        report["expected_digest"].as_str(),
        Some(built.as_str()),
        "the same arch tags call for the same index: {report}"
    );

    // reconcile recreates it.
    s.reconcile(&["app"]);
    let back = s.index("app", "v4").await;
    assert_eq!(back.entries(), both);
    assert_eq!(digest_of(&back.body), built);

    // Deleted again; the next push of x86_64_v4 (the CI job run again)
    // recreates it.
    s.delete_via("app", &built).await;
    s.assert_absent("app", "v4", "after its index was deleted again")
        .await;
    skopeo_push(&amd_layout, &s.via("app:x86_64_v4"), Format::Source);
    assert_eq!(s.index("app", "v4").await.entries(), both);
}

// === 5. the webhook and reconcile follow the same rules ===

#[tokio::test]
async fn webhook_an_artifact_pushed_straight_at_an_arch_tag_leaves_the_index_alone() {
    let s = Stack::with_webhook("");
    let oras = Oras::new();
    let amd = s.push_to(&s.direct("hook/app:x86_64_v1"), &AMD64, 501);
    let arm = s.push_to(&s.direct("hook/app:aarch64_v1"), &ARM64, 502);
    let want = set([("linux/amd64", &amd), ("linux/arm64/v8", &arm)]);
    let (st, w) = (&s, &want);
    let merged = eventually(Duration::from_secs(15), move || async move {
        let a = st.stored("hook/app", "v1").await;
        listed(&a).as_ref() == Some(w)
    })
    .await;
    assert!(
        merged,
        "hook/app:v1 never listed both arches\n{}",
        s.proxy_log()
    );
    let before = s.stored("hook/app", "v1").await;

    // An SBOM pushed straight at the registry at aarch64_v1.
    let sbom = oras.push_artifact(
        &s.direct("hook/app:aarch64_v1"),
        SBOM_TYPE,
        &[(
            "sbom.json",
            "application/spdx+json",
            r#"{"spdxVersion":"SPDX-2.3"}"#,
        )],
    );
    assert_eq!(sbom.status, 201);
    // The webhook reaches archmerge; the index never changes.
    stays_unchanged(&s, "hook/app", "v1", &before.body, Duration::from_secs(3)).await;
    let counted = s.metric(NON_IMAGE_COUNTER).await;
    assert!(
        counted >= 1.0,
        "{NON_IMAGE_COUNTER} is {counted} 3 s after an artifact was pushed at an arch tag\n{}",
        s.proxy_log()
    );
    assert_eq!(
        s.non_image_lines("aarch64_v1", &sbom.digest),
        1,
        "{}",
        s.proxy_log()
    );
}

#[tokio::test]
async fn webhook_a_list_pushed_straight_at_the_target_becomes_its_base() {
    let s = Stack::with_webhook("");
    let amd = s.push_to(&s.direct("hook/list:x86_64_v1"), &AMD64, 511);
    let arm = s.push_to(&s.direct("hook/list:aarch64_v1"), &ARM64, 512);
    let want = set([("linux/amd64", &amd), ("linux/arm64/v8", &arm)]);
    let (st, w) = (&s, &want);
    let merged = eventually(Duration::from_secs(15), move || async move {
        let a = st.stored("hook/list", "v1").await;
        listed(&a).as_ref() == Some(w)
    })
    .await;
    assert!(
        merged,
        "hook/list:v1 never listed both arches\n{}",
        s.proxy_log()
    );

    // A list of amd64 and s390x, made with buildah, pushed straight at the
    // registry at hook/list:v1.
    let other_amd = s.push_to(&s.direct("seed/amd64:1"), &AMD64, 513);
    let s390 = s.push_to(&s.direct("seed/s390x:1"), &S390X, 514);
    let b = Buildah::new();
    b.manifest_create("localhost/hook-list");
    b.manifest_add("localhost/hook-list", &s.direct("seed/amd64:1"));
    b.manifest_add("localhost/hook-list", &s.direct("seed/s390x:1"));
    let list = b.manifest_push_all("localhost/hook-list", &s.direct("hook/list:v1"));

    // archmerge hears of it and rebuilds hook/list:v1: the arch tags'
    // amd64 and arm64 (the list's amd64 gives way), the list's s390x, and
    // the list as its base.
    let want = set([
        ("linux/amd64", &amd),
        ("linux/arm64/v8", &arm),
        ("linux/s390x", &s390),
    ]);
    let (st, w, l) = (&s, &want, list.as_str());
    let rebuilt = eventually(Duration::from_secs(15), move || async move {
        let a = st.stored("hook/list", "v1").await;
        listed(&a).as_ref() == Some(w)
            && index_annotation(&a.json(), ANN_BASE).as_deref() == Some(l)
    })
    .await;
    let now = s.stored("hook/list", "v1").await;
    assert!(
        rebuilt,
        "hook/list:v1 15 s after the list {list} (amd64 {other_amd}, s390x {s390}) was pushed \
         straight at it: {}\n--- archmerge log ---\n{}",
        now.text(),
        s.proxy_log()
    );
}

#[tokio::test]
async fn webhook_a_delete_straight_in_a_per_arch_repository_updates_the_target() {
    let s = Stack::with_webhook(WG_RULES);
    let s390 = s.push_to(&s.direct("wg/tool-s390x:v2"), &S390X, 521);
    let amd = s.push_to(&s.direct("wg/tool-amd64:v2"), &AMD64, 522);
    let want = set([("linux/amd64", &amd), ("linux/s390x", &s390)]);
    let (st, w) = (&s, &want);
    let merged = eventually(Duration::from_secs(15), move || async move {
        let a = st.stored("wg/tool", "v2").await;
        listed(&a).as_ref() == Some(w)
    })
    .await;
    assert!(
        merged,
        "wg/tool:v2 never listed both arches\n{}",
        s.proxy_log()
    );

    // The s390x build is deleted straight at the registry.
    let gone = s.delete(&s.registry.url(), "wg/tool-s390x", &s390).await;
    assert_eq!(gone.status, 202, "{gone:?}");
    let want = set([("linux/amd64", &amd)]);
    let (st, w) = (&s, &want);
    let updated = eventually(Duration::from_secs(15), move || async move {
        let a = st.stored("wg/tool", "v2").await;
        listed(&a).as_ref() == Some(w)
    })
    .await;
    assert!(
        updated,
        "wg/tool:v2 15 s after wg/tool-s390x@{s390} was deleted: {}\n--- archmerge log ---\n{}",
        s.stored("wg/tool", "v2").await.text(),
        s.proxy_log()
    );
}

#[tokio::test]
async fn reconcile_makes_no_index_of_artifacts_and_one_of_the_images_beside_them() {
    let s = Stack::with_rules("");
    let oras = Oras::new();
    // Straight at the registry: only artifacts at rec/art's arch tags; an
    // image and an artifact at rec/mix's.
    oras.push_files(
        &s.direct("rec/art:aarch64_v1"),
        EXAMPLE_CONFIG,
        r#"{"generator":"example"}"#,
        &notes("release notes\n"),
    );
    oras.push_artifact(
        &s.direct("rec/art:x86_64_v1"),
        SBOM_TYPE,
        &[(
            "sbom.json",
            "application/spdx+json",
            r#"{"spdxVersion":"SPDX-2.3"}"#,
        )],
    );
    let amd = s.push_to(&s.direct("rec/mix:x86_64_v1"), &AMD64, 531);
    let sbom = oras.push_artifact(
        &s.direct("rec/mix:aarch64_v1"),
        SBOM_TYPE,
        &[(
            "sbom.json",
            "application/spdx+json",
            r#"{"spdxVersion":"SPDX-2.3"}"#,
        )],
    );

    s.reconcile(&["rec/art", "rec/mix"]);
    s.assert_absent(
        "rec/art",
        "v1",
        "reconciled with only artifacts at its arch tags",
    )
    .await;
    let index = s.index("rec/mix", "v1").await;
    assert_eq!(
        index.entries(),
        set([("linux/amd64", &amd)]),
        "rec/mix:v1 reconciled with an image at x86_64_v1 and an artifact {} at aarch64_v1: {}",
        sbom.digest,
        index.text()
    );
}

#[tokio::test]
async fn reconcile_of_a_per_arch_repository_rebuilds_its_target() {
    let s = Stack::with_rules(WG_RULES);
    // Straight at the registry, so no index yet.
    let s390 = s.push_to(&s.direct("wg/tool-s390x:v2"), &S390X, 541);
    let amd = s.push_to(&s.direct("wg/tool-amd64:v2"), &AMD64, 542);
    s.assert_absent("wg/tool", "v2", "pushed straight at the registry")
        .await;

    s.reconcile(&["wg/tool-s390x"]);
    let index = s.index("wg/tool", "v2").await;
    assert_eq!(
        index.entries(),
        set([("linux/amd64", &amd), ("linux/s390x", &s390)]),
        "{}",
        index.text()
    );
}
