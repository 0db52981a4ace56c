#!/usr/bin/env bash
# Instructions one sidecar executes per proxied request, counted by `valgrind --tool=callgrind`
# (repeatable where timings are not: this machine's CPU share, other load and frequency do not
# move it), and the functions that take them.
#
# How: a benchmark pair (`bench-run --serve meshid`: load -> outbound sidecar -> mTLS, h2 ->
# inbound sidecar -> app), one sidecar restarted with its own command line under callgrind, a
# warm-up (connections, pools), counters zeroed, then `meshload` over ONE keep-alive connection
# for 5 s (one request at a time, so no batching of requests into one wake-up changes the count),
# and a dump. Expect a few percent between runs (timers and housekeeping that fall in the window).
#
# The same for nginx's half of the nginx pair (`nginx` as the third argument): its process is
# restarted under callgrind as one process (`master_process off`), with its own configuration.
#
# With CONNECTIONS=N (default 1) the load runs over N connections at once instead: the outbound
# then sends requests between the sidecars over h2 (one connection alone takes its HTTP/1.1 pool),
# and requests batch into wake-ups as under load. Repeatable to a percent or so, not exactly.
#
# Usage: [CONNECTIONS=N] scripts/request-instructions.sh [inbound|outbound] [BIN_DIR] [meshid|nginx]
#   (default: inbound, target/dist, meshid)
#   BIN_DIR holds meshid-sidecar, meshid-ca and the meshid-bench binaries (scripts/dist-build.sh
#   -p meshid-sidecar, then -p meshid-ca, then -p meshid-bench, as bench/run.sh builds them). Prints the count per request and the top 25 functions by
#   their own instructions, then the instructions per request by crate; the callgrind file is
#   kept (its path is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
role=${1:-inbound}
bin=${2:-target/dist}
pair=${3:-meshid}
connections=${CONNECTIONS:-1}
case $role in inbound | outbound) ;; *) echo "role: inbound or outbound" >&2; exit 64 ;; esac
case $pair in meshid | nginx) ;; *) echo "pair: meshid or nginx" >&2; exit 64 ;; esac
for b in meshid-sidecar meshid-ca bench-run ca-bench meshload bench-app; do
    [ -x "$bin/$b" ] || { echo "$bin/$b is missing (build it first)" >&2; exit 66; }
done
command -v callgrind_control >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 69; }

. scripts/bench-pair.sh
start_bench_pair "$bin" "$pair"
pid=$(sed -n "s/^$role: pids \[\([0-9]*\).*\]$/\1/p" "$work/serve.log")
if [ "$pair" = meshid ]; then
    tr '\0' '\n' <"/proc/$pid/cmdline" >"$work/cmd"
    admin=$(grep -A1 -x -- '--admin-listen' "$work/cmd" | tail -1)
    kill "$pid"
    while curl -s -o /dev/null "http://$admin/readyz"; do sleep 0.1; done
    mapfile -t cmd <"$work/cmd"
    ready() { curl -sf "http://$admin/readyz" >/dev/null; }
else
    # nginx rewrites its command line: "nginx: master process nginx -p DIR -e LOG -c CONF".
    read -r -a cmd <<<"$(tr '\0' ' ' <"/proc/$pid/cmdline" | sed 's/^nginx: master process //')"
    cmd+=(-g 'master_process off;')
    port=$(grep -o 'listen [0-9.]*:[0-9]*' "$(printf '%s\n' "${cmd[@]}" | grep '\.conf$')" | head -1 | cut -d: -f2)
    ready() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }
    kill "$pid"
    while ready; do sleep 0.1; done
fi
TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$work/cg" "${cmd[@]}" \
    >"$work/valgrind.log" 2>&1 &
vg=$!
pids+=($vg)
for _ in $(seq 240); do
    ready && break
    sleep 0.5
done
"$bin/meshload" --target "$entry" --connections 4 --duration 3s >/dev/null 2>&1
callgrind_control -z "$vg" >/dev/null 2>&1
# No warm-up of its own (the run above was it): every request it counts falls between -z and -d.
"$bin/meshload" --target "$entry" --connections "$connections" --warmup 0s --duration 5s --json >"$work/load.json" 2>&1
callgrind_control -d "$vg" >/dev/null 2>&1
for _ in $(seq 50); do [ -s "$work/cg.1" ] && break; sleep 0.1; done
requests=$(grep -o '"count":[0-9]*' "$work/load.json" | head -1 | cut -d: -f2)
instructions=$(sed -n 's/^summary: *//p; s/^totals: *//p' "$work/cg.1" | tail -1)
out="${TMPDIR:-/tmp}/request-instructions-$role.callgrind"
cp "$work/cg.1" "$out"
echo "$role $pair: $requests requests, $instructions instructions, $((instructions / requests)) per request"
echo "callgrind file: $out (callgrind_annotate --inclusive=no $out)"
callgrind_annotate --threshold=100 --inclusive=no --auto=no "$out" 2>/dev/null |
    grep -E '^ *[0-9,]+ \(' | grep -v 'PROGRAM TOTALS\|ld-linux\|below main\|libc_start\|__rust_begin_short_backtrace\|:main \[' \
        >"$work/functions"
head -25 "$work/functions" | cut -c1-160
# The same instructions by crate (the Rust path a function's name starts with), by malloc, mem*
# and aws-lc (by source file), else by object file (nginx, libssl, libcrypto): per request.
echo "by crate, instructions per request:"
awk -v requests="$requests" '
{
    n = $1; gsub(",", "", n)
    rest = $0; sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "", rest)
    file = rest; sub(/:.*/, "", file)
    name = rest; sub(/^[^:]*:/, "", name)
    if (file ~ /malloc/) key = "malloc"
    else if (file ~ /mem(move|cpy|set|cmp)/) key = "mem*"
    else if (file ~ /aws-lc/) key = "aws-lc"
    else if (match(name, /^[<&]*(dyn )?[a-z_0-9]+::/)) {
        key = substr(name, RSTART, RLENGTH); gsub(/[<&]|dyn |::/, "", key)
    } else if (match(rest, /\[[^]]*\]$/)) {
        key = substr(rest, RSTART + 1, RLENGTH - 2); sub(/.*\//, "", key)
    } else key = "other"
    sum[key] += n; total += n
}
END { for (k in sum) printf "%8.0f %5.1f%%  %s\n", sum[k] / requests, 100 * sum[k] / total, k }
' "$work/functions" | sort -rn | head -15
