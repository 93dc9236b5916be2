#!/usr/bin/env bash
# Webhook benchmark (issue 2) and sustained load with bad input (issue 5).
#
#   scripts/bench-webhook.sh                 # latency at 2,000/s + saturation (≈ 2 min)
#   scripts/bench-webhook.sh sustained       # 3 min of real pods mixed with garbage bodies
#   scripts/bench-webhook.sh sustained --duration 10m --rate 1500
#
# Builds the release webhook and the load generator (bench/webhook-load), which starts the
# webhook as a separate process with throwaway certificates (rcgen) on loopback and drives
# AdmissionReviews over TLS with keep-alive. Extra arguments go to `webhook-load <mode>`;
# see `target/release/webhook-load <mode> --help`. Figures: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-bench}"
[[ $# -gt 0 ]] && shift
case "$mode" in
  bench | sustained) ;;
  *) echo "usage: $0 [bench|sustained] [webhook-load args...]" >&2; exit 2 ;;
esac

cargo build --release --locked -p multus-eni-webhook -p multus-eni-webhook-load
exec target/release/webhook-load \
  --webhook-bin target/release/multus-eni-webhook \
  --fixtures webhook/tests/data \
  "$mode" "$@"
