#!/usr/bin/env bash
# Fuzzes archmerge's pure parsers and the index builder with cargo-fuzz
# (libFuzzer), each target for a bounded time.
#
#   scripts/fuzz.sh [SECONDS] [TARGET…]
#
# SECONDS  time per target (default 60)
# TARGET   route_parse, tag_rules, manifest_parse, index_build (default: all)
#
# Installs cargo-fuzz when it is missing. cargo-fuzz passes nightly-only
# flags to rustc (-Zsanitizer, coverage instrumentation); on a stable
# toolchain RUSTC_BOOTSTRAP=1 lets them through, so no nightly is needed.
#
# Seeds are kept in fuzz/corpus/<target>/ (small real inputs: paths, tags,
# a Docker list, an OCI index, a buildx index, an image config), with
# libFuzzer dictionaries in fuzz/dict/<target>.dict; both are only
# read; what libFuzzer finds on top goes to fuzz/target/corpus/<target>/, so
# later runs start from it. A crash stops that target, leaves its input in
# fuzz/artifacts/<target>/, and makes the script fail at the end (after the
# other targets ran) with the command that reproduces it.
#
# Environment:
#   FUZZ_SANITIZER  none (default; safe Rust, twice the executions) or address
#   FUZZ_JOBS       processes per target (libFuzzer -fork; default 1)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds=${1:-60}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
    targets=(route_parse tag_rules manifest_parse index_build)
fi
sanitizer=${FUZZ_SANITIZER:-none}
jobs=${FUZZ_JOBS:-1}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

echo "==> building the fuzz targets (sanitizer: $sanitizer)" >&2
cargo fuzz build --sanitizer "$sanitizer" --debug-assertions

failed=()
summary=()
for t in "${targets[@]}"; do
    work="target/corpus/$t"
    mkdir -p "$work" "artifacts/$t"
    log="target/fuzz-$t.log"
    echo "==> $t for ${seconds}s" >&2
    extra=()
    if [ -f "dict/$t.dict" ]; then extra+=(-dict="dict/$t.dict"); fi
    if [ "$jobs" -gt 1 ]; then extra+=(-fork="$jobs"); fi
    status=0
    cargo fuzz run --sanitizer "$sanitizer" --debug-assertions "$t" "$work" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        "${extra[@]}" >"$log" 2>&1 || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}')
    units=$(find "$work" -type f | wc -l)
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        crash=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -1 | sed 's/Test unit written to //')
        summary+=("$t: FAILED after $execs executions; input: ${crash:-?}")
        grep -m1 -A8 -E "panicked at|ERROR: libFuzzer" "$log" >&2 || tail -20 "$log" >&2
        echo "reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer --debug-assertions $t ${crash:-<input>})" >&2
    else
        summary+=("$t: ok, $execs executions, corpus $units inputs")
    fi
done

printf '\n==> fuzz summary (%ss per target)\n' "$seconds"
printf '  %s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "crashes in: ${failed[*]} (logs in fuzz/target/fuzz-<target>.log)" >&2
    exit 1
fi
