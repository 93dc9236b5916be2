#!/usr/bin/env bash
# Builds the previous release's `multus-eni-sidecar-agent-mode` (0.1.0, protocol v1) into
# target/prev-release/, for the version-skew e2e test (a sidecar already running in pods keeps
# working after the agent is upgraded; docs/contract.md). Built from git in a temporary
# worktree with this repo's own target dir and this tree's dev profile, so the dependencies it
# shares with the workspace are reused. Idempotent: does nothing when the binary of that commit is there.
# The next `cargo build` of the current tree puts the current binary back into target/debug.
set -euo pipefail
cd "$(dirname "$0")/.."

# 0.1.0 (CHANGELOG.md); tests/conftest.py's PREVIOUS_RELEASE_COMMIT, checked by tests/test_versions.py.
commit="${MULTUS_ENI_PREV_RELEASE:-db67960}"
out=target/prev-release
stamp="$out/commit"
bin=multus-eni-sidecar-agent-mode

full=$(git rev-parse --verify "$commit^{commit}")
if [ -x "$out/$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$full" ]; then
  echo "previous release sidecar: $out/$bin ($commit) up to date"
  exit 0
fi

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
tree=$(mktemp -d)
cleanup() { git worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"; }
trap cleanup EXIT
git worktree add --detach --quiet "$tree" "$full"
echo "previous release sidecar: building $bin at $commit"
# With this tree's [profile.dev] (Cargo.toml), which that commit's Cargo.toml lacks: with its own
# (full debug info) every dependency would compile again instead of being reused from target/.
# Only what its feature set changes compiles (tokio and the crates above it, ~30 of ~95).
(cd "$tree" && CARGO_TARGET_DIR="$target_dir" cargo build -p "$bin" --locked \
  --config 'profile.dev.debug="line-tables-only"' --config 'profile.dev.package."*".debug=false')
mkdir -p "$out"
cp "$target_dir/debug/$bin" "$out/$bin.tmp"
mv "$out/$bin.tmp" "$out/$bin"
echo "$full" > "$stamp"
