#!/usr/bin/env bash
# Makes, in the local Docker engine, the base images that the Dockerfile and
# docker-compose.yml name, for an engine that cannot pull them (no registry
# reachable). The Dockerfile stays the one users build against Docker Hub;
# this only puts local stand-ins under the same names:
#
#   debian:bookworm-slim  Debian bookworm, `debootstrap --variant=minbase`,
#                         trimmed as the slim image is (no docs, apt lists or
#                         .debs; apt told to keep no caches, as the Docker Hub
#                         image does), `docker import`ed
#   rust:1-bookworm       the same Debian with gcc and libc6-dev (what the
#                         official image has for crates that build C), this
#                         machine's Rust toolchain (rustc, cargo) and its crate
#                         cache, with cargo set offline (CARGO_NET_OFFLINE)
#   registry:2            the same Debian with Debian's docker-registry
#                         (distribution 2.8), laid out as the official image:
#                         /etc/docker/registry/config.yml, data in
#                         /var/lib/registry, port 5000, REGISTRY_* overrides
#
# An image already present under one of these names is left alone (a real
# one pulled from Docker Hub stays what the build uses); stand-ins carry the
# label org.archmerge.stand-in=1. The debootstrapped tree is kept in
# target/docker-bases/ so the next run does not fetch it again.
#
# Needs: docker, debootstrap (installed when missing), rustc and cargo on
# PATH. Usage: scripts/docker-bases.sh [--force] (--force remakes the
# stand-ins, never a real image).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
cache=$root/target/docker-bases
force=0
[ "${1:-}" = --force ] && force=1

note() { printf '==> docker-bases: %s\n' "$*" >&2; }
die() {
    printf 'docker-bases.sh: %s\n' "$*" >&2
    exit 1
}

export PATH="$PATH:/usr/sbin:/sbin"
label=org.archmerge.stand-in
# debootstrap, and reading the tree it makes, need root.
sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi

# present NAME: the image exists and is to be kept as it is.
present() {
    local name=$1 is_stand_in
    is_stand_in=$(docker image inspect --format "{{index .Config.Labels \"$label\"}}" "$name" 2>/dev/null) ||
        return 1
    if [ "$force" = 1 ] && [ "$is_stand_in" = 1 ]; then
        return 1
    fi
    return 0
}

need_any=0
for image in debian:bookworm-slim rust:1-bookworm registry:2; do
    present "$image" || need_any=1
done
if [ "$need_any" = 0 ]; then
    note "debian:bookworm-slim, rust:1-bookworm and registry:2 are present"
    exit 0
fi

# === Debian, once ===

rootfs=$cache/bookworm
if [ ! -f "$rootfs/.complete" ]; then
    if ! command -v debootstrap >/dev/null 2>&1; then
        note "installing debootstrap"
        "${sudo[@]}" apt-get update
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y --no-install-recommends debootstrap
    fi
    "${sudo[@]}" rm -rf "$rootfs"
    mkdir -p "$cache"
    note "debootstrap --variant=minbase bookworm (about a minute)"
    "${sudo[@]}" debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian \
        >"$cache/debootstrap.log" 2>&1 || die "debootstrap failed: $(tail -n 20 "$cache/debootstrap.log")"
    # As the slim image: no .debs, apt lists, docs, man pages or locales.
    "${sudo[@]}" rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log
    "${sudo[@]}" find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
    "${sudo[@]}" touch "$rootfs/.complete"
fi

# apt as the Docker Hub debian images set it up: no package caches or
# translations kept, so an `apt-get install` layer holds only the packages.
conf=$rootfs/etc/apt/apt.conf.d
"${sudo[@]}" tee "$conf/docker-clean" >/dev/null <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' | "${sudo[@]}" tee "$conf/docker-no-languages" >/dev/null
echo 'Acquire::GzipIndexes "true";' | "${sudo[@]}" tee "$conf/docker-gzip-indexes" >/dev/null
echo 'Apt::AutoRemove::SuggestsImportant "false";' | "${sudo[@]}" tee "$conf/docker-autoremove-suggests" >/dev/null

path_env=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

if ! present debian:bookworm-slim; then
    note "docker import debian:bookworm-slim"
    "${sudo[@]}" tar -C "$rootfs" --numeric-owner --exclude=./.complete -c . |
        docker import --change "ENV PATH=$path_env" --change "LABEL $label=1" \
            --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
fi

# === rust:1-bookworm ===

if ! present rust:1-bookworm; then
    sysroot=$(rustc --print sysroot)
    [ -x "$sysroot/bin/cargo" ] || die "no cargo in $sysroot/bin"
    ctx=$(mktemp -d -t archmerge-rust-base.XXXXXX)
    trap 'rm -rf "$ctx"' EXIT
    mkdir -p "$ctx/rust" "$ctx/cargo"
    # The toolchain without its docs (share/), and the crate cache.
    cp -a --reflink=auto "$sysroot/bin" "$sysroot/lib" "$ctx/rust/"
    [ -d "$sysroot/libexec" ] && cp -a --reflink=auto "$sysroot/libexec" "$ctx/rust/"
    cargo_home=${CARGO_HOME:-$HOME/.cargo}
    if [ -d "$cargo_home/registry" ]; then
        mkdir -p "$ctx/cargo/registry"
        for d in index cache; do
            [ -d "$cargo_home/registry/$d" ] && cp -a --reflink=auto "$cargo_home/registry/$d" "$ctx/cargo/registry/"
        done
    fi
    cat >"$ctx/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev binutils ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY rust /usr/local/rust
COPY cargo /usr/local/cargo
ENV CARGO_HOME=/usr/local/cargo \
    CARGO_NET_OFFLINE=true \
    PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.archmerge.stand-in=1
EOF
    note "docker build rust:1-bookworm ($(rustc --version))"
    docker build -q -t rust:1-bookworm "$ctx" >/dev/null
    rm -rf "$ctx"
    trap - EXIT
fi

# === registry:2 ===

if ! present registry:2; then
    ctx=$(mktemp -d -t archmerge-registry-base.XXXXXX)
    trap 'rm -rf "$ctx"' EXIT
    # The official image's config.yml.
    cat >"$ctx/config.yml" <<'EOF'
version: 0.1
log:
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: /var/lib/registry
http:
  addr: :5000
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
EOF
    cat >"$ctx/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends docker-registry \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/docker-registry /usr/local/bin/registry
COPY config.yml /etc/docker/registry/config.yml
VOLUME ["/var/lib/registry"]
EXPOSE 5000
ENTRYPOINT ["registry"]
CMD ["serve", "/etc/docker/registry/config.yml"]
LABEL org.archmerge.stand-in=1
EOF
    note "docker build registry:2 (Debian's docker-registry)"
    docker build -q -t registry:2 "$ctx" >/dev/null
    rm -rf "$ctx"
    trap - EXIT
fi

note "done: $(docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' |
    grep -E '^(debian:bookworm-slim|rust:1-bookworm|registry:2) ' | tr '\n' ',' | sed 's/,$//')"
