//! Garbage collection: distribution's `garbage-collect --delete-untagged`
//! (a common nightly job; the community Helm chart turns it on) after
//! pushes through archmerge must leave every index it made pullable on
//! every platform.
//!
//! Each test pushes per-arch images through archmerge the way CI jobs do
//! (skopeo from OCI layouts), stops writing (archmerge stops), stops the
//! registry, runs the real `docker-registry garbage-collect --delete-untagged`
//! on the registry's own config and storage, starts the registry again and
//! pulls every index straight from it once per platform (`skopeo copy
//! --override-os/--override-arch/--override-variant`, every blob's digest
//! checked). Every (index, platform) is tried before the test fails, so a
//! failure lists everything GC broke.
//!
//! Two layouts: arch tags in the index's own repository (each child keeps
//! the arch tag it was pushed under), and repository patterns
//! (`{repo}-{arch}`), where archmerge copies each child into the target
//! repository by digest.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::*;

/// Pushes `spec`'s image (`seed` makes it unique) with skopeo through
/// `proxy` to `image`; returns its manifest digest.
fn push(proxy: &Archmerge, image: &str, spec: &ArchSpec, seed: u64) -> String {
    let layout = build_oci_layout(&spec.image(seed), "build");
    skopeo_push(
        &layout,
        &format!("{}/{image}", proxy.host()),
        Format::Source,
    )
}

/// Stops the registry, runs `docker-registry garbage-collect
/// --delete-untagged` on its config, starts it again; returns what GC
/// printed.
fn collect_garbage(registry: &mut Registry) -> String {
    registry.kill();
    // The harness keeps config.yml beside the storage root.
    let config: PathBuf = registry
        .data_dir()
        .parent()
        .expect("the storage root has a parent")
        .join("config.yml");
    assert!(
        config.is_file(),
        "no registry config at {}",
        config.display()
    );
    let out = run_with_timeout(
        Command::new("docker-registry")
            .arg("garbage-collect")
            .arg("--delete-untagged")
            .arg(&config),
        TOOL_TIMEOUT,
    );
    expect_success("docker-registry garbage-collect --delete-untagged", &out);
    registry.start_again();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Pulls `image` straight from the registry as a machine of `spec` would;
/// `Err` says what failed. On success, the pulled manifest must be
/// `want` and every blob must match its digest.
fn pull_on(image: &str, spec: &ArchSpec, want: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let mut global = vec!["--override-os", "linux", "--override-arch", spec.arch];
    if let Some(v) = spec.variant {
        global.extend(["--override-variant", v]);
    }
    let out = skopeo_output(
        &global,
        &[
            "copy",
            "--retry-times",
            "0",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &format!("dir:{}", dir.path().display()),
        ],
    );
    if !out.status.success() {
        return Err(format!(
            "{image} on {}: skopeo copy failed: {}",
            spec.platform(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let manifest = std::fs::read(dir.path().join("manifest.json")).map_err(|e| e.to_string())?;
    let got = digest_of(&manifest);
    if got != want {
        return Err(format!(
            "{image} on {}: pulled {got}, pushed {want}",
            spec.platform()
        ));
    }
    Ok(())
}

/// Panics with every failure of `pulls` ((image, platform, digest)).
fn assert_all_pull(pulls: &[(String, ArchSpec, String)], gc_output: &str) {
    let failures: Vec<String> = pulls
        .iter()
        .filter_map(|(image, spec, digest)| pull_on(image, spec, digest).err())
        .collect();
    assert!(
        failures.is_empty(),
        "after garbage-collect --delete-untagged, {} of {} pulls fail:\n  {}\n\
         --- what garbage-collect deleted ---\n{}",
        failures.len(),
        pulls.len(),
        failures.join("\n  "),
        gc_output
            .lines()
            .filter(|l| l.contains("delet"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn gc_keeps_every_arch_of_an_index_of_arch_tags_in_its_own_repository() {
    let mut registry = spawn_registry();
    let proxy = spawn_archmerge(&registry.url());

    let amd = push(&proxy, "gc/app:x86_64_v1", &AMD64, 101);
    let arm = push(&proxy, "gc/app:aarch64_v1", &ARM64, 102);
    // A rebuild of one arch: the first amd64 image loses its tag and its
    // place in the index, and is garbage now.
    let _ = push(&proxy, "gc/app:x86_64_v2", &AMD64, 103);
    let amd2 = push(&proxy, "gc/app:x86_64_v2", &AMD64, 104);
    let arm2 = push(&proxy, "gc/app:aarch64_v2", &ARM64, 105);
    drop(proxy);

    let gc = collect_garbage(&mut registry);
    let host = registry.host();
    assert_all_pull(
        &[
            (format!("{host}/gc/app:v1"), AMD64, amd.clone()),
            (format!("{host}/gc/app:v1"), ARM64, arm.clone()),
            (format!("{host}/gc/app:v2"), AMD64, amd2),
            (format!("{host}/gc/app:v2"), ARM64, arm2),
        ],
        &gc,
    );
}

#[test]
fn gc_keeps_every_arch_of_an_index_whose_children_were_copied_from_per_arch_repositories() {
    let mut registry = spawn_registry();
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

    let amd = push(&proxy, "wg/ui-amd64:v1", &AMD64_REPO, 201);
    let arm = push(&proxy, "wg/ui-arm64:v1", &ARM64_REPO, 202);
    drop(proxy);

    let gc = collect_garbage(&mut registry);
    let host = registry.host();
    assert_all_pull(
        &[
            (format!("{host}/wg/ui:v1"), AMD64_REPO, amd.clone()),
            (format!("{host}/wg/ui:v1"), ARM64_REPO, arm.clone()),
            // The per-arch repositories keep their own tags.
            (format!("{host}/wg/ui-amd64:v1"), AMD64_REPO, amd),
            (format!("{host}/wg/ui-arm64:v1"), ARM64_REPO, arm),
        ],
        &gc,
    );
}

/// The arches as repository patterns name them (`{repo}-amd64`).
const AMD64_REPO: ArchSpec = ArchSpec {
    alias: "amd64",
    ..AMD64
};
const ARM64_REPO: ArchSpec = ArchSpec {
    alias: "arm64",
    ..ARM64
};
