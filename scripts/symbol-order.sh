#!/usr/bin/env bash
# Records which of the shipped sidecar's functions run at start-up and on the request path, and
# writes them to sidecar/symbol-order.txt, the order in which `sidecar/build.rs` asks the linker to
# lay them out (first the start-up functions, then those of the request path): the code an idle
# sidecar touches then sits in a few contiguous pages instead of being spread across its `.text`.
#
# How: the `dist` build of the sidecar (the Dockerfile's command), a benchmark pair
# (`bench-run --serve meshid`: outbound sidecar -> mTLS, h2 -> inbound sidecar -> app), both sidecars
# restarted with their own command lines under `valgrind --tool=callgrind`, which names every
# function that ran: once the sidecar is ready, then after HTTP/1.1 and h2 traffic through the pair
# and straight to the inbound's mTLS port. Then a rebuild with the new list, and how much of it the
# binary has.
#
# Rerun it after a toolchain or dependency update, or a large change of the sidecar: the names carry
# hashes of the crates' versions and features, and names the linker no longer finds leave their
# functions where they were (nothing breaks; the idle memory grows back). bench/run.sh reports the
# idle RSS it gives ("memory" scenario).
#
# Usage: scripts/symbol-order.sh      (about 15 minutes on 2 cores, most of it the two dist builds)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1 || ! command -v callgrind_control >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi

cargo build --profile dist --locked -q -p meshid-sidecar
cargo build --profile dist --locked -q -p meshid-bench
bin=target/dist

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$bin/bench-run" --serve meshid --bin-dir "$bin" >"$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
    grep -q "running until interrupted" "$work/serve.log" && break
    sleep 0.5
done
grep -q "running until interrupted" "$work/serve.log" || {
    cat "$work/serve.log" >&2
    exit 1
}
entry=$(sed -n 's/^meshid: plaintext entry //p' "$work/serve.log")
read -r -a tls <<<"$(sed -n 's/^terminator (mTLS) \([^:]*:[0-9]*\): \(.*\)$/--target \1 \2/p' "$work/serve.log")"

# An admin address from a command line (one argument per line).
admin_of() { grep -A1 -x -- '--admin-listen' "$1" | tail -1; }
ready() { # ADMIN_ADDR: wait for /readyz (as a kubelet probes it: one connection per probe)
    for _ in $(seq 240); do
        curl -sf -H 'connection: close' "http://$1/readyz" >/dev/null && return 0
        sleep 0.5
    done
    echo "symbol-order: sidecar at $1 never became ready" >&2
    exit 1
}

roles=(inbound outbound)
declare -A vg
for role in "${roles[@]}"; do
    pid=$(sed -n "s/^$role: pids \[\([0-9]*\)\]$/\1/p" "$work/serve.log")
    tr '\0' '\n' <"/proc/$pid/cmdline" >"$work/$role.cmd"
    workers=$(tr '\0' '\n' <"/proc/$pid/environ" | sed -n 's/^TOKIO_WORKER_THREADS=//p')
    kill "$pid"
    while curl -s -o /dev/null "http://$(admin_of "$work/$role.cmd")/readyz"; do sleep 0.1; done
    mapfile -t cmd <"$work/$role.cmd"
    TOKIO_WORKER_THREADS="${workers:-1}" valgrind --tool=callgrind --demangle=no --dump-instr=no \
        --dump-line=no --compress-strings=no --callgrind-out-file="$work/$role.cg" \
        "${cmd[@]}" >"$work/$role.log" 2>&1 &
    vg[$role]=$!
    pids+=($!)
done
for role in "${roles[@]}"; do ready "$(admin_of "$work/$role.cmd")"; done
# A policy file replaced, as a ConfigMap update does (the reload path runs in every pod sooner or
# later, and right after start when the file was written just before).
policy=$(grep -A1 -x -- '--policy' "$work/inbound.cmd" | tail -1)
cp "$policy" "$policy.new"
mv "$policy.new" "$policy"
sleep 2
for role in "${roles[@]}"; do ready "$(admin_of "$work/$role.cmd")"; done
# The start-up part: everything that ran until the sidecar was ready and idle.
for role in "${roles[@]}"; do callgrind_control -d "${vg[$role]}" >/dev/null; done
sleep 1

load="$bin/meshload"
"$load" --target "$entry" --connections 4 --duration 3s >"$work/load1.log" 2>&1
"$load" "${tls[@]}" --connections 4 --duration 3s >"$work/load2.log" 2>&1
"$load" "${tls[@]}" --h2 --connections 4 --duration 3s >"$work/load3.log" 2>&1
for role in "${roles[@]}"; do
    admin=$(admin_of "$work/$role.cmd")
    curl -sf "http://$admin/metrics" >/dev/null
    curl -sf "http://$admin/readyz" >/dev/null
done
for role in "${roles[@]}"; do
    kill -TERM "${vg[$role]}"
    wait "${vg[$role]}" || true
done

nm --defined-only "$bin/meshid-sidecar" | awk '{print $3}' >"$work/symbols"
python3 - "$work" "${roles[@]}" >sidecar/symbol-order.txt <<'EOF'
import sys

work, roles = sys.argv[1], sys.argv[2:]
known = set(open(f"{work}/symbols").read().split())


def ran(path):
    """Functions of the sidecar's own binary that ran, in the order callgrind lists them."""
    out, ob, cob = [], None, None
    for line in open(path, errors="replace"):
        if line.startswith("ob="):
            ob = line[3:].strip()
        elif line.startswith("cob="):
            cob = line[4:].strip()
        elif line.startswith("fn="):
            if ob and ob.endswith("meshid-sidecar"):
                out.append(line[3:].strip())
        elif line.startswith("cfn="):
            obj = cob or ob
            if obj and obj.endswith("meshid-sidecar"):
                out.append(line[4:].strip())
            cob = None
    return out


# The entry point (crt1's `_start`, not one of the functions callgrind names) leads.
order, seen = ["_start"], {"_start"}
# Start-up of every role first (callgrind's first dump), then the request path (its last).
for part in [f"{work}/{r}.cg.1" for r in roles] + [f"{work}/{r}.cg" for r in roles]:
    for name in ran(part):
        if name in known and name not in seen:
            seen.add(name)
            order.append(name)
print("\n".join(order))
EOF
echo "symbol-order: $(wc -l <sidecar/symbol-order.txt) functions in sidecar/symbol-order.txt"

# Relink with it and say how much of it the binary has (all of it, right after recording).
cargo build --profile dist --locked -q -p meshid-sidecar
nm --defined-only "$bin/meshid-sidecar" | awk '{print $3}' | sort -u >"$work/after"
found=$(sort -u sidecar/symbol-order.txt | comm -12 - "$work/after" | wc -l)
echo "symbol-order: the dist build has $found of them"
