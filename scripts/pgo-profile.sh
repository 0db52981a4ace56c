#!/usr/bin/env bash
# Records how the sidecar runs under proxy traffic and writes it to sidecar/pgo.profdata.gz, the
# profile `scripts/dist-build.sh` (the Dockerfiles', the benchmark's build) optimises with:
# profile-guided optimisation (PGO) lays out and inlines the request path by what it really does
# (which branches are taken, which calls are hot) instead of by guesses.
#
# How:
# - an instrumented `dist` build of the sidecar (`-Cprofile-generate`, in target/pgo-gen) counts
#   every branch it takes;
# - a benchmark pair from it (`bench-run --serve meshid`: outbound sidecar -> mTLS -> inbound
#   sidecar -> app) carries the benchmark's kinds of traffic: keep-alive HTTP/1.1 closed loop and
#   at 1,000 req/s, h2, a new connection per request (plaintext into the outbound, mTLS into the
#   inbound's port, with and without Nagle), keep-alive mTLS straight to the inbound;
# - both sidecars are stopped with SIGTERM (a clean exit writes the counts), and
#   `llvm-profdata merge` writes them for rustc (6.4 MB, 1.4 MB gzipped). The profile keeps the
#   functions that never ran, with their zero counts: LLVM builds them as cold code (for size,
#   away from the hot path). Measured: -25% proxy CPU per request at 1,000 req/s.
#
# Not recorded: plain-TCP listeners, the CA mode (join, renewals), rotations, revocations, policy
# reloads: their code is built as cold code (correct, but not optimised for speed). llvm-profdata must be of the LLVM that rustc is
# built with (`rustc -vV`); it is taken from PATH, then /usr/lib/llvm-N, then installed from
# Debian (llvm-N).
#
# Rerun it after a toolchain update or a large change of the request path (functions that changed
# lose their profile; nothing breaks, they are only optimised as without one), then rebuild with
# scripts/dist-build.sh and rerun scripts/symbol-order.sh (the inlining changes the function names
# the linker lays out).
#
# Usage: scripts/pgo-profile.sh      (about 15 minutes on 2 cores, most of it the two builds)
set -euo pipefail
cd "$(dirname "$0")/.."

llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
find_profdata() {
    local c
    for c in "llvm-profdata-$llvm" "/usr/lib/llvm-$llvm/bin/llvm-profdata" llvm-profdata; do
        if command -v "$c" >/dev/null 2>&1 && "$c" --version 2>/dev/null | grep -q "LLVM version $llvm\."; then
            echo "$c"
            return
        fi
    done
}
profdata=$(find_profdata)
if [ -z "$profdata" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "pgo-profile.sh: installing llvm-$llvm (llvm-profdata for rustc's LLVM $llvm)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "llvm-$llvm" >/dev/null
    profdata=$(find_profdata)
    [ -n "$profdata" ] || { echo "no llvm-profdata of LLVM $llvm found" >&2; exit 69; }
fi

# The benchmark tools that drive the pair, and the CA it checks for, as bench/run.sh builds them.
scripts/dist-build.sh -q -p meshid-ca
scripts/dist-build.sh -q -p meshid-bench
# One fixed directory for the counts: the path is part of the compiler flags, and other flags
# would rebuild everything. The build is the shipped build's command but for the flags: no
# `--target`, which would change every symbol's hash (cargo puts the target kind into each
# crate's metadata), and a profile names functions by their symbols: one recorded from a
# `--target` build matches nothing in the shipped one (tried: no gain at all). The build
# scripts and proc-macros are instrumented too and leave counts while the build runs: the
# directory is emptied after the build.
raw="$PWD/target/pgo-gen/profraw"
RUSTFLAGS="-Cprofile-generate=$raw" \
    cargo build --profile dist --locked -q -p meshid-sidecar --target-dir target/pgo-gen
rm -rf "$raw"
mkdir -p "$raw"
# A work directory removed on exit with the pair's processes (scripts/bench-pair.sh).
. scripts/bench-pair.sh
bins="$work/bin"
mkdir "$bins"
for b in meshid-ca bench-run bench-app meshload ca-bench fleet-bench; do
    ln -s "$PWD/target/dist/$b" "$bins/$b"
done
ln -s "$PWD/target/pgo-gen/dist/meshid-sidecar" "$bins/meshid-sidecar"

start_bench_pair "$bins" meshid
sidecars=$(grep -E "^(inbound|outbound): pids" "$work/serve.log" | grep -o '[0-9][0-9]*' | tr '\n' ' ')
read -r terminator mtls_args < <(sed -n 's/^terminator (mTLS) \([^ ]*\): \(.*\)$/\1 \2/p' "$work/serve.log")
[ -n "$terminator" ] || { cat "$work/serve.log" >&2; exit 1; }
load() {
    echo "  meshload $*" >&2
    "$bins/meshload" "$@" | grep -E 'requests in' >&2
}
load --target "$entry" --connections 32 --duration 8s
load --target "$entry" --connections 32 --duration 8s --rate 1000
load --target "$entry" --connections 32 --duration 4s --h2
load --target "$entry" --connections 16 --duration 4s --new-conn
# shellcheck disable=SC2086 # the printed client arguments, split on purpose
{
    load --target "$terminator" $mtls_args --connections 32 --duration 4s
    load --target "$terminator" $mtls_args --connections 8 --duration 4s --new-conn
    load --target "$terminator" $mtls_args --connections 8 --duration 3s --new-conn --nagle
}
for p in $sidecars; do kill -TERM "$p"; done
# A sidecar drains for up to its grace period (--grace, 20 s) before it exits. An exited sidecar
# stays a zombie until bench-run is stopped, so the process state tells, not `kill -0`.
running() { [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat")" != Z ]; }
for p in $sidecars; do
    for _ in $(seq 600); do running "$p" || break; sleep 0.1; done
    if running "$p"; then echo "sidecar $p did not exit: no profile written" >&2; exit 1; fi
done
ls "$raw"/*.profraw >/dev/null 2>&1 || { echo "the sidecars wrote no profile into $raw" >&2; exit 1; }
"$profdata" merge -o "$raw/merged.profdata" "$raw"/*.profraw
gzip -9n -c "$raw/merged.profdata" >sidecar/pgo.profdata.gz
echo "sidecar/pgo.profdata.gz: $(du -k sidecar/pgo.profdata.gz | cut -f1) KiB;" \
    "$("$profdata" show "$raw/merged.profdata" | grep -E '^Total functions')"
echo "next: scripts/dist-build.sh -p meshid-sidecar (and the others), then scripts/symbol-order.sh"
