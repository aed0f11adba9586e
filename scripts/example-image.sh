#!/usr/bin/env bash
# Writes a tiny OCI image layout for one platform, so skopeo has something to
# push without any network: one layer holding /hello.txt.
#
#   scripts/example-image.sh DIR TAG OS/ARCH[/VARIANT] [TEXT]
#   scripts/example-image.sh .run/images/aarch64 v1.2 linux/arm64/v8
#   skopeo copy --dest-tls-verify=false oci:.run/images/aarch64:v1.2 \
#       docker://127.0.0.1:5080/myapp:aarch64_v1.2
#
# The same arguments always give the same digests (fixed mtimes, owners and
# gzip header).
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n '2,9p' "$0" >&2
    exit 64
fi
dir=$1
tag=$2
platform=$3
text=${4:-"hello from $platform"}
IFS=/ read -r os arch variant <<<"$platform"
if [ -z "${os:-}" ] || [ -z "${arch:-}" ]; then
    echo "example-image.sh: platform must be OS/ARCH[/VARIANT], got $platform" >&2
    exit 64
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dir/blobs/sha256" "$work/root"
printf '%s\n' "$text" >"$work/root/hello.txt"
touch -d @0 "$work/root/hello.txt"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -C "$work/root" -cf "$work/layer.tar" hello.txt
gzip -n -9 -c "$work/layer.tar" >"$work/layer.tar.gz"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
# Stores a file as a blob and prints its hex digest.
put() {
    local h
    h=$(sha "$1")
    cp "$1" "$dir/blobs/sha256/$h"
    echo "$h"
}

diff_id=$(sha "$work/layer.tar")
layer=$(put "$work/layer.tar.gz")
layer_size=$(size "$work/layer.tar.gz")

variant_field=""
if [ -n "${variant:-}" ]; then variant_field=",\"variant\":\"$variant\""; fi
printf '{"architecture":"%s","os":"%s"%s,"config":{"Cmd":["/hello.txt"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$arch" "$os" "$variant_field" "$diff_id" >"$work/config.json"
config=$(put "$work/config.json")
config_size=$(size "$work/config.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
manifest=$(put "$work/manifest.json")
manifest_size=$(size "$work/manifest.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$manifest_size" "$tag" >"$dir/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
echo "sha256:$manifest"
