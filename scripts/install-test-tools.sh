#!/usr/bin/env bash
# Installs the outside tools the end-to-end tests check our work with, if missing:
# openssl and curl (Debian packages), and Python's grpcio + grpcio-tools (PyPI).
# Idempotent; needs root (or sudo) only when a Debian package is missing.
set -euo pipefail
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-pip)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  echo "installing: grpcio grpcio-tools (pip)"
  python3 -m pip install -q --disable-pip-version-check grpcio grpcio-tools 2>&1 | grep -v "Running pip as the 'root' user" || true
  python3 -c 'import grpc, grpc_tools'
fi
echo "test tools: openssl $(openssl version | cut -d' ' -f2), $(curl --version | head -1 | cut -d' ' -f1-2), grpcio $(python3 -c 'import grpc; print(grpc.__version__)')"
