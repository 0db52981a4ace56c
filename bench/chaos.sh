#!/usr/bin/env bash
# Chaos scenarios (issue #18): builds release binaries once, then runs each fault against the real
# meshid-ca, meshid-sidecar and meshid-injector on loopback, under load, and writes bench/results/chaos-latest.json
# and docs/reliability.md (a --smoke run writes into bench/results/smoke/ instead). Exits 1 when a
# scenario's promised behaviour broke (also in --smoke, where figures are not judged).
# Usage: bench/chaos.sh [--smoke] [--scenarios ca-outage,signals,files,ca-dir,clock-steps,floods,rotations-under-load,soak] [--sidecars 500] [--soak-minutes 30]
# clock-steps needs libfaketime (scripts/install-test-tools.sh installs it).
# MESHID_BIN_DIR=DIR runs the binaries already built in DIR and builds nothing (CI's smoke run passes
# the test build's target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir="${MESHID_BIN_DIR:-}"
if [ -z "$bin_dir" ]; then
    cargo build --release -q -p meshid-ca -p meshid-sidecar -p meshid-injector -p meshid-bench
    bin_dir="${CARGO_TARGET_DIR:-target}/release"
fi
exec "$bin_dir/chaos-run" --bin-dir "$bin_dir" "$@"
