//! Issue 3: arch tags become a correct, canonical multi-arch index.
//!
//! Every test starts its own `docker-registry` (CNCF distribution 2.8) with
//! archmerge in front of it, pushes per-architecture tags the way a CI job
//! would — skopeo from an OCI layout, or the distribution API over raw HTTP
//! when many small pushes must run at once — and then looks at what the
//! registry holds at the target tag, with the clients a user would use:
//! `docker manifest inspect`, `skopeo copy --override-arch`, raw `GET`s.
//!
//! The index is always read back *from the registry* as well as through
//! archmerge: in `write` mode the registry is the source of truth, so a pull
//! that bypasses archmerge must see the same bytes.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::{Command, Output};

use serde_json::{json, Value};
use tempfile::TempDir;

use support::*;

/// Every manifest media type, as docker and skopeo send in `Accept`.
const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// The annotation archmerge puts on every entry it manages.
const ANN_TAG: &str = "io.archmerge.tag";
/// The annotation on entries kept from something archmerge did not make.
const ANN_AMENDED: &str = "io.archmerge.amended";
const ANN_REF_TYPE: &str = "vnd.docker.reference.type";
const ANN_REF_DIGEST: &str = "vnd.docker.reference.digest";

// === the stack ===

impl Stack {
    /// The index at `repo:tag`, read through archmerge and straight from
    /// the registry; panics unless both serve the same bytes.
    async fn index(&self, repo: &str, tag: &str) -> Index {
        let through = fetch_index(&self.proxy.url(), repo, tag).await;
        let stored = fetch_index(&self.registry.url(), repo, tag).await;
        assert!(
            through.bytes == stored.bytes,
            "archmerge and the registry serve different bytes at {repo}:{tag}\n\
             via archmerge: {}\nregistry:      {}",
            through.text(),
            stored.text()
        );
        stored
    }

    /// archmerge's `merge` log lines for `repo:target`, oldest first.
    fn merge_lines(&self, repo: &str, target: &str) -> Vec<String> {
        let (repo, target) = (
            format!("repo=\"{repo}\""),
            format!("reference=\"{target}\""),
        );
        self.proxy_log()
            .lines()
            .filter(|l| l.contains(" merge ") && l.contains(&repo) && l.contains(&target))
            .map(str::to_owned)
            .collect()
    }
}

// === arches and images ===

/// One arch of the classic template: its tag alias and the platform its
/// image is built for.
#[derive(Clone, Copy, Debug)]
struct Arch {
    alias: &'static str,
    arch: &'static str,
    variant: Option<&'static str>,
}

impl Arch {
    /// `linux/<arch>[/<variant>]`, as the index must list it.
    fn platform(&self) -> String {
        match self.variant {
            Some(v) => format!("linux/{}/{v}", self.arch),
            None => format!("linux/{}", self.arch),
        }
    }

    /// A small image whose config names this arch's platform; `seed`
    /// makes its layer (and so its digest) unique.
    fn spec(&self, seed: u64) -> ImageSpec {
        let spec = ImageSpec::new("linux", self.arch).layer(seed, 2048);
        match self.variant {
            Some(v) => spec.variant(v),
            None => spec,
        }
    }

    fn layout(&self, seed: u64, tag: &str) -> OciLayout {
        build_oci_layout(&self.spec(seed), tag)
    }
}

const fn arch(alias: &'static str, arch: &'static str, variant: Option<&'static str>) -> Arch {
    Arch {
        alias,
        arch,
        variant,
    }
}

/// The four arches of the classic `make annotate` template.
const CLASSIC: [Arch; 4] = [
    arch("x86_64", "amd64", None),
    arch("aarch64", "arm64", Some("v8")),
    arch("armv7l", "arm", Some("v7")),
    arch("armhf", "arm", Some("v6")),
];

/// The classic four and four more.
const EIGHT: [Arch; 8] = [
    arch("x86_64", "amd64", None),
    arch("aarch64", "arm64", Some("v8")),
    arch("armv7l", "arm", Some("v7")),
    arch("armhf", "arm", Some("v6")),
    arch("i386", "386", None),
    arch("ppc64le", "ppc64le", None),
    arch("s390x", "s390x", None),
    arch("riscv64", "riscv64", None),
];

/// A manifest stored in the registry: its bytes and digest.
#[derive(Clone, Debug)]
struct Pushed {
    bytes: Vec<u8>,
    digest: String,
}

/// Uploads the blobs of `spec`'s image and PUTs its manifest *by digest*
/// (untagged), as buildx does for the children of an index.
async fn push_untagged(c: &reqwest::Client, base: &str, repo: &str, spec: &ImageSpec) -> Pushed {
    let built = build_oci_layout(spec, "untagged");
    push_layout(c, base, repo, &built.manifest_digest, &built).await
}

/// Uploads the blobs of `layout` and PUTs its manifest at `repo:reference`
/// over raw HTTP.
async fn push_layout(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    layout: &OciLayout,
) -> Pushed {
    for d in layout.blob_digests() {
        put_blob(c, base, repo, &fs::read(layout.blob_path(&d)).unwrap()).await;
    }
    put_json(
        c,
        base,
        repo,
        reference,
        media::OCI_MANIFEST,
        layout.manifest.clone(),
    )
    .await
}

/// PUTs `bytes` as a manifest of `media_type` at `repo:reference`; panics
/// unless the answer is 201.
async fn put_json(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: Vec<u8>,
) -> Pushed {
    let res = put_manifest(c, base, repo, reference, media_type, &bytes).await;
    let status = res.status();
    let answered = res
        .headers()
        .get("docker-content-digest")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = res.text().await.unwrap_or_default();
    assert_eq!(
        status, 201,
        "PUT {base}/v2/{repo}/manifests/{reference} failed: {body}"
    );
    let digest = digest_of(&bytes);
    assert_eq!(answered.as_deref(), Some(digest.as_str()));
    Pushed { bytes, digest }
}

/// A buildx attestation manifest for the image `of`: an OCI manifest with an
/// in-toto layer, its blobs uploaded, PUT by digest. Returns it with the
/// descriptor buildx lists for it.
async fn push_attestation(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    of: &str,
) -> (Pushed, Value) {
    let statement = serde_json::to_vec(&json!({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://slsa.dev/provenance/v0.2",
        "subject": [{"name": "_", "digest": {"sha256": of.trim_start_matches("sha256:")}}],
        "predicate": {"builder": {"id": "archmerge-test"}},
    }))
    .unwrap();
    let layer = put_blob(c, base, repo, &statement).await;
    let config = serde_json::to_vec(&json!({
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    }))
    .unwrap();
    let config_digest = put_blob(c, base, repo, &config).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{
            "mediaType": "application/vnd.in-toto+json",
            "digest": layer,
            "size": statement.len(),
            "annotations": {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"},
        }],
    }))
    .unwrap();
    let digest = digest_of(&manifest);
    let pushed = put_json(c, base, repo, &digest, media::OCI_MANIFEST, manifest).await;
    let descriptor = json!({
        "mediaType": media::OCI_MANIFEST,
        "digest": pushed.digest,
        "size": pushed.bytes.len(),
        "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {
            ANN_REF_TYPE: "attestation-manifest",
            ANN_REF_DIGEST: of,
        },
    });
    (pushed, descriptor)
}

/// The descriptor of an image manifest in an index, as buildx writes it.
fn image_descriptor(p: &Pushed, os: &str, arch: &str) -> Value {
    json!({
        "mediaType": media::OCI_MANIFEST,
        "digest": p.digest,
        "size": p.bytes.len(),
        "platform": {"os": os, "architecture": arch},
    })
}

// === reading manifests back ===

/// A manifest as served.
struct Fetched {
    content_type: String,
    bytes: Vec<u8>,
}

/// `GET /v2/<repo>/manifests/<reference>` accepting every manifest type;
/// `None` on 404, a panic with the body on anything but 200.
async fn fetch(base: &str, repo: &str, reference: &str) -> Option<Fetched> {
    let res = http()
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("accept", ACCEPT_ALL)
        .send()
        .await
        .expect("GET manifest");
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = res.bytes().await.expect("reading the manifest").to_vec();
    match status {
        200 => Some(Fetched {
            content_type,
            bytes,
        }),
        404 => None,
        _ => panic!(
            "GET {base}/v2/{repo}/manifests/{reference}: {status} {}",
            String::from_utf8_lossy(&bytes)
        ),
    }
}

/// An index as served, parsed.
#[derive(Debug)]
struct Index {
    content_type: String,
    bytes: Vec<u8>,
    digest: String,
    json: Value,
}

async fn fetch_index(base: &str, repo: &str, reference: &str) -> Index {
    let f = fetch(base, repo, reference)
        .await
        .unwrap_or_else(|| panic!("no manifest at {base} {repo}:{reference}"));
    let json: Value = serde_json::from_slice(&f.bytes).expect("index is JSON");
    assert!(
        json["manifests"].is_array(),
        "{repo}:{reference} is not an index: {}",
        String::from_utf8_lossy(&f.bytes)
    );
    Index {
        content_type: f.content_type,
        digest: digest_of(&f.bytes),
        bytes: f.bytes,
        json,
    }
}

impl Index {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    fn media_type(&self) -> &str {
        self.json["mediaType"].as_str().unwrap_or_default()
    }

    fn manifests(&self) -> &[Value] {
        self.json["manifests"].as_array().unwrap()
    }

    /// (platform, digest) of every entry, in index order.
    fn pairs(&self) -> Vec<(String, String)> {
        pairs_of(&self.json)
    }

    /// The entry for `digest`; panics with the index when there is none.
    fn entry(&self, digest: &str) -> &Value {
        self.manifests()
            .iter()
            .find(|m| m["digest"] == digest)
            .unwrap_or_else(|| panic!("{digest} is not listed in {}", self.text()))
    }
}

/// (platform, digest) of every entry of an index or manifest list.
fn pairs_of(index: &Value) -> Vec<(String, String)> {
    index["manifests"]
        .as_array()
        .expect("an index")
        .iter()
        .map(|m| {
            (
                platform_string(&m["platform"]),
                m["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `os/architecture[/variant]` of a descriptor's platform.
fn platform_string(p: &Value) -> String {
    let mut s = format!(
        "{}/{}",
        p["os"].as_str().unwrap_or("?"),
        p["architecture"].as_str().unwrap_or("?")
    );
    if let Some(v) = p["variant"].as_str().filter(|v| !v.is_empty()) {
        s.push('/');
        s.push_str(v);
    }
    s
}

fn pairs<const N: usize>(items: [(&str, &str); N]) -> Vec<(String, String)> {
    items
        .into_iter()
        .map(|(p, d)| (p.to_owned(), d.to_owned()))
        .collect()
}

/// The tags of `repo` (empty when the registry knows none).
async fn tags(base: &str, repo: &str) -> Vec<String> {
    let res = http()
        .get(format!("{base}/v2/{repo}/tags/list"))
        .send()
        .await
        .expect("GET tags");
    if res.status() == 404 {
        return Vec::new();
    }
    assert_eq!(res.status(), 200);
    let v: Value = serde_json::from_slice(&res.bytes().await.unwrap()).expect("tags list is JSON");
    let mut tags: Vec<String> = v["tags"]
        .as_array()
        .map(|a| a.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    tags.sort();
    tags
}

/// `DELETE /v2/<repo>/manifests/<digest>` through `base`; panics unless 202.
async fn delete_manifest(base: &str, repo: &str, digest: &str) {
    let res = http()
        .delete(format!("{base}/v2/{repo}/manifests/{digest}"))
        .send()
        .await
        .expect("DELETE manifest");
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    assert_eq!(status, 202, "DELETE {repo}@{digest}: {body}");
}

// === the docker CLI, with one config dir for a whole workflow ===

/// `docker manifest create` keeps its list in `$DOCKER_CONFIG/manifests`
/// until `push`, so the manual workflow needs one config dir across its
/// commands (the harness's `docker()` makes a fresh one per call).
struct DockerCli {
    config: TempDir,
}

impl DockerCli {
    fn new() -> DockerCli {
        DockerCli {
            config: tempfile::Builder::new()
                .prefix("archmerge-docker-config-")
                .tempdir()
                .unwrap(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("docker");
        cmd.args(args).env("DOCKER_CONFIG", self.config.path());
        let out = run_with_timeout(&mut cmd, TOOL_TIMEOUT);
        expect_success(&format!("docker {}", args.join(" ")), &out);
        out
    }
}

// === 1. the classic template ===

#[tokio::test]
async fn classic_template_four_arches_make_v1_2_and_latest() {
    let s = Stack::new();
    let repo = "classic/app";
    let mut pushed = BTreeMap::new();
    for (i, a) in CLASSIC.iter().enumerate() {
        let layout = a.layout(100 + i as u64, "build");
        for tag in [format!("{}_v1.2", a.alias), a.alias.to_owned()] {
            let digest = skopeo_push(&layout, &s.via(&format!("{repo}:{tag}")), Format::Source);
            assert_eq!(
                digest, layout.manifest_digest,
                "skopeo stored another manifest"
            );
        }
        pushed.insert(a.alias, layout.manifest_digest.clone());
    }

    // Both targets list exactly the four platforms, in canonical order,
    // with the digests skopeo pushed, each naming its arch tag.
    let want = pairs([
        ("linux/amd64", &pushed["x86_64"]),
        ("linux/arm/v6", &pushed["armhf"]),
        ("linux/arm/v7", &pushed["armv7l"]),
        ("linux/arm64/v8", &pushed["aarch64"]),
    ]);
    for (target, suffix) in [("v1.2", "_v1.2"), ("latest", "")] {
        let index = s.index(repo, target).await;
        assert_eq!(index.media_type(), media::OCI_INDEX, "{}", index.text());
        assert_eq!(index.content_type, media::OCI_INDEX);
        assert_eq!(index.pairs(), want, "{target}: {}", index.text());
        for a in &CLASSIC {
            let entry = index.entry(&pushed[a.alias]);
            assert_eq!(entry["mediaType"], media::OCI_MANIFEST);
            assert_eq!(
                entry["annotations"][ANN_TAG],
                format!("{}{suffix}", a.alias),
                "{target}: {}",
                index.text()
            );
        }
    }

    // `docker manifest inspect` through archmerge shows the four images.
    let shown = docker_manifest_inspect(&s.via(&format!("{repo}:v1.2")));
    let mut shown_pairs = pairs_of(&shown);
    shown_pairs.sort();
    let mut sorted_want = want.clone();
    sorted_want.sort();
    assert_eq!(
        shown_pairs, sorted_want,
        "docker manifest inspect: {shown:#}"
    );

    // A pull of v1.2 on each platform gets that platform's image.
    for a in &CLASSIC {
        let pulled = skopeo_pull(
            &s.via(&format!("{repo}:v1.2")),
            Some(("linux", a.arch, a.variant)),
        );
        assert_eq!(
            pulled.manifest_digest,
            pushed[a.alias],
            "pull of v1.2 as {} got another image",
            a.platform()
        );
        let config = pulled.config_json();
        assert_eq!(config["architecture"], a.arch);
        assert_eq!(config["variant"].as_str(), a.variant);
        pulled.verified_blob_digests();
    }
}

// === 2. the manual workflow ===

#[tokio::test]
async fn same_platforms_and_digests_as_docker_manifest_create_annotate_push() {
    let s = Stack::new();
    let repo = "manual/app";
    let mut images = Vec::new();
    for (i, a) in CLASSIC.iter().enumerate() {
        let layout = a.layout(200 + i as u64, "build");
        let tag = format!("{}_v1.2", a.alias);
        // Docker schema2, as `docker push` from a build host would store.
        let digest = skopeo_push(&layout, &s.via(&format!("{repo}:{tag}")), Format::V2s2);
        images.push((a, s.direct(&format!("{repo}:{tag}")), digest));
    }

    // What people do by hand today, straight against the registry.
    let docker = DockerCli::new();
    let list = s.direct(&format!("{repo}:manual"));
    let mut create = vec!["manifest", "create", "--insecure", list.as_str()];
    create.extend(images.iter().map(|(_, image, _)| image.as_str()));
    docker.run(&create);
    for (a, image, _) in &images {
        let mut annotate = vec!["manifest", "annotate", "--os", "linux", "--arch", a.arch];
        if let Some(v) = a.variant {
            annotate.extend(["--variant", v]);
        }
        annotate.extend([list.as_str(), image.as_str()]);
        docker.run(&annotate);
    }
    let out = docker.run(&["manifest", "push", "--insecure", "--purge", &list]);
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    let manual = fetch_index(&s.registry.url(), repo, "manual").await;
    assert_eq!(
        printed, manual.digest,
        "docker manifest push printed another digest"
    );
    let ours = s.index(repo, "v1.2").await;

    let set = |v: Vec<(String, String)>| v.into_iter().collect::<BTreeSet<_>>();
    assert_eq!(
        set(ours.pairs()),
        set(manual.pairs()),
        "archmerge: {}\nby hand:   {}",
        ours.text(),
        manual.text()
    );
    assert_eq!(ours.pairs().len(), 4);
    // Both are Docker manifest lists of schema2 images.
    assert_eq!(ours.media_type(), media::DOCKER_LIST);
    assert_eq!(manual.media_type(), media::DOCKER_LIST);
    for (_, _, digest) in &images {
        assert_eq!(ours.entry(digest)["mediaType"], media::DOCKER_MANIFEST);
        assert_eq!(
            ours.entry(digest)["size"],
            manual.entry(digest)["size"],
            "sizes differ for {digest}"
        );
    }
}

// === 3. re-push ===

#[tokio::test]
async fn repush_replaces_its_entry_and_identical_repush_writes_nothing() {
    let s = Stack::new();
    let c = http();
    let via = s.proxy.url();
    let repo = "repush/app";
    let old = push_small_image(&c, &via, repo, "x86_64_v1", "amd64", 300).await;
    let arm = push_small_image(&c, &via, repo, "aarch64_v1", "arm64", 301).await;
    let before = s.index(repo, "v1").await;
    assert_eq!(
        before.pairs(),
        pairs([
            ("linux/amd64", &old.digest),
            ("linux/arm64/v8", &arm.digest)
        ])
    );

    // The amd64 builder rebuilds: its entry is replaced, nothing stale stays.
    let new = push_small_image(&c, &via, repo, "x86_64_v1", "amd64", 302).await;
    assert_ne!(new.digest, old.digest);
    let after = s.index(repo, "v1").await;
    assert_eq!(
        after.pairs(),
        pairs([
            ("linux/amd64", &new.digest),
            ("linux/arm64/v8", &arm.digest)
        ]),
        "{}",
        after.text()
    );
    assert!(
        !after.text().contains(&old.digest),
        "the old amd64 image is still listed: {}",
        after.text()
    );

    // The same image pushed again: the index is not rewritten.
    let puts = s.manifest_put_count(repo, "v1");
    assert_eq!(puts, 3, "one index write per changing push");
    let again = push_small_image(&c, &via, repo, "x86_64_v1", "amd64", 302).await;
    assert_eq!(again.digest, new.digest);
    let unchanged = s.index(repo, "v1").await;
    assert_eq!(unchanged.bytes, after.bytes);
    assert_eq!(unchanged.digest, after.digest);
    assert_eq!(
        s.manifest_put_count(repo, "v1"),
        puts,
        "an identical re-push rewrote the index"
    );
    let merges = s.merge_lines(repo, "v1");
    let last = merges
        .last()
        .unwrap_or_else(|| panic!("archmerge logged no merge:\n{}", s.proxy_log()));
    assert!(
        last.contains("outcome=\"unchanged\""),
        "last merge of v1 was not `unchanged`: {last}"
    );
}

/// An arch push's rebuild reads the registry while the client's PUT is on
/// its way, so the push waits for one round trip fewer after the registry
/// has answered. That read may begin before the registry stored the push:
/// a new arch tag still lands, and a read that finds nothing to write is
/// made again before the client is answered. A plain push is never read
/// ahead (whether it is a target can only be read after it is stored).
#[tokio::test]
async fn an_arch_push_is_read_ahead_and_a_read_that_finds_nothing_to_do_is_made_again() {
    const USED: &str = "archmerge_merge_reads_ahead_total{outcome=\"used\"}";
    const AGAIN: &str = "archmerge_merge_reads_ahead_total{outcome=\"read_again\"}";
    let s = Stack::new();
    let c = http();
    let via = s.proxy.url();
    let repo = "ahead/app";
    let amd = push_small_image(&c, &via, repo, "x86_64_v1", "amd64", 320).await;
    let arm = push_small_image(&c, &via, repo, "aarch64_v1", "arm64", 321).await;
    let index = s.index(repo, "v1").await;
    assert_eq!(
        index.pairs(),
        pairs([
            ("linux/amd64", &amd.digest),
            ("linux/arm64/v8", &arm.digest)
        ]),
        "{}",
        index.text()
    );
    assert_eq!(s.metric(USED).await, 2.0, "each arch push read ahead");
    assert_eq!(s.metric(AGAIN).await, 0.0);

    // The same image again: the read made ahead finds the index right, and
    // cannot say so alone.
    let puts = s.manifest_put_count(repo, "v1");
    push_small_image(&c, &via, repo, "aarch64_v1", "arm64", 321).await;
    assert_eq!(s.metric(USED).await, 3.0);
    assert_eq!(s.metric(AGAIN).await, 1.0, "the target read again");
    assert_eq!(s.manifest_put_count(repo, "v1"), puts, "index rewritten");
    assert_eq!(s.index(repo, "v1").await.bytes, index.bytes);

    // A new arch tag, in a repository whose listing archmerge has seen.
    let ppc = push_small_image(&c, &via, repo, "ppc64le_v1", "ppc64le", 322).await;
    let index = s.index(repo, "v1").await;
    assert_eq!(index.pairs().len(), 3, "{}", index.text());
    assert!(index.text().contains(&ppc.digest), "{}", index.text());

    // A plain push at a possible target is read after it is stored.
    push_small_image(&c, &via, repo, "v2", "amd64", 323).await;
    assert_eq!(s.metric(USED).await, 4.0, "a plain push was read ahead");
}

/// The next push after arch tags changed behind archmerge's back sees the
/// registry as it is, not as archmerge last saw it: archmerge HEADs the arch
/// tags its last snapshot had while it lists the tags, so an arch tag gone
/// from the registry, one moved and one new must all show.
#[tokio::test]
async fn a_push_sees_arch_tags_changed_straight_at_the_registry_since_the_last_merge() {
    let s = Stack::new();
    let c = http();
    let (via, direct) = (s.proxy.url(), s.registry.url());
    let repo = "behind/app";
    let amd = push_small_image(&c, &via, repo, "x86_64_v1", "amd64", 310).await;
    let arm = push_small_image(&c, &via, repo, "aarch64_v1", "arm64", 311).await;
    let ppc = push_small_image(&c, &via, repo, "ppc64le_v1", "ppc64le", 312).await;
    assert_eq!(s.index(repo, "v1").await.pairs().len(), 3);

    // Straight at the registry: ppc64le's manifest deleted (its tag with
    // it), aarch64 moved to another image, s390x added.
    delete_manifest(&direct, repo, &ppc.digest).await;
    let arm2 = push_small_image(&c, &direct, repo, "aarch64_v1", "arm64", 313).await;
    let s390x = push_small_image(&c, &direct, repo, "s390x_v1", "s390x", 314).await;
    assert_ne!(arm2.digest, arm.digest);

    // The next push through archmerge.
    let amd2 = push_small_image(&c, &via, repo, "x86_64_v1", "amd64", 315).await;
    assert_ne!(amd2.digest, amd.digest);
    let index = s.index(repo, "v1").await;
    assert_eq!(
        index.pairs(),
        pairs([
            ("linux/amd64", &amd2.digest),
            ("linux/arm64/v8", &arm2.digest),
            ("linux/s390x", &s390x.digest),
        ]),
        "{}",
        index.text()
    );
}

// === 4. push order ===

#[tokio::test]
async fn push_order_does_not_change_the_index_bytes() {
    let s = Stack::new();
    let c = http();
    let via = s.proxy.url();
    // The same four children, pushed into three repositories in three orders.
    let children: Vec<(Arch, OciLayout)> = CLASSIC
        .iter()
        .enumerate()
        .map(|(i, a)| (*a, a.layout(400 + i as u64, "x")))
        .collect();
    let orders = [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]];
    let mut indexes = Vec::new();
    for (n, order) in orders.iter().enumerate() {
        let repo = format!("order/app{n}");
        for &i in order {
            let (a, layout) = &children[i];
            push_layout(&c, &via, &repo, &format!("{}_v2", a.alias), layout).await;
        }
        indexes.push(s.index(&repo, "v2").await);
    }
    assert_eq!(indexes[0].pairs().len(), 4, "{}", indexes[0].text());
    for (order, index) in orders.iter().zip(&indexes).skip(1) {
        assert!(
            index.bytes == indexes[0].bytes,
            "pushed in order {:?} and {order:?}:\n{}\n{}",
            orders[0],
            indexes[0].text(),
            index.text()
        );
        assert_eq!(index.digest, indexes[0].digest);
    }
}

// === 5. delete ===

#[tokio::test]
async fn deleting_arch_manifests_removes_entries_then_the_index() {
    let s = Stack::new();
    let c = http();
    let via = s.proxy.url();
    let repo = "delete/app";
    let amd = push_small_image(&c, &via, repo, "x86_64_v1", "amd64", 500).await;
    let arm = push_small_image(&c, &via, repo, "aarch64_v1", "arm64", 501).await;
    // The same amd64 image is also the bare `x86_64`, so it feeds `latest` too.
    put_json(
        &c,
        &via,
        repo,
        "x86_64",
        media::OCI_MANIFEST,
        amd.manifest.clone(),
    )
    .await;
    assert_eq!(s.index(repo, "v1").await.pairs().len(), 2);
    assert_eq!(
        s.index(repo, "latest").await.pairs(),
        pairs([("linux/amd64", &amd.digest)])
    );

    delete_manifest(&via, repo, &arm.digest).await;
    let index = s.index(repo, "v1").await;
    assert_eq!(
        index.pairs(),
        pairs([("linux/amd64", &amd.digest)]),
        "{}",
        index.text()
    );
    assert_eq!(
        tags(&s.registry.url(), repo).await,
        ["latest", "v1", "x86_64", "x86_64_v1"]
    );

    // The last arch of v1 (and of latest) goes: both indexes go.
    delete_manifest(&via, repo, &amd.digest).await;
    for base in [s.proxy.url(), s.registry.url()] {
        for target in ["v1", "latest"] {
            if let Some(left) = fetch(&base, repo, target).await {
                panic!(
                    "{base}: {target} still holds {}",
                    String::from_utf8_lossy(&left.bytes)
                );
            }
        }
    }
    assert_eq!(tags(&s.registry.url(), repo).await, Vec::<String>::new());
}

// === 6. plain tags ===

#[tokio::test]
async fn plain_tags_stay_byte_identical_plain_images() {
    let s = Stack::new();
    let repo = "plain/app";
    let referrers_tag = format!("sha256-{}", "ab".repeat(32));
    let mut pushed = Vec::new();
    for (i, tag) in ["v2", "v1_2", "arm64v8-latest", referrers_tag.as_str()]
        .into_iter()
        .enumerate()
    {
        let layout = CLASSIC[i % 4].layout(600 + i as u64, "build");
        let digest = skopeo_push(&layout, &s.via(&format!("{repo}:{tag}")), Format::Source);
        assert_eq!(digest, layout.manifest_digest);
        pushed.push((tag.to_owned(), layout));
    }
    for (tag, layout) in &pushed {
        for base in [s.proxy.url(), s.registry.url()] {
            let got = fetch(&base, repo, tag)
                .await
                .expect("the plain tag is there");
            assert_eq!(got.content_type, media::OCI_MANIFEST, "{tag}");
            assert!(
                got.bytes == layout.manifest,
                "{base} {repo}:{tag} is not what was pushed: {}",
                String::from_utf8_lossy(&got.bytes)
            );
        }
    }
    // An index pushed at a plain tag is not touched either.
    let c = http();
    let via = s.proxy.url();
    let one = push_untagged(
        &c,
        &via,
        repo,
        &ImageSpec::new("linux", "amd64").layer(610, 2048),
    )
    .await;
    let two = push_untagged(
        &c,
        &via,
        repo,
        &ImageSpec::new("linux", "arm64").layer(611, 2048),
    )
    .await;
    let index = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [image_descriptor(&two, "linux", "arm64"), image_descriptor(&one, "linux", "amd64")],
    }))
    .unwrap();
    let index = put_json(&c, &via, repo, "v6", media::OCI_INDEX, index).await;
    let stored = fetch_index(&s.registry.url(), repo, "v6").await;
    assert_eq!(stored.digest, index.digest, "{}", stored.text());

    // No index appeared anywhere: the repository holds exactly the pushed tags.
    let mut want: Vec<String> = pushed.iter().map(|(t, _)| t.clone()).collect();
    want.push("v6".into());
    want.sort();
    assert_eq!(tags(&s.registry.url(), repo).await, want);
    assert!(fetch(&s.registry.url(), repo, "latest").await.is_none());
    assert!(fetch(&s.registry.url(), repo, "2").await.is_none());
    let log = s.proxy_log();
    assert!(
        !log.contains(" merge ") && !log.contains("index written"),
        "archmerge merged a plain tag:\n{log}"
    );
}

// === 7. parallel pushes ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_arches_times_three_targets_pushed_in_parallel_all_land() {
    let s = Stack::new();
    let via = s.proxy.url();
    let repo = "parallel/app";
    let targets = ["v1", "v2.0", "latest"];
    let mut tasks = Vec::new();
    for (t, &target) in targets.iter().enumerate() {
        for (i, a) in EIGHT.iter().enumerate() {
            let tag = if target == "latest" {
                a.alias.to_owned()
            } else {
                format!("{}_{target}", a.alias)
            };
            let (via, a) = (via.clone(), *a);
            let seed = 700 + (t * 10 + i) as u64;
            tasks.push(tokio::spawn(async move {
                let img = push_small_image(&http(), &via, repo, &tag, a.arch, seed).await;
                (target.to_string(), a.platform(), img.digest)
            }));
        }
    }
    let mut want: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for t in tasks {
        let (target, platform, digest) = t.await.expect("a push task panicked");
        want.entry(target).or_default().insert((platform, digest));
    }
    // Every push has returned: every target is complete now, not eventually.
    for target in targets {
        let index = s.index(repo, target).await;
        let got: BTreeSet<_> = index.pairs().into_iter().collect();
        assert_eq!(got.len(), 8, "{target}: {}", index.text());
        assert_eq!(got, want[target], "{target}: {}", index.text());
    }
    // (A rebuild may fail here: distribution 2.8 answers 500 "invalid
    // checksum digest format" to a HEAD of a tag whose link it is still
    // writing. The push being written has its own rebuild, which covers it;
    // what matters is that every target is complete once every push returned.)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_pushing_eight_arches_at_once_converge() {
    let s = Stack::new();
    let second = spawn_archmerge(&s.registry.url());
    let repo = "replicas/app";
    let bases = [s.proxy.url(), second.url()];
    let mut tasks = Vec::new();
    for (i, a) in EIGHT.iter().enumerate() {
        // Alternate replicas, as a load balancer would.
        let (base, a) = (bases[i % 2].clone(), *a);
        tasks.push(tokio::spawn(async move {
            let tag = format!("{}_v7", a.alias);
            let img = push_small_image(&http(), &base, repo, &tag, a.arch, 750 + i as u64).await;
            (a.platform(), img.digest)
        }));
    }
    let mut want = BTreeSet::new();
    for t in tasks {
        want.insert(t.await.expect("a push task panicked"));
    }
    let index = s.index(repo, "v7").await;
    assert_eq!(
        index.pairs().into_iter().collect::<BTreeSet<_>>(),
        want,
        "{}",
        index.text()
    );
    assert_eq!(
        fetch_index(&second.url(), repo, "v7").await.bytes,
        index.bytes
    );
}

// === 8. kill -9 ===

#[tokio::test]
async fn kill_9_and_restart_between_pushes_loses_nothing() {
    let mut s = Stack::new();
    let repo = "crash/app";
    let amd = push_small_image(&http(), &s.proxy.url(), repo, "x86_64_v1", "amd64", 800).await;
    assert_eq!(
        s.index(repo, "v1").await.pairs(),
        pairs([("linux/amd64", &amd.digest)])
    );

    let old_pid = s.proxy.pid();
    s.proxy.kill_9();
    s.proxy.restart();
    assert_ne!(s.proxy.pid(), old_pid);

    let arm = push_small_image(&http(), &s.proxy.url(), repo, "aarch64_v1", "arm64", 801).await;
    let index = s.index(repo, "v1").await;
    assert_eq!(
        index.pairs(),
        pairs([
            ("linux/amd64", &amd.digest),
            ("linux/arm64/v8", &arm.digest)
        ]),
        "{}",
        index.text()
    );
}

#[tokio::test]
async fn an_arch_push_whose_merge_was_killed_is_picked_up_by_the_next_push() {
    let mut s = Stack::new();
    let repo = "crash/window";
    let c = http();
    let amd = push_small_image(&c, &s.proxy.url(), repo, "x86_64_v1", "amd64", 810).await;
    // archmerge dies after the registry accepted an arm64 push but before
    // it merged it: the registry has the arch tag, the index lacks it.
    s.proxy.kill_9();
    let arm = push_small_image(&c, &s.registry.url(), repo, "aarch64_v1", "arm64", 811).await;
    assert_eq!(
        fetch_index(&s.registry.url(), repo, "v1").await.pairs(),
        pairs([("linux/amd64", &amd.digest)])
    );
    s.proxy.restart();

    // The next arch push rebuilds v1 from the registry's arch tags.
    let ppc = push_small_image(&c, &s.proxy.url(), repo, "ppc64le_v1", "ppc64le", 812).await;
    let index = s.index(repo, "v1").await;
    assert_eq!(
        index.pairs(),
        pairs([
            ("linux/amd64", &amd.digest),
            ("linux/arm64/v8", &arm.digest),
            ("linux/ppc64le", &ppc.digest),
        ]),
        "{}",
        index.text()
    );
}

// === 9. media types ===

#[tokio::test]
async fn schema2_children_give_a_docker_list_and_oci_children_an_oci_index() {
    let s = Stack::new();
    let cases = [
        (
            "types/docker",
            [Format::V2s2, Format::V2s2],
            media::DOCKER_LIST,
        ),
        (
            "types/oci",
            [Format::Source, Format::Source],
            media::OCI_INDEX,
        ),
        (
            "types/mixed",
            [Format::V2s2, Format::Source],
            media::OCI_INDEX,
        ),
    ];
    for (n, (repo, formats, want)) in cases.into_iter().enumerate() {
        let mut children = Vec::new();
        for (a, format) in CLASSIC[..2].iter().zip(formats) {
            let layout = a.layout(900 + n as u64 * 10, "build");
            let digest = skopeo_push(&layout, &s.via(&format!("{repo}:{}_v9", a.alias)), format);
            let child_type = match format {
                Format::V2s2 => media::DOCKER_MANIFEST,
                _ => media::OCI_MANIFEST,
            };
            children.push((a.platform(), digest, child_type));
        }
        let index = s.index(repo, "v9").await;
        assert_eq!(index.media_type(), want, "{repo}: {}", index.text());
        assert_eq!(index.content_type, want, "{repo}: Content-Type");
        assert_eq!(index.json["schemaVersion"], 2);
        for (platform, digest, child_type) in &children {
            let e = index.entry(digest);
            assert_eq!(&platform_string(&e["platform"]), platform);
            assert_eq!(e["mediaType"], *child_type, "{repo}: {}", index.text());
        }
    }
    // docker reads the Docker list archmerge wrote.
    let shown = docker_manifest_inspect(&s.via("types/docker:v9"));
    assert_eq!(shown["mediaType"], media::DOCKER_LIST);
    assert_eq!(
        pairs_of(&shown).into_iter().collect::<BTreeSet<_>>(),
        s.index("types/docker", "v9")
            .await
            .pairs()
            .into_iter()
            .collect::<BTreeSet<_>>()
    );
}

// === 10. buildx indexes ===

#[tokio::test]
async fn a_buildx_index_pushed_as_an_arch_tag_is_flattened_with_its_attestation_last() {
    let s = Stack::new();
    let c = http();
    let via = s.proxy.url();
    let repo = "buildx/app";

    // What `docker buildx build --platform linux/arm64,linux/amd64 --push`
    // leaves behind: two images, an attestation manifest for each, and an
    // index listing all four — here pushed at the arm64 builder's arch tag.
    let arm = push_untagged(
        &c,
        &via,
        repo,
        &ImageSpec::new("linux", "arm64").layer(1000, 2048),
    )
    .await;
    let amd = push_untagged(
        &c,
        &via,
        repo,
        &ImageSpec::new("linux", "amd64").layer(1001, 2048),
    )
    .await;
    let (arm_att, arm_att_desc) = push_attestation(&c, &via, repo, &arm.digest).await;
    let (amd_att, amd_att_desc) = push_attestation(&c, &via, repo, &amd.digest).await;
    let buildx = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [
            image_descriptor(&arm, "linux", "arm64"),
            image_descriptor(&amd, "linux", "amd64"),
            arm_att_desc,
            amd_att_desc,
        ],
    }))
    .unwrap();
    put_json(&c, &via, repo, "aarch64_v3", media::OCI_INDEX, buildx).await;
    let x86 = push_small_image(&c, &via, repo, "x86_64_v3", "amd64", 1002).await;

    let index = s.index(repo, "v3").await;
    assert_eq!(index.media_type(), media::OCI_INDEX);
    assert_eq!(
        index.pairs(),
        pairs([
            ("linux/amd64", &x86.digest),
            ("linux/arm64/v8", &arm.digest),
            ("unknown/unknown", &arm_att.digest),
        ]),
        "{}",
        index.text()
    );
    assert!(
        !index.text().contains(&amd.digest) && !index.text().contains(&amd_att.digest),
        "the buildx index's amd64 image or its attestation leaked in: {}",
        index.text()
    );
    let att = &index.manifests()[2];
    assert_eq!(att["annotations"][ANN_REF_TYPE], "attestation-manifest");
    assert_eq!(att["annotations"][ANN_REF_DIGEST], arm.digest.as_str());
    assert_eq!(att["annotations"][ANN_TAG], "aarch64_v3");
    assert_eq!(att["size"], arm_att.bytes.len());
    assert_eq!(
        index.entry(&arm.digest)["annotations"][ANN_TAG],
        "aarch64_v3"
    );
    assert_eq!(
        index.entry(&x86.digest)["annotations"][ANN_TAG],
        "x86_64_v3"
    );

    // An arm64 machine pulling v3 gets the image from the buildx index.
    let pulled = skopeo_pull(
        &s.via(&format!("{repo}:v3")),
        Some(("linux", "arm64", Some("v8"))),
    );
    assert_eq!(pulled.manifest_digest, arm.digest);
    assert_eq!(pulled.config_json()["architecture"], "arm64");

    // The arm64 builder re-pushes a plain image: its attestation goes too.
    let plain = push_small_image(&c, &via, repo, "aarch64_v3", "arm64", 1003).await;
    let index = s.index(repo, "v3").await;
    assert_eq!(
        index.pairs(),
        pairs([
            ("linux/amd64", &x86.digest),
            ("linux/arm64/v8", &plain.digest)
        ]),
        "{}",
        index.text()
    );
}

// === 11. amend, never clobber ===

#[tokio::test]
async fn a_plain_image_at_the_target_is_amended_and_restored_on_delete() {
    let s = Stack::new();
    let c = http();
    let repo = "amend/app";
    // Someone pushed a plain s390x image at v4, straight to the registry.
    let original = push_small_image(&c, &s.registry.url(), repo, "v4", "s390x", 1100).await;

    let amd = push_small_image(&c, &s.proxy.url(), repo, "x86_64_v4", "amd64", 1101).await;
    let index = s.index(repo, "v4").await;
    assert_eq!(
        index.pairs(),
        pairs([
            ("linux/amd64", &amd.digest),
            ("linux/s390x", &original.digest)
        ]),
        "{}",
        index.text()
    );
    let kept = index.entry(&original.digest);
    assert_eq!(kept["annotations"][ANN_AMENDED], original.digest.as_str());
    assert!(kept["annotations"].get(ANN_TAG).is_none(), "{kept}");
    assert_eq!(kept["size"], original.manifest.len());
    assert_eq!(
        index.entry(&amd.digest)["annotations"][ANN_TAG],
        "x86_64_v4"
    );

    // The amd64 build is withdrawn: v4 is the original image again.
    delete_manifest(&s.proxy.url(), repo, &amd.digest).await;
    for base in [s.proxy.url(), s.registry.url()] {
        let back = fetch(&base, repo, "v4").await.expect("v4 is gone");
        assert_eq!(digest_of(&back.bytes), original.digest, "{base}");
        assert!(back.bytes == original.manifest);
        assert_eq!(back.content_type, media::OCI_MANIFEST);
    }
}

#[tokio::test]
async fn a_foreign_index_at_the_target_keeps_its_other_platforms_and_comes_back() {
    let mut s = Stack::new();
    let c = http();
    let reg = s.registry.url();
    let repo = "amend/foreign";
    // A buildx-made index at v4 — amd64 and arm64, each with its
    // attestation — pushed straight to the registry.
    let f_amd = push_untagged(
        &c,
        &reg,
        repo,
        &ImageSpec::new("linux", "amd64").layer(1200, 2048),
    )
    .await;
    let f_arm = push_untagged(
        &c,
        &reg,
        repo,
        &ImageSpec::new("linux", "arm64").layer(1201, 2048),
    )
    .await;
    let (f_amd_att, f_amd_att_desc) = push_attestation(&c, &reg, repo, &f_amd.digest).await;
    let (f_arm_att, f_arm_att_desc) = push_attestation(&c, &reg, repo, &f_arm.digest).await;
    let foreign = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [
            image_descriptor(&f_amd, "linux", "amd64"),
            image_descriptor(&f_arm, "linux", "arm64"),
            f_amd_att_desc,
            f_arm_att_desc,
        ],
    }))
    .unwrap();
    let foreign = put_json(&c, &reg, repo, "v4", media::OCI_INDEX, foreign).await;

    // A new amd64 build arrives as an arch tag: it replaces amd64 (and its
    // attestation) only; arm64 and its attestation are kept.
    let amd = push_small_image(&c, &s.proxy.url(), repo, "x86_64_v4", "amd64", 1202).await;
    let index = s.index(repo, "v4").await;
    assert_eq!(
        index.pairs(),
        pairs([
            ("linux/amd64", &amd.digest),
            ("linux/arm64/v8", &f_arm.digest),
            ("unknown/unknown", &f_arm_att.digest),
        ]),
        "{}",
        index.text()
    );
    assert!(
        !index.text().contains(&f_amd_att.digest),
        "{}",
        index.text()
    );
    for kept in [&f_arm.digest, &f_arm_att.digest] {
        assert_eq!(
            index.entry(kept)["annotations"][ANN_AMENDED],
            foreign.digest.as_str(),
            "{}",
            index.text()
        );
    }
    assert_eq!(
        index.entry(&f_arm_att.digest)["annotations"][ANN_REF_DIGEST],
        f_arm.digest.as_str()
    );

    // archmerge restarts (nothing cached), then the amd64 build is
    // withdrawn: v4 is the foreign index again, byte for byte.
    s.proxy.restart();
    delete_manifest(&s.proxy.url(), repo, &amd.digest).await;
    let back = s.index(repo, "v4").await;
    assert_eq!(back.digest, foreign.digest, "{}", back.text());
}

#[tokio::test]
async fn docker_lists_carry_the_amend_marks_across_a_restart() {
    let mut s = Stack::new();
    let repo = "amend/docker";
    // A plain schema2 s390x image at v4, straight to the registry.
    let s390x = build_oci_layout(&ImageSpec::new("linux", "s390x").layer(1250, 2048), "b");
    let original = skopeo_push(&s390x, &s.direct(&format!("{repo}:v4")), Format::V2s2);
    let amd = skopeo_push(
        &CLASSIC[0].layout(1251, "b"),
        &s.via(&format!("{repo}:x86_64_v4")),
        Format::V2s2,
    );
    let index = s.index(repo, "v4").await;
    assert_eq!(index.media_type(), media::DOCKER_LIST, "{}", index.text());
    assert_eq!(
        index.pairs(),
        pairs([("linux/amd64", &amd), ("linux/s390x", &original)])
    );
    assert_eq!(
        index.entry(&original)["annotations"][ANN_AMENDED],
        original.as_str()
    );
    assert_eq!(index.entry(&amd)["annotations"][ANN_TAG], "x86_64_v4");

    s.proxy.kill_9();
    s.proxy.restart();
    delete_manifest(&s.proxy.url(), repo, &amd).await;
    let back = fetch(&s.registry.url(), repo, "v4")
        .await
        .expect("v4 is gone");
    assert_eq!(digest_of(&back.bytes), original);
    assert_eq!(back.content_type, media::DOCKER_MANIFEST);
}

#[tokio::test]
async fn a_plain_image_superseded_by_its_own_platform_comes_back_when_the_arch_tag_goes() {
    let s = Stack::new();
    let c = http();
    let repo = "amend/same";
    // v4 was a plain amd64 image; then CI starts pushing x86_64_v4.
    let original = push_small_image(&c, &s.registry.url(), repo, "v4", "amd64", 1260).await;
    let amd = push_small_image(&c, &s.proxy.url(), repo, "x86_64_v4", "amd64", 1261).await;
    assert_eq!(
        s.index(repo, "v4").await.pairs(),
        pairs([("linux/amd64", &amd.digest)])
    );

    // The arch push is withdrawn: v4 must fall back to what the index
    // amended (SPEC §3), not vanish.
    delete_manifest(&s.proxy.url(), repo, &amd.digest).await;
    let back = fetch(&s.registry.url(), repo, "v4").await;
    let back = back.unwrap_or_else(|| {
        panic!(
            "v4 is gone: the plain image {} that was there before x86_64_v4 was not put back\n{}",
            original.digest,
            s.merge_lines(repo, "v4").join("\n")
        )
    });
    assert_eq!(digest_of(&back.bytes), original.digest);
}

// === 12. platform decisions ===

#[tokio::test]
async fn the_tag_alias_decides_the_platform_and_the_config_adds_os_version() {
    let s = Stack::new();
    let c = http();
    let via = s.proxy.url();
    let repo = "platform/app";
    // Cross-built on an amd64 host: the config says amd64, the tag aarch64.
    let wrong = build_oci_layout(&ImageSpec::new("linux", "amd64").layer(1300, 2048), "x");
    push_layout(&c, &via, repo, "aarch64_v5", &wrong).await;
    // An amd64 image whose config carries os.version and os.features.
    let mut spec = ImageSpec::new("linux", "amd64")
        .os_version("5.15.0-test")
        .layer(1301, 2048);
    spec.os_features = vec!["test-feature".into()];
    let detailed = build_oci_layout(&spec, "x");
    push_layout(&c, &via, repo, "x86_64_v5", &detailed).await;

    let index = s.index(repo, "v5").await;
    assert_eq!(
        index.pairs(),
        pairs([
            ("linux/amd64", &detailed.manifest_digest),
            ("linux/arm64/v8", &wrong.manifest_digest),
        ]),
        "{}",
        index.text()
    );
    let p = &index.entry(&detailed.manifest_digest)["platform"];
    assert_eq!(p["os.version"], "5.15.0-test", "{}", index.text());
    assert_eq!(
        p["os.features"],
        json!(["test-feature"]),
        "{}",
        index.text()
    );
    let p = &index.entry(&wrong.manifest_digest)["platform"];
    assert!(p.get("os.version").is_none() && p.get("variant") == Some(&json!("v8")));

    // The disagreement was logged and counted.
    assert!(
        !mismatch_warnings(&s, "aarch64_v5").is_empty(),
        "no mismatch logged:\n{}",
        s.proxy_log()
    );
    assert_ne!(mismatch_counter(&s).await, 0);
}

#[tokio::test]
async fn a_mismatched_arch_tag_is_counted_once_not_on_every_rebuild() {
    let s = Stack::new();
    let c = http();
    let via = s.proxy.url();
    let repo = "platform/count";
    let wrong = build_oci_layout(&ImageSpec::new("linux", "amd64").layer(1350, 2048), "x");
    push_layout(&c, &via, repo, "aarch64_v5", &wrong).await;
    // Two more arches arrive; aarch64_v5 itself is not pushed again.
    push_small_image(&c, &via, repo, "x86_64_v5", "amd64", 1351).await;
    push_small_image(&c, &via, repo, "s390x_v5", "s390x", 1352).await;
    assert_eq!(s.index(repo, "v5").await.pairs().len(), 3);

    // One arch tag disagrees with its config: the counter, whose help says
    // "Arch tags whose image config platform disagrees with the tag alias",
    // must say 1, and the warning be given once, not on every rebuild of v5.
    let counted = mismatch_counter(&s).await;
    let warned = mismatch_warnings(&s, "aarch64_v5");
    assert!(
        counted == 1 && warned.len() == 1,
        "archmerge_platform_mismatches_total is {counted}; warned {} times:\n{}",
        warned.len(),
        warned.join("\n")
    );
}

#[tokio::test]
async fn platform_source_config_lets_the_image_config_win() {
    let s = Stack::with(ArchmergeOpts {
        config_toml: Some("[merge]\nplatform_source = \"config\"\n".into()),
        ..ArchmergeOpts::default()
    });
    let c = http();
    let via = s.proxy.url();
    let repo = "platform/config";
    let wrong = push_small_image(&c, &via, repo, "aarch64_v5", "amd64", 1400).await;
    let index = s.index(repo, "v5").await;
    assert_eq!(
        index.pairs(),
        pairs([("linux/amd64", &wrong.digest)]),
        "{}",
        index.text()
    );
}

/// archmerge's warnings that `arch_tag`'s config disagrees with its alias.
fn mismatch_warnings(s: &Stack, arch_tag: &str) -> Vec<String> {
    s.proxy_log()
        .lines()
        .filter(|l| {
            l.contains("image config disagrees with the tag alias")
                && l.contains(&format!("reference={arch_tag}"))
        })
        .map(str::to_owned)
        .collect()
}

/// `archmerge_platform_mismatches_total` from the admin listener.
async fn mismatch_counter(s: &Stack) -> u64 {
    let metrics = http()
        .get(format!("{}/metrics", s.proxy.admin_url()))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("archmerge_platform_mismatches_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no archmerge_platform_mismatches_total:\n{metrics}"))
}

#[tokio::test]
async fn an_unusable_arch_tag_is_left_out_and_does_not_hold_back_the_others() {
    let s = Stack::new();
    let c = http();
    let via = s.proxy.url();
    let repo = "poison/app";

    // An index at an arm64 arch tag that holds no arm64 image (two others,
    // so none can stand in for it): nothing usable for linux/arm64/v8.
    let amd = push_untagged(
        &c,
        &via,
        repo,
        &ImageSpec::new("linux", "amd64").layer(2000, 512),
    )
    .await;
    let s390 = push_untagged(
        &c,
        &via,
        repo,
        &ImageSpec::new("linux", "s390x").layer(2001, 512),
    )
    .await;
    let wrong = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [
            image_descriptor(&amd, "linux", "amd64"),
            image_descriptor(&s390, "linux", "s390x"),
        ],
    }))
    .unwrap();
    put_json(&c, &via, repo, "aarch64_v3", media::OCI_INDEX, wrong).await;
    let x86 = push_small_image(&c, &via, repo, "x86_64_v3", "amd64", 2002).await;

    // The valid arch is published at once, without the unusable one.
    let index = s.index(repo, "v3").await;
    assert_eq!(
        index.pairs(),
        pairs([("linux/amd64", &x86.digest)]),
        "{}",
        index.text()
    );
    let log = strip_ansi(&s.proxy.log_text());
    assert!(
        log.contains("arch tag left out of the index") && log.contains("aarch64_v3"),
        "the skipped arch tag is not logged:\n{log}"
    );
}
