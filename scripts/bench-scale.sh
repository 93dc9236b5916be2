#!/usr/bin/env bash
# EC2 throttling scale simulation: PODS real sidecars (default 200) on ENIS node ENIs
# (default 30, 3 per node) through a rollout against EC2's token buckets in direct mode, then in
# agent mode (one multus-eni-agent per node; --no-agent skips it), then the polling
# baseline through the same rollout. Root; bounded to 20 minutes; cleans up on any exit.
#   scripts/bench-scale.sh [PODS] [ENIS] [scale_sim.py flags, e.g. --write-doc --idle 65]
#   BENCH_PROFILE=release scripts/bench-scale.sh 200 30 --write-doc
set -euo pipefail
source "$(dirname "$0")/../bench/common.sh"

pods=200
enis=30
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then pods=$1; shift; fi
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then enis=$1; shift; fi

bench_run 1200 .venv/bin/python bench/scale_sim.py --pods "$pods" --enis "$enis" "$@"
