# Shared by scripts/bench-scale.sh and scripts/bench-sidecar.sh (sourced, not run).
# Picks the sidecar binary, checks the environment, and guarantees that every network
# namespace (and every process inside one) this run created is gone on exit, Ctrl-C or
# failure: names are mne-b<shell pid>-*, passed to Python as MNE_BENCH_RUN.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench: needs root (network namespaces)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import moto, boto3' 2>/dev/null; then
  echo "bench: no .venv with moto; run scripts/setup-test-env.sh first" >&2
  exit 2
fi

export MNE_BENCH_RUN="b$$"

bench_cleanup() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^mne-${MNE_BENCH_RUN}-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap bench_cleanup EXIT

# bench_run SECONDS CMD...: runs CMD bounded in time; Ctrl-C or SIGTERM to this script is
# passed on (the Python side then removes what it made) before the namespaces are swept.
bench_run() {
  local limit=$1; shift
  timeout -k 30 "$limit" "$@" &
  local child=$!
  trap 'kill -TERM "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; exit 130' INT TERM
  local rc=0
  wait "$child" || rc=$?
  trap - INT TERM
  return "$rc"
}

# MULTUS_ENI_SIDECAR_BIN (and MULTUS_ENI_AGENT_BIN) win; else BENCH_PROFILE=release|debug
# (default debug) is built with cargo (a no-op when up to date). Agent-mode runs use
# multus-eni-sidecar-agent-mode beside the sidecar binary when it is there (as pods do); in the
# debug build's one cargo invocation its library gets the full sidecar's `direct` feature,
# which that binary never calls.
if [ -z "${MULTUS_ENI_SIDECAR_BIN:-}" ]; then
  case "${BENCH_PROFILE:-debug}" in
    # As the Dockerfile builds them: the sidecar's two binaries with profile release-sidecar,
    # each on its own (unified, the agent-mode one would get the SDK); the agent --release.
    release) cargo build --profile release-sidecar -p multus-eni-sidecar >&2
             cargo build --profile release-sidecar -p multus-eni-sidecar-agent-mode >&2
             cargo build --release -p multus-eni-agent >&2
             export MULTUS_ENI_SIDECAR_BIN="$PWD/target/release-sidecar/multus-eni-sidecar"
             export MULTUS_ENI_AGENT_BIN="$PWD/target/release/multus-eni-agent" ;;
    debug)   cargo build -p multus-eni-sidecar -p multus-eni-sidecar-agent-mode -p multus-eni-agent >&2
             export MULTUS_ENI_SIDECAR_BIN="$PWD/target/debug/multus-eni-sidecar" ;;
    *) echo "bench: BENCH_PROFILE must be release or debug" >&2; exit 2 ;;
  esac
fi
echo "bench: sidecar $MULTUS_ENI_SIDECAR_BIN" >&2
