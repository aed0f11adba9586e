//! Real clients: skopeo and docker, run with timeouts, failing loudly.
//!
//! skopeo runs with `--insecure-policy` (no host policy.json needed),
//! `--command-timeout`, `--retry-times 0` (a failure shows at once, not after
//! retries) and plain HTTP to loopback. Pulls go to skopeo's `dir:`
//! transport, which keeps the manifest and blobs exactly as the registry
//! sent them, so digests can be compared byte for byte.
//!
//! docker runs with `DOCKER_CONFIG` pointing at an empty temp dir, so no
//! credentials or manifest-list cache of the host leak into a test.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{digest_of, OciLayout};

/// How long one skopeo or docker command may take.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `cmd` to completion or until `timeout`, capturing its output.
/// Panics when it cannot start or runs out of time (killing it).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    // Drain both pipes on threads so a chatty child never blocks on a full
    // pipe while we wait for it.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for child") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_t.join().unwrap_or_default();
            let stderr = err_t.join().unwrap_or_default();
            panic!(
                "{shown} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Panics with the command, its status and its output unless it succeeded.
pub fn expect_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// === skopeo ===

/// Manifest format for `skopeo copy --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Keep the source's format (OCI for [`OciLayout`]).
    Source,
    /// `--format oci`.
    Oci,
    /// `--format v2s2`: Docker schema2.
    V2s2,
}

/// Runs `skopeo [global…] <args>` with the harness's global flags; does not
/// check the exit status (see [`skopeo`]).
pub fn skopeo_output(global: &[&str], args: &[&str]) -> Output {
    // No credentials of the host's user: an auth file that does not exist.
    let auth = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy")
        .arg("--command-timeout")
        .arg(format!("{}s", TOOL_TIMEOUT.as_secs()))
        .args(global)
        .args(args)
        .env("REGISTRY_AUTH_FILE", auth.path().join("auth.json"));
    run_with_timeout(&mut cmd, TOOL_TIMEOUT + Duration::from_secs(10))
}

/// Runs skopeo and panics with its output unless it succeeded.
pub fn skopeo(global: &[&str], args: &[&str]) -> Output {
    let out = skopeo_output(global, args);
    expect_success(
        &format!("skopeo {} {}", global.join(" "), args.join(" ")),
        &out,
    );
    out
}

/// `skopeo copy` of `layout` to `docker://<dest>` (e.g.
/// `127.0.0.1:5080/app:x86_64_v1`), plain HTTP. Returns the digest of the
/// manifest the registry stored.
pub fn skopeo_push(layout: &OciLayout, dest: &str, format: Format) -> String {
    let digest_dir = tempfile::tempdir().unwrap();
    let digest_file = digest_dir.path().join("digest");
    let digest_arg = digest_file.display().to_string();
    let src = layout.reference();
    let dst = format!("docker://{dest}");
    let mut args = vec![
        "copy",
        "--retry-times",
        "0",
        "--dest-tls-verify=false",
        "--digestfile",
        &digest_arg,
    ];
    match format {
        Format::Source => {}
        Format::Oci => args.extend(["--format", "oci"]),
        Format::V2s2 => args.extend(["--format", "v2s2"]),
    }
    args.extend([src.as_str(), dst.as_str()]);
    skopeo(&[], &args);
    let digest = fs::read_to_string(&digest_file).expect("skopeo wrote no digest file");
    digest.trim().to_owned()
}

/// `skopeo inspect --raw docker://<image>`: the manifest bytes exactly as
/// served.
pub fn skopeo_inspect_raw(image: &str) -> Vec<u8> {
    let src = format!("docker://{image}");
    skopeo(
        &[],
        &[
            "inspect",
            "--retry-times",
            "0",
            "--tls-verify=false",
            "--raw",
            &src,
        ],
    )
    .stdout
}

/// An image pulled with skopeo into a `dir:` directory, as served.
pub struct PulledImage {
    /// Keeps the directory alive.
    dir: TempDir,
    /// The image manifest bytes as served.
    pub manifest: Vec<u8>,
    /// Their digest.
    pub manifest_digest: String,
}

impl PulledImage {
    /// The `dir:` directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The manifest as JSON.
    pub fn manifest_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.manifest).expect("pulled manifest is JSON")
    }

    /// The bytes of the blob `digest` as pulled.
    pub fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        // skopeo's dir: transport names blobs `<hex>` (older: `<hex>.tar`).
        for name in [hex.to_owned(), format!("{hex}.tar")] {
            if let Ok(b) = fs::read(self.dir.path().join(name)) {
                return b;
            }
        }
        panic!("blob {digest} not in {}", self.dir.path().display());
    }

    /// The config blob's JSON.
    pub fn config_json(&self) -> serde_json::Value {
        let m = self.manifest_json();
        let d = m["config"]["digest"]
            .as_str()
            .expect("manifest has a config");
        serde_json::from_slice(&self.blob(d)).expect("config is JSON")
    }

    /// Every blob the manifest names (config first, then layers), after
    /// checking each file's sha256 matches its digest: the bytes arrived
    /// intact.
    pub fn verified_blob_digests(&self) -> Vec<String> {
        let m = self.manifest_json();
        let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_owned()];
        for l in m["layers"].as_array().expect("manifest has layers") {
            digests.push(l["digest"].as_str().unwrap().to_owned());
        }
        for d in &digests {
            assert_eq!(&digest_of(&self.blob(d)), d, "pulled blob does not match");
        }
        digests
    }
}

/// `skopeo copy docker://<image> dir:<tmp>`; `platform` = (os, arch,
/// variant) picks an image out of an index as `--override-*` do.
pub fn skopeo_pull(image: &str, platform: Option<(&str, &str, Option<&str>)>) -> PulledImage {
    let dir = tempfile::Builder::new()
        .prefix("archmerge-pull-")
        .tempdir()
        .unwrap();
    let mut global = Vec::new();
    if let Some((os, arch, variant)) = platform {
        global.extend(["--override-os", os, "--override-arch", arch]);
        if let Some(v) = variant {
            global.extend(["--override-variant", v]);
        }
    }
    let src = format!("docker://{image}");
    let dst = format!("dir:{}", dir.path().display());
    skopeo(
        &global,
        &[
            "copy",
            "--retry-times",
            "0",
            "--src-tls-verify=false",
            &src,
            &dst,
        ],
    );
    let manifest = fs::read(dir.path().join("manifest.json")).expect("dir: has manifest.json");
    PulledImage {
        manifest_digest: digest_of(&manifest),
        manifest,
        dir,
    }
}

// === docker ===

/// `docker build --platform <platform> -t <tag>` of a scratch image whose
/// `/arch.txt` holds `content` (the engine pulls nothing for it).
pub fn build_scratch(platform: &str, tag: &str, content: &str) {
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("arch.txt"), content).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY arch.txt /arch.txt\nCMD [\"/arch.txt\"]\n",
    )
    .unwrap();
    docker(&[
        "build",
        "--platform",
        platform,
        "-t",
        tag,
        ctx.path().to_str().unwrap(),
    ]);
}

/// The content of the first file of a tar stream (what `docker cp
/// CONTAINER:FILE -` writes).
pub fn first_file_of_tar(tar: &[u8]) -> String {
    assert!(tar.len() >= 512, "docker cp gave no tar");
    let size_field = String::from_utf8_lossy(&tar[124..136]);
    let size = usize::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
        .expect("tar size field");
    String::from_utf8_lossy(&tar[512..512 + size]).into_owned()
}

/// Panics unless a Docker engine answers, for a test that drives one.
/// `scripts/test.sh` leaves the `docker_engine_*` tests out by name when no
/// engine answers, and says NOT RUN loudly; run any other way, such a test
/// fails without an engine instead of passing unrun.
pub fn require_docker_engine() {
    assert!(
        docker_available(),
        "no Docker engine answers (`docker info` fails), and this test drives one; \
         scripts/test.sh leaves the docker_engine_* tests out by name then and reports \
         them as NOT RUN"
    );
}

/// True when a Docker engine answers (`docker info` succeeds in 20 s).
pub fn docker_available() -> bool {
    let out = Command::new("docker")
        .arg("info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(|mut c| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match c.try_wait() {
                    Ok(Some(s)) => return s.success(),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        return false;
                    }
                }
            }
        });
    out.unwrap_or(false)
}

/// Runs `docker <args>` with an empty `DOCKER_CONFIG`; no status check.
pub fn docker_output(args: &[&str]) -> Output {
    let config = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("docker");
    cmd.args(args).env("DOCKER_CONFIG", config.path());
    run_with_timeout(&mut cmd, TOOL_TIMEOUT)
}

/// Runs docker and panics with its output unless it succeeded.
pub fn docker(args: &[&str]) -> Output {
    let out = docker_output(args);
    expect_success(&format!("docker {}", args.join(" ")), &out);
    out
}

/// `docker manifest inspect --insecure <image>` parsed as JSON (the docker
/// CLI does this itself, no engine needed).
pub fn docker_manifest_inspect(image: &str) -> serde_json::Value {
    let out = docker(&["manifest", "inspect", "--insecure", image]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "docker manifest inspect printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
