#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, Rust unit and integration tests, then
# the end-to-end tests (real binaries, network namespaces, the EC2 emulator, TLS like the
# kube-apiserver), the manifest and alert-rule tests (kubectl kustomize, promtool), with a short
# fuzzing run before them (unoptimized, WITHOUT a sanitizer: it finds panics, not memory errors;
# scripts/fuzz.sh alone builds with AddressSanitizer). Needs root for the network namespaces.
#
# Under CI=true (.ci/run sets it) a SKIPPED test in any end-to-end module (tests/test_*_e2e.py),
# the manifest tests or the alert-rule tests is a FAILURE (tests/conftest.py MUST_NOT_SKIP): not
# root, a binary not built, a stripped binary or promtool missing cannot pass CI unnoticed.
# Elsewhere they skip, and `pytest -ra` lists why.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each stage's header carries the time of day (UTC), so a CI log shows where the time goes
# (docs/benchmarks.md, "CI time").
stage() { echo "== $(date -u +%T) $*"; }

case "${CI:-}" in
  true|1|yes|TRUE|True) echo "== CI=true: a skip in tests/test_*_e2e.py (agent, agent node, sidecar, chain), test_manifests.py or test_alert_rules.py fails the run" ;;
  *) echo "== CI is not set: skipped end-to-end tests are listed at the end, not failed (CI=true makes them failures)" ;;
esac

stage "setup (scripts/setup-test-env.sh; after the demo only a check)"
scripts/setup-test-env.sh

# Nothing that could be shared compiles twice: the demo's `cargo build` makes the one below a
# no-op; the previous release's sidecar reuses target/'s dependencies and compiles only those its
# own feature set changes (~30 of ~95); `cargo test` compiles only what the dev-dependencies change
# (proptest turns on regex-syntax's unicode features, so tracing-subscriber and our crates compile
# again). Clippy's checks and the instrumented fuzz build (fuzz/target) cannot share the build's
# artifacts. Times per stage: docs/benchmarks.md, "CI time".
stage "cargo fmt --check"
cargo fmt --all -- --check
stage "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The sidecar library without direct mode (what multus-eni-sidecar-agent-mode is built from on
# its own): the workspace run above always has `direct` unified in.
stage "cargo clippy (the sidecar without direct mode)"
cargo clippy -p multus-eni-sidecar --no-default-features --all-targets --locked -- -D warnings
stage "previous release's agent-mode sidecar (version-skew e2e test; cached in target/prev-release)"
scripts/build-previous-sidecar.sh
stage "cargo build (binaries for the end-to-end tests, both sidecars included)"
cargo build --workspace --bins --locked
stage "cargo test"
cargo test --workspace --locked
stage "fuzz (10 s per target, unoptimized, no sanitizer: panics only; with ASan: scripts/fuzz.sh 300)"
FUZZ_PROFILE=dev FUZZ_SANITIZER=none scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
stage "pytest (end-to-end)"
export MULTUS_ENI_BIN_DIR="${MULTUS_ENI_BIN_DIR:-$PWD/target/debug}"
# Four workers, each taking whole modules (pytest-xdist, --dist loadfile): every e2e module has
# its own emulator and network namespaces (names carry the worker's pid), so modules run side by
# side; the tests mostly wait on processes and timers, not the CPU (about 75 % of one core with
# four workers on 2 cores). The longest module (test_agent_node_e2e.py, ~160 s) bounds the run:
# 3.9 min with three workers, 3.3 with four (docs/benchmarks.md, "CI time"). The 25 slowest tests
# are listed at the end.
.venv/bin/python -m pytest tests -ra -n 4 --dist loadfile --durations=25
