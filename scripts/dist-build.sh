#!/usr/bin/env bash
# Builds what ships: `cargo build --profile dist --locked ARGS...` (fat LTO, one codegen unit:
# Cargo.toml), optimised with the sidecar's recorded execution profile (profile-guided
# optimisation, PGO) when `sidecar/pgo.profdata.gz` is there. The Dockerfiles, bench/run.sh and the
# scripts that record from the shipped binaries all build through it, so they measure the same
# code. `scripts/pgo-profile.sh` records the profile.
#
# The profile applies to every crate of the build: the sidecar's own code and the dependencies it
# shares with the CA and the benchmark tools (tokio, rustls, hyper, h2), where their functions are
# the same; functions the profile does not name are optimised as without it. A profile recorded
# from older code still applies to every function that did not change since (LLVM matches them by
# name and a hash of their control flow; the others are built as without a profile, silently).
#
# MESHID_PGO=0 builds without the profile (to compare). RUSTFLAGS already set are kept.
#
# Usage: scripts/dist-build.sh -p meshid-sidecar [more cargo build arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=sidecar/pgo.profdata.gz
if [ -f "$profile" ] && [ "${MESHID_PGO:-1}" != 0 ]; then
    # Cargo does not watch the file rustc reads: a copy named by its content's hash makes a new
    # profile a new compiler flag, and so a rebuild.
    target_dir=${CARGO_TARGET_DIR:-target}
    mkdir -p "$target_dir/pgo"
    copy="$(cd "$target_dir/pgo" && pwd)/$(sha256sum "$profile" | cut -c1-16).profdata"
    if [ ! -f "$copy" ]; then
        gzip -dc "$profile" >"$copy.tmp"
        mv "$copy.tmp" "$copy"
    fi
    export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-Cprofile-use=$copy -Cllvm-args=-no-pgo-warn-mismatch"
fi
exec cargo build --profile dist --locked "$@"
