#!/usr/bin/env bash
# Installs the outside tools the end-to-end tests check our work with (openssl, curl), if missing.
# Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "test tools: openssl $(openssl version | cut -d' ' -f2), $(curl --version | head -1 | cut -d' ' -f1-2)"
