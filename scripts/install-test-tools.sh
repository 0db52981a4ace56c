#!/usr/bin/env bash
# Installs the test runner and the outside tools the end-to-end tests check our work with, if missing:
# cargo-nextest (the test runner of the README's test command; `cargo install`),
# openssl, curl, haproxy and libfaketime (Debian packages), Python's grpcio + grpcio-tools, prometheus-client and spiffe (py-spiffe) (PyPI),
# and promtool (from
# Debian's prometheus package, unpacked into the workspace's .tools/promtool/: only that binary, no
# server, user or service).
# Idempotent; needs root (or sudo) only when a Debian package is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# cargo-nextest: the README's and CI's test command is `cargo nextest run --workspace`.
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if ! command -v python3 >/dev/null 2>&1; then
  missing+=(python3 python3-pip)
elif ! python3 -m pip --version >/dev/null 2>&1; then
  missing+=(python3-pip)
fi
# libfaketime: the chaos suite's clock-steps scenario moves one sidecar's wall clock with it.
ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1 || missing+=(libfaketime)
# haproxy: reads the sidecar's PROXY protocol v2 header (`accept-proxy`) in tests/tests/proxy_protocol.rs.
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian 12 and later mark the system Python "externally managed" and pip refuses to install into
# it; these test-only packages go there anyway (pip ignores the variable before 23.0).
export PIP_BREAK_SYSTEM_PACKAGES=1
if ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  echo "installing: grpcio grpcio-tools (pip)"
  python3 -m pip install -q --disable-pip-version-check grpcio grpcio-tools 2>&1 | grep -v "Running pip as the 'root' user" || true
  python3 -c 'import grpc, grpc_tools'
fi
# The Prometheus project's Python client: its strict OpenMetrics parser checks our OpenMetrics
# answers (promtool reads only the 0.0.4 text format).
if ! python3 -c 'import prometheus_client.openmetrics.parser' >/dev/null 2>&1; then
  echo "installing: prometheus-client (pip)"
  python3 -m pip install -q --disable-pip-version-check prometheus-client 2>&1 | grep -v "Running pip as the 'root' user" || true
  python3 -c 'import prometheus_client.openmetrics.parser'
fi
# py-spiffe: an outside client of the sidecar's SPIFFE Workload API (tests/tests/workload_api.rs).
if ! python3 -c 'import spiffe' >/dev/null 2>&1; then
  echo "installing: spiffe (py-spiffe, pip)"
  python3 -m pip install -q --disable-pip-version-check 'spiffe>=0.3.2,<0.4' 2>&1 | grep -v "Running pip as the 'root' user" || true
  python3 -c 'import spiffe'
fi
PROMTOOL="$ROOT/.tools/promtool/bin/promtool"
if [ ! -x "$PROMTOOL" ]; then
  echo "installing: promtool (Debian package prometheus, unpacked into .tools/promtool)"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # Downloaded as the current user into a directory of ours (apt's _apt user cannot write there).
  download() { (cd "$tmp" && apt-get download -q -o APT::Sandbox::User="$(id -un)" prometheus >/dev/null); }
  download || { $SUDO apt-get update -qq && download; }
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  mkdir -p "$(dirname "$PROMTOOL")"
  cp "$tmp/root/usr/bin/promtool" "$PROMTOOL"
fi
echo "test tools: openssl $(openssl version | cut -d' ' -f2), haproxy $(haproxy -v | head -1 | cut -d' ' -f3), $(curl --version | head -1 | cut -d' ' -f1-2), grpcio $(python3 -c 'import grpc; print(grpc.__version__)'), promtool $("$PROMTOOL" --version 2>&1 | head -1 | cut -d' ' -f3)"
