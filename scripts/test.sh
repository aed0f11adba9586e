#!/usr/bin/env bash
# Runs every test of archmerge: formatting, lints, unit tests, and the
# integration suites against a real registry (tests/proxy.rs, …), the
# Kubernetes manifests validated offline (tests/deploy.rs) and, when a Docker
# engine answers, the docker engine suite: tests/docker_engine.rs and the
# image and compose stack of tests/deploy.rs (`docker_engine_*`).
#
# Installs what the tests need when it is missing (Debian packages):
#   docker-registry  the CNCF distribution registry the tests start
#   skopeo           the image client the tests push and pull with
#   docker.io        only for its `docker` CLI (`docker manifest inspect`)
#   buildah, podman  the manifest-list clients (`buildah manifest push --all`)
#   binutils         readelf, to check the image's binary is stripped
#   docker-compose   the Compose tool, when neither `docker compose` nor
#                    `docker-compose` works
#   debootstrap      makes the local base images the Dockerfile names when
#                    the engine has none (scripts/docker-bases.sh)
#   util-linux       `prlimit`, to start archmerge under an open-file limit
#   python3-pip      when python3 has no pip, to install the PyPI packages below
# and two PyPI packages, each when its import fails:
#   oras                 oras-py, the artifact client (tests/support/clients.rs)
#   kubernetes-validate  the Kubernetes schemas, offline (tests/deploy.rs)
#
# Environment:
#   ARCHMERGE_ALLOW_NO_DOCKER=1  pass even when no Docker engine answers (the
#                                engine suite is then reported as NOT RUN).
#
# .ci/run calls exactly this script.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$SECONDS
note() { printf '\n==> %s\n' "$*" >&2; }

# === what the tests need ===

need=()
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v docker >/dev/null 2>&1 || need+=(docker.io)
command -v sha256sum >/dev/null 2>&1 || need+=(coreutils)
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v readelf >/dev/null 2>&1 || need+=(binutils)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    need+=(docker-compose)
fi
PATH="$PATH:/usr/sbin:/sbin" command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if ! command -v python3 >/dev/null 2>&1; then
    need+=(python3 python3-pip)
elif { ! python3 -c 'import oras' >/dev/null 2>&1 || ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; } &&
    ! python3 -m pip --version >/dev/null 2>&1; then
    need+=(python3-pip)
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
if ((${#need[@]})); then
    note "installing ${need[*]}"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${need[@]}"
fi
for pkg in oras:oras kubernetes-validate:kubernetes_validate; do
    if ! python3 -c "import ${pkg#*:}" >/dev/null 2>&1; then
        note "installing ${pkg%%:*} (PyPI)"
        # A Debian python3 refuses to install into its own environment
        # (PEP 668) unless told to.
        python3 -m pip install --quiet "${pkg%%:*}" ||
            python3 -m pip install --quiet --break-system-packages "${pkg%%:*}"
    fi
done

# === the docker engine suite: run it, or say loudly that it did not run ===

docker_banner() {
    cat >&2 <<'EOF'

##############################################################################
#  NOT RUN: docker engine suite — no Docker engine answered
#    tests/docker_engine.rs  docker build/push/pull --platform through archmerge
#    tests/deploy.rs         the image from the Dockerfile, the compose stack
##############################################################################

EOF
}

# Every `test result:` line of this run, summed up at the end.
log=$(mktemp -t archmerge-test.XXXXXX)

docker_ok=0
skip=()
if timeout 30 docker info >/dev/null 2>&1; then
    docker_ok=1
else
    # The engine tests (tests/docker_engine.rs, and those of tests/deploy.rs)
    # are all named docker_engine_*: leave them out, so the counts say
    # "filtered out" instead of a pass that never ran.
    skip=(-- --skip docker_engine_)
    docker_banner
fi

finish() {
    local status=$?
    if [ -s "$log" ]; then
        awk '/^test result:/ {
                 for (i = 1; i <= NF; i++) {
                     if ($(i) ~ /^passed/) p += $(i - 1)
                     if ($(i) ~ /^failed/) f += $(i - 1)
                     if ($(i) ~ /^ignored/) s += $(i - 1)
                     if ($(i) == "filtered") s += $(i - 1)
                 }
             }
             END { printf "\nall tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
    fi
    rm -f "$log"
    if [ "$docker_ok" -ne 1 ]; then
        docker_banner
        if [ "${ARCHMERGE_ALLOW_NO_DOCKER:-0}" != 1 ] && [ "$status" -eq 0 ]; then
            echo "failing: set ARCHMERGE_ALLOW_NO_DOCKER=1 to accept a run without the engine suite" >&2
            status=1
        fi
    fi
    printf '\n==> scripts/test.sh finished in %ss with status %s\n' "$((SECONDS - started))" "$status" >&2
    exit "$status"
}
trap finish EXIT

# === checks and tests ===

note "cargo fmt --check"
cargo fmt --all -- --check

note "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

note "cargo test --doc"
cargo test --doc 2>&1 | tee -a "$log"

note "cargo test --lib --bins --tests (unit + integration; the benchmark is scripts/bench.sh)"
cargo test --lib --bins --tests --no-fail-fast "${skip[@]}" 2>&1 | tee -a "$log"
