#!/usr/bin/env bash
# The whole multus-eni chain on one machine, with no cluster and no AWS account:
#   multus-eni-webhook certs → the webhook over TLS (the Deployment's flags) → the busybox sample
#   admitted like the kube-apiserver does it → the node agent with its DaemonSet's flags → the
#   injected sidecar, run exactly as injected, in a network namespace wired like the pod → its IP
#   on the right (emulated) ENI, assigned by the agent → released when the pod goes.
# Runs from a fresh clone as root (network namespaces). Exit code non-zero if any step fails.
# Everything it creates (processes, namespaces, temp files) is removed at the end; on failure the
# logs directory is kept and printed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run as root (it creates network namespaces): sudo scripts/demo.sh" >&2
  exit 1
fi

echo "== 0. setup: test environment and debug binaries"
scripts/setup-test-env.sh
if ! cargo build --workspace --bins --locked --quiet; then
  echo "demo: cargo build --workspace --bins --locked failed" >&2
  exit 1
fi
echo "built: target/debug/multus-eni-webhook, target/debug/multus-eni-sidecar(-agent-mode), target/debug/multus-eni-agent"

export MULTUS_ENI_BIN_DIR="${MULTUS_ENI_BIN_DIR:-$PWD/target/debug}"
exec .venv/bin/python scripts/demo.py
