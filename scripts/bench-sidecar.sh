#!/usr/bin/env bash
# Sidecar reaction benchmark: address change → EC2 request at the proxy (p50/p99 over 50
# adds and 50 deletes), EC2 calls per change, idle CPU over 30 s, RSS, binary size.
# Root; bounded to 5 minutes; cleans up on any exit.
#   scripts/bench-sidecar.sh [reaction.py flags, e.g. --changes 50 --idle 30]
#   scripts/bench-sidecar.sh --agent   (agent mode: the sidecar beside one multus-eni-agent)
#   BENCH_PROFILE=release scripts/bench-sidecar.sh
set -euo pipefail
source "$(dirname "$0")/../bench/common.sh"

bench_run 300 .venv/bin/python bench/reaction.py "$@"
