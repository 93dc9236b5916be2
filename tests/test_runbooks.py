"""The runbooks of docs/install.md, pasted as they are, against sample pods of every mode.

Every ```sh block of docs/install.md that filters with `jq` starts with a comment saying what it
lists; that comment is the key of its expected output below. The block runs in bash exactly as
written, with `kubectl` and `aws` replaced by stand-ins that print tests/data/pods/*.json (what
`kubectl get pods -A -o json` and `kubectl get nodes` print on a cluster with one pod of each
kind) and a fixed list of ENI addresses; any other command they are given fails the test. A
filter added to the docs without an expectation here fails too, and so does one whose output
changes.

Sample pods (tests/data/pods/pods.json): agent mode with a native sidecar of this release, agent
mode with a legacy sidecar of the previous release (0.1.0), the HTTP gate, direct mode, a Multus
pod admitted without a sidecar, an opted-out Multus pod, a hostNetwork pod with the annotation,
an ordinary pod, and an application container running the sidecar's image.

Needs jq (scripts/setup-test-env.sh installs it from Debian).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL_MD = REPO / "docs" / "install.md"
PODS = REPO / "tests" / "data" / "pods" / "pods.json"
NODES = REPO / "tests" / "data" / "pods" / "nodes.json"
NEW = "ghcr.io/multus-eni/multus-eni-sidecar:0.2.0"
OLD = "ghcr.io/multus-eni/multus-eni-sidecar:0.1.0"

# What `aws ec2 describe-network-interfaces ... --output text` prints: the Multus ENIs' secondary
# addresses, tab-separated per ENI. 10.10.9.9 is held by no pod (leaked); 10.10.1.82 and .83 are
# held by pods without being on an ENI (the pod admitted without a sidecar, the opted-out one).
ENI_ADDRESSES = "10.10.1.80\t10.10.1.81\t10.10.9.9\n10.10.2.80\t10.10.3.80\n"

# First comment line of a block -> the lines it prints (order ignored, whitespace collapsed).
EXPECTED: dict[str, list[str]] = {
    "# pods per sidecar image (the release each pod was admitted with)": [f"1 {OLD}", f"3 {NEW}"],
    "# pods that still need the agent (agent mode and the gate): must be empty before step 5": [
        "cnf-a/upf-agent-0", "cnf-a/upf-legacy-0", "cnf-b/smf-gate-0",
    ],
    "# Multus pods without a sidecar, whose addresses only the agent (--pods all) assigns": [
        "cnf-a/upf-nosidecar-0", "cnf-a/upf-optout-0",
    ],
    "# pods still in direct mode (their sidecars hold AWS credentials)": ["cnf-c/amf-direct-0"],
    "# secondary IPv4 and IPv6 addresses on the Multus ENIs": ["10.10.9.9", "10.10.1.82", "10.10.1.83"],
    "# pods with a sidecar (any mode): must be empty before step 3": [
        "cnf-a/upf-agent-0", "cnf-a/upf-legacy-0", "cnf-b/smf-gate-0", "cnf-c/amf-direct-0",
    ],
    "# Multus pods admitted without a sidecar (not opted out, not hostNetwork)": ["cnf-a/upf-nosidecar-0"],
}
# Blocks that read node groups: GROUP=upf-a holds ip-10-0-1-10 and ip-10-0-1-11.
EXPECTED["# Multus pods of the node group without a sidecar: must be empty before step 2c"] = ["cnf-a/upf-nosidecar-0"]

FAKE_KUBECTL = r"""#!/usr/bin/env bash
# kubectl as the runbooks call it, reading tests/data/pods; anything else is a test failure.
case "$*" in
  "get pods -A -o json") exec cat "$PODS" ;;
  "get nodes -l eks.amazonaws.com/nodegroup="*" -o name")
    group=${4#eks.amazonaws.com/nodegroup=}
    exec jq -r --arg g "$group" '.items[] | select(.metadata.labels["eks.amazonaws.com/nodegroup"] == $g) | "node/\(.metadata.name)"' "$NODES" ;;
esac
echo "fake kubectl: unexpected: kubectl $*" >&2
exit 97
"""

FAKE_AWS = r"""#!/usr/bin/env bash
case "$1 $2" in
  "ec2 describe-network-interfaces") printf '%s' "$ENI_ADDRESSES"; exit 0 ;;
esac
echo "fake aws: unexpected: aws $*" >&2
exit 97
"""


def jq() -> str:
    found = shutil.which("jq")
    if found is None:
        pytest.fail("jq is not installed: run scripts/setup-test-env.sh", pytrace=False)
    return found


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^[ ]*```sh\n(.*?)^[ ]*```", text, re.S | re.M)


def dedent(block: str) -> str:
    lines = block.splitlines()
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return "\n".join(line[indent:] for line in lines) + "\n"


def filter_blocks() -> dict[str, str]:
    """First comment line -> block, for every sh block of install.md that runs jq on
    `kubectl` output."""
    out: dict[str, str] = {}
    for block in map(dedent, sh_blocks(INSTALL_MD.read_text())):
        if not re.search(r"\|\s*jq\b", block) or "kubectl get pods" not in block:
            continue
        first_comment = next((line for line in block.splitlines() if line.startswith("#")), None)
        assert first_comment, f"a runbook filter without a comment saying what it lists:\n{block}"
        assert first_comment not in out, f"two filters with the same comment: {first_comment}"
        out[first_comment] = block
    return out


@pytest.fixture
def fake_bin(tmp_path: Path) -> dict[str, str]:
    jq()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("kubectl", FAKE_KUBECTL), ("aws", FAKE_AWS)):
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PODS": str(PODS),
        "NODES": str(NODES),
        "ENI_ADDRESSES": ENI_ADDRESSES,
        "LC_ALL": "C",
    }


def run_block(block: str, env: dict[str, str], cwd: Path) -> list[str]:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], env=env, cwd=cwd, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"{block}\nexit {proc.returncode}: {proc.stderr}"
    return [" ".join(line.split()) for line in proc.stdout.splitlines() if line.strip()]


def test_every_runbook_filter_has_an_expectation():
    blocks = filter_blocks()
    assert set(blocks) == set(EXPECTED), (
        f"filters without an expectation: {sorted(set(blocks) - set(EXPECTED))}; "
        f"expectations whose filter is gone: {sorted(set(EXPECTED) - set(blocks))}"
    )


@pytest.mark.parametrize("comment", sorted(EXPECTED))
def test_runbook_filter_lists_exactly_the_right_pods(comment, fake_bin, tmp_path):
    blocks = filter_blocks()
    assert comment in blocks, f"docs/install.md lost the filter {comment!r}"
    assert sorted(run_block(blocks[comment], fake_bin, tmp_path)) == sorted(EXPECTED[comment])


def test_the_sample_has_a_pod_of_every_mode():
    """Each filter above is only as good as the sample: one pod per mode and sidecar kind."""
    import json

    pods = json.loads(PODS.read_text())["items"]
    statuses = [json.loads(p["metadata"]["annotations"]["multus-eni.io/status"]) for p in pods
                if "multus-eni.io/status" in p["metadata"]["annotations"]]
    assert {s["ec2Access"] for s in statuses} == {"agent", "gate", "direct"}
    assert {s["mode"] for s in statuses} == {"native", "legacy"}
    assert {s["image"] for s in statuses} == {NEW, OLD}


def test_the_old_agent_to_direct_filter_would_miss_gate_pods(fake_bin, tmp_path):
    """The filter this runbook had (ec2Access == "agent") leaves the gate pods out, which the
    agent alone serves: the check above can tell the difference."""
    block = filter_blocks()["# pods that still need the agent (agent mode and the gate): must be empty before step 5"]
    old = block.replace('.ec2Access | IN("agent", "gate"))', '.ec2Access == "agent")')
    assert old != block
    assert "cnf-b/smf-gate-0" not in run_block(old, fake_bin, tmp_path)


def test_the_fake_kubectl_refuses_what_it_does_not_know(fake_bin, tmp_path):
    proc = subprocess.run(["bash", "-c", "kubectl delete namespace multus-eni"], env=fake_bin, cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 97


def test_the_fail_open_patch_covers_every_webhook_entry():
    """`Pod creation is failing`, way A: the one-line patch sets failurePolicy Ignore on every
    entry the rendered configuration has (a fifth entry would otherwise stay Fail)."""
    import json

    from test_manifests import MANIFESTS, only, render

    text = INSTALL_MD.read_text()
    [patch] = re.findall(
        r"kubectl patch mutatingwebhookconfiguration multus-eni-webhook --type=json -p '(\[.*?\])'", text
    )
    operations = json.loads(patch)
    entries = only(render(MANIFESTS), "MutatingWebhookConfiguration")["webhooks"]
    assert sorted(op["path"] for op in operations) == sorted(f"/webhooks/{i}/failurePolicy" for i in range(len(entries)))
    assert {(op["op"], op["value"]) for op in operations} == {("replace", "Ignore")}
