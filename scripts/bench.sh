#!/usr/bin/env bash
# The proxy benchmark, in one command: the same work sent straight to the
# registry (the limit) and through four proxies in front of the same
# registry — nginx (buffered, tuned), HAProxy (HTTP mode, kernel splicing),
# socat (a plain TCP relay) and archmerge — side by side and interleaved in
# one run, printed as one table per phase with ratios to direct and each
# proxy's CPU per unit of work.
#
#   1. installs Debian's docker-registry, nginx, haproxy and socat when
#      missing,
#   2. builds archmerge (the `profiling` profile of Cargo.toml: the release
#      build with symbols and line tables, so perf can name functions) and
#      the load generator (benches/bench/),
#   3. starts, on free loopback ports and with everything in one temp dir:
#      the registry (its own config); in front of it nginx (bench/nginx.conf)
#      and HAProxy (bench/haproxy.cfg), both run as the current user with
#      their own config, never the system config or service; socat; archmerge;
#      and a second archmerge in serve mode (for the index GET phase),
#   4. runs the load generator against all of them (see benches/bench/main.rs
#      for what it measures and the BENCH_* knobs; BENCH_QUICK=1 is a smoke
#      run of about a minute),
#   5. for the instructions phase (`instr`), starts two more archmerge
#      instances, write and serve mode, under callgrind (Debian's valgrind),
#      which count the user-space instructions of a fixed number of GETs,
#   6. with BENCH_PROFILE=1, samples archmerge with `perf record` (Debian's
#      linux-perf) during the run and writes the report to
#      target/bench/profile.txt (pair it with BENCH_ONLY=get, blobs, …),
#   7. stops everything (also on Ctrl-C or failure) and removes the temp dir
#      (BENCH_KEEP=1 keeps it, with every log).
#
# The table is also written to target/bench/last-run.txt. A full run takes
# about 10 minutes on a 2-core machine (first build not counted). Numbers
# from a shared machine are noisy: read the ratios, which are measured
# interleaved in one run, not the absolute figures.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

note() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'bench.sh: %s\n' "$*" >&2
    exit 1
}

# === what the benchmark needs ===

export PATH="$PATH:/usr/sbin:/sbin"
need=()
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v socat >/dev/null 2>&1 || need+=(socat)
# phase_on NAME: whether the run includes that phase (BENCH_ONLY, as the
# load generator reads it).
phase_on() {
    [ -z "${BENCH_ONLY:-}" ] || [[ ",${BENCH_ONLY// /}," == *",$1,"* ]]
}
if phase_on instr; then
    command -v callgrind_control >/dev/null 2>&1 || need+=(valgrind)
fi
if ((${#need[@]})); then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
    note "installing ${need[*]} (Debian packages)"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${need[@]}"
fi

if [ -n "${BENCH_ARCHMERGE_BIN:-}" ]; then
    # Another build of archmerge (say, one to compare with this one).
    archmerge_bin=$(realpath "$BENCH_ARCHMERGE_BIN")
    [ -x "$archmerge_bin" ] || die "BENCH_ARCHMERGE_BIN=$BENCH_ARCHMERGE_BIN is not an executable"
    note "archmerge: $archmerge_bin (BENCH_ARCHMERGE_BIN)"
else
    note "cargo build --profile profiling (archmerge: release, with symbols)"
    cargo build --profile profiling --bin archmerge
    archmerge_bin=$root/target/profiling/archmerge
fi

note "cargo bench --no-run (the load generator)"
# The bench target's own artifact (cargo also builds the archmerge binary
# for it, and may report that one last).
bench_bin=$(cargo bench --bench bench --no-run --message-format=json |
    grep '"kind":\["bench"\]' | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4)
[ -x "$bench_bin" ] || die "could not find the bench executable (got '$bench_bin')"

# === one temp dir, and a trap that stops everything ===

tmp=$(mktemp -d -t archmerge-bench.XXXXXX)
pids=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        # Bounded: a process that ignores TERM for 10 s gets KILL.
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        note "kept $tmp (logs, configs, registry data)"
    else
        rm -rf "$tmp"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A loopback port nothing answers on and not handed out before (bounded
# tries), in $REPLY. Below the kernel's ephemeral range, so no outgoing
# connection holds it when the server binds.
taken_ports=" "
ephemeral_low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
free_port() {
    local p
    for _ in $(seq 50); do
        p=$((10000 + RANDOM % (ephemeral_low - 10000)))
        if [[ $taken_ports != *" $p "* ]] && ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            taken_ports+="$p "
            REPLY=$p
            return 0
        fi
    done
    die "no free loopback port found"
}

# GET /v2/ over bash's /dev/tcp: true on a 200.
v2_ok() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf 'GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:%s\r\n\r\n' "$1" >&3
        IFS= read -r -t 2 line <&3 || exit 1
        [[ $line == HTTP/1.?" 200"* ]]
    ) 2>/dev/null
}

# Waits (at most 30 s: under callgrind archmerge takes seconds to start)
# for GET /v2/ on a port; fails with the log.
wait_ready() {
    local name=$1 port=$2 pid=$3 log=$4
    for _ in $(seq 300); do
        v2_ok "$port" && return 0
        kill -0 "$pid" 2>/dev/null || die "$name exited:
$(tail -n 20 "$log")"
        sleep 0.1
    done
    die "$name does not answer on 127.0.0.1:$port:
$(tail -n 20 "$log")"
}

free_port; registry_port=$REPLY
free_port; nginx_port=$REPLY
free_port; haproxy_port=$REPLY
free_port; socat_port=$REPLY
free_port; archmerge_port=$REPLY
free_port; admin_port=$REPLY
free_port; serve_port=$REPLY
free_port; serve_admin_port=$REPLY
free_port; counted_port=$REPLY
free_port; counted_admin_port=$REPLY
free_port; counted_serve_port=$REPLY
free_port; counted_serve_admin_port=$REPLY

# distribution reads REGISTRY_* and archmerge ARCHMERGE_* variables as
# overrides; this run uses only its own settings.
while read -r v; do unset "$v"; done < <(compgen -e | grep -E '^(REGISTRY|ARCHMERGE)_' || true)

# === the registry ===
# The limit: filesystem storage, the in-memory blob descriptor cache of the
# stock config, and logging at warn without an access log (the cheapest
# registry, so the figures through a proxy are compared with the best case).

mkdir -p "$tmp/registry/data"
cat >"$tmp/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $tmp/registry/data
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$registry_port
  secret: archmerge-bench
EOF
note "starting docker-registry on 127.0.0.1:$registry_port"
docker-registry serve "$tmp/registry/config.yml" >"$tmp/registry/log" 2>&1 &
registry_pid=$!
pids+=("$registry_pid")
wait_ready docker-registry "$registry_port" "$registry_pid" "$tmp/registry/log"

# === nginx ===

mkdir -p "$tmp/nginx"
user_line=
if [ "$(id -u)" -eq 0 ]; then
    # Workers keep the current user (root here) instead of nginx's `nobody`,
    # so they can use the temp dir.
    user_line="user $(id -un) $(id -gn);"
fi
sed -e "s|@PREFIX@|$tmp/nginx|g" \
    -e "s|@LISTEN@|$nginx_port|g" \
    -e "s|@UPSTREAM@|127.0.0.1:$registry_port|g" \
    -e "s|@USER@|$user_line|g" \
    bench/nginx.conf >"$tmp/nginx/nginx.conf"
nginx -t -q -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -e "$tmp/nginx/error.log" ||
    die "nginx rejected its config: $(cat "$tmp/nginx/error.log" 2>/dev/null)"
note "starting nginx $(nginx -v 2>&1 | sed 's/.*\///') on 127.0.0.1:$nginx_port"
nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -e "$tmp/nginx/error.log" \
    >"$tmp/nginx/stdout" 2>&1 &
nginx_pid=$!
pids+=("$nginx_pid")
wait_ready nginx "$nginx_port" "$nginx_pid" "$tmp/nginx/error.log"

# === HAProxy ===
# In the foreground (-db: no daemon, no master process), so its pid is the
# one process to measure; its request log goes to stdout, into a file.

mkdir -p "$tmp/haproxy"
sed -e "s|@LISTEN@|$haproxy_port|g" \
    -e "s|@UPSTREAM@|127.0.0.1:$registry_port|g" \
    bench/haproxy.cfg >"$tmp/haproxy/haproxy.cfg"
haproxy -c -q -f "$tmp/haproxy/haproxy.cfg" >"$tmp/haproxy/check.log" 2>&1 ||
    die "haproxy rejected its config: $(cat "$tmp/haproxy/check.log")"
haproxy_version=$(haproxy -v | awk 'NR == 1 {print $3}')
note "starting haproxy $haproxy_version on 127.0.0.1:$haproxy_port"
haproxy -db -f "$tmp/haproxy/haproxy.cfg" >"$tmp/haproxy/log" 2>&1 &
haproxy_pid=$!
pids+=("$haproxy_pid")
wait_ready haproxy "$haproxy_port" "$haproxy_pid" "$tmp/haproxy/log"

# === socat ===
# A plain TCP relay: one forked child per connection, 1 MiB blocks.

note "starting socat on 127.0.0.1:$socat_port"
socat -b 1048576 "TCP-LISTEN:$socat_port,bind=127.0.0.1,reuseaddr,fork" \
    "TCP:127.0.0.1:$registry_port" >"$tmp/socat.log" 2>&1 &
socat_pid=$!
pids+=("$socat_pid")
wait_ready socat "$socat_port" "$socat_pid" "$tmp/socat.log"

# === archmerge ===
# As it is deployed: default settings, the access log at info.

# start_archmerge NAME PORT ADMIN_PORT LOG [FLAG…]: starts one archmerge in
# front of the registry and waits until it answers; its pid in $REPLY.
start_archmerge() {
    local name=$1 port=$2 admin=$3 log=$4
    shift 4
    note "starting $name on 127.0.0.1:$port"
    "${run_under[@]}" "$archmerge_bin" serve "$@" \
        --listen "127.0.0.1:$port" \
        --upstream "http://127.0.0.1:$registry_port" \
        --admin-listen "127.0.0.1:$admin" \
        >"$log" 2>&1 &
    REPLY=$!
    pids+=("$REPLY")
    wait_ready "$name" "$port" "$REPLY" "$log"
}

run_under=()
start_archmerge archmerge "$archmerge_port" "$admin_port" "$tmp/archmerge.log"
archmerge_pid=$REPLY
# A second archmerge in serve mode, for the index GET phase only.
start_archmerge "archmerge --mode serve" "$serve_port" "$serve_admin_port" \
    "$tmp/archmerge-serve.log" --mode serve
serve_pid=$REPLY

# Two more under callgrind for the instructions phase: they count nothing
# until the load generator turns instrumentation on (`--instr-atstart=no`);
# `--trace-children` follows a BENCH_ARCHMERGE_BIN wrapper's `exec`.
counted_args=()
if phase_on instr; then
    run_under=(valgrind --tool=callgrind --instr-atstart=no --trace-children=yes
        "--callgrind-out-file=$tmp/callgrind-write.out")
    start_archmerge "archmerge under callgrind" "$counted_port" "$counted_admin_port" \
        "$tmp/archmerge-callgrind.log"
    counted_args+=(--counted "127.0.0.1:$counted_port" --counted-pid "$REPLY"
        --counted-out "$tmp/callgrind-write.out")
    run_under=(valgrind --tool=callgrind --instr-atstart=no --trace-children=yes
        "--callgrind-out-file=$tmp/callgrind-serve.out")
    start_archmerge "archmerge --mode serve under callgrind" "$counted_serve_port" \
        "$counted_serve_admin_port" "$tmp/archmerge-serve-callgrind.log" --mode serve
    counted_args+=(--counted-serve "127.0.0.1:$counted_serve_port"
        --counted-serve-pid "$REPLY" --counted-serve-out "$tmp/callgrind-serve.out")
    run_under=()
fi

# === the run ===

perf_pid=
if [ "${BENCH_PROFILE:-0}" = 1 ]; then
    command -v perf >/dev/null 2>&1 || die "BENCH_PROFILE=1 needs perf (apt-get install linux-perf)"
    note "sampling archmerge with perf (cpu-clock, DWARF call graphs)"
    perf record -q -e cpu-clock -F "${BENCH_PROFILE_HZ:-299}" --call-graph dwarf,8192 \
        -p "$archmerge_pid" -o "$tmp/perf.data" 2>"$tmp/perf.log" &
    perf_pid=$!
    pids+=("$perf_pid")
    sleep 1
fi

note "load before the run: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
mkdir -p target/bench
"$bench_bin" \
    --direct "127.0.0.1:$registry_port" \
    --nginx "127.0.0.1:$nginx_port" \
    --haproxy "127.0.0.1:$haproxy_port" \
    --socat "127.0.0.1:$socat_port" \
    --archmerge "127.0.0.1:$archmerge_port" \
    --archmerge-admin "127.0.0.1:$admin_port" \
    --registry-pid "$registry_pid" \
    --nginx-pid "$nginx_pid" \
    --haproxy-pid "$haproxy_pid" \
    --socat-pid "$socat_pid" \
    --archmerge-pid "$archmerge_pid" \
    --serve "127.0.0.1:$serve_port" \
    --serve-pid "$serve_pid" \
    --archmerge-bin "$archmerge_bin" \
    --registry-data "$tmp/registry/data" \
    "${counted_args[@]}" | tee target/bench/last-run.txt
note "load after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    note "writing target/bench/profile.txt"
    perf report -i "$tmp/perf.data" --stdio --no-children --sort dso,symbol \
        --percent-limit 0.3 -g none >target/bench/profile.txt 2>/dev/null || true
    perf report -i "$tmp/perf.data" --stdio --children --sort symbol \
        --percent-limit 2 -g caller,0.5,callee,function,percent --max-stack 40 \
        >target/bench/profile-callers.txt 2>/dev/null || true
fi
{
    echo
    echo "nginx $(nginx -v 2>&1 | sed 's/.*\///'), haproxy $haproxy_version, $(socat -V | awk '/socat version/ {print "socat " $3}'), distribution $(docker-registry --version | awk '{print $NF}'), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
} | tee -a target/bench/last-run.txt
