#!/usr/bin/env bash
# CA issuance benchmark: builds release binaries once, then measures end-to-end issuance over gRPC.
# Usage: bench/ca.sh [--concurrency 32] [--count 20000] [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p meshid-ca -p meshid-bench
mkdir -p bench/results
exec target/release/ca-bench --bin-dir target/release --out bench/results/ca-latest.json "$@"
