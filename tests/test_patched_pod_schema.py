"""Every object the webhook's mutation produces is valid Kubernetes, in strict mode, for every
supported release: the built `multus-eni-webhook inject` runs over every fixture under
webhook/tests/data (native mode, and legacy mode with the sidecar-only IRSA role) and each
resulting object is validated with kubernetes-validate (1.29 — the first release with native
sidecars on by default — through the newest schema the package ships; kubernetes-validate 1.37.0
ships 1.25–1.37).

The binary is read from $MULTUS_ENI_BIN_DIR (default <repo>/target/debug); pytest does not build.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from lib.pod_security import baseline_violations, restricted_violations

REPO = Path(__file__).resolve().parent.parent
BIN_DIR = Path(os.environ.get("MULTUS_ENI_BIN_DIR", REPO / "target" / "debug"))
WEBHOOK = BIN_DIR / "multus-eni-webhook"
FIXTURES = sorted((REPO / "webhook" / "tests" / "data").glob("*.yaml"))
SIDECAR = "multus-eni-sidecar"
IMAGE = "ghcr.io/multus-eni/multus-eni-sidecar:0.1.0"
MIN_VERSION = (1, 29)
REQUIRED_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]

MODES = {
    # The default: agent mode (hostPath socket volume, no AWS settings).
    "native": ["--sidecar-mode", "native", "--aws-region", "us-west-2"],
    "legacy-irsa": [
        "--sidecar-mode",
        "legacy",
        "--ec2-access",
        "direct",
        "--aws-region",
        "us-west-2",
        "--sidecar-role-arn",
        "arn:aws:iam::123456789012:role/multus-eni-sidecar",
    ],
    # The HTTP startup gate (/mutate/gate): no volume, the node's address from the downward API.
    "gate": ["--ec2-access", "gate"],
    "direct-settings": [
        "--ec2-access",
        "direct",
        "--sidecar-https-proxy",
        "http://proxy.internal:3128",
        "--sidecar-no-proxy",
        "169.254.169.254",
        "--sidecar-ec2-endpoint",
        "https://vpce-0abc.ec2.us-west-2.vpce.amazonaws.com",
        "--sidecar-resync-interval",
        "10m",
        "--sidecar-startup-timeout",
        "10m",
    ],
}


def schema_versions() -> list[str]:
    """`major.minor` of every schema set kubernetes-validate ships from 1.29 on."""
    found = set()
    for v in kubernetes_validate.utils.all_versions():
        major, minor = (int(x) for x in v.split(".")[:2])
        if (major, minor) >= MIN_VERSION:
            found.add((major, minor))
    return [f"{a}.{b}" for a, b in sorted(found)]


VERSIONS = schema_versions()


def test_the_supported_releases_have_schemas() -> None:
    missing = [v for v in REQUIRED_VERSIONS if v not in VERSIONS]
    assert not missing, f"kubernetes-validate lacks schemas for {missing}; pin a newer one in tests/requirements.txt"


def inject(fixture: Path, mode: str) -> list[dict]:
    if not WEBHOOK.exists():
        pytest.fail(f"{WEBHOOK} missing: run `cargo build -p multus-eni-webhook` first")
    done = subprocess.run(
        [str(WEBHOOK), "inject", "-f", str(fixture), "--sidecar-image", IMAGE, *MODES[mode]],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("MULTUS_ENI_")},
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def pod_template(obj: dict) -> dict | None:
    kind = obj.get("kind")
    if kind == "Pod":
        return obj
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return obj["spec"]["template"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return None


def sidecar_of(template: dict) -> dict | None:
    spec = template.get("spec", {})
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        if container.get("name") == SIDECAR:
            return container
    return None


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_injected_objects_pass_strict_schemas(fixture: Path, mode: str) -> None:
    assert FIXTURES, "no fixtures found"
    original = [doc for doc in yaml.safe_load_all(fixture.read_text()) if doc is not None]
    objects = inject(fixture, mode)
    assert len(objects) == len(original)
    for before, obj in zip(original, objects):
        template = pod_template(obj)
        # The golden file says whether this fixture is injected; the binary must agree.
        golden = fixture.with_suffix(".patch.json").read_text()
        expect_sidecar = '"skip"' not in golden
        if template is not None:
            # Legacy mode leaves pods that run to completion alone (a Job would never finish).
            if mode.startswith("legacy") and template["spec"].get("restartPolicy") in {"Never", "OnFailure"}:
                expect_sidecar = False
            sidecar = sidecar_of(template)
            assert (sidecar is not None) == expect_sidecar, fixture.name
            if sidecar is not None:
                # A sidecar already injected as an init container (reinvocation) stays one.
                native = not mode.startswith("legacy") or sidecar is template["spec"].get("initContainers", [None])[0]
                first = template["spec"]["initContainers"][0] if native else template["spec"]["containers"][-1]
                assert first["name"] == SIDECAR
                assert template["spec"]["containers"][: len(pod_template(before)["spec"]["containers"])] == pod_template(before)["spec"]["containers"]
        else:
            assert obj == before, f"{fixture.name}: a non-workload object was changed"
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{fixture.name} ({mode}) invalid for Kubernetes {version}: {err.message} at {list(err.path)}")


# === Pod Security ===

RESTRICTED_FIXTURE = REPO / "webhook" / "tests" / "data" / "pod-restricted.yaml"


def test_the_gate_keeps_a_restricted_pod_restricted() -> None:
    """/mutate/gate serves namespaces that enforce Pod Security `restricted`: a pod that passes
    `restricted` still passes it with the gate injected. Agent mode's sidecar would not (its
    hostPath volume), which is why those namespaces never get it."""
    [original] = [d for d in yaml.safe_load_all(RESTRICTED_FIXTURE.read_text()) if d]
    assert restricted_violations(original["spec"]) == [], "the fixture itself must be restricted"

    [gated] = inject(RESTRICTED_FIXTURE, "gate")
    sidecar = sidecar_of(gated)
    assert sidecar is not None and "--agent-url=http://$(HOST_IP):9812" in sidecar["args"]
    assert restricted_violations(gated["spec"]) == []

    [agent] = inject(RESTRICTED_FIXTURE, "native")
    assert any("hostPath" in v for v in baseline_violations(agent["spec"])), "agent mode mounts a hostPath"


@pytest.mark.parametrize("mode", ["gate", "direct-settings", "legacy-irsa"])
@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_the_sidecar_adds_nothing_restricted_forbids(fixture: Path, mode: str) -> None:
    """Whatever the application does, what the gate and direct mode add (the sidecar container
    and its volumes) passes `restricted`: those are the modes of namespaces without hostPath.
    A workload the golden file says is injected must come out with a sidecar: a mutation that
    injected nothing would otherwise pass here by checking nothing."""
    original = [doc for doc in yaml.safe_load_all(fixture.read_text()) if doc is not None]
    injected = '"skip"' not in fixture.with_suffix(".patch.json").read_text()
    for before, obj in zip(original, inject(fixture, mode)):
        template = pod_template(obj)
        if template is None or sidecar_of(pod_template(before)) is not None:
            continue  # not a workload, or already injected (reinvocation)
        run_to_completion = template["spec"].get("restartPolicy") in {"Never", "OnFailure"}
        sidecar = sidecar_of(template)
        if injected and not (mode.startswith("legacy") and run_to_completion):
            assert sidecar is not None, f"{fixture.name} ({mode}): nothing was injected"
        if sidecar is None:
            continue
        added_volumes = [v for v in template["spec"].get("volumes") or [] if v not in (pod_template(before)["spec"].get("volumes") or [])]
        alone = {
            "securityContext": {},
            "containers": [sidecar],
            "volumes": added_volumes,
        }
        assert restricted_violations(alone) == [], f"{fixture.name} ({mode})"


def test_the_pod_security_model_refuses_what_the_standards_refuse() -> None:
    """tests/lib/pod_security.py must be able to say no, rule by rule, or the Pod Security tests
    above prove nothing: a restricted pod, then one change at a time that the standards forbid."""
    ok = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "app",
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }],
        "volumes": [{"name": "data", "emptyDir": {}}],
    }
    assert restricted_violations(ok) == []
    baseline_cases = {
        "pod appArmorProfile Unconfined": ("securityContext", "appArmorProfile", {"type": "Unconfined"}),
        "hostNetwork: true": (None, "hostNetwork", True),
        "volume host: hostPath": (None, "volumes", [{"name": "host", "hostPath": {"path": "/"}}]),
        "pod seccompProfile Unconfined": ("securityContext", "seccompProfile", {"type": "Unconfined"}),
    }
    for expected, (parent, key, value) in baseline_cases.items():
        spec = copy.deepcopy(ok)
        (spec[parent] if parent else spec)[key] = value
        assert expected in baseline_violations(spec), expected
        assert expected in restricted_violations(spec), expected
    container_cases = {
        "app: appArmorProfile Unconfined": ("appArmorProfile", {"type": "Unconfined"}),
        "app: privileged": ("privileged", True),
    }
    for expected, (key, value) in container_cases.items():
        spec = copy.deepcopy(ok)
        spec["containers"][0]["securityContext"][key] = value
        assert expected in baseline_violations(spec), expected
    # RuntimeDefault and Localhost AppArmor are allowed at both levels.
    spec = copy.deepcopy(ok)
    spec["securityContext"]["appArmorProfile"] = {"type": "RuntimeDefault"}
    spec["containers"][0]["securityContext"]["appArmorProfile"] = {"type": "Localhost", "localhostProfile": "p"}
    assert restricted_violations(spec) == []
