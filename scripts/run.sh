#!/usr/bin/env bash
# Runs archmerge on this machine in front of a local registry:
#
#   1. installs Debian's docker-registry if it is missing,
#   2. starts it on 127.0.0.1:$REGISTRY_PORT with its config and data under
#      .run/ (never /etc, never /var/lib),
#   3. builds archmerge (release) and two example images under .run/images,
#   4. prints the commands to try, and runs archmerge in the foreground on
#      127.0.0.1:$ARCHMERGE_PORT. Ctrl-C stops both.
#
# Environment: REGISTRY_PORT (5000), ARCHMERGE_PORT (5080),
# ARCHMERGE_ADMIN_PORT (5081), RUST_LOG (info).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

registry_port=${REGISTRY_PORT:-5000}
proxy_port=${ARCHMERGE_PORT:-5080}
admin_port=${ARCHMERGE_ADMIN_PORT:-5081}
# distribution reads REGISTRY_* variables as config overrides; keep ours out.
unset REGISTRY_PORT

die() {
    echo "run.sh: $*" >&2
    exit 1
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$registry_port" "$proxy_port" "$admin_port"; do
    if port_taken "$p"; then
        die "127.0.0.1:$p is already taken (an earlier run still going?). Stop it, or choose
other ports: REGISTRY_PORT=5001 ARCHMERGE_PORT=5090 ARCHMERGE_ADMIN_PORT=5091 scripts/run.sh"
    fi
done

if ! command -v docker-registry >/dev/null 2>&1; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
    echo "==> installing docker-registry (Debian package)" >&2
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends docker-registry
fi

# === the registry ===

mkdir -p .run/registry-data
cat >.run/registry.yml <<EOF
# Written by scripts/run.sh; rewritten on every run.
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $root/.run/registry-data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$registry_port
  secret: archmerge-run-sh
EOF

echo "==> starting docker-registry on 127.0.0.1:$registry_port (log: .run/registry.log)" >&2
docker-registry serve .run/registry.yml >.run/registry.log 2>&1 &
registry_pid=$!
cleanup() {
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
}
trap cleanup EXIT

# GET /v2/ over bash's /dev/tcp (no curl needed): true on a 200.
v2_ok() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf 'GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
        IFS= read -r -t 2 line <&3 || exit 1
        [[ $line == HTTP/1.?" 200"* ]]
    ) 2>/dev/null
}
for _ in $(seq 100); do
    v2_ok "$registry_port" && break
    kill -0 "$registry_pid" 2>/dev/null || die "docker-registry exited:
$(cat .run/registry.log)"
    sleep 0.1
done
v2_ok "$registry_port" || die "docker-registry does not answer on 127.0.0.1:$registry_port:
$(cat .run/registry.log)"

# === archmerge and example images ===

echo "==> cargo build --release" >&2
cargo build --release

rm -rf .run/images
bash scripts/example-image.sh .run/images/x86_64 v1.2 linux/amd64 "hello from x86_64" >/dev/null
bash scripts/example-image.sh .run/images/aarch64 v1.2 linux/arm64/v8 "hello from aarch64" >/dev/null

a=127.0.0.1:$proxy_port
cat <<EOF

archmerge is starting on http://$a in front of the registry at http://127.0.0.1:$registry_port.
In another terminal, from $root:

  # push two arch tags (example images made in .run/images)
  skopeo copy --dest-tls-verify=false oci:.run/images/x86_64:v1.2  docker://$a/myapp:x86_64_v1.2
  skopeo copy --dest-tls-verify=false oci:.run/images/aarch64:v1.2 docker://$a/myapp:aarch64_v1.2

  # the multi-arch index archmerge keeps at myapp:v1.2
  docker manifest inspect --insecure $a/myapp:v1.2
  skopeo inspect --tls-verify=false --raw docker://$a/myapp:v1.2
  skopeo inspect --tls-verify=false docker://$a/myapp:v1.2
  skopeo --override-arch arm64 inspect --tls-verify=false docker://$a/myapp:v1.2

  # with a Docker engine: build and push per arch, pull by platform
  printf 'FROM scratch\\nCOPY hello.txt /\\n' > Dockerfile.demo; echo hi > hello.txt
  docker build --platform linux/arm64 -f Dockerfile.demo -t $a/myapp:aarch64_v1.2 .
  docker push $a/myapp:aarch64_v1.2
  docker pull --platform linux/arm64 $a/myapp:v1.2

Health: http://127.0.0.1:$admin_port/healthz  Ctrl-C stops archmerge and the registry.

EOF

export RUST_LOG=${RUST_LOG:-info}
target/release/archmerge serve \
    --listen "$a" \
    --upstream "http://127.0.0.1:$registry_port" \
    --admin-listen "127.0.0.1:$admin_port"
