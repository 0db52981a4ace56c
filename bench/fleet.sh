#!/usr/bin/env bash
# Fleet scale at one CA replica: for each fleet size, a fresh release `meshid-ca serve` on CPU 1 and
# that many simulated sidecars (this process, CPU 0) holding trust-bundle streams; memory per
# connected sidecar, idle CPU, time to push a bundle change to all, renewals/s alongside. As root it
# raises net.core.netdev_max_backlog to the largest size for the run (loopback drops of keep-alive
# probes otherwise break idle streams at 19,000) and puts it back.
# Usage: bench/fleet.sh [--sizes 1000,5000,10000,19000] [--smoke] [fleet-bench flags]
# MESHID_BIN_DIR=DIR runs the binaries already built in DIR and builds nothing (CI's smoke run passes
# the test build's target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir="${MESHID_BIN_DIR:-}"
if [ -z "$bin_dir" ]; then
    cargo build --release -q -p meshid-ca -p meshid-bench
    bin_dir="${CARGO_TARGET_DIR:-target}/release"
fi
out=bench/results/fleet-latest.json
for arg in "$@"; do
    # A smoke run (CI) never replaces the published figures.
    [ "$arg" = "--smoke" ] && out=bench/results/smoke/fleet.json
done
mkdir -p "$(dirname "$out")"
pin=()
command -v taskset >/dev/null 2>&1 && pin=(taskset -c 0)
exec "${pin[@]}" "$bin_dir/fleet-bench" --bin-dir "$bin_dir" --out "$out" "$@"
