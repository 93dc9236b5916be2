#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine: iproute2 (network namespaces) and a
# Python venv at .venv with the EC2 emulator, schema validator and CEL evaluator pinned in
# tests/requirements.txt. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v ip >/dev/null 2>&1; then
  echo "setup: installing iproute2 (network namespaces for the end-to-end tests)"
  apt-get update -qq
  apt-get install -y -qq iproute2 >/dev/null
fi

if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup: kubectl (with kustomize) is required by the manifest tests and is not on PATH." >&2
  echo "setup: install kubectl >= 1.29 and run again." >&2
  exit 1
fi

if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "setup: installing python3-venv"
  apt-get update -qq
  apt-get install -y -qq python3-venv >/dev/null
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv from tests/requirements.txt"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
  echo "$want" > "$stamp"
fi
echo "setup: ready (ip, kubectl $(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | head -1), .venv)"
