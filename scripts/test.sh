#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, Rust unit and integration tests, then
# the end-to-end tests (real binaries, network namespaces, the EC2 emulator, TLS like the
# kube-apiserver), with a short fuzzing run before them. Needs root for the network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-test-env.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The sidecar library without direct mode (what multus-eni-sidecar-agent-mode is built from on
# its own): the workspace run above always has `direct` unified in.
cargo clippy -p multus-eni-sidecar --no-default-features --all-targets --locked -- -D warnings
echo "== previous release's agent-mode sidecar (version-skew e2e test; cached in target/prev-release)"
scripts/build-previous-sidecar.sh
echo "== cargo build (binaries for the end-to-end tests, both sidecars included)"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked
echo "== fuzz (short run of every target; a longer one: scripts/fuzz.sh 300)"
FUZZ_PROFILE=dev FUZZ_SANITIZER=none scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
echo "== pytest (end-to-end)"
export MULTUS_ENI_BIN_DIR="${MULTUS_ENI_BIN_DIR:-$PWD/target/debug}"
.venv/bin/python -m pytest tests -ra
