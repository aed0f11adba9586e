//! More real clients: buildah (manifest lists) and the PyPI `oras` library
//! (artifacts), each with its own storage and configuration in a temp dir.
//!
//! buildah runs with `--root`/`--runroot` in its temp dir, the `vfs` storage
//! driver (no kernel overlay needed), its own `registries.conf`,
//! `storage.conf`, `containers.conf`, signature policy and auth file, and
//! `HOME`/`XDG_*` pointing there too: nothing of the machine's container
//! configuration is read or written. Plain HTTP to loopback is
//! `--tls-verify=false` on every command that talks to a registry.
//!
//! oras is the Python oras-py library (`pip install oras`), driven by a
//! small script written to its temp dir and run with `python3` from there
//! (oras-py only pushes files below its working directory), with `HOME`
//! and `DOCKER_CONFIG` in the temp dir so no credentials of the machine are
//! seen. `OrasClient.push` makes a manifest with a config of any media type
//! and any layers; it has no way to set `artifactType`, so the OCI 1.1
//! artifact (`artifactType` and the empty config) is pushed with the same
//! library's `upload_blob` and `upload_manifest`, which take a manifest as
//! given.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};
use tempfile::TempDir;

use super::{expect_success, run_with_timeout, TOOL_TIMEOUT};

// === buildah ===

/// A buildah with its own storage and configuration. Removed on drop.
pub struct Buildah {
    dir: TempDir,
}

impl Buildah {
    /// A fresh buildah home: storage, run dir, configuration files.
    pub fn new() -> Buildah {
        let dir = tempfile::Builder::new()
            .prefix("archmerge-buildah-")
            .tempdir()
            .expect("creating the buildah temp dir");
        let d = dir.path();
        for sub in ["root", "run", "home", "tmp", "xdg-run"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        fs::write(
            d.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .unwrap();
        fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                d.join("run").display(),
                d.join("root").display()
            ),
        )
        .unwrap();
        fs::write(d.join("containers.conf"), "").unwrap();
        fs::write(
            d.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        fs::write(d.join("auth.json"), "{}").unwrap();
        Buildah { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `buildah <global flags> <args>`; no status check.
    pub fn output(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(self.path("root"))
            .arg("--runroot")
            .arg(self.path("run"))
            .arg("--storage-driver")
            .arg("vfs")
            .arg("--registries-conf")
            .arg(self.path("registries.conf"))
            .args(args)
            .env("HOME", self.path("home"))
            .env("XDG_RUNTIME_DIR", self.path("xdg-run"))
            .env("XDG_CONFIG_HOME", self.path("home/.config"))
            .env("XDG_DATA_HOME", self.path("home/.local/share"))
            .env("TMPDIR", self.path("tmp"))
            .env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("REGISTRY_AUTH_FILE", self.path("auth.json"));
        let out = run_with_timeout(&mut cmd, TOOL_TIMEOUT);
        if let Some(127) = out.status.code() {
            panic!(
                "buildah is not installed (scripts/test.sh installs it: apt-get install buildah)"
            );
        }
        out
    }

    /// Runs buildah and panics with its output unless it succeeded.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.output(args);
        expect_success(&format!("buildah {}", args.join(" ")), &out);
        out
    }

    /// `buildah manifest create <list>` (a local name such as
    /// `localhost/app-list`).
    pub fn manifest_create(&self, list: &str) {
        self.run(&["manifest", "create", list]);
    }

    /// `buildah manifest add --tls-verify=false <list> docker://<image>`.
    pub fn manifest_add(&self, list: &str, image: &str) {
        let src = format!("docker://{image}");
        self.run(&["manifest", "add", "--tls-verify=false", list, &src]);
    }

    /// `buildah manifest push --all --tls-verify=false <list>
    /// docker://<dest>`: the children first, then the list at `dest`.
    /// Returns the digest of the list buildah pushed (its `--digestfile`).
    pub fn manifest_push_all(&self, list: &str, dest: &str) -> String {
        let digest_file = self.path("digest");
        let _ = fs::remove_file(&digest_file);
        let digest_arg = digest_file.display().to_string();
        let policy = self.path("policy.json").display().to_string();
        let dst = format!("docker://{dest}");
        self.run(&[
            "manifest",
            "push",
            "--all",
            "--tls-verify=false",
            "--signature-policy",
            &policy,
            "--digestfile",
            &digest_arg,
            list,
            &dst,
        ]);
        fs::read_to_string(&digest_file)
            .expect("buildah wrote no digest file")
            .trim()
            .to_owned()
    }
}

impl Default for Buildah {
    fn default() -> Self {
        Buildah::new()
    }
}

// === oras (oras-py) ===

/// What the media types of an OCI 1.1 artifact are.
pub mod artifact {
    /// The empty config descriptor's media type (OCI image-spec 1.1).
    pub const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";
    /// The digest of the two bytes `{}`.
    pub const EMPTY_DIGEST: &str =
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
}

/// The driver script: one JSON argument says what to push; the last line of
/// stdout is `{"status": …, "digest": …}` from the registry's answer to the
/// manifest PUT.
const ORAS_SCRIPT: &str = r#"
import json, sys
import oras.client, oras.oci

req = json.loads(sys.argv[1])
client = oras.client.OrasClient(insecure=True)
if req["mode"] == "files":
    # The ordinary `oras push`: a config of the caller's media type, files as layers.
    res = client.push(
        target=req["target"],
        files=[f["name"] + ":" + f["media_type"] for f in req["files"]],
        manifest_config="config.json:" + req["config_media_type"],
        quiet=True,
    )
else:
    # An OCI 1.1 artifact: `artifactType`, the empty config, one layer.
    container = client.get_container(req["target"])
    layers = []
    for f in req["files"]:
        layer = oras.oci.NewLayer(f["name"], media_type=f["media_type"])
        client._check_200_response(client.upload_blob(f["name"], container, layer))
        layers.append(layer)
    config = {
        "mediaType": "application/vnd.oci.empty.v1+json",
        "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "size": 2,
        "data": "e30=",
    }
    client._check_200_response(client.upload_blob("empty.json", container, config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": req["artifact_type"],
        "config": config,
        "layers": layers,
    }
    res = client.upload_manifest(manifest, container)
    client._check_200_response(res)
print(json.dumps({"status": res.status_code, "digest": res.headers.get("Docker-Content-Digest")}))
"#;

/// What oras pushed: the registry's answer to the manifest PUT.
#[derive(Clone, Debug)]
pub struct OrasPushed {
    /// Its status (201 from distribution).
    pub status: u16,
    /// `Docker-Content-Digest` of the answer.
    pub digest: String,
}

/// An oras-py client with its own working directory and home.
pub struct Oras {
    dir: TempDir,
}

impl Oras {
    /// A fresh working directory holding the driver script; panics (never
    /// skips) when `python3` cannot import `oras`.
    pub fn new() -> Oras {
        let dir = tempfile::Builder::new()
            .prefix("archmerge-oras-")
            .tempdir()
            .expect("creating the oras temp dir");
        fs::write(dir.path().join("push.py"), ORAS_SCRIPT).unwrap();
        fs::write(dir.path().join("empty.json"), "{}").unwrap();
        let oras = Oras { dir };
        let out = oras.python(&["-c", "import oras.client"]);
        assert!(
            out.status.success(),
            "python3 cannot import oras (scripts/test.sh installs it: \
             python3 -m pip install oras)\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        oras
    }

    fn python(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        let mut cmd = Command::new("python3");
        cmd.args(args)
            .current_dir(d)
            .env("HOME", d)
            .env("DOCKER_CONFIG", d.join(".docker"))
            .env("PYTHONDONTWRITEBYTECODE", "1");
        run_with_timeout(&mut cmd, TOOL_TIMEOUT)
    }

    fn push(&self, request: Value) -> OrasPushed {
        let arg = request.to_string();
        let out = self.python(&["push.py", &arg]);
        expect_success(&format!("oras-py push {arg}"), &out);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().rev().find(|l| l.starts_with('{'));
        let answer: Value = last
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("oras-py printed no answer:\n{stdout}"));
        OrasPushed {
            status: answer["status"].as_u64().unwrap_or(0) as u16,
            digest: answer["digest"].as_str().unwrap_or_default().to_owned(),
        }
    }

    fn write_files(&self, files: &[(&str, &str, &str)]) -> Vec<Value> {
        files
            .iter()
            .map(|(name, media_type, content)| {
                assert!(!name.contains('/'), "oras files live in its working dir");
                fs::write(self.dir.path().join(name), content).unwrap();
                json!({"name": name, "media_type": media_type})
            })
            .collect()
    }

    /// `oras push <target> <files> --config config.json:<config_media_type>`:
    /// a manifest whose config is `config` (of that media type) and whose
    /// layers are `files` = (name, media type, content). `target` is
    /// `host:port/repo:tag`, plain HTTP.
    pub fn push_files(
        &self,
        target: &str,
        config_media_type: &str,
        config: &str,
        files: &[(&str, &str, &str)],
    ) -> OrasPushed {
        fs::write(self.dir.path().join("config.json"), config).unwrap();
        let files = self.write_files(files);
        self.push(json!({
            "mode": "files",
            "target": target,
            "config_media_type": config_media_type,
            "files": files,
        }))
    }

    /// An OCI 1.1 artifact at `target`: `artifactType` = `artifact_type`,
    /// the empty config (`application/vnd.oci.empty.v1+json`), `files` as
    /// layers.
    pub fn push_artifact(
        &self,
        target: &str,
        artifact_type: &str,
        files: &[(&str, &str, &str)],
    ) -> OrasPushed {
        let files = self.write_files(files);
        self.push(json!({
            "mode": "artifact",
            "target": target,
            "artifact_type": artifact_type,
            "files": files,
        }))
    }

    /// The working directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for Oras {
    fn default() -> Self {
        Oras::new()
    }
}
