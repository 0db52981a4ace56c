#!/usr/bin/env bash
# The dependency policy in deny.toml, checked with cargo-deny: one crypto provider (no ring, no
# OpenSSL), permissive licenses only, crates.io as the only source. Installs the pinned cargo-deny if
# missing. Advisories are left out (their database lives on GitHub, which CI cannot reach); run
# `cargo deny check advisories` by hand where it can.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.20.2
if ! cargo deny --version 2>/dev/null | grep -q "$version"; then
    echo "deny: installing cargo-deny $version" >&2
    # Unoptimised, without debug info: 90 s to build on 2 cores instead of 240 s for its own
    # release profile (fat LTO), and the checks below still take about 3 s.
    CARGO_PROFILE_DEV_DEBUG=false cargo install --locked --quiet --debug cargo-deny --version "$version"
fi
cargo deny --log-level error check bans licenses sources
