#!/usr/bin/env bash
# CA root rotation benchmark: builds release binaries once, then runs prepare -> activate -> retire on a
# real CA with simulated sidecars and compares the CA's CPU time with an equally long quiet window.
# Usage: bench/rotation.sh [--sidecars 200] [--ttl 20s] [--smoke]
# MESHID_BIN_DIR=DIR runs the binaries already built in DIR and builds nothing (CI's smoke run passes
# the test build's target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir="${MESHID_BIN_DIR:-}"
if [ -z "$bin_dir" ]; then
    cargo build --release -q -p meshid-ca -p meshid-bench
    bin_dir="${CARGO_TARGET_DIR:-target}/release"
fi
out=bench/results/rotation-latest.json
for arg in "$@"; do
    # A smoke run (CI) never replaces the published figures.
    [ "$arg" = "--smoke" ] && out=bench/results/smoke/rotation.json
done
mkdir -p "$(dirname "$out")"
exec "$bin_dir/rotation-bench" --bin-dir "$bin_dir" --out "$out" "$@"
