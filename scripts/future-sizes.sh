#!/usr/bin/env bash
# The sidecar's largest futures (async fns and blocks), in bytes, as rustc lays them out. A future
# is as large as its largest state, and every future it awaits is inline in it: a rarely taken
# path (a dial, a TLS handshake, a body read) sizes every request's future unless it is boxed, and
# a request's future is moved whole several times (into hyper's dispatcher, into a task), while a
# connection's task holds its own for the connection's life.
#
# How: `cargo rustc --release -p meshid-sidecar --lib -- -Zprint-type-sizes`, with RUSTC_BOOTSTRAP=1
# so that the stable compiler accepts the flag (it changes nothing in the code built). Only the
# sidecar's own crate is rebuilt; the next plain release build rebuilds it once more.
#
# Usage: scripts/future-sizes.sh [MIN_BYTES]   (default 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
min=${1:-2000}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
RUSTC_BOOTSTRAP=1 cargo rustc -q --release -p meshid-sidecar --lib -- -Zprint-type-sizes >"$out" 2>&1 || {
    cat "$out" >&2
    exit 1
}
grep -E '^print-type-size type: `\{async (fn|block)' "$out" |
    sed -E 's/^print-type-size type: `(.*)`: ([0-9]+) bytes.*/\2\t\1/' |
    awk -F'\t' -v min="$min" '$1 >= min' | sort -rn -k1,1 | uniq
