//! The Docker engine suite: real `docker build`, `docker push` and
//! `docker pull --platform` through archmerge.
//!
//! The engine reaches no public registry, so images are built `FROM scratch`
//! with one file that names their platform; `docker build --platform` sets
//! the config's os/architecture without running anything. The daemon shares
//! the host's network, so `127.0.0.1:PORT` is archmerge, and loopback is an
//! insecure registry by default (plain HTTP, no daemon configuration).
//!
//! Each test fails without an engine ([`require_docker_engine`]), never
//! passes unrun. scripts/test.sh leaves them out by name when `docker info`
//! fails, prints a loud NOT RUN banner and fails unless told it may; every
//! test here is named `docker_engine_*` for that filter.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use support::*;

/// Local image references and containers this test made; removed on drop
/// so the engine's store ends as it started.
#[derive(Default)]
struct Local {
    images: Vec<String>,
    containers: Vec<String>,
}

impl Drop for Local {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker_output(&["rm", "-f", c]);
        }
        for i in &self.images {
            let _ = docker_output(&["rmi", "-f", i]);
        }
    }
}

/// Something no other run has built: the engine's store outlives tests.
fn nonce() -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    format!("{}-{}", std::process::id(), t.as_nanos())
}

/// Support's [`build_scratch`], the image removed when the test ends.
fn build(local: &mut Local, platform: &str, tag: &str, content: &str) {
    local.images.push(tag.to_owned());
    build_scratch(platform, tag, content);
}

/// `docker push`; returns the manifest digest docker reports.
fn push(tag: &str) -> String {
    let out = docker(&["push", tag]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in docker push output:\n{text}"))
        .to_owned()
}

/// `os/architecture` of a local image.
fn platform_of(image: &str) -> String {
    let out = docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Os}}/{{.Architecture}}",
        image,
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The content of `/arch.txt` in a local image, read without running it
/// (`docker create` + `docker cp`, so an arm64 image works on amd64).
fn arch_file(local: &mut Local, image: &str) -> String {
    let out = docker(&["create", image]);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    local.containers.push(id.clone());
    first_file_of_tar(&docker(&["cp", &format!("{id}:/arch.txt"), "-"]).stdout)
}

#[test]
fn docker_engine_push_of_a_plain_tag_then_pull_by_digest() {
    require_docker_engine();
    let s = Stack::new();
    let mut local = Local::default();
    let repo = format!("{}/engine/plain", s.proxy.host());
    let tag = format!("{repo}:v1");
    let content = format!("plain {}", nonce());
    build(&mut local, "linux/amd64", &tag, &content);

    let digest = push(&tag);
    // What the registry stored is what docker reported.
    let stored = skopeo_inspect_raw(&tag);
    assert_eq!(digest_of(&stored), digest);

    docker(&["rmi", &tag]);
    let by_digest = format!("{repo}@{digest}");
    local.images.push(by_digest.clone());
    docker(&["pull", &by_digest]);
    assert_eq!(platform_of(&by_digest), "linux/amd64");
    assert_eq!(arch_file(&mut local, &by_digest), content);
}

/// Issue 3: two builders push their arch tags; a pull of the target on
/// each platform gets that platform's image.
#[test]
fn docker_engine_pull_platform_gets_the_image_pushed_for_that_arch() {
    require_docker_engine();
    let s = Stack::new();
    let mut local = Local::default();
    let repo = format!("{}/engine/app", s.proxy.host());
    let run = nonce();
    let builds = [
        ("x86_64_v1", "linux/amd64", format!("amd64 {run}")),
        ("aarch64_v1", "linux/arm64", format!("arm64 {run}")),
    ];
    for (tag, platform, content) in &builds {
        let tag = format!("{repo}:{tag}");
        build(&mut local, platform, &tag, content);
        push(&tag);
        docker(&["rmi", &tag]);
    }

    let target = format!("{repo}:v1");
    local.images.push(target.clone());
    for (_, platform, content) in builds.iter().rev() {
        docker(&["pull", "--platform", platform, &target]);
        assert_eq!(
            &platform_of(&target),
            platform,
            "pulled {target} for {platform}"
        );
        assert_eq!(&arch_file(&mut local, &target), content, "{platform}");
        for c in local.containers.drain(..) {
            docker(&["rm", "-f", &c]);
        }
        docker(&["rmi", &target]);
    }
}

/// docker sends each layer as one chunked PATCH: archmerge splices it,
/// framing and all, and the image pulls back whole.
#[test]
fn docker_engine_push_of_a_large_layer_is_spliced_and_pulls_back_whole() {
    require_docker_engine();
    let s = Stack::new();
    let mut local = Local::default();
    let tag = format!("{}/engine/large:v1", s.proxy.host());
    // Text from random bytes, so the gzipped layer stays megabytes long.
    let content: String = Seeded::bytes(31, 4 << 20)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    build(&mut local, "linux/amd64", &tag, &content);
    let digest = push(&tag);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let spliced = rt.block_on(s.metric("archmerge_spliced_upload_bytes_total"));
    assert!(
        spliced >= (3 << 20) as f64,
        "only {spliced} bytes of docker's layer upload spliced"
    );

    docker(&["rmi", &tag]);
    let by_digest = format!("{}/engine/large@{digest}", s.proxy.host());
    local.images.push(by_digest.clone());
    docker(&["pull", &by_digest]);
    assert!(
        arch_file(&mut local, &by_digest) == content,
        "the pulled layer's file is not the one pushed"
    );
}
