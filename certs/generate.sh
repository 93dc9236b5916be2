#!/usr/bin/env bash
# TLS for the webhook without cert-manager: runs `multus-eni-webhook certs`, which writes a CA,
# the serving certificate as a kubernetes.io/tls Secret manifest and the caBundle patch for the
# MutatingWebhookConfiguration; with --apply, also installs the no-cert-manager overlay and
# applies both, in the order that works on a fresh cluster.
#
#   certs/generate.sh [--out-dir DIR] [--overlay KUSTOMIZATION] [--apply] [-- EXTRA CERTS FLAGS]
#
# DIR defaults to ./multus-eni-certs. KUSTOMIZATION is what --apply installs: your own overlay
# (your images, flags) built on manifests/overlays/no-cert-manager; default that overlay itself.
# EXTRA CERTS FLAGS go to `multus-eni-webhook certs` as they
# are (--namespace, --service, --secret-name, --validity-days; see `multus-eni-webhook certs --help`).
# The binary: $MULTUS_ENI_WEBHOOK, else multus-eni-webhook on PATH, else this checkout's
# target/release or target/debug build.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="./multus-eni-certs"
overlay="$repo/manifests/overlays/no-cert-manager"
apply=false
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out-dir) out_dir="${2:?--out-dir needs a directory}"; shift 2 ;;
    --out-dir=*) out_dir="${1#--out-dir=}"; shift ;;
    --overlay) overlay="${2:?--overlay needs a kustomization directory}"; shift 2 ;;
    --overlay=*) overlay="${1#--overlay=}"; shift ;;
    --apply) apply=true; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "generate.sh: unknown argument $1 (extra certs flags go after --)" >&2; exit 2 ;;
  esac
done

webhook="${MULTUS_ENI_WEBHOOK:-}"
if [ -z "$webhook" ]; then
  for candidate in "$(command -v multus-eni-webhook || true)" \
                   "$repo/target/release/multus-eni-webhook" "$repo/target/debug/multus-eni-webhook"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then webhook="$candidate"; break; fi
  done
fi
if [ -z "$webhook" ]; then
  echo "generate.sh: multus-eni-webhook not found: set MULTUS_ENI_WEBHOOK, put it on PATH or" >&2
  echo "generate.sh: run 'cargo build -p multus-eni-webhook' (or use the image, certs/README.md)" >&2
  exit 1
fi

if [ ! -f "$overlay/kustomization.yaml" ] && [ ! -f "$overlay/kustomization.yml" ] && [ ! -f "$overlay/Kustomization" ]; then
  echo "generate.sh: --overlay $overlay is not a kustomization directory" >&2
  exit 2
fi

mkdir -p "$out_dir"
"$webhook" certs --out-dir "$out_dir" ${extra[@]+"${extra[@]}"}
for file in secret.yaml cabundle-patch.json; do
  if [ ! -s "$out_dir/$file" ]; then
    echo "generate.sh: $webhook certs did not write $out_dir/$file" >&2
    exit 1
  fi
done
echo "generate.sh: wrote $out_dir (secret.yaml, cabundle-patch.json, ca.crt, tls.crt, keys)"

# A JSON array is an RFC 6902 patch; an object a strategic merge patch (merged by webhook name).
patch_type=strategic
if [ "$(tr -d ' \t\r\n' < "$out_dir/cabundle-patch.json" | cut -c1)" = "[" ]; then
  patch_type=json
fi

if [ "$apply" = true ]; then
  kubectl apply -k "$overlay"
  kubectl apply -f "$out_dir/secret.yaml"
  kubectl patch mutatingwebhookconfiguration multus-eni-webhook \
    --type="$patch_type" --patch-file "$out_dir/cabundle-patch.json"
  echo "generate.sh: installed; the webhook pods start once they can mount the Secret"
else
  cat <<NEXT
Next (or run again with --apply):
  kubectl apply -k $overlay
  kubectl apply -f $out_dir/secret.yaml
  kubectl patch mutatingwebhookconfiguration multus-eni-webhook --type=$patch_type --patch-file $out_dir/cabundle-patch.json
Keep $out_dir/ca.key secret (or delete it): whoever holds it can impersonate the webhook.
NEXT
fi
