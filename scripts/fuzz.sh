#!/usr/bin/env bash
# Fuzzes the webhook with cargo-fuzz (libFuzzer) on the stable toolchain (issue 5):
#   networks_annotation  the Multus annotation parser
#   admission_review     /mutate body handling (admission::review)
#   mutate_pod           the injection on any JSON pod: patch applies, one sidecar, idempotent
#
#   scripts/fuzz.sh [SECONDS]     # SECONDS per target, default 30
#
# Installs cargo-fuzz (pinned) if missing, seeds fuzz/corpus/<target> from the fixture pods in
# webhook/tests/data (via `webhook-load corpus`), builds the targets in fuzz/target and runs
# each for SECONDS. Env: FUZZ_SANITIZER (default `address`), FUZZ_PROFILE (`release`, the
# default, or `dev`: unoptimized, builds in half the time), FUZZ_JOBS (parallel libFuzzer
# processes per target, default 1). CI: FUZZ_PROFILE=dev FUZZ_SANITIZER=none scripts/fuzz.sh 10
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the script. Reproduce it with
# `cargo fuzz run <target> fuzz/artifacts/<target>/crash-...`, fix it, and keep the input as a
# regression test with the target's checks in webhook/tests/properties.rs (fuzz/corpus is
# regenerated from the fixtures on every run and is not committed).
# FUZZ_SANITIZER=none (what scripts/test.sh uses) finds panics and failed checks only; memory
# errors need the default `address`.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
sanitizer="${FUZZ_SANITIZER:-address}"
jobs="${FUZZ_JOBS:-1}"
profile="${FUZZ_PROFILE:-release}"
cargo_fuzz_version=0.13.2
targets=(networks_annotation admission_review mutate_pod)

# A debug build: cargo-fuzz only runs cargo and the fuzz binaries, and it installs in about half
# the time of a release build (56 s instead of 91 s on 2 cores); a fresh machine's CI pays it once.
if ! cargo fuzz --version 2>/dev/null | grep -qF "$cargo_fuzz_version"; then
  cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --debug
fi
echo "== seeding fuzz/corpus from webhook/tests/data"
# The webhook-load that `cargo build --workspace --bins` already built (scripts/test.sh), else
# cargo builds it: `cargo run -p` alone resolves features for that one package and would
# rebuild part of the workspace's dependencies in target/.
load="${MULTUS_ENI_BIN_DIR:-$PWD/target/debug}/webhook-load"
if [ -x "$load" ]; then
  "$load" --fixtures webhook/tests/data corpus --out fuzz/corpus
else
  cargo run --quiet --locked -p multus-eni-webhook-load --bin webhook-load -- \
    --fixtures webhook/tests/data corpus --out fuzz/corpus
fi

# cargo-fuzz passes -Z flags (sanitizer coverage, -Zsanitizer); only nightly accepts them,
# unless the stable compiler is told to, which is what this does. No nightly is needed.
# Set only from here on (fuzz/target): proc-macro2's build script reruns when RUSTC_BOOTSTRAP
# changes, so a cargo command in the workspace under it rebuilds every proc macro and all
# that depends on one in target/, and the next plain `cargo` command rebuilds them again.
export RUSTC_BOOTSTRAP=1

cd fuzz
case "$profile" in
  release) build=(-O --codegen-units 16 --sanitizer "$sanitizer") ;;
  dev) build=(--dev --sanitizer "$sanitizer") ;;
  *) echo "FUZZ_PROFILE must be release or dev" >&2; exit 2 ;;
esac
echo "== cargo fuzz build ${build[*]}"
cargo fuzz build "${build[@]}"

parallel=()
if [[ "$jobs" -gt 1 ]]; then
  parallel=(-jobs="$jobs" -workers="$jobs")
fi
status=0
for target in "${targets[@]}"; do
  echo "== fuzzing $target for ${seconds}s"
  mkdir -p "artifacts/$target"
  if ! cargo fuzz run "${build[@]}" "$target" "corpus/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      "${parallel[@]}" -print_final_stats=1 2>"artifacts/$target/log.txt"; then
    echo "!! $target found a crash:" >&2
    tail -n 40 "artifacts/$target/log.txt" >&2
    status=1
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb|cov: " "artifacts/$target/log.txt" | tail -n 3 || true
done
exit "$status"
