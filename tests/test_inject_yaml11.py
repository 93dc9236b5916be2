"""Offline `inject` output reads back the same under YAML 1.1, as kubectl reads it
(sigs.k8s.io/yaml over go-yaml v2): strings that YAML 1.1 takes for booleans, nulls, numbers or
dates (`yes`, `off`, `0644`, `1_000`, `2001-12-14`, ...) must come out quoted, or kubectl sends a
boolean where a string belongs and the apiserver rejects the object.

PyYAML is the YAML 1.1 reader here. It reads a few spellings differently from go-yaml v2 (`y`/`n`
and `1e3` are strings to PyYAML, booleans and floats to go-yaml), so those are also checked
against the output text: they must be quoted.

The binary is read from $MULTUS_ENI_BIN_DIR (default <repo>/target/debug); pytest does not build.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN_DIR = Path(os.environ.get("MULTUS_ENI_BIN_DIR", REPO / "target" / "debug"))
WEBHOOK = BIN_DIR / "multus-eni-webhook"
IMAGE = "ghcr.io/multus-eni/multus-eni-sidecar:0.1.0"
SIDECAR = "multus-eni-sidecar"
STATUS = "multus-eni.io/status"

# YAML 1.1 booleans, nulls, ints (octal, hex, binary, underscores, base 60), floats, dates, and
# the go-yaml-only spellings.
TRICKY = [
    "yes", "Yes", "NO", "on", "Off", "y", "Y", "n", "N", "true", "False",
    "null", "~", "", "0644", "0o17", "0x1F", "0b101", "1_000", "1:20", "190:20:30.15",
    "1e3", "1.0e+3", "-1", "+1", ".5", ".inf", "-.Inf", ".NaN", "2001-12-14",
    "2001-12-14t21:59:43.10-05:00", "<<", "=",
]


def manifest() -> str:
    """A Deployment whose strings are all written quoted, so any reader takes them as strings."""
    q = lambda s: yaml.safe_dump(s, default_style='"').strip().removesuffix("\n...")  # noqa: E731
    env = "\n".join(f"        - {{name: V{i}, value: {q(s)}}}" for i, s in enumerate(TRICKY))
    args = "\n".join(f"        - {q(s)}" for s in TRICKY)
    annotations = "\n".join(f"        a{i}.example.com/v: {q(s)}" for i, s in enumerate(TRICKY))
    return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: tricky
  labels: {{app: tricky, enabled: "yes", version: "1.10"}}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: tricky}}
  template:
    metadata:
      labels: {{app: tricky}}
      annotations:
        k8s.v1.cni.cncf.io/networks: ipvlan
{annotations}
    spec:
      containers:
      - name: app
        image: busybox
        args:
{args}
        env:
{env}
      volumes:
      - name: cfg
        configMap: {{name: c, defaultMode: 0644}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: c}}
data:
{chr(10).join(f"  k{i}: {q(s)}" for i, s in enumerate(TRICKY))}
"""


def inject(text: str) -> str:
    if not WEBHOOK.exists():
        pytest.fail(f"{WEBHOOK} missing: run `cargo build -p multus-eni-webhook` first (pytest does not build)")
    done = subprocess.run(
        [str(WEBHOOK), "inject", "-f", "-", "--sidecar-image", IMAGE],
        input=text, capture_output=True, text=True, check=False, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def without_injection(deployment: dict) -> dict:
    d = copy.deepcopy(deployment)
    template = d["spec"]["template"]
    template["metadata"]["annotations"].pop(STATUS)
    # The sidecar's own additions besides the container: IRSA skips it; agent mode mounts the
    # agent's socket directory.
    template["metadata"]["annotations"].pop("eks.amazonaws.com/skip-containers")
    template["spec"]["volumes"] = [v for v in template["spec"]["volumes"] if v["name"] != "multus-eni-agent-socket"]
    inits = [c for c in template["spec"].get("initContainers", []) if c["name"] != SIDECAR]
    if inits:
        template["spec"]["initContainers"] = inits
    else:
        template["spec"].pop("initContainers", None)
    return d


def test_output_reads_back_the_same_under_yaml_1_1() -> None:
    source = manifest()
    expected = list(yaml.safe_load_all(source))
    # 0644 unquoted is octal 420 under YAML 1.1, as kubectl reads it.
    assert expected[0]["spec"]["template"]["spec"]["volumes"][0]["configMap"]["defaultMode"] == 420
    output = inject(source)
    got = list(yaml.safe_load_all(output))
    assert len(got) == 2
    assert without_injection(got[0]) == expected[0]
    assert got[1] == expected[1]
    sidecar = got[0]["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["name"] == SIDECAR


@pytest.mark.parametrize("word", ["y", "Y", "n", "N", "1e3"])
def test_go_yaml_only_spellings_are_quoted(word: str) -> None:
    """go-yaml v2 reads these as a boolean or a float; PyYAML does not, so check the text."""
    output = inject(manifest())
    plain = [line for line in output.splitlines() if line.rstrip().endswith(f": {word}") or line.strip() == f"- {word}"]
    assert not plain, f"{word!r} left unquoted: {plain}"
