#!/usr/bin/env bash
# CA root rotation benchmark: builds release binaries once, then runs prepare -> activate -> retire on a
# real CA with simulated sidecars and compares the CA's CPU time with an equally long quiet window.
# Usage: bench/rotation.sh [--sidecars 200] [--ttl 20s] [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p meshid-ca -p meshid-bench
target="${CARGO_TARGET_DIR:-target}"
out=bench/results/rotation-latest.json
for arg in "$@"; do
    # A smoke run (CI) never replaces the published figures.
    [ "$arg" = "--smoke" ] && out=bench/results/smoke/rotation.json
done
mkdir -p "$(dirname "$out")"
exec "$target/release/rotation-bench" --bin-dir "$target/release" --out "$out" "$@"
