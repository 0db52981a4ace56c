#!/usr/bin/env bash
# The benchmark harness: meshid against a direct path, nginx and haproxy, side by side in one run.
# Installs what it needs (apt: nginx libnginx-mod-stream haproxy), builds the release binaries once,
# runs every scenario, writes bench/results/latest.json (+ SVG plots) and regenerates docs/benchmarks.md.
#
# Usage: bench/run.sh [--smoke] [bench-run flags, e.g. --runs 5 --scenarios throughput,latency]
#        target/release/bench-run --help   lists every flag
# MESHID_BIN_DIR=DIR runs the binaries already built in DIR and builds nothing (CI's smoke run passes
# the test build's target/debug: figures are not judged there, and a second build would double CI).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(nproc --all)" -lt 2 ]; then
    echo "bench/run.sh: needs 2 CPUs (load generator on CPU 0, app and proxies on CPU 1)" >&2
    exit 1
fi

missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "bench/run.sh: installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Full runs measure what ships: the `dist` profile (fat LTO, one codegen unit, the sidecar's
# recorded profile: scripts/dist-build.sh), as the Dockerfiles build it; the CI smoke run only
# checks the harness and uses `release` (built once per session).
profile=dist
for arg in "$@"; do
    [ "$arg" = "--smoke" ] && profile=release
done
bin_dir="${CARGO_TARGET_DIR:-target}/$profile"
if [ -n "${MESHID_BIN_DIR:-}" ]; then
    bin_dir="$MESHID_BIN_DIR"
elif [ "$profile" = dist ]; then
    # As the Dockerfiles build them, each on its own: what else is built in the same command changes
    # a crate's features, and so its code (and the names sidecar/symbol-order.txt lays out). With
    # packed relocations, as the Dockerfiles set (scripts/symbol-order-build.rs).
    export MESHID_PACKED_RELOCS=on
    scripts/dist-build.sh -q -p meshid-sidecar
    scripts/dist-build.sh -q -p meshid-ca
    scripts/dist-build.sh -q -p meshid-bench
else
    cargo build --profile "$profile" -q -p meshid-ca -p meshid-sidecar -p meshid-bench
fi
mkdir -p bench/results

# Everything the harness starts inherits a higher priority than background jobs (when allowed), so
# other work on a shared machine disturbs the measurement less; every contender gets the same.
prio=()
if nice -n -10 true 2>/dev/null; then
    prio=(nice -n -10)
fi
exec "${prio[@]}" taskset -c 0 "$bin_dir/bench-run" --bin-dir "$bin_dir" "$@"
