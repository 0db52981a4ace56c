#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz: libFuzzer + AddressSanitizer) of every parser that faces
# untrusted input: SPIFFE IDs, certificate identities, CSRs, policy files, pod annotations, revocation lists,
# service-account tokens, the app's HTTP/1.1 responses, the injector's AdmissionReviews, the form bodies
# and override headers the inbound reads `_method` from, and the HTTP/2 frames a local client sends the
# Workload API (seeds of that one: scripts/fuzz-seeds/gen_workload_api_frames.py). Targets are in fuzz/fuzz_targets, seeds in fuzz/seeds; docs/fuzzing.md.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   default: 60 s for every target
#        scripts/fuzz.sh --smoke [TARGET...]                 50,000 runs each from a fixed seed
#                                                            (deterministic; what CI runs)
#        scripts/fuzz.sh --build-only                        build the targets, run nothing (CI builds
#                                                            them in the background, beside the smoke runs)
# A crash leaves its input in fuzz/artifacts/TARGET/ and the script exits 1; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a TARGET fuzz/artifacts/TARGET/crash-...   (in fuzz/)
#
# The project builds with its one stable toolchain. cargo-fuzz passes nightly-only flags
# (-Zsanitizer=address); RUSTC_BOOTSTRAP=1 allows them on stable for this build only.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$version"; then
    echo "fuzz: installing cargo-fuzz $version" >&2
    # Unoptimised, without debug info: it only drives cargo, and builds in half the time.
    CARGO_PROFILE_DEV_DEBUG=false cargo install --locked --quiet --debug cargo-fuzz --version "$version"
fi

smoke=false
build_only=false
seconds=60
targets=()
for arg in "$@"; do
    case "$arg" in
        --smoke) smoke=true ;;
        --build-only) build_only=true ;;
        ''|*[!0-9]*) targets+=("$arg") ;;
        *) seconds="$arg" ;;
    esac
done
if [ ${#targets[@]} -eq 0 ]; then
    targets=(spiffe_id cert_identity csr policy annotations sa_token jwt_svid metrics_accept check_scrape revocations h1_response admission_review form_overrides workload_api_frames)
fi

if $smoke; then
    budget=(-runs=50000 -seed=1)
else
    budget=("-max_total_time=$seconds")
fi

export RUSTC_BOOTSTRAP=1
# The workspace's lock file pins the fuzz build to the versions the project ships.
cp Cargo.lock fuzz/Cargo.lock
cd fuzz
cargo fuzz build -O -a
if $build_only; then
    echo "fuzz: targets built"
    exit 0
fi
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    cp -n "seeds/$t"/* "corpus/$t/" 2>/dev/null || true
    echo "== fuzz $t (${budget[*]})"
    # The Workload API's header-block bound (64 KiB) is reached only by inputs past 65,536 bytes.
    max_len=65536
    [ "$t" = workload_api_frames ] && max_len=70000
    if cargo fuzz run -O -a "$t" "corpus/$t" -- "${budget[@]}" -rss_limit_mb=2048 -max_len="$max_len" \
        -print_final_stats=1 >"corpus/$t.log" 2>&1; then
        grep -E '^(Done|stat::number_of_executed_units)' "corpus/$t.log" || true
    else
        echo "fuzz $t FAILED:" >&2
        grep -E -A20 'ERROR|panicked' "corpus/$t.log" | head -40 >&2 || tail -40 "corpus/$t.log" >&2
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} target(s) passed"
