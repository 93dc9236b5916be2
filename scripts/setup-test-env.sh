#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine (run as root; CI runs it from
# scripts/test.sh): iproute2 (network namespaces), binutils (`nm`, the sidecar's symbol test),
# g++ (libFuzzer), jq (the runbooks' filters), promtool (the alert rule tests), and a Python venv at .venv with the EC2 emulator, schema validator and CEL
# evaluator pinned in tests/requirements.txt; checks that kubectl (with kustomize) is there.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v ip >/dev/null 2>&1; then
  echo "setup: installing iproute2 (network namespaces for the end-to-end tests)"
  apt_install iproute2
fi

if ! command -v nm >/dev/null 2>&1; then
  echo "setup: installing binutils (nm: the sidecar test that inspects the agent-mode binary)"
  apt_install binutils
fi

if ! command -v g++ >/dev/null 2>&1; then
  echo "setup: installing g++ (cargo-fuzz builds libFuzzer from C++ sources)"
  apt_install g++
fi

if ! command -v jq >/dev/null 2>&1; then
  echo "setup: installing jq (the runbooks' filters in docs/install.md are run on sample pods)"
  apt_install jq
fi

# kubectl (with its built-in kustomize) comes with the machine image: only package registries are
# reachable from here, so there is nothing to download it from.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup: kubectl (with kustomize) is required by the manifest tests and is not on PATH." >&2
  echo "setup: install kubectl >= 1.29 and run again." >&2
  exit 1
fi

if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "setup: installing python3-venv"
  apt_install python3-venv
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv from tests/requirements.txt"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
  echo "$want" > "$stamp"
fi

# promtool from Debian's `prometheus` package, unpacked into .venv/bin rather than installed:
# installing the package would also start a Prometheus server on a machine with systemd.
if ! command -v promtool >/dev/null 2>&1 && [ ! -x .venv/bin/promtool ]; then
  echo "setup: unpacking promtool from Debian's prometheus package into .venv/bin"
  [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null && dpkg-deb -x prometheus_*.deb root)
  install -m 0755 "$tmp/root/usr/bin/promtool" .venv/bin/promtool
  rm -rf "$tmp"
fi
promtool=$(command -v promtool || echo .venv/bin/promtool)

echo "setup: ready (ip, nm, g++, jq, kubectl $(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | head -1), $("$promtool" --version 2>&1 | head -1 | cut -d' ' -f1-3), .venv)"
