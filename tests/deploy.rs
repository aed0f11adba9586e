//! Deployment as operators run it: the image the Dockerfile builds, the
//! `docker-compose.yml` stack, and the Kubernetes manifests in
//! `deploy/kubernetes/`.
//!
//! - `kubernetes_*` need no engine: the manifests are validated offline
//!   against the Kubernetes schemas (PyPI `kubernetes-validate --strict`,
//!   which scripts/test.sh installs), the ConfigMap's `archmerge.toml` goes
//!   through `archmerge check-config`, and what the files must agree on
//!   (ports, probes, Secret keys, the notification URL) is checked across
//!   them.
//! - `docker_engine_*` need a Docker engine and fail without one
//!   ([`require_docker_engine`]); scripts/test.sh leaves them out by name
//!   when `docker info` fails, and says so loudly. The engine pulls nothing: `scripts/docker-bases.sh` puts
//!   local stand-ins under the base image names the Dockerfile and the
//!   compose file use (when they are missing), and the image is built from
//!   the Dockerfile users get. The compose stack is started as the file
//!   says, under a project name, ports and image tag of the test's own, and
//!   taken down with `down -v`; the test then checks that no container,
//!   network or volume of the project is left.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use support::*;

/// The first image build compiles every dependency in the container.
const BUILD_TIMEOUT: Duration = Duration::from_secs(45 * 60);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn k8s_file(name: &str) -> PathBuf {
    root().join("deploy/kubernetes").join(name)
}

// === YAML, read with Python's PyYAML (no YAML crate in this project) ===

/// Every document of a YAML file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
             print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
        )
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): scripts/test.sh installs it"));
    assert!(
        out.status.success(),
        "reading {} with PyYAML failed (scripts/test.sh installs kubernetes-validate, \
         which brings PyYAML):\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("python printed JSON")
}

/// The one object of `kind` named `name` among `docs`.
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "want exactly one {kind} {name}");
    found[0]
}

/// The value of the environment variable `name` of `container`.
fn env_of<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .expect("the container has env")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in the container's env"))
}

// === kubernetes: offline ===

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let files = [k8s_file("archmerge.yaml"), k8s_file("secret.example.yaml")];
    // The oldest and the newest Kubernetes the schemas bundle covers here.
    for version in ["1.25", "1.37"] {
        let out = run_with_timeout(
            Command::new("python3")
                .args([
                    "-m",
                    "kubernetes_validate",
                    "--strict",
                    "--kubernetes-version",
                    version,
                ])
                .args(&files),
            Duration::from_secs(120),
        );
        expect_success(
            &format!(
                "kubernetes-validate --strict -k {version} (PyPI kubernetes-validate; \
                 scripts/test.sh installs it)"
            ),
            &out,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        // Every object was checked against a schema, none passed over.
        for object in [
            "configmap/archmerge",
            "deployment/archmerge",
            "service/archmerge",
            "service/archmerge-admin",
            "poddisruptionbudget/archmerge",
            "secret/archmerge",
        ] {
            assert!(
                text.contains(&format!("passed for resource {object} ")),
                "{object} not validated against {version}:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn kubernetes_config_map_is_a_valid_archmerge_config() {
    let docs = yaml_documents(&k8s_file("archmerge.yaml"));
    let toml = object(&docs, "ConfigMap", "archmerge")["data"]["archmerge.toml"]
        .as_str()
        .expect("the ConfigMap has archmerge.toml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archmerge.toml");
    fs::write(&path, toml).unwrap();
    let out = archmerge_command(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "archmerge check-config refuses the ConfigMap's archmerge.toml: {}",
        shown(&out)
    );
}

#[test]
fn kubernetes_manifests_agree_on_ports_probes_secrets_and_the_webhook() {
    let docs = yaml_documents(&k8s_file("archmerge.yaml"));
    let secret_docs = yaml_documents(&k8s_file("secret.example.yaml"));
    let secret = object(&secret_docs, "Secret", "archmerge");

    let deployment = object(&docs, "Deployment", "archmerge");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    // The Dockerfile's user.
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    // The config file the container is told to read is the ConfigMap's.
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| config_path.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("the --config path is on a mounted volume");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["configMap"]["name"], "archmerge");
    let key = config_path
        .strip_prefix(mount["mountPath"].as_str().unwrap())
        .unwrap()
        .trim_start_matches('/');
    assert!(
        object(&docs, "ConfigMap", "archmerge")["data"][key].is_string(),
        "the ConfigMap has no {key}"
    );

    // Ports: the listeners the env sets are the container ports.
    let port_named = |name: &str| -> u64 {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    let listen = env_of(c, "ARCHMERGE_LISTEN")["value"].as_str().unwrap();
    let admin = env_of(c, "ARCHMERGE_ADMIN_LISTEN")["value"]
        .as_str()
        .unwrap();
    assert_eq!(listen, format!("0.0.0.0:{}", port_named("registry")));
    assert_eq!(admin, format!("0.0.0.0:{}", port_named("metrics")));

    // Probes: /healthz for liveness and startup, /readyz for readiness, on
    // the admin listener.
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }

    // Secrets: every key the Deployment reads is one the Secret has.
    let mut keys = Vec::new();
    for e in c["env"].as_array().unwrap() {
        if let Some(r) = e["valueFrom"].get("secretKeyRef") {
            assert_eq!(r["name"], "archmerge");
            let key = r["key"].as_str().unwrap();
            assert!(
                secret["stringData"][key].is_string(),
                "secret.example.yaml has no {key}"
            );
            keys.push((e["name"].as_str().unwrap(), r["optional"] == true));
        }
    }
    assert!(
        keys.contains(&("ARCHMERGE_ADMIN_TOKEN", false)),
        "the admin token must come from the Secret, not optional: {keys:?}"
    );

    // Services: the admin one exposes the metrics port by name, for a
    // ServiceMonitor, and both select the pods.
    let admin_service = object(&docs, "Service", "archmerge-admin");
    for name in ["archmerge", "archmerge-admin"] {
        assert_eq!(
            &object(&docs, "Service", name)["spec"]["selector"],
            labels,
            "Service {name} selects the pods"
        );
    }
    let metrics = admin_service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("archmerge-admin has a port named metrics");
    assert_eq!(metrics["targetPort"], "metrics");
    let admin_port = metrics["port"].as_u64().unwrap();

    // The ServiceMonitor picks exactly that Service and port.
    let monitor = yaml_documents(&k8s_file("servicemonitor.yaml"));
    let monitor = object(&monitor, "ServiceMonitor", "archmerge");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &admin_service["metadata"]["labels"][k], v,
            "ServiceMonitor label {k}"
        );
    }
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");

    // The registry's notifications go to that Service's /events, with the
    // Secret's admin token.
    let notify = yaml_documents(&k8s_file("registry-notifications.yml"));
    let endpoint = &notify[0]["notifications"]["endpoints"][0];
    assert_eq!(
        endpoint["url"],
        format!("http://archmerge-admin.default.svc.cluster.local:{admin_port}/events")
    );
    assert_eq!(
        endpoint["headers"]["Authorization"][0],
        format!(
            "Bearer {}",
            secret["stringData"]["admin-token"].as_str().unwrap()
        )
    );
}

// === docker engine ===

fn nonce() -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    format!("{}{}", std::process::id(), t.as_nanos() % 1_000_000_000)
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The image of this checkout, built once per test run (the engine tests
/// here run in parallel and share it).
fn build_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(build_image_now).clone()
}

/// The base images (stand-ins made when missing), then `docker build` of
/// the Dockerfile at the repository root, tagged per checkout so parallel
/// checkouts do not overwrite each other's image (and each keeps its
/// layer cache). Returns the tag.
fn build_image_now() -> String {
    let out = run_with_timeout(
        Command::new("bash").arg(root().join("scripts/docker-bases.sh")),
        Duration::from_secs(20 * 60),
    );
    expect_success("scripts/docker-bases.sh", &out);

    let checkout = sha256_hex(root().to_string_lossy().as_bytes());
    let tag = format!("archmerge-test:{}", &checkout[..12]);
    let started = Instant::now();
    // The build stage gets a tag of its own, so the engine keeps it (the
    // layer cache of the next run) and the stages of earlier builds become
    // dangling images, removed below.
    let build_tag = format!("archmerge-test-build:{}", &checkout[..12]);
    for (what, args) in [
        (
            "docker build --target build (the Dockerfile's build stage)",
            ["--target", "build", "-t", build_tag.as_str()].as_slice(),
        ),
        (
            "docker build (the Dockerfile)",
            ["-t", tag.as_str()].as_slice(),
        ),
    ] {
        let out = run_with_timeout(
            Command::new("docker").arg("build").args(args).arg(root()),
            BUILD_TIMEOUT,
        );
        expect_success(what, &out);
    }
    // Earlier builds of these images: dangling images that descend from
    // the local stand-ins (labelled org.archmerge.stand-in=1), never an
    // image of anyone else.
    let _ = docker_output(&[
        "image",
        "prune",
        "--force",
        "--filter",
        "label=org.archmerge.stand-in=1",
    ]);
    let size: u64 = text(&docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Size}}",
        &tag,
    ]))
    .parse()
    .unwrap();
    eprintln!(
        "docker build: {tag} in {:.0?}, {:.1} MB",
        started.elapsed(),
        size as f64 / 1e6
    );
    tag
}

/// One HTTP/1.0 request to `127.0.0.1:port`; (status, body).
fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn get(port: u16, path: &str) -> (u16, String) {
    request(port, "GET", path, &[], "")
}

/// Polls `check` every 250 ms until it is true or `limit` passes.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The content of `/arch.txt` in a local image, read without running it.
fn arch_file(image: &str) -> String {
    let id = text(&docker(&["create", image]));
    let tar = docker_output(&["cp", &format!("{id}:/arch.txt"), "-"]);
    let _ = docker_output(&["rm", "-f", &id]);
    expect_success("docker cp", &tar);
    first_file_of_tar(&tar.stdout)
}

/// The compose tool: `docker compose` (v2) when the plugin is there, else
/// `docker-compose` (v1, Debian's package).
fn compose_command() -> Vec<String> {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        return vec!["docker".into(), "compose".into()];
    }
    let v1 = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        v1,
        "neither `docker compose` nor `docker-compose` works (scripts/test.sh installs \
         Debian's docker-compose)"
    );
    vec!["docker-compose".into()]
}

/// The compose stack of docker-compose.yml under a project of its own;
/// `down -v` on drop.
struct ComposeStack {
    compose: Vec<String>,
    project: String,
    env: Vec<(String, String)>,
    proxy_port: u16,
    admin_port: u16,
    registry_port: u16,
    token: String,
    /// Local images the test tagged, removed on drop.
    images: Vec<String>,
}

impl ComposeStack {
    fn up(image: &str) -> ComposeStack {
        let n = nonce();
        let token = sha256_hex(format!("token {n}").as_bytes());
        let (proxy_port, admin_port, registry_port) = (free_port(), free_port(), free_port());
        let env = vec![
            ("ARCHMERGE_ADMIN_TOKEN".to_owned(), token.clone()),
            ("ARCHMERGE_IMAGE".to_owned(), image.to_owned()),
            ("ARCHMERGE_PORT".to_owned(), proxy_port.to_string()),
            ("ARCHMERGE_ADMIN_PORT".to_owned(), admin_port.to_string()),
            ("REGISTRY_PORT".to_owned(), registry_port.to_string()),
        ];
        let stack = ComposeStack {
            compose: compose_command(),
            project: format!("archmerge-e2e-{n}"),
            env,
            proxy_port,
            admin_port,
            registry_port,
            token,
            images: Vec::new(),
        };
        // The image is built already: compose must not build it again.
        let out = stack.run(&["up", "-d", "--no-build"]);
        expect_success("compose up -d", &out);
        stack
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .arg("--project-name")
            .arg(&self.project)
            .arg("--file")
            .arg(root().join("docker-compose.yml"))
            .args(args)
            .current_dir(root());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        run_with_timeout(&mut cmd, TOOL_TIMEOUT)
    }

    fn logs(&self) -> String {
        let out = self.run(&["logs", "--no-color"]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The id of the service's container.
    fn container(&self, service: &str) -> String {
        text(&self.run(&["ps", "-q", service]))
    }

    /// What the engine still has of the project (containers, networks,
    /// volumes), one line each.
    fn leftovers(project: &str) -> Vec<String> {
        let filter = format!("label=com.docker.compose.project={project}");
        let mut left = Vec::new();
        for (kind, args) in [
            ("container", vec!["ps", "-aq", "--filter", &filter]),
            ("network", vec!["network", "ls", "-q", "--filter", &filter]),
            ("volume", vec!["volume", "ls", "-q", "--filter", &filter]),
        ] {
            for id in text(&docker(&args)).lines().filter(|l| !l.is_empty()) {
                left.push(format!("{kind} {id}"));
            }
        }
        left
    }

    fn down(&mut self) -> Output {
        let out = self.run(&["down", "-v", "--remove-orphans"]);
        for i in self.images.drain(..) {
            let _ = docker_output(&["rmi", "-f", &i]);
        }
        out
    }
}

impl Drop for ComposeStack {
    fn drop(&mut self) {
        if !self.project.is_empty() {
            let _ = self.down();
        }
    }
}

#[test]
fn docker_engine_image_is_small_stripped_non_root_with_a_healthcheck() {
    require_docker_engine();
    let image = build_image();
    let config: Value = serde_json::from_str(&text(&docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        &image,
    ])))
    .unwrap();
    assert_eq!(config["User"], "archmerge", "runs as non-root");
    assert!(
        config["Healthcheck"]["Test"].is_array(),
        "the image has a HEALTHCHECK: {config}"
    );

    // The binary: stripped (no symbol table, no debug sections).
    let id = text(&docker(&["create", &image]));
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("archmerge");
    let out = docker_output(&[
        "cp",
        &format!("{id}:/usr/local/bin/archmerge"),
        bin.to_str().unwrap(),
    ]);
    let _ = docker_output(&["rm", "-f", &id]);
    expect_success("docker cp of the binary", &out);
    let sections = run_with_timeout(
        Command::new("readelf").args(["-S", "-W"]).arg(&bin),
        Duration::from_secs(30),
    );
    expect_success("readelf -S", &sections);
    let sections = text(&sections);
    for s in [".symtab", ".debug_info", ".debug_line"] {
        assert!(
            !sections.contains(s),
            "the binary in the image has {s}: not stripped"
        );
    }
    let bin_size = fs::metadata(&bin).unwrap().len();
    let image_size: u64 = text(&docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Size}}",
        &image,
    ]))
    .parse()
    .unwrap();
    eprintln!(
        "image {image}: {:.1} MB, binary {:.1} MB",
        image_size as f64 / 1e6,
        bin_size as f64 / 1e6
    );
    assert!(bin_size < 40_000_000, "binary of {bin_size} bytes");
    assert!(image_size < 150_000_000, "image of {image_size} bytes");
}

#[test]
fn docker_engine_compose_stack_pushes_pulls_merges_webhook_pushes_and_reports() {
    require_docker_engine();
    let image = build_image();
    let mut s = ComposeStack::up(&image);
    let project = s.project.clone();

    // Up: archmerge answers /v2/ (through to the registry), the admin
    // listener /healthz and /readyz, on the published ports.
    let up = eventually(Duration::from_secs(60), || {
        get(s.proxy_port, "/v2/").0 == 200 && get(s.admin_port, "/readyz").0 == 200
    });
    assert!(
        up,
        "the stack did not come up: /v2/ {:?}, /readyz {:?}\n{}",
        get(s.proxy_port, "/v2/"),
        get(s.admin_port, "/readyz"),
        s.logs()
    );
    assert_eq!(get(s.admin_port, "/healthz"), (200, "ok\n".to_owned()));

    // Two builders push their arch tags through archmerge.
    let run = nonce();
    let repo = format!("127.0.0.1:{}/e2e/app", s.proxy_port);
    let arches = [
        ("x86_64", "linux/amd64", format!("amd64 {run}")),
        ("aarch64", "linux/arm64", format!("arm64 {run}")),
    ];
    for (alias, platform, content) in &arches {
        let tag = format!("{repo}:{alias}_v1");
        s.images.push(tag.clone());
        build_scratch(platform, &tag, content);
        docker(&["push", &tag]);
        docker(&["rmi", &tag]);
    }

    // A pull of the target on each platform gets that platform's image.
    let target = format!("{repo}:v1");
    s.images.push(target.clone());
    for (_, platform, content) in arches.iter().rev() {
        docker(&["pull", "--platform", platform, &target]);
        let got = text(&docker(&[
            "image",
            "inspect",
            "--format",
            "{{.Os}}/{{.Architecture}}",
            &target,
        ]));
        assert_eq!(&got, platform, "docker pull --platform {platform} {target}");
        assert_eq!(&arch_file(&target), content, "{platform}");
        docker(&["rmi", &target]);
    }

    // A push straight to the registry reaches archmerge through the
    // registry's notifications (POST /events with the admin token): the
    // index appears without a push through archmerge.
    let direct = format!("127.0.0.1:{}/e2e/hook", s.registry_port);
    for (alias, platform, content) in &arches {
        let tag = format!("{direct}:{alias}_v1");
        s.images.push(tag.clone());
        build_scratch(platform, &tag, content);
        docker(&["push", &tag]);
    }
    let accept = ("Accept", "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json");
    let merged = eventually(Duration::from_secs(60), || {
        let (status, body) = request(
            s.registry_port,
            "GET",
            "/v2/e2e/hook/manifests/v1",
            &[accept],
            "",
        );
        status == 200 && body.matches("\"digest\"").count() == 2
    });
    assert!(
        merged,
        "pushes straight to the registry were not merged through its notifications: {:?}\n{}",
        request(
            s.registry_port,
            "GET",
            "/v2/e2e/hook/manifests/v1",
            &[accept],
            ""
        ),
        s.logs()
    );
    // /events refuses a caller without the token.
    assert_eq!(
        request(s.admin_port, "POST", "/events", &[], "{\"events\":[]}").0,
        401
    );
    let bearer = format!("Bearer {}", s.token);
    let (status, _) = request(
        s.admin_port,
        "POST",
        "/events",
        &[
            ("Authorization", &bearer),
            (
                "Content-Type",
                "application/vnd.docker.distribution.events.v1+json",
            ),
        ],
        "{\"events\":[]}",
    );
    assert!(
        (200..300).contains(&status),
        "POST /events with the token: {status}"
    );

    // /metrics through the published admin port counts the merges.
    let (status, metrics) = get(s.admin_port, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("archmerge_merges_total") && metrics.contains("archmerge_requests_total"),
        "/metrics:\n{metrics}"
    );

    // The image's HEALTHCHECK reports the container healthy.
    let container = s.container("archmerge");
    let healthy = eventually(Duration::from_secs(90), || {
        text(&docker(&[
            "inspect",
            "--format",
            "{{.State.Health.Status}}",
            &container,
        ])) == "healthy"
    });
    assert!(healthy, "the archmerge container never became healthy");

    // Down: nothing of the project is left.
    let out = s.down();
    expect_success("compose down -v", &out);
    s.project.clear();
    let left = ComposeStack::leftovers(&project);
    assert!(left.is_empty(), "compose down -v left: {left:?}");
}

/// Containers and networks a test made with plain `docker`; removed on
/// drop.
#[derive(Default)]
struct Made {
    containers: Vec<String>,
    networks: Vec<String>,
}

impl Drop for Made {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker_output(&["rm", "-f", "-v", c]);
        }
        for n in &self.networks {
            let _ = docker_output(&["network", "rm", n]);
        }
    }
}

/// The Deployment's container, run by docker as the kubelet would run it:
/// its args, its env (the Secret's keys from secret.example.yaml), its
/// user, a read-only root filesystem, no capabilities, the ConfigMap
/// mounted where the Deployment mounts it, and the registry reachable at
/// the ConfigMap's upstream name. The probes' endpoints answer 200, and
/// POST /events refuses a caller without the token.
#[test]
fn docker_engine_kubernetes_container_runs_as_the_deployment_says() {
    require_docker_engine();
    let image = build_image();
    let docs = yaml_documents(&k8s_file("archmerge.yaml"));
    let secret_docs = yaml_documents(&k8s_file("secret.example.yaml"));
    let secret = &object(&secret_docs, "Secret", "archmerge")["stringData"];
    let config_map = object(&docs, "ConfigMap", "archmerge");
    let pod = &object(&docs, "Deployment", "archmerge")["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let toml = config_map["data"]["archmerge.toml"].as_str().unwrap();
    let upstream = toml
        .lines()
        .find_map(|l| l.strip_prefix("upstream = "))
        .expect("the ConfigMap names its upstream")
        .trim_matches('"');
    let upstream_host = upstream
        .strip_prefix("http://")
        .and_then(|h| h.split(':').next())
        .expect("an http://HOST:PORT upstream");

    // The ConfigMap as the kubelet mounts it: a read-only directory.
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("archmerge.toml"), toml).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(
        dir.path().join("archmerge.toml"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap()["mountPath"]
        .as_str()
        .unwrap();

    let n = nonce();
    let mut made = Made::default();
    let network = format!("archmerge-k8s-{n}");
    docker(&["network", "create", &network]);
    made.networks.push(network.clone());
    let registry = format!("archmerge-k8s-registry-{n}");
    docker(&[
        "run",
        "-d",
        "--name",
        &registry,
        "--network",
        &network,
        "--network-alias",
        upstream_host,
        "registry:2",
    ]);
    made.containers.push(registry);

    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    let user = format!(
        "{}:{}",
        pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    );
    let (proxy_port, admin_port) = (free_port(), free_port());
    let name = format!("archmerge-k8s-{n}");
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &network,
        "--read-only",
        "--user",
        &user,
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push("-v".into());
    args.push(format!("{}:{mount}:ro", dir.path().display()));
    for e in c["env"].as_array().unwrap() {
        let value = match e.get("value") {
            Some(v) => v.as_str().unwrap().to_owned(),
            None => {
                let key = e["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap();
                secret[key].as_str().unwrap().to_owned()
            }
        };
        args.push("-e".into());
        args.push(format!("{}={value}", e["name"].as_str().unwrap()));
    }
    let port_of = |name: &str| {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .clone()
    };
    args.push("-p".into());
    args.push(format!("127.0.0.1:{proxy_port}:{}", port_of("registry")));
    args.push("-p".into());
    args.push(format!("127.0.0.1:{admin_port}:{}", port_of("metrics")));
    args.push(image);
    for a in c["args"].as_array().unwrap() {
        args.push(a.as_str().unwrap().to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args);
    made.containers.push(name.clone());

    let ready = eventually(Duration::from_secs(60), || {
        get(admin_port, "/healthz").0 == 200 && get(admin_port, "/readyz").0 == 200
    });
    let logs = || {
        let out = docker_output(&["logs", &name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    assert!(
        ready,
        "the probes' endpoints never answered 200: /healthz {:?}, /readyz {:?}\n{}",
        get(admin_port, "/healthz"),
        get(admin_port, "/readyz"),
        logs()
    );
    assert_eq!(get(proxy_port, "/v2/").0, 200, "{}", logs());
    assert_eq!(
        request(admin_port, "POST", "/events", &[], "{\"events\":[]}").0,
        401
    );
    let bearer = format!("Bearer {}", secret["admin-token"].as_str().unwrap());
    let status = request(
        admin_port,
        "POST",
        "/events",
        &[("Authorization", &bearer)],
        "{\"events\":[]}",
    )
    .0;
    assert!(
        (200..300).contains(&status),
        "POST /events with the token: {status}"
    );
}
