//! Issue 8: per-repository naming rules (`[[rules]]`), one user story per
//! rule kind.
//!
//! Every test starts its own `docker-registry` (CNCF distribution 2.8) with
//! archmerge in front of it, configured with the `[[rules]]` of its story,
//! pushes per-architecture images the way a CI job would — skopeo from an
//! OCI layout, or the distribution API over raw HTTP where the test must
//! read the push's own response headers — and then looks at what the
//! registry itself holds at the target tag. In `write` mode the registry is
//! the source of truth, so targets are read straight from it (and compared
//! with what archmerge serves), and pulls that prove a point go straight to
//! the registry too.

mod support;

use std::collections::BTreeSet;
use std::fs;

use serde_json::Value;

use support::*;

/// An amd64 image, pushed under whatever alias the story's naming uses.
const AMD64: ArchSpec = ArchSpec {
    alias: "amd64",
    arch: "amd64",
    variant: None,
};
/// An arm64 (v8) image.
const ARM64: ArchSpec = ArchSpec {
    alias: "arm64",
    arch: "arm64",
    variant: Some("v8"),
};
/// An s390x image, for the allow-list.
const S390X: ArchSpec = ArchSpec {
    alias: "s390x",
    arch: "s390x",
    variant: None,
};

const VENDOR: &str = "org.opencontainers.image.vendor";

// === the stack ===

/// The stacks here run archmerge with one rules file
/// ([`Stack::with_rules`]).
impl Stack {
    /// Builds the image of `spec` (`seed` makes it unique) and pushes it
    /// with skopeo through archmerge to `image` (`repo:tag`); returns the
    /// digest the registry stored.
    fn push_via(&self, image: &str, spec: &ArchSpec, seed: u64, format: Format) -> String {
        let layout = build_oci_layout(&spec.image(seed), "build");
        let digest = skopeo_push(&layout, &self.via(image), format);
        if format != Format::V2s2 {
            assert_eq!(
                digest, layout.manifest_digest,
                "skopeo stored another manifest"
            );
        }
        digest
    }

    /// The index at `repo:tag`, read straight from the registry (it must
    /// be an index whose headers say what its bytes are) and through
    /// archmerge (the same bytes).
    async fn index(&self, repo: &str, tag: &str) -> ManifestAnswer {
        let stored = get_any_manifest(&http(), &self.registry.url(), repo, tag).await;
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

    /// Panics unless the registry has nothing at `repo:tag`.
    async fn assert_absent(&self, repo: &str, tag: &str) {
        let a = get_any_manifest(&http(), &self.registry.url(), repo, tag).await;
        assert_eq!(
            a.status,
            404,
            "{repo}:{tag} should not exist, the registry holds: {}",
            a.text()
        );
    }

    /// Panics unless `repo:tag` is the plain image manifest `digest`.
    async fn assert_plain_image(&self, repo: &str, tag: &str, digest: &str) {
        let a = get_any_manifest(&http(), &self.registry.url(), repo, tag)
            .await
            .expect(200);
        assert_eq!(a.digest_header().as_deref(), Some(digest), "{repo}:{tag}");
        assert!(
            a.json()["config"].is_object() && a.json().get("manifests").is_none(),
            "{repo}:{tag} should be the image as pushed: {}",
            a.text()
        );
    }

    /// The registry's tags of `repo`, sorted.
    async fn tags(&self, repo: &str) -> Vec<String> {
        list_tags(&http(), &self.registry.url(), repo).await
    }

    /// `archmerge inspect` of `reference` with the stack's rules file.
    fn inspect(&self, reference: &str, json: bool) -> String {
        let config = self.config_path().display().to_string();
        let registry = self.registry.url();
        let mut args = vec![
            "inspect",
            "--config",
            config.as_str(),
            "--upstream",
            registry.as_str(),
        ];
        if json {
            args.push("--json");
        }
        args.push(reference);
        let out = archmerge_command(&args, &[]);
        assert!(out.status.success(), "inspect {reference}: {}", shown(&out));
        String::from_utf8(out.stdout).expect("inspect prints UTF-8")
    }
}

/// `{(platform, digest)}` as [`ManifestAnswer::entries`] gives them.
fn entries<const N: usize>(items: [(&str, &str); N]) -> BTreeSet<(String, String)> {
    items
        .into_iter()
        .map(|(p, d)| (p.to_owned(), d.to_owned()))
        .collect()
}

/// `skopeo copy --override-os linux --override-arch … --override-variant …`
/// of `image`, as a pull on that machine picks from an index.
fn pull_as(image: &str, spec: &ArchSpec) -> PulledImage {
    let pulled = skopeo_pull(image, Some(("linux", spec.arch, spec.variant)));
    let config = pulled.config_json();
    assert_eq!(
        config["architecture"], spec.arch,
        "pulled config of {image}"
    );
    pulled.verified_blob_digests();
    pulled
}

// === 1. prefixes (linuxserver) ===

#[tokio::test]
async fn linuxserver_prefixes_merge_where_the_rule_applies_and_nowhere_else() {
    let s = Stack::with_rules(
        r#"
[[rules]]
repositories = ["ls/*"]
tag_patterns = ["{arch}-{tag}"]
"#,
    );
    // linuxserver's naming: `amd64-<version>`, `arm64v8-<version>`.
    let amd = s.push_via("ls/app:amd64-1.0", &AMD64, 11, Format::Source);
    let arm = s.push_via("ls/app:arm64v8-1.0", &ARM64, 12, Format::Source);

    let index = s.index("ls/app", "1.0").await;
    assert_eq!(
        index.entries(),
        entries([("linux/amd64", &amd), ("linux/arm64/v8", &arm)]),
        "{}",
        index.text()
    );
    // A pull of 1.0 on an arm64 machine, straight from the registry.
    assert_eq!(
        pull_as(&s.direct("ls/app:1.0"), &ARM64).manifest_digest,
        arm
    );

    // The first matching rule wins: under ls/* the default `{arch}_{tag}`
    // naming is not an arch tag.
    let underscore = s.push_via("ls/app:aarch64_2.0", &ARM64, 13, Format::Source);
    s.assert_absent("ls/app", "2.0").await;
    s.assert_plain_image("ls/app", "aarch64_2.0", &underscore)
        .await;

    // In a repository no rule names, the default rule applies:
    // `amd64-1.0` is a plain tag there and makes no `1.0`.
    let plain = s.push_via("other/app:amd64-1.0", &AMD64, 14, Format::Source);
    s.assert_plain_image("other/app", "amd64-1.0", &plain).await;
    assert_eq!(s.tags("other/app").await, vec!["amd64-1.0"]);
    assert_eq!(
        s.tags("ls/app").await,
        vec!["1.0", "aarch64_2.0", "amd64-1.0", "arm64v8-1.0"]
    );
}

// === 2. suffixes ===

#[tokio::test]
async fn suffixes_merge_into_the_tag_before_the_arch() {
    let s = Stack::with_rules(
        r#"
[[rules]]
repositories = ["sfx/*"]
tag_patterns = ["{tag}-{arch}"]
"#,
    );
    let amd = s.push_via("sfx/app:1.0-x86_64", &AMD64, 21, Format::Source);
    let arm = s.push_via("sfx/app:1.0-aarch64", &ARM64, 22, Format::Source);
    let index = s.index("sfx/app", "1.0").await;
    assert_eq!(
        index.entries(),
        entries([("linux/amd64", &amd), ("linux/arm64/v8", &arm)]),
        "{}",
        index.text()
    );

    // A version with dashes of its own: only the trailing arch is cut off.
    let rc = s.push_via("sfx/app:2.0-rc1-x86_64", &AMD64, 23, Format::Source);
    let index = s.index("sfx/app", "2.0-rc1").await;
    assert_eq!(index.entries(), entries([("linux/amd64", &rc)]));

    assert_eq!(
        s.tags("sfx/app").await,
        vec![
            "1.0",
            "1.0-aarch64",
            "1.0-x86_64",
            "2.0-rc1",
            "2.0-rc1-x86_64"
        ]
    );
    assert_eq!(
        pull_as(&s.direct("sfx/app:1.0"), &AMD64).manifest_digest,
        amd
    );
}

// === 3. one repository per arch ===

#[tokio::test]
async fn one_repository_per_arch_is_copied_into_the_target_repository() {
    let s = Stack::with_rules(
        r#"
[[rules]]
repositories = ["wg/*"]
repository_patterns = ["{repo}-{arch}"]
"#,
    );
    let amd_layout = build_oci_layout(&AMD64.image(31), "build");
    let arm_layout = build_oci_layout(&ARM64.image(32), "build");
    let amd = skopeo_push(&amd_layout, &s.via("wg/go-ui-amd64:v1.0.2"), Format::Source);
    let arm = skopeo_push(&arm_layout, &s.via("wg/go-ui-arm64:v1.0.2"), Format::Source);
    assert_eq!(amd, amd_layout.manifest_digest);
    assert_eq!(arm, arm_layout.manifest_digest);

    // The index lives in the target repository, at the pushed tag.
    let index = s.index("wg/go-ui", "v1.0.2").await;
    assert_eq!(
        index.entries(),
        entries([("linux/amd64", &amd), ("linux/arm64/v8", &arm)]),
        "{}",
        index.text()
    );
    // Each copied child has a keep tag of its own (garbage-collect
    // --delete-untagged deletes untagged manifests, even listed ones), and
    // no other tag was added.
    let keep = |d: &str| format!("archmerge.keep.{}", d.trim_start_matches("sha256:"));
    let mut want = vec![keep(&amd), keep(&arm), "v1.0.2".to_owned()];
    want.sort();
    assert_eq!(s.tags("wg/go-ui").await, want);
    // The per-arch repositories keep their own tags.
    assert_eq!(s.tags("wg/go-ui-amd64").await, vec!["v1.0.2"]);

    // Every child manifest and every blob is in wg/go-ui itself: the
    // registry answers for them in that repository (distribution checks
    // the repository's own links, not its global blob store).
    let client = http();
    let registry = s.registry.url();
    for layout in [&amd_layout, &arm_layout] {
        let url = format!(
            "{registry}/v2/wg/go-ui/manifests/{}",
            layout.manifest_digest
        );
        let res = client
            .head(&url)
            .header("accept", ACCEPT_ANY_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "HEAD {url}");
        for blob in layout.blob_digests() {
            let url = format!("{registry}/v2/wg/go-ui/blobs/{blob}");
            let res = client.head(&url).send().await.unwrap();
            assert_eq!(res.status(), 200, "HEAD {url}: the blob was not copied");
        }
    }

    // The check tells repositories apart: the arm64 repository never got
    // the amd64 layer.
    let url = format!(
        "{registry}/v2/wg/go-ui-arm64/blobs/{}",
        amd_layout.layer_digests[0]
    );
    let res = client.head(&url).send().await.unwrap();
    assert_eq!(res.status(), 404, "HEAD {url}");

    // A pull of wg/go-ui:v1.0.2 on each machine, straight from the
    // registry, gets that machine's image, every blob intact.
    for (spec, digest) in [(&ARM64, &arm), (&AMD64, &amd)] {
        let pulled = pull_as(&s.direct("wg/go-ui:v1.0.2"), spec);
        assert_eq!(
            &pulled.manifest_digest,
            digest,
            "pull as {}",
            spec.platform()
        );
    }
}

// === 4. allow-list ===

#[tokio::test]
async fn an_allow_list_leaves_other_arches_as_plain_tags() {
    let s = Stack::with_rules(
        r#"
[[rules]]
repositories = ["allow/*"]
arches = ["amd64", "arm64"]
"#,
    );
    // s390x is not on the list: its arch tag is a plain tag, makes no v1.
    let s390x = s.push_via("allow/app:s390x_v1", &S390X, 41, Format::Source);
    s.assert_absent("allow/app", "v1").await;
    s.assert_plain_image("allow/app", "s390x_v1", &s390x).await;

    let amd = s.push_via("allow/app:x86_64_v1", &AMD64, 42, Format::Source);
    let arm = s.push_via("allow/app:aarch64_v1", &ARM64, 43, Format::Source);
    let index = s.index("allow/app", "v1").await;
    assert_eq!(
        index.entries(),
        entries([("linux/amd64", &amd), ("linux/arm64/v8", &arm)]),
        "s390x must not be listed: {}",
        index.text()
    );
    s.assert_plain_image("allow/app", "s390x_v1", &s390x).await;
}

// === 5. required set ===

#[tokio::test]
async fn a_required_set_publishes_nothing_until_complete_and_inspect_says_what_is_missing() {
    let s = Stack::with_rules(
        r#"
[[rules]]
repositories = ["req/*"]
required = ["amd64", "arm64"]
"#,
    );
    let amd = s.push_via("req/app:x86_64_v1", &AMD64, 51, Format::Source);

    // Nothing is published: not in the registry, not through archmerge.
    s.assert_absent("req/app", "v1").await;
    get_any_manifest(&http(), &s.proxy.url(), "req/app", "v1")
        .await
        .expect(404);
    assert_eq!(s.tags("req/app").await, vec!["x86_64_v1"]);

    // inspect says what is missing, for people and for scripts.
    let text = s.inspect("req/app:v1", false);
    assert!(
        text.contains("WAITING") && text.contains("linux/arm64/v8"),
        "inspect should say it waits for linux/arm64/v8:\n{text}"
    );
    let report: Value = serde_json::from_str(&s.inspect("req/app:v1", true)).unwrap();
    assert_eq!(
        report["missing_required"],
        serde_json::json!(["linux/arm64/v8"]),
        "{report:#}"
    );
    assert_eq!(report["state"], "absent", "{report:#}");
    assert_eq!(
        report["arch_tags"],
        serde_json::json!(["x86_64_v1"]),
        "{report:#}"
    );

    // The last required arch arrives: the index is published with both.
    let arm = s.push_via("req/app:aarch64_v1", &ARM64, 52, Format::Source);
    let index = s.index("req/app", "v1").await;
    assert_eq!(
        index.entries(),
        entries([("linux/amd64", &amd), ("linux/arm64/v8", &arm)]),
        "{}",
        index.text()
    );
    let report: Value = serde_json::from_str(&s.inspect("req/app:v1", true)).unwrap();
    assert_eq!(
        report["missing_required"],
        serde_json::json!([]),
        "{report:#}"
    );
    assert_eq!(report["state"], "index", "{report:#}");
    assert!(!s.inspect("req/app:v1", false).contains("WAITING"));
}

// === 6. extra targets ===

#[tokio::test]
async fn extra_targets_get_the_same_index() {
    let s = Stack::with_rules(
        r#"
[[rules]]
repositories = ["ext/*"]
extra_targets = ["latest"]
"#,
    );
    let amd = s.push_via("ext/app:x86_64_v2", &AMD64, 61, Format::Source);
    let arm = s.push_via("ext/app:aarch64_v2", &ARM64, 62, Format::Source);

    let v2 = s.index("ext/app", "v2").await;
    let latest = s.index("ext/app", "latest").await;
    assert_eq!(
        v2.entries(),
        entries([("linux/amd64", &amd), ("linux/arm64/v8", &arm)]),
        "{}",
        v2.text()
    );
    assert_eq!(
        latest.digest_header(),
        v2.digest_header(),
        "latest and v2 differ\nlatest: {}\nv2:     {}",
        latest.text(),
        v2.text()
    );
    assert_eq!(latest.body, v2.body);
    assert_eq!(
        pull_as(&s.direct("ext/app:latest"), &ARM64).manifest_digest,
        arm
    );
}

// === 7. index annotations ===

#[tokio::test]
async fn annotations_go_on_an_oci_index_and_a_docker_list_has_none() {
    let s = Stack::with_rules(
        r#"
[[rules]]
repositories = ["ann/*"]
annotations = { "org.opencontainers.image.vendor" = "example" }
"#,
    );
    // OCI children → an OCI image index, which carries the annotation.
    s.push_via("ann/oci:x86_64_v1", &AMD64, 71, Format::Oci);
    s.push_via("ann/oci:aarch64_v1", &ARM64, 72, Format::Oci);
    let oci = s.index("ann/oci", "v1").await;
    let json = oci.json();
    assert_eq!(json["mediaType"], media::OCI_INDEX, "{}", oci.text());
    assert_eq!(json["annotations"][VENDOR], "example", "{}", oci.text());
    assert_eq!(json["manifests"].as_array().unwrap().len(), 2);

    // Docker schema2 children → a Docker manifest list. Its schema
    // (application/vnd.docker.distribution.manifest.list.v2+json) has no
    // index-level `annotations` at all, so there is nowhere to put the
    // vendor: the list must come out without one (not with a field Docker
    // tooling does not know), and still list both images.
    let amd = s.push_via("ann/docker:x86_64_v1", &AMD64, 73, Format::V2s2);
    let arm = s.push_via("ann/docker:aarch64_v1", &ARM64, 74, Format::V2s2);
    let list = s.index("ann/docker", "v1").await;
    let json = list.json();
    assert_eq!(json["mediaType"], media::DOCKER_LIST, "{}", list.text());
    assert!(
        json.get("annotations").is_none(),
        "a Docker list has no annotations: {}",
        list.text()
    );
    assert_eq!(
        list.entries(),
        entries([("linux/amd64", &amd), ("linux/arm64/v8", &arm)])
    );
}

// === 8. a merge the registry refuses: Warning ===

/// Uploads the blobs of `spec`'s image to `base` as `client`, then PUTs its
/// manifest at `repo:tag`: the manifest PUT's answer, whole.
async fn push_for_answer(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    spec: &ImageSpec,
) -> (
    String,
    reqwest::StatusCode,
    reqwest::header::HeaderMap,
    String,
) {
    let built = build_oci_layout(spec, tag);
    for d in built.blob_digests() {
        put_blob(client, base, repo, &fs::read(built.blob_path(&d)).unwrap()).await;
    }
    let res = put_manifest(
        client,
        base,
        repo,
        tag,
        media::OCI_MANIFEST,
        &built.manifest,
    )
    .await;
    let (status, headers) = (res.status(), res.headers().clone());
    let body = res.text().await.unwrap_or_default();
    (built.manifest_digest.clone(), status, headers, body)
}

/// The `Warning` header values of an answer.
fn warnings(headers: &reqwest::header::HeaderMap) -> Vec<String> {
    headers
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap_or("<not ascii>").to_owned())
        .collect()
}

#[tokio::test]
async fn a_copy_the_registry_refuses_keeps_the_push_and_says_so_in_a_warning() {
    // A registry with token auth (as Harbor, GitLab, or distribution behind
    // docker/auth): each token carries the repository scopes it was issued
    // for, and archmerge copies children with the pushing client's own
    // token, so a client whose token does not cover the target repository
    // cannot have its child copied there.
    let issuer = TokenIssuer::new();
    let registry = spawn_registry_with(RegistryOpts {
        env: issuer.registry_env(),
        ..RegistryOpts::default()
    });
    let proxy = spawn_archmerge_with(
        &registry.url(),
        ArchmergeOpts {
            config_toml: Some(
                "[[rules]]\nrepositories = [\"wg/*\"]\nrepository_patterns = [\"{repo}-{arch}\"]\n"
                    .to_owned(),
            ),
            ..ArchmergeOpts::default()
        },
    );
    let (base, reg) = (proxy.url(), registry.url());
    let admin = http_bearer(&issuer.token(&[
        ("wg/app", &["pull", "push"]),
        ("wg/app-amd64", &["pull", "push"]),
        ("wg/app-arm64", &["pull", "push"]),
    ]));

    // The amd64 job may push its own repository and read the shared one,
    // not write it: the mount into wg/app is refused.
    let amd64_job =
        http_bearer(&issuer.token(&[("wg/app-amd64", &["pull", "push"]), ("wg/app", &["pull"])]));
    let (amd, status, headers, body) =
        push_for_answer(&amd64_job, &base, "wg/app-amd64", "v1", &AMD64.image(81)).await;

    // The push itself stands: the registry's own 201 and digest.
    assert_eq!(status, 201, "the arch push must succeed: {body}");
    assert_eq!(
        headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(amd.as_str())
    );
    get_any_manifest(&admin, &reg, "wg/app-amd64", "v1")
        .await
        .expect(200);
    // …and the client is told the index did not follow.
    let said = warnings(&headers);
    assert_eq!(said.len(), 1, "one Warning expected, got {said:?}");
    assert!(
        said[0].starts_with("199 archmerge \"") && said[0].ends_with('"'),
        "Warning must be `199 archmerge \"…\"`: {}",
        said[0]
    );
    assert!(
        said[0].contains("wg/app:v1"),
        "Warning must name the index: {}",
        said[0]
    );
    assert!(
        said[0].contains("401"),
        "Warning must say the registry refused: {}",
        said[0]
    );
    // Nothing was published in wg/app.
    get_any_manifest(&admin, &reg, "wg/app", "v1")
        .await
        .expect(404);
    // It was the copy into wg/app that the registry refused.
    let refused = registry
        .log_text()
        .lines()
        .any(|l| l.contains("POST /v2/wg/app/blobs/uploads/?mount=") && l.contains("\" 401 "));
    assert!(
        refused,
        "no refused mount into wg/app in the registry log:\n{}",
        registry.log_text()
    );
    let log = proxy.log_text();
    assert!(
        log.contains("merge failed"),
        "the failure must be logged:\n{log}"
    );

    // A job whose token covers the target repository: its push carries no
    // Warning, and the index lists both arches — the refused amd64 child
    // was not lost, it is copied now.
    let arm64_job = http_bearer(&issuer.token(&[
        ("wg/app-arm64", &["pull", "push"]),
        ("wg/app-amd64", &["pull"]),
        ("wg/app", &["pull", "push"]),
    ]));
    let (arm, status, headers, body) =
        push_for_answer(&arm64_job, &base, "wg/app-arm64", "v1", &ARM64.image(82)).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        warnings(&headers),
        Vec::<String>::new(),
        "a merge that worked warns of nothing"
    );
    let index = get_any_manifest(&admin, &reg, "wg/app", "v1")
        .await
        .expect(200);
    assert_eq!(
        index.entries(),
        entries([("linux/amd64", &amd), ("linux/arm64/v8", &arm)]),
        "{}",
        index.text()
    );
}

/// A token registry whose realm issues archmerge's own identity
/// (`archmerge-bot`) a token for any scope, and archmerge in front of it with
/// those credentials and the `wg/*` repository-pattern rule plus `extra`.
async fn with_own_credentials(
    extra: &str,
) -> (std::sync::Arc<TokenIssuer>, Realm, Registry, Archmerge) {
    let issuer = std::sync::Arc::new(TokenIssuer::new());
    let realm = Realm::start(issuer.clone(), "archmerge-bot", "bot-pass-47", 300).await;
    let registry = spawn_registry_with(RegistryOpts {
        env: issuer.registry_env_with_realm(&realm.url()),
        ..RegistryOpts::default()
    });
    let rules = format!(
        "[[rules]]\nrepositories = [\"wg/*\"]\nrepository_patterns = [\"{{repo}}-{{arch}}\"]\n{extra}"
    );
    let proxy = spawn_archmerge_with(
        &registry.url(),
        ArchmergeOpts {
            config_toml: Some(rules),
            env: vec![
                ("ARCHMERGE_UPSTREAM_USERNAME".into(), "archmerge-bot".into()),
                ("ARCHMERGE_UPSTREAM_PASSWORD".into(), "bot-pass-47".into()),
            ],
            ..ArchmergeOpts::default()
        },
    );
    (issuer, realm, registry, proxy)
}

#[tokio::test]
async fn a_rule_may_have_archmerges_own_credentials_copy_and_write_its_targets() {
    // The same token registry, where each CI job's token covers only its
    // own per-arch repository: with `write_with = "archmerge"` on the rule,
    // archmerge's own credentials (exchanged at the realm for a token per
    // scope) copy the child into the target repository and write the index.
    let (issuer, realm, registry, proxy) =
        with_own_credentials("write_with = \"archmerge\"\n").await;
    let (base, reg) = (proxy.url(), registry.url());
    let reader = http_bearer(&issuer.token(&[("wg/app", &["pull"])]));

    // Each job may push its own repository only.
    let amd64_job = http_bearer(&issuer.token(&[("wg/app-amd64", &["pull", "push"])]));
    let (amd, status, headers, body) =
        push_for_answer(&amd64_job, &base, "wg/app-amd64", "v1", &AMD64.image(91)).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        warnings(&headers),
        Vec::<String>::new(),
        "the merge must work"
    );
    let arm64_job = http_bearer(&issuer.token(&[("wg/app-arm64", &["pull", "push"])]));
    let (arm, status, headers, body) =
        push_for_answer(&arm64_job, &base, "wg/app-arm64", "v1", &ARM64.image(92)).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        warnings(&headers),
        Vec::<String>::new(),
        "the merge must work"
    );

    let index = get_any_manifest(&reader, &reg, "wg/app", "v1")
        .await
        .expect(200);
    assert_eq!(
        index.entries(),
        entries([("linux/amd64", &amd), ("linux/arm64/v8", &arm)]),
        "{}",
        index.text()
    );
    // It was archmerge's own identity that asked for the target's scope.
    assert!(
        realm
            .asked()
            .iter()
            .any(|s| s.contains("repository:wg/app:") && s.contains("push")),
        "archmerge never asked the realm for wg/app: {:?}",
        realm.asked()
    );
    // Nothing was read with archmerge's own credentials before the
    // registry had said the job may push.
    assert_eq!(
        proxy.metric("archmerge_merge_reads_ahead_total").await,
        0.0,
        "a push was read ahead with archmerge's own credentials"
    );

    // Without upstream_auth the rule is refused: nobody's credentials would do it.
    let out = check_config(
        "upstream = \"http://127.0.0.1:5000\"\n[[rules]]\nrepositories = [\"wg/*\"]\nrepository_patterns = [\"{repo}-{arch}\"]\nwrite_with = \"archmerge\"\n",
    );
    assert_eq!(out.status.code(), Some(64), "{}", shown(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rules[0].write_with"),
        "{}",
        shown(&out)
    );
}

#[tokio::test]
async fn without_the_opt_in_archmerges_own_credentials_never_write_what_the_client_could_not() {
    // archmerge has its own credentials (for reconcile, the webhook and
    // retries), but the rule does not say `write_with = "archmerge"`: a
    // merge the registry refused for the client's token is not retried
    // with archmerge's own, so the target is never written for that client.
    let (issuer, realm, registry, proxy) = with_own_credentials("").await;
    let amd64_job = http_bearer(&issuer.token(&[("wg/app-amd64", &["pull", "push"])]));
    let (_, status, headers, body) = push_for_answer(
        &amd64_job,
        &proxy.url(),
        "wg/app-amd64",
        "v1",
        &AMD64.image(95),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(warnings(&headers).len(), 1, "the refused merge is said");
    // Background retries start after a second: give them three.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let reader = http_bearer(&issuer.token(&[("wg/app", &["pull"])]));
    get_any_manifest(&reader, &registry.url(), "wg/app", "v1")
        .await
        .expect(404);
    assert!(
        !realm
            .asked()
            .iter()
            .any(|s| s.contains("repository:wg/app:") && s.contains("push")),
        "archmerge asked for push on wg/app with its own identity: {:?}",
        realm.asked()
    );
    let log = proxy.log_text();
    assert!(
        log.contains("not retried"),
        "the refusal must be logged:\n{log}"
    );
}

// === 9. check-config ===

/// `archmerge check-config --config <file holding text>`.
fn check_config(text: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archmerge.toml");
    fs::write(&path, text).unwrap();
    let path = path.display().to_string();
    archmerge_command(&["check-config", "--config", path.as_str()], &[])
}

#[test]
fn check_config_refuses_bad_rules_naming_each_key_and_line() {
    // The example of the README (and issue 8) is valid as written.
    let example = r#"upstream = "http://127.0.0.1:5000"

[[rules]]
repositories = ["ls/*"]
tag_patterns = ["{arch}-{tag}"]

[[rules]]
repositories = ["sfx/*"]
tag_patterns = ["{tag}-{arch}"]

[[rules]]
repositories = ["wg/*"]
repository_patterns = ["{repo}-{arch}"]

[[rules]]
repositories = ["req/*"]
tag_patterns = ["{arch}_{tag}"]
arches = ["amd64", "arm64"]
required = ["amd64", "arm64"]
extra_targets = ["latest"]
annotations = { "org.opencontainers.image.vendor" = "example" }
index_media_type = "oci"
"#;
    let out = check_config(example);
    assert!(
        out.status.success(),
        "the documented example: {}",
        shown(&out)
    );

    // Four mistakes, each reported with its key and where it is — all in
    // one run, not just the first.
    let bad = r#"upstream = "http://127.0.0.1:5000"

[[rules]]
repositories = ["ls/*"]
tag_patterns = ["{arch}-{version}"]

[[rules]]
repositories = ["sfx/*"]
tag_patterns = ["{tag}-linux"]

[[rules]]
repositories = ["req/*"]
arches = ["amd64", "sparc"]

[[rules]]
repositories = ["wg/*"]
repository_patterns = ["{repo}-{arch}-{tag}"]
"#;
    let out = check_config(bad);
    assert_eq!(
        out.status.code(),
        Some(64),
        "bad rules must exit 64: {}",
        shown(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line_of = |key: &str| {
        stderr
            .lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("nothing about {key}: {}", shown(&out)))
            .to_owned()
    };
    // An unknown placeholder.
    let l = line_of("rules[0].tag_patterns");
    assert!(
        l.contains("{version}") && l.contains("line 5, column 17"),
        "{l}"
    );
    // A pattern without {arch}.
    let l = line_of("rules[1].tag_patterns");
    assert!(
        l.contains("{tag}-linux") && l.contains("{arch}") && l.contains("line 9, column 17"),
        "{l}"
    );
    // An unknown arch.
    let l = line_of("rules[2].arches");
    assert!(
        l.contains("sparc") && l.contains("line 13, column 20"),
        "{l}"
    );
    // A repository pattern with a placeholder it cannot have.
    let l = line_of("rules[3].repository_patterns");
    assert!(
        l.contains("{tag}") && l.contains("line 17, column 24"),
        "{l}"
    );
}

// === 10. foreign layers under a repository pattern ===

#[tokio::test]
async fn a_windows_image_with_a_foreign_base_layer_is_copied_without_that_layer() {
    // Windows images are pushed with their base layer *foreign*
    // (`…rootfs.foreign.diff.tar.gzip` with `urls`): the blob stays at
    // Microsoft's registry, and distribution accepts the manifest without
    // having it. Copying such a child into the target repository must do
    // what the registry did: skip the foreign layer, copy the rest (a PUT
    // of this manifest by digest into win/app without that blob gets a 201
    // from the same registry).
    //
    // distribution takes foreign layers only from the URLs its operator
    // allows (`validation.manifests.urls.allow`), as registries that hold
    // Windows images are set up.
    let registry = RegistryOpts {
        env: vec![(
            "REGISTRY_VALIDATION_MANIFESTS_URLS_ALLOW".to_owned(),
            r"['^https://mcr\.microsoft\.com/']".to_owned(),
        )],
        ..RegistryOpts::default()
    };
    let rules = r#"
[aliases]
windows-amd64 = "windows/amd64"

[[rules]]
repositories = ["win/*"]
repository_patterns = ["{repo}-{arch}"]
"#;
    let s = Stack::with_registry(
        registry,
        ArchmergeOpts {
            config_toml: Some(rules.to_owned()),
            ..ArchmergeOpts::default()
        },
    );
    let (base, repo) = (s.proxy.url(), "win/app-windows-amd64");
    let client = http();
    let own_layer = build_oci_layout(&ImageSpec::new("windows", "amd64").layer(101, 2048), "x");
    let layer = fs::read(own_layer.blob_path(&own_layer.layer_digests[0])).unwrap();
    let layer_digest = put_blob(&client, &base, repo, &layer).await;
    let foreign = b"the servercore base layer, never uploaded";
    let foreign_digest = digest_of(foreign);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "windows",
        "os.version": "10.0.17763.5206",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [foreign_digest, own_layer.diff_ids[0]]},
    }))
    .unwrap();
    let config_digest = put_blob(&client, &base, repo, &config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                "digest": foreign_digest,
                "size": foreign.len(),
                "urls": [format!("https://mcr.microsoft.com/v2/windows/servercore/blobs/{foreign_digest}")],
            },
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": layer_digest,
                "size": layer.len(),
            },
        ],
    }))
    .unwrap();
    let digest = digest_of(&manifest);
    let res = put_manifest(
        &client,
        &base,
        repo,
        "ltsc2019",
        media::DOCKER_MANIFEST,
        &manifest,
    )
    .await;
    let (status, headers) = (res.status(), res.headers().clone());
    let body = res.text().await.unwrap_or_default();
    assert_eq!(
        status, 201,
        "the registry takes a manifest with a foreign layer: {body}"
    );
    assert_eq!(
        warnings(&headers),
        Vec::<String>::new(),
        "the merge must not fail"
    );

    let index = s.index("win/app", "ltsc2019").await;
    assert_eq!(
        index.entries(),
        entries([("windows/amd64", &digest)]),
        "{}",
        index.text()
    );
    let registry = s.registry.url();
    for blob in [&config_digest, &layer_digest] {
        let url = format!("{registry}/v2/win/app/blobs/{blob}");
        assert_eq!(
            client.head(&url).send().await.unwrap().status(),
            200,
            "HEAD {url}"
        );
    }
}
