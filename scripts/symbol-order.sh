#!/usr/bin/env bash
# Records which of the shipped sidecar's and CA's functions run at start-up and on the request
# path, and writes them to sidecar/symbol-order.txt and ca-service/symbol-order.txt, the order in
# which `scripts/symbol-order-build.rs` (both packages' build script) asks the linker to lay them
# out (first the start-up functions, then those of the request path): the code an idle process
# touches then sits in a few contiguous pages instead of being spread across its `.text`.
#
# How: the `dist` builds of the sidecar and the CA (the Dockerfiles' commands), run under
# `valgrind --tool=callgrind`, which names every function that ran:
# - a benchmark pair (`bench-run --serve meshid`: outbound sidecar -> mTLS, h2 -> inbound sidecar
#   -> app) with certificate files, both sidecars restarted with their own command lines: once
#   ready, then after HTTP/1.1 and h2 traffic through the pair and straight to the inbound's mTLS
#   port;
# - `meshid-ca serve` and a CA-mode sidecar (join token) until it has renewed its certificate.
# Then a rebuild with the new lists, and how much of them the binaries have.
#
# Not recorded: service-account token checks at the CA (the JWKS path), rotations; aws-lc's
# assembly for CPU features valgrind does not offer (AVX-512): those functions stay where they are.
#
# Rerun it after a toolchain or dependency update, or a large change of the sidecar or the CA: the
# names carry hashes of the crates' versions and features, and names the linker no longer finds
# leave their functions where they were (nothing breaks; the idle memory grows back). bench/run.sh
# reports the idle RSS it gives ("memory" and "startup" scenarios).
#
# Usage: scripts/symbol-order.sh      (about 15 minutes on 2 cores, most of it the dist builds)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1 || ! command -v callgrind_control >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi

scripts/dist-build.sh -q -p meshid-sidecar
scripts/dist-build.sh -q -p meshid-ca
scripts/dist-build.sh -q -p meshid-bench
bin=target/dist

. scripts/bench-pair.sh
start_bench_pair "$bin"
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

# CA mode, as sidecars run in a cluster: `meshid-ca serve` and a sidecar with an inbound and an
# outbound listener that gets its first certificate with a join token, opens the trust bundle
# stream and renews (20 s certificates: a renewal at about half of that), both under callgrind.
# The sidecar's start-up joins the start-up part, its renewal the rest (its request path is the
# one recorded above). The CA's start-up is its own start-up part; issuing, streaming the bundle
# and renewing its request path.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ca_grpc="127.0.0.1:$(free_port)"
ca_admin="127.0.0.1:$(free_port)"
"$bin/meshid-ca" init --dir "$work/ca" >"$work/ca-init.log" 2>&1
valgrind --tool=callgrind --demangle=no --dump-instr=no --dump-line=no --compress-strings=no \
    --callgrind-out-file="$work/ca.cg" \
    "$bin/meshid-ca" serve --dir "$work/ca" --listen "$ca_grpc" --admin-listen "$ca_admin" --ttl 20s \
    >"$work/ca.log" 2>&1 &
vg[ca]=$!
pids+=($!)
ready "$ca_admin"
curl -sf "http://$ca_admin/healthz" >/dev/null
callgrind_control -d "${vg[ca]}" >/dev/null
"$bin/meshid-ca" token create --dir "$work/ca" --id spiffe://cluster.local/ns/bench/sa/server \
    --ttl 10m >"$work/join-token"
app=$(grep -A1 -x -- '--inbound' "$work/inbound.cmd" | tail -1 | sed 's/^[^=]*=\([^,]*\),.*/\1/')
remote=$(grep -A1 -x -- '--inbound' "$work/inbound.cmd" | tail -1 | sed 's/=.*//')
ca_in="127.0.0.1:$(free_port)"
ca_out="127.0.0.1:$(free_port)"
ca_side_admin="127.0.0.1:$(free_port)"
cat >"$work/ca-policy.yaml" <<POLICY
mode: enforce
inbound:
  - port: ${ca_in##*:}
    protocol: http
    allow:
      - id: spiffe://cluster.local/ns/bench/sa/client
POLICY
TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --demangle=no --dump-instr=no --dump-line=no \
    --compress-strings=no --callgrind-out-file="$work/ca-mode.cg" \
    "$bin/meshid-sidecar" run --ca-addr "$ca_grpc" --ca-server-name localhost \
    --ca-bundle "$work/ca/bundle.pem" --join-token-file "$work/join-token" \
    --inbound "$ca_in=$app,http" --outbound "$ca_out=$remote,spiffe://cluster.local/ns/bench/sa/server,http" \
    --policy "$work/ca-policy.yaml" --admin-listen "$ca_side_admin" >"$work/ca-mode.log" 2>&1 &
vg[ca-mode]=$!
pids+=($!)
ready "$ca_side_admin"
sleep 1
callgrind_control -d "${vg[ca-mode]}" >/dev/null
renewed() { # the second successful certificate request
    curl -sf "http://$ca_side_admin/metrics" |
        awk '/^meshid_sidecar_renewals_total\{result="success"\}/ { n = $2 } END { exit !(n >= 2) }'
}
for _ in $(seq 120); do renewed && break; sleep 0.5; done
renewed || {
    echo "symbol-order: the CA-mode sidecar did not renew its certificate" >&2
    tail -20 "$work/ca-mode.log" >&2
    exit 1
}
curl -sf -H 'connection: close' "http://$ca_side_admin/readyz" >/dev/null
kill -TERM "${vg[ca-mode]}"
wait "${vg[ca-mode]}" || true
curl -sf "http://$ca_admin/metrics" >/dev/null
curl -sf -H 'connection: close' "http://$ca_admin/readyz" >/dev/null
kill -TERM "${vg[ca]}"
wait "${vg[ca]}" || true

# ORDER_FILE BINARY RECORDING...: the functions of BINARY that ran, start-up parts first.
write_order() {
    local out=$1 binary=$2
    shift 2
    nm --defined-only "$bin/$binary" | awk '{print $3}' >"$work/symbols"
    python3 - "$work" "$binary" "$@" >"$out" <<'EOF'
import sys

work, binary, roles = sys.argv[1], sys.argv[2], sys.argv[3:]
known = set(open(f"{work}/symbols").read().split())


def ran(path):
    """Functions of the binary itself that ran, in the order callgrind lists them."""
    out, ob, cob = [], None, None
    for line in open(path, errors="replace"):
        if line.startswith("ob="):
            ob = line[3:].strip()
        elif line.startswith("cob="):
            cob = line[4:].strip()
        elif line.startswith("fn="):
            if ob and ob.endswith("/" + binary):
                out.append(line[3:].strip())
        elif line.startswith("cfn="):
            obj = cob or ob
            if obj and obj.endswith("/" + binary):
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
    echo "symbol-order: $(wc -l <"$out") functions in $out"
}
write_order sidecar/symbol-order.txt meshid-sidecar inbound outbound ca-mode
write_order ca-service/symbol-order.txt meshid-ca ca

# Relink with them and say how much of each list the binaries have (all, right after recording).
scripts/dist-build.sh -q -p meshid-sidecar
scripts/dist-build.sh -q -p meshid-ca
for pair in sidecar/symbol-order.txt:meshid-sidecar ca-service/symbol-order.txt:meshid-ca; do
    nm --defined-only "$bin/${pair#*:}" | awk '{print $3}' | sort -u >"$work/after"
    found=$(sort -u "${pair%:*}" | comm -12 - "$work/after" | wc -l)
    echo "symbol-order: the dist ${pair#*:} has $found of the $(wc -l <"${pair%:*}") in ${pair%:*}"
done
