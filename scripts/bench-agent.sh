#!/usr/bin/env bash
# Node agent benchmark (issue 17): 110 pod namespaces without sidecars on one simulated node;
# adoption, watch reaction (address added → Assign, p50/p99), release after a namespace is
# deleted, RSS with 2,000 idle socket connections, idle CPU over a resync.
# Root; bounded to 10 minutes; cleans up on any exit.
#   scripts/bench-agent.sh [agent_watch.py flags, e.g. --pods 110 --connections 2000 --idle 65]
#   BENCH_PROFILE=release scripts/bench-agent.sh
set -euo pipefail
source "$(dirname "$0")/../bench/common.sh"

bench_run 600 .venv/bin/python bench/agent_watch.py "$@"
