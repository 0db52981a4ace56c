#!/usr/bin/env bash
# Chaos scenarios (issue #18): builds release binaries once, then runs each fault against the real
# meshid-ca, meshid-sidecar and meshid-injector on loopback, under load, and writes bench/results/chaos-latest.json
# and docs/reliability.md (a --smoke run writes into bench/results/smoke/ instead). Exits 1 when a
# scenario's promised behaviour broke (also in --smoke, where figures are not judged).
# Usage: bench/chaos.sh [--smoke] [--scenarios ca-outage,signals,files,ca-dir,clock-steps,floods,rotations-under-load,soak] [--sidecars 500] [--soak-minutes 30]
# clock-steps needs libfaketime (scripts/install-test-tools.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p meshid-ca -p meshid-sidecar -p meshid-injector -p meshid-bench
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/chaos-run" --bin-dir "$target/release" "$@"
