"""What an operator applies, checked the way a broken install would show up.

- every kustomization renders with `kubectl kustomize` and every built-in object passes the
  Kubernetes OpenAPI schemas of 1.29 onwards in strict mode (kubernetes-validate); the CRD kinds
  listed in CRD_KINDS are checked structurally instead;
- the parts agree with each other (Service ↔ webhook flags, webhook config ↔ Service,
  Certificate ↔ Service and Deployment, opt-in label ↔ sample namespace, sidecar image and probe
  port ↔ the sidecar binary, IAM policy ↔ the EC2 calls in ec2/src, Dockerfile ↔ contract);
- the webhook's matchConditions, evaluated with a CEL implementation on fixture pods, send only
  Multus pods that are not hostNetwork and not opted out.

Needs kubectl (with its built-in kustomize) on PATH: without it these tests fail, they never skip.
Binaries are read from $MULTUS_ENI_BIN_DIR (default <repo>/target/debug) when present.
"""

from __future__ import annotations

import copy
import fnmatch
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import celpy
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from lib.apiserver import label_selector_matches as selector_matches
from lib.pod_security import restricted_violations

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
CONTRACT = REPO / "docs" / "contract.md"
BIN_DIR = Path(os.environ.get("MULTUS_ENI_BIN_DIR", REPO / "target" / "debug"))

# Every kustomization an operator may apply.
KUSTOMIZATIONS = {
    "default": MANIFESTS,
    "no-cert-manager": MANIFESTS / "overlays" / "no-cert-manager",
    "samples": MANIFESTS / "samples",
    "monitoring": MANIFESTS / "overlays" / "monitoring",
    "multus-node-groups": MANIFESTS / "overlays" / "multus-node-groups",
}
# Kubernetes versions whose schemas every built-in object must pass (1.29 is the oldest release
# with native sidecars on by default). Newer schemas shipped by kubernetes-validate are added.
MIN_VERSION = (1, 29)
# Custom resources: kubernetes-validate has no schema for them; check_crd_object() covers them.
CRD_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition"),
}

NAMESPACE = "multus-eni"
SERVICE = "multus-eni-webhook"
AGENT = "multus-eni-agent"
AGENT_NAMESPACE = "multus-eni-agent"
CRD_KINDS |= {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
OPT_IN_LABEL = ("multus-eni.io/injection", "enabled")
NETWORKS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"
OPT_OUT_ANNOTATION = "multus-eni.io/inject"
WEBHOOK_PATH = "/mutate"
DIRECT_PATH = "/mutate/direct"
# The HTTP startup gate: no hostPath volume (docs/contract.md).
GATE_PATH = "/mutate/gate"
# Pod Security levels that forbid hostPath volumes (the agent's socket).
NO_HOSTPATH_LEVELS = {"baseline", "restricted"}
# The namespace label that chooses a mode explicitly.
EC2_ACCESS_LABEL = "multus-eni.io/ec2-access"
SIDECAR_BINARY_PATH = "/usr/local/bin/multus-eni-sidecar"
# The sidecar image's second binary, agent mode only (no AWS SDK): what agent mode injects.
SIDECAR_AGENT_MODE_BINARY_PATH = "/usr/local/bin/multus-eni-sidecar-agent-mode"
# The packages whose binaries each image target holds, at /usr/local/bin/<package>; the first
# is the entrypoint.
IMAGE_PACKAGES = {
    "webhook": ["multus-eni-webhook"],
    "sidecar": ["multus-eni-sidecar", "multus-eni-sidecar-agent-mode"],
    "agent": ["multus-eni-agent"],
}


# === rendering ===


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not on PATH: the manifest tests render the kustomizations with "
            "`kubectl kustomize`. Install kubectl >= 1.29 (it bundles kustomize) and run again.",
            pytrace=False,
        )
    return path


def render(directory: Path) -> list[dict]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, f"kubectl kustomize {directory} rendered nothing"
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in KUSTOMIZATIONS.items()}


def only(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [
        d
        for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def all_of(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def webhook_container(docs: list[dict]) -> dict:
    deployment = only(docs, "Deployment", SERVICE)
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the webhook Deployment runs exactly one container"
    return containers[0]


def settings(container: dict) -> dict[str, str]:
    """The webhook's settings as flag names: its flags, plus `MULTUS_ENI_<FLAG>` env values."""
    out = {
        e["name"].removeprefix("MULTUS_ENI_").lower().replace("_", "-"): e["value"]
        for e in container.get("env", [])
        if e["name"].startswith("MULTUS_ENI_") and "value" in e
    }
    out.update(flags(container))
    return out


def flags(container: dict) -> dict[str, str]:
    """`--name=value` / `--name value` arguments of a container, by flag name."""
    args = list(container.get("command", [])[1:]) + list(container.get("args", []))
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if "=" in arg:
                name, value = arg[2:].split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                name, value = arg[2:], args[i + 1]
                i += 1
            else:
                name, value = arg[2:], "true"
            out[name] = value
        i += 1
    return out


def port_of(addr: str) -> int:
    host, _, port = addr.rpartition(":")
    assert host and port.isdigit(), f"not a host:port address: {addr!r}"
    return int(port)


def container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"container {container['name']} has no port named {port!r}"
    return named[0]


def namespace_labels(namespace: dict) -> dict:
    """Labels as the apiserver stores them: plus the immutable kubernetes.io/metadata.name."""
    labels = dict(namespace["metadata"].get("labels", {}))
    labels["kubernetes.io/metadata.name"] = namespace["metadata"]["name"]
    return labels


# === schema validation ===


def kubernetes_versions() -> list[str]:
    versions = sorted(
        {
            tuple(int(p) for p in v.split(".")[:2])
            for v in kubernetes_validate.utils.all_versions()
        }
    )
    wanted = [f"{a}.{b}" for a, b in versions if (a, b) >= MIN_VERSION]
    return wanted


def test_validator_ships_every_supported_version():
    versions = kubernetes_versions()
    for required in ("1.29", "1.30", "1.31", "1.32", "1.33"):
        assert required in versions, (
            f"kubernetes-validate {kubernetes_validate.__version__} has no schema for {required}; "
            "pin a release that has 1.29-1.33 in tests/requirements.txt"
        )


def test_strict_validation_rejects_unknown_fields(rendered):
    """The validator itself must be able to fail, or the schema test proves nothing."""
    deployment = copy.deepcopy(only(rendered["default"], "Deployment", SERVICE))
    deployment["spec"]["template"]["spec"]["containers"][0]["tlsCertFile"] = "/x"
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(deployment, "1.29", strict=True)


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZATIONS))
def test_builtin_objects_pass_strict_schemas(rendered, kustomization):
    checked = 0
    for doc in rendered[kustomization]:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        for version in kubernetes_versions():
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(
                    f"{doc['kind']}/{doc['metadata']['name']} fails the {version} schema at "
                    f"{path}: {e.message}"
                )
            except SchemaNotFoundError as e:
                pytest.fail(f"{e.message}: add it to CRD_KINDS only if it is a custom resource")
        checked += 1
    assert checked > 0


# Fields of the cert-manager v1 API that these manifests may use (a typo is an error).
CERT_MANAGER_FIELDS = {
    "Issuer": {"selfSigned", "ca"},
    "Certificate": {
        "secretName", "commonName", "dnsNames", "duration", "renewBefore", "usages",
        "privateKey", "issuerRef", "isCA", "subject", "secretTemplate", "ipAddresses",
        "revisionHistoryLimit",
    },
    "Certificate.privateKey": {"algorithm", "size", "encoding", "rotationPolicy"},
    "Certificate.issuerRef": {"name", "kind", "group"},
}
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+s)?$")


def check_crd_object(doc: dict) -> None:
    meta = doc["metadata"]
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, f"unexpected keys in {doc}"
    assert meta.get("name") and meta.get("namespace"), f"{doc['kind']} needs name and namespace"
    spec = doc.get("spec")
    assert isinstance(spec, dict), f"{doc['kind']}/{meta['name']} has no spec"
    kind = doc["kind"]
    if kind == "Issuer":
        assert set(spec) <= CERT_MANAGER_FIELDS["Issuer"] and len(spec) == 1, spec
        if "ca" in spec:
            assert set(spec["ca"]) == {"secretName"}, spec
    elif kind == "Certificate":
        unknown = set(spec) - CERT_MANAGER_FIELDS["Certificate"]
        assert not unknown, f"unknown Certificate fields {unknown}"
        assert spec["secretName"] and spec["issuerRef"]["name"]
        assert set(spec["issuerRef"]) <= CERT_MANAGER_FIELDS["Certificate.issuerRef"]
        assert set(spec.get("privateKey", {})) <= CERT_MANAGER_FIELDS["Certificate.privateKey"]
        for key in ("duration", "renewBefore"):
            if key in spec:
                assert DURATION.match(spec[key]), f"{key} {spec[key]!r} is not a Go duration"
        if not spec.get("isCA"):
            assert spec.get("dnsNames"), "a serving certificate needs dnsNames"
    elif kind == "NetworkAttachmentDefinition":
        assert set(spec) == {"config"}, spec
        config = json.loads(spec["config"])
        assert config.get("cniVersion") and config.get("type"), config
    elif kind == "PodMonitor":
        assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}, spec
        assert spec["selector"]["matchLabels"]
        for endpoint in spec["podMetricsEndpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scheme"}, endpoint
            assert endpoint["port"] and DURATION.match(endpoint.get("interval", "30s"))
    elif kind == "PrometheusRule":
        assert set(spec) == {"groups"}, spec
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
                assert rule["alert"] and rule["expr"] and rule["labels"]["severity"]
                assert DURATION.match(rule.get("for", "0s")), rule
    else:  # pragma: no cover - CRD_KINDS and this function must move together
        pytest.fail(f"no structural check for {kind}")


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZATIONS))
def test_custom_resources_are_well_formed(rendered, kustomization):
    for doc in rendered[kustomization]:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            check_crd_object(doc)


def test_expected_objects_are_rendered(rendered):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered["default"])
    assert kinds == sorted(
        [
            ("Namespace", NAMESPACE),
            ("ServiceAccount", SERVICE),
            ("Deployment", SERVICE),
            ("Service", SERVICE),
            ("PodDisruptionBudget", SERVICE),
            ("MutatingWebhookConfiguration", SERVICE),
            ("Namespace", AGENT_NAMESPACE),
            ("ServiceAccount", AGENT),
            ("DaemonSet", AGENT),
            ("Service", AGENT),
            ("Issuer", "multus-eni-selfsigned"),
            ("Issuer", "multus-eni-ca"),
            ("Certificate", "multus-eni-ca"),
            ("Certificate", "multus-eni-webhook"),
        ]
    )
    for doc in rendered["default"]:
        if doc["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
            expected = AGENT_NAMESPACE if doc["metadata"]["name"] == AGENT else NAMESPACE
            assert doc["metadata"].get("namespace") == expected, doc["metadata"]


def test_no_cert_manager_overlay_is_core_without_cert_manager(rendered):
    overlay = rendered["no-cert-manager"]
    assert not [d for d in overlay if d["apiVersion"].startswith("cert-manager.io/")]
    webhook = only(overlay, "MutatingWebhookConfiguration")
    assert "cert-manager.io/inject-ca-from" not in webhook["metadata"].get("annotations", {})
    default_core = [
        d for d in rendered["default"] if not d["apiVersion"].startswith("cert-manager.io/")
    ]
    for doc in default_core:
        twin = only(overlay, doc["kind"], doc["metadata"]["name"])
        if doc["kind"] != "MutatingWebhookConfiguration":
            assert twin == doc, f"{doc['kind']} differs between the default install and overlay"


# === the webhook Deployment, Service and PDB ===


def test_service_reaches_the_webhook_tls_port(rendered):
    docs = rendered["default"]
    service = only(docs, "Service", SERVICE)
    container = webhook_container(docs)
    addr_port = port_of(flags(container)["addr"])
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"https", "metrics"}, "named ports: https for the apiserver, metrics"
    assert ports["https"]["port"] == 443
    assert container_port(container, ports["https"]["targetPort"]) == addr_port
    metrics_port = port_of(flags(container).get("metrics-addr", "0.0.0.0:8080"))
    assert container_port(container, ports["metrics"]["targetPort"]) == metrics_port
    pod_labels = only(docs, "Deployment", SERVICE)["spec"]["template"]["metadata"]["labels"]
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels)


def test_webhook_client_config_points_at_the_service(rendered):
    docs = rendered["default"]
    service = only(docs, "Service", SERVICE)
    hooks = only(docs, "MutatingWebhookConfiguration")["webhooks"]
    assert [h["clientConfig"]["service"]["path"] for h in hooks] == [WEBHOOK_PATH, GATE_PATH, GATE_PATH, DIRECT_PATH]
    https = next(p for p in service["spec"]["ports"] if p["name"] == "https")
    for hook in hooks:
        svc_ref = hook["clientConfig"]["service"]
        assert svc_ref["name"] == service["metadata"]["name"]
        assert svc_ref["namespace"] == service["metadata"]["namespace"]
        assert svc_ref.get("port", 443) == https["port"]
        assert "url" not in hook["clientConfig"]


def test_deployment_is_highly_available_and_hardened(rendered):
    docs = rendered["default"]
    deployment = only(docs, "Deployment", SERVICE)
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spread = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    for constraint in spread.values():
        assert selector_matches(constraint["labelSelector"], pod["metadata"]["labels"])

    pdb = only(docs, "PodDisruptionBudget", SERVICE)
    assert selector_matches(pdb["spec"]["selector"], pod["metadata"]["labels"])
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1

    assert spec["automountServiceAccountToken"] is False
    service_account = only(docs, "ServiceAccount", spec["serviceAccountName"])
    assert service_account["automountServiceAccountToken"] is False
    assert not [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding")]

    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    container = webhook_container(docs)
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc.get("privileged", False) is False
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]

    ns = only(docs, "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_probes_use_the_metrics_port(rendered):
    container = webhook_container(rendered["default"])
    metrics_port = port_of(flags(container).get("metrics-addr", "0.0.0.0:8080"))
    assert metrics_port == 8080
    probes = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get.get("scheme", "HTTP") == "HTTP"
        assert container_port(container, get["port"]) == metrics_port


def test_tls_secret_is_mounted_as_a_directory_the_flags_point_into(rendered):
    docs = rendered["default"]
    deployment = only(docs, "Deployment", SERVICE)
    container = webhook_container(docs)
    args = flags(container)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    serving = only(docs, "Certificate", "multus-eni-webhook")
    tls_mounts = [
        m
        for m in container["volumeMounts"]
        if volumes[m["name"]].get("secret", {}).get("secretName") == serving["spec"]["secretName"]
    ]
    assert len(tls_mounts) == 1, "the Secret the Certificate writes is mounted exactly once"
    [mount] = tls_mounts
    assert "subPath" not in mount and "subPathExpr" not in mount, (
        "a subPath mount never sees kubelet's ..data swap, so rotation would not reach the webhook"
    )
    assert mount.get("readOnly") is True
    # cert-manager and `multus-eni-webhook certs` both write kubernetes.io/tls keys.
    assert args["tls-cert"] == f"{mount['mountPath']}/tls.crt"
    assert args["tls-key"] == f"{mount['mountPath']}/tls.key"
    assert "items" not in volumes[mount["name"]]["secret"]


# === the node agent DaemonSet ===


def test_agent_daemonset_runs_everywhere_with_only_the_privileges_it_needs(rendered):
    docs = rendered["default"]
    daemonset = only(docs, "DaemonSet", AGENT)
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"], "tolerates every taint"
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    # The node's resolver: the agent calls EC2, STS and IMDS, never the Kubernetes API, so its
    # name resolution must not depend on CoreDNS.
    assert spec["dnsPolicy"] == "Default"
    assert spec["automountServiceAccountToken"] is False
    assert only(docs, "ServiceAccount", spec["serviceAccountName"])["automountServiceAccountToken"] is False
    container = agent_container(docs)
    assert container["command"] == ["/usr/local/bin/multus-eni-agent"] and container["args"][0] == "run"
    sc = container["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc.get("privileged", False) is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN", "SYS_PTRACE"]}
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    # Each privilege is justified where it is granted.
    text = (MANIFESTS / "agent" / "daemonset.yaml").read_text()
    for granted in (r"hostNetwork: true", r"hostPID: true", r"- SYS_ADMIN", r"- SYS_PTRACE", r"runAsUser: 0"):
        assert re.search(rf"#[^\n]*\n(\s*#[^\n]*\n)*\s*{granted}", text), f"{granted} has no comment saying why"
    volumes = {v["name"]: v["hostPath"] for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    args = flags(container)
    socket_dir = str(Path(args["socket"]).parent)
    assert volumes[mounts[socket_dir]["name"]] == {"path": socket_dir, "type": "DirectoryOrCreate"}
    netns = mounts[args["netns-dir"]]
    assert netns["readOnly"] is True and netns["mountPropagation"] == "HostToContainer"
    assert volumes[netns["name"]]["path"] == "/var/run/netns"
    # Never created by the kubelet: an empty directory would be a node without pods.
    assert volumes[netns["name"]]["type"] == "Directory"
    state = mounts[args["state-dir"]]
    assert volumes[state["name"]] == {"path": "/var/lib/multus-eni", "type": "DirectoryOrCreate"}
    assert not state.get("readOnly")

    ns = only(docs, "Namespace", AGENT_NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    # The webhook's own namespace keeps `restricted`: the agent does not live there.
    assert only(docs, "Namespace", NAMESPACE)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_agent_flags_follow_the_contract(rendered):
    """docs/contract.md fixes the agent's flags and defaults; the DaemonSet passes only those,
    and the socket is where the webhook's --agent-socket-dir mounts it into sidecars."""
    container = agent_container(rendered["default"])
    args = flags(container)
    section = contract_text().split("## Node agent command line", 1)
    assert len(section) == 2, "docs/contract.md has no node agent section"
    documented = dict(re.findall(r"^\|\s*`--([a-z-]+)[^`]*`\s*\|[^|]*\|\s*`([^`]*)`", section[1].split("\n## ", 1)[0], re.M))
    assert set(args) <= set(documented), set(args) - set(documented)
    for flag, value in args.items():
        if flag == "metrics-addr":
            # The DaemonSet listens on both families ([::], test_every_port_listens_on_both_
            # address_families); the contract fixes the port.
            assert port_of(value) == port_of(documented[flag]), (flag, value, documented[flag])
        elif flag != "log-format":
            assert value == documented[flag], (flag, value, documented[flag])
    webhook = settings(webhook_container(rendered["default"]))
    assert str(Path(args["socket"]).parent) == webhook["agent-socket-dir"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}} in container["env"]
    service = only(rendered["default"], "Service", AGENT)
    [port] = service["spec"]["ports"]
    assert port["name"] == "metrics" and container_port(container, port["targetPort"]) == port_of(args["metrics-addr"])


# Flags that name an address to listen on, per container of the shipped manifests.
LISTEN_FLAGS = {"webhook": ("addr", "metrics-addr"), "agent": ("metrics-addr",)}


def test_every_port_listens_on_both_address_families(rendered):
    """IPv6-only EKS: the API server, the kubelet's probes, Prometheus and the gate's sidecars
    reach the webhook and the agent over IPv6; IPv4 clusters over IPv4. `[::]` serves both (the
    binaries fall back to 0.0.0.0 on a host without IPv6), so one manifest fits every cluster.
    Every containerPort is one of those listeners."""
    docs = rendered["default"]
    for name, container in (("webhook", webhook_container(docs)), ("agent", agent_container(docs))):
        args = flags(container)
        listening = set()
        for flag in LISTEN_FLAGS[name]:
            assert args[flag].startswith("[::]:"), f"{name} --{flag}={args[flag]} is not dual-stack"
            listening.add(port_of(args[flag]))
        assert {p["containerPort"] for p in container["ports"]} == listening, (name, container["ports"])


# Node labels as EKS sets them, for the agent's node affinity.
EC2_LINUX_AMD64 = {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "eks.amazonaws.com/nodegroup": "upf-a"}
NODES = {
    "ec2 linux amd64": (EC2_LINUX_AMD64, True),
    "ec2 linux arm64 (Graviton)": (EC2_LINUX_AMD64 | {"kubernetes.io/arch": "arm64"}, True),
    "self-managed node without compute-type": ({"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}, True),
    "windows": (EC2_LINUX_AMD64 | {"kubernetes.io/os": "windows"}, False),
    "another architecture": (EC2_LINUX_AMD64 | {"kubernetes.io/arch": "s390x"}, False),
    "fargate": (EC2_LINUX_AMD64 | {"eks.amazonaws.com/compute-type": "fargate"}, False),
    "hybrid": (EC2_LINUX_AMD64 | {"eks.amazonaws.com/compute-type": "hybrid"}, False),
    "auto mode": (EC2_LINUX_AMD64 | {"eks.amazonaws.com/compute-type": "auto"}, False),
    "no os label": ({"kubernetes.io/arch": "amd64"}, False),
}
MULTUS_NODE_LABEL = ("multus-eni.io/multus-node", "true")


def node_affinity_matches(pod_spec: dict, labels: dict[str, str]) -> bool:
    """requiredDuringSchedulingIgnoredDuringExecution as the scheduler reads it: terms are ORed,
    the expressions of a term ANDed (matchExpressions on labels only); plus nodeSelector."""
    if not all(labels.get(k) == v for k, v in pod_spec.get("nodeSelector", {}).items()):
        return False
    required = pod_spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return True

    def expression(e: dict) -> bool:
        op, key, values = e["operator"], e["key"], e.get("values", [])
        if op == "In":
            return key in labels and labels[key] in values
        if op == "NotIn":
            return key not in labels or labels[key] not in values
        if op == "Exists":
            return key in labels
        if op == "DoesNotExist":
            return key not in labels
        raise AssertionError(f"operator {op} is not modelled here")

    terms = required["nodeSelectorTerms"]
    assert terms and all("matchFields" not in t for t in terms)
    return any(all(expression(e) for e in t.get("matchExpressions", [])) for t in terms)


def test_node_affinity_model_can_refuse():
    spec = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "a", "operator": "In", "values": ["x"]}]}]}}}}
    assert node_affinity_matches(spec, {"a": "x"}) and not node_affinity_matches(spec, {"a": "y"})
    assert not node_affinity_matches(spec, {})


def test_agent_runs_only_where_it_can_work(rendered):
    """Linux, amd64 or arm64 (the images' platforms), and not Fargate, EKS Hybrid or Auto Mode
    nodes, with the keys the VPC CNI's aws-node DaemonSet uses."""
    spec = only(rendered["default"], "DaemonSet", AGENT)["spec"]["template"]["spec"]
    got = {name: node_affinity_matches(spec, labels) for name, (labels, _) in NODES.items()}
    assert got == {name: expected for name, (_, expected) in NODES.items()}
    # Tolerating every taint stays: the Multus node groups are often tainted.
    assert {"operator": "Exists"} in spec["tolerations"]
    # The image platforms the docs build are the ones the affinity admits.
    build = (REPO / "docs" / "install.md").read_text()
    assert "--platform linux/amd64,linux/arm64" in build


def test_multus_node_groups_overlay_restricts_the_agent_to_labelled_nodes(rendered):
    key, value = MULTUS_NODE_LABEL
    spec = only(rendered["multus-node-groups"], "DaemonSet", AGENT)["spec"]["template"]["spec"]
    for name, (labels, expected) in NODES.items():
        assert node_affinity_matches(spec, labels | {key: value}) is expected, name
        assert node_affinity_matches(spec, labels) is False, f"{name} without the label"
        assert node_affinity_matches(spec, labels | {key: "false"}) is False, name
    # Everything else is the default install, the affinity term aside.
    default = rendered["default"]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered["multus-node-groups"]) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in default
    )
    ours = copy.deepcopy(only(rendered["multus-node-groups"], "DaemonSet", AGENT))
    expressions = ours["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]
    assert expressions.pop() == {"key": key, "operator": "In", "values": [value]}
    assert ours == only(default, "DaemonSet", AGENT)


def test_multus_node_groups_component_works_in_an_operator_overlay(tmp_path):
    """`components: [.../multus-node-groups]` on the operator's own overlay of manifests/, as the
    docs show it, and on the no-cert-manager overlay."""
    for base in (MANIFESTS, MANIFESTS / "overlays" / "no-cert-manager"):
        overlay = {
            "resources": [os.path.relpath(base, tmp_path)],
            "components": [os.path.relpath(MANIFESTS / "components" / "multus-node-groups", tmp_path)],
        }
        (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
        spec = only(render(tmp_path), "DaemonSet", AGENT)["spec"]["template"]["spec"]
        assert not node_affinity_matches(spec, EC2_LINUX_AMD64)
        assert node_affinity_matches(spec, EC2_LINUX_AMD64 | dict([MULTUS_NODE_LABEL]))


def test_agent_contract_matches_the_agent_binary():
    """Every flag of docs/contract.md's agent table is a flag of `multus-eni-agent run` with the
    same default and env variable, and the binary has no flag the table lacks."""
    help_output = help_text("multus-eni-agent", "run")
    assert help_output is not None, f"{BIN_DIR}/multus-eni-agent is missing: cargo build -p multus-eni-agent"
    section = contract_text().split("## Node agent command line", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`--([a-z-]+)[^`]*`\s*\|\s*`([A-Z_]+)`\s*\|\s*([^|]*?)\s*\|", section, re.M)
    assert rows, "docs/contract.md's agent table has no rows"
    in_binary = set(re.findall(r"^\s+--([a-z][a-z0-9-]*)", help_output, re.M)) - {"help", "version"}
    assert {flag for flag, _, _ in rows} == in_binary
    for flag, env, default in rows:
        block = option_block(help_output, f"--{flag}") or ""
        assert f"[env: {env}=" in block, (flag, block)
        if default.startswith("`"):
            assert f"[default: {default.strip('`')}]" in block, (flag, default, block)
        else:
            # A default in words ("from IMDSv2"): the binary has no literal default.
            assert "[default:" not in block, (flag, default, block)


def test_monitoring_component_scrapes_named_metrics_ports(rendered):
    docs = rendered["monitoring"]
    monitors = all_of(docs, "PodMonitor")
    assert sorted(m["metadata"]["name"] for m in monitors) == sorted([SERVICE, AGENT])
    workloads = {SERVICE: only(docs, "Deployment", SERVICE), AGENT: only(docs, "DaemonSet", AGENT)}
    for monitor in monitors:
        workload = workloads[monitor["metadata"]["name"]]
        assert monitor["metadata"]["namespace"] == workload["metadata"]["namespace"]
        pod = workload["spec"]["template"]
        assert selector_matches(monitor["spec"]["selector"], pod["metadata"]["labels"])
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports
    # The webhook's rules next to the webhook, the agent's next to the agent (its own
    # component, left out in direct mode); tests/test_alert_rules.py runs them.
    rule_objects = {r["metadata"]["name"]: r for r in all_of(docs, "PrometheusRule")}
    assert {n: r["metadata"]["namespace"] for n, r in rule_objects.items()} == {
        "multus-eni": NAMESPACE,
        "multus-eni-agent": AGENT_NAMESPACE,
    }
    alerts = {r["alert"] for o in rule_objects.values() for g in o["spec"]["groups"] for r in g["rules"]}
    for needed in ("CertificateExpiring", "AdmissionsFailing", "SidecarNotRoutable", "AgentUnavailable"):
        assert any(needed in a for a in alerts), needed
    # The default install does not need the Prometheus Operator.
    assert not all_of(rendered["default"], "PodMonitor")


# === MutatingWebhookConfiguration ===


def test_webhook_configuration_settings(rendered):
    hooks = only(rendered["default"], "MutatingWebhookConfiguration")["webhooks"]
    assert len(hooks) == 4, "docs/contract.md: /mutate, /mutate/gate (twice) and /mutate/direct"
    assert len({h["name"] for h in hooks}) == 4
    # Identical but for name, path and the split of the namespaces.
    strip = lambda h: {k: v for k, v in h.items() if k not in ("name", "clientConfig", "namespaceSelector")}
    assert all(strip(h) == strip(hooks[0]) for h in hooks)
    for hook in hooks:
        check_webhook_settings(hook)


def check_webhook_settings(hook: dict) -> None:
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    assert 1 <= hook["timeoutSeconds"] <= 5
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["failurePolicy"] == "Fail"  # justified in docs/install.md
    assert hook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert "clientConfig" in hook and "caBundle" not in hook["clientConfig"]


def test_only_opted_in_namespaces_are_selected(rendered):
    hooks = only(rendered["default"], "MutatingWebhookConfiguration")["webhooks"]
    key, value = OPT_IN_LABEL
    sample_ns = only(rendered["samples"], "Namespace")
    assert sample_ns["metadata"]["labels"][key] == value
    assert any(selector_matches(h["namespaceSelector"], namespace_labels(sample_ns)) for h in hooks)

    for hook in hooks:
        selector = hook["namespaceSelector"]
        plain = {"metadata": {"name": "default", "labels": {}}}
        assert not selector_matches(selector, namespace_labels(plain))
        wrong_value = {"metadata": {"name": "apps", "labels": {key: "disabled"}}}
        assert not selector_matches(selector, namespace_labels(wrong_value))
        # Labelled by mistake, our own namespaces and kube-system are still never selected.
        for name in (NAMESPACE, AGENT_NAMESPACE, "kube-system"):
            for level in (None, "privileged", "restricted"):
                for access in (None, "gate", "direct"):
                    labels = {key: value} | ({"pod-security.kubernetes.io/enforce": level} if level else {})
                    labels |= {EC2_ACCESS_LABEL: access} if access else {}
                    labelled = {"metadata": {"name": name, "labels": labels}}
                    assert not selector_matches(selector, namespace_labels(labelled)), (name, level, access)


def test_pod_security_selects_the_gate_and_only_a_label_selects_direct_mode(rendered):
    """Exactly one entry takes an opted-in namespace: /mutate/gate (no hostPath volume) where
    Pod Security forbids the agent socket's hostPath volume or the namespace asks for the gate,
    /mutate/direct only where the namespace asks for direct mode, /mutate everywhere else (the
    labels absent included). A Pod Security label never selects direct mode."""
    hooks = only(rendered["default"], "MutatingWebhookConfiguration")["webhooks"]
    key, value = OPT_IN_LABEL
    for level in (None, "privileged", "baseline", "restricted"):
        for access in (None, "agent", "gate", "direct", "typo"):
            labels = {key: value}
            labels |= {"pod-security.kubernetes.io/enforce": level} if level else {}
            labels |= {EC2_ACCESS_LABEL: access} if access else {}
            ns = {"metadata": {"name": "cnf", "labels": labels}}
            paths = [
                h["clientConfig"]["service"]["path"]
                for h in hooks
                if selector_matches(h["namespaceSelector"], namespace_labels(ns))
            ]
            if access == "direct":
                expected = DIRECT_PATH
            elif access == "gate" or level in NO_HOSTPATH_LEVELS:
                expected = GATE_PATH
            else:
                expected = WEBHOOK_PATH
            assert paths == [expected], (level, access, paths)


def test_cert_manager_chain_and_ca_injection(rendered):
    docs = rendered["default"]
    service = only(docs, "Service", SERVICE)
    webhook = only(docs, "MutatingWebhookConfiguration")
    inject_from = webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    ns, _, cert_name = inject_from.partition("/")
    serving = only(docs, "Certificate", cert_name)
    assert serving["metadata"]["namespace"] == ns

    svc = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert svc in serving["spec"]["dnsNames"]
    assert set(serving["spec"]["dnsNames"]) <= {svc, f"{svc}.cluster.local"}
    assert serving["spec"].get("commonName", svc) in serving["spec"]["dnsNames"]
    assert "server auth" in serving["spec"].get("usages", ["server auth"])
    assert not serving["spec"].get("isCA")

    # serving Certificate -> CA Issuer -> CA Certificate -> self-signed Issuer
    issuers = {d["metadata"]["name"]: d for d in all_of(docs, "Issuer")}
    ca_issuer = issuers[serving["spec"]["issuerRef"]["name"]]
    assert serving["spec"]["issuerRef"].get("kind", "Issuer") == "Issuer"
    assert ca_issuer["metadata"]["namespace"] == ns
    ca_secret = ca_issuer["spec"]["ca"]["secretName"]
    ca_certs = [c for c in all_of(docs, "Certificate") if c["spec"]["secretName"] == ca_secret]
    assert len(ca_certs) == 1, f"no Certificate writes the CA Secret {ca_secret}"
    [ca_cert] = ca_certs
    assert ca_cert["spec"]["isCA"] is True
    assert ca_cert["metadata"]["namespace"] == ns
    root = issuers[ca_cert["spec"]["issuerRef"]["name"]]
    assert "selfSigned" in root["spec"]
    # A CA key kept across renewals keeps already-issued serving certificates valid.
    assert ca_cert["spec"]["privateKey"]["rotationPolicy"] == "Never"


# === CEL matchConditions ===


def pod(name: str, annotations: dict | None = None, host_network: bool | None = None) -> dict:
    metadata: dict = {"name": name, "namespace": "multus"}
    if annotations is not None:
        metadata["annotations"] = annotations
    spec: dict = {"containers": [{"name": "app", "image": "busybox:1.37"}]}
    if host_network is not None:
        spec["hostNetwork"] = host_network
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def sample_pod(rendered) -> dict:
    """The sample Deployment's pod as the ReplicaSet controller creates it."""
    deployment = only(rendered["samples"], "Deployment")
    template = copy.deepcopy(deployment["spec"]["template"])
    template["metadata"].update(name="busybox-deployment-5d8f7c-abcde", namespace="multus")
    return {"apiVersion": "v1", "kind": "Pod", **template}


def admission_request(obj: dict) -> dict:
    return {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": obj["metadata"].get("name", ""),
        "namespace": obj["metadata"].get("namespace", ""),
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "dryRun": False,
    }


def sent_to_webhook(conditions: list[dict], obj: dict) -> bool:
    """The apiserver calls the webhook only when every matchCondition is true.

    An expression that errors would fall back to failurePolicy (Fail): treat it as a test failure.
    """
    env = celpy.Environment()
    activation = {
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(None),
        "request": celpy.json_to_cel(admission_request(obj)),
    }
    results = []
    for condition in conditions:
        program = env.program(env.compile(condition["expression"]))
        value = program.evaluate(activation)
        assert isinstance(value, celpy.celtypes.BoolType), (
            f"matchCondition {condition['name']} did not yield a bool on {obj['metadata']}: {value!r}"
        )
        results.append(bool(value))
    return all(results)


def test_match_conditions_send_only_multus_pods(rendered):
    hooks = only(rendered["default"], "MutatingWebhookConfiguration")["webhooks"]
    conditions = hooks[0]["matchConditions"]
    assert all(h["matchConditions"] == conditions for h in hooks), "every entry filters alike"
    multus = sample_pod(rendered)
    assert NETWORKS_ANNOTATION in multus["metadata"]["annotations"]
    cases = {
        "multus pod (sample Deployment)": (multus, True),
        "multus pod, hostNetwork false": (
            pod("b", {NETWORKS_ANNOTATION: "ipvlan-multus@n3"}, host_network=False),
            True,
        ),
        "plain pod": (pod("c", {"prometheus.io/scrape": "true"}), False),
        "pod without annotations map": (pod("d", None), False),
        "hostNetwork multus pod": (
            pod("e", {NETWORKS_ANNOTATION: "ipvlan-multus"}, host_network=True),
            False,
        ),
        "empty networks annotation": (pod("f", {NETWORKS_ANNOTATION: ""}), False),
        "multus pod opted out": (
            pod("g", {NETWORKS_ANNOTATION: "ipvlan-multus", OPT_OUT_ANNOTATION: "false"}),
            False,
        ),
    }
    got = {name: sent_to_webhook(conditions, obj) for name, (obj, _) in cases.items()}
    want = {name: expected for name, (_, expected) in cases.items()}
    assert got == want


def test_match_condition_evaluator_sees_changes():
    """A condition that matches everything must be caught by the test above (sanity check)."""
    always = [{"name": "all", "expression": "true"}]
    assert sent_to_webhook(always, pod("x", None)) is True
    never_host = [{"name": "h", "expression": "!has(object.spec.hostNetwork) || !object.spec.hostNetwork"}]
    assert sent_to_webhook(never_host, pod("x", None, host_network=True)) is False


# === samples ===


def test_sample_is_the_aws_sample_without_the_sidecar(rendered):
    docs = rendered["samples"]
    nad = only(docs, "NetworkAttachmentDefinition")
    deployment = only(docs, "Deployment")
    namespace = only(docs, "Namespace")
    for doc in (nad, deployment):
        assert doc["metadata"]["namespace"] == namespace["metadata"]["name"]

    networks = deployment["spec"]["template"]["metadata"]["annotations"][NETWORKS_ANNOTATION]
    referenced = {entry.strip().split("@")[0] for entry in networks.split(",")}
    assert referenced == {nad["metadata"]["name"]}, "the pod must use the sample's NAD"

    config = json.loads(nad["spec"]["config"])
    assert config["type"] == "ipvlan" and config["master"]
    ipam = config["ipam"]
    assert ipam["type"] == "whereabouts"
    subnet = ipaddress.ip_network(ipam["range"])
    for key in ("range_start", "range_end", "gateway"):
        assert ipaddress.ip_address(ipam[key]) in subnet, key
    pool = int(ipaddress.ip_address(ipam["range_end"])) - int(ipaddress.ip_address(ipam["range_start"])) + 1
    assert pool > deployment["spec"]["replicas"], "a rolling update needs a spare address"

    # The whole point: the application manifests know nothing of multus-eni.
    for doc in (nad, deployment):
        text = json.dumps(doc).lower()
        assert "sidecar" not in text and "multus-eni" not in text, doc["metadata"]["name"]
    spec = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["busybox"]
    assert "initContainers" not in spec


# === sidecar contract: image and probe port ===


def binary(name: str) -> Path | None:
    path = BIN_DIR / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def help_text(name: str, *args: str) -> str | None:
    path = binary(name)
    if path is None:
        return None
    proc = subprocess.run([str(path), *args, "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{path} {' '.join(args)} --help failed: {proc.stderr}"
    assert "--help" in proc.stdout, (
        f"`{path} {' '.join(args)} --help` printed no help: a stale build? run `cargo build --workspace`"
    )
    return proc.stdout


def option_block(help_output: str, flag: str) -> str | None:
    """The help paragraph of one option (from its line to the next option line)."""
    match = re.search(rf"^\s+(?:-\w, )?{re.escape(flag)}\b.*?(?=^\s+-{{1,2}}\w|\Z)", help_output, re.M | re.S)
    return match.group(0) if match else None


def contract_text() -> str:
    assert CONTRACT.is_file(), f"{CONTRACT} is missing"
    return CONTRACT.read_text()


def sidecar_default_probe_port() -> tuple[int, str]:
    help_output = help_text("multus-eni-sidecar", "run")
    if help_output is not None:
        block = option_block(help_output, "--probe-addr")
        assert block, "`multus-eni-sidecar run --help` has no --probe-addr"
        default = re.search(r"\[default: ([^\]]+)\]", block)
        assert default, f"--probe-addr shows no default:\n{block}"
        return port_of(default.group(1)), "multus-eni-sidecar run --help"
    row = re.search(r"^\|\s*`--probe-addr[^|]*\|[^|]*\|\s*`([^`]+)`", contract_text(), re.M)
    assert row, "neither the sidecar binary nor docs/contract.md gives the default probe address"
    return port_of(row.group(1)), "docs/contract.md"


def webhook_serve_flags() -> tuple[set[str], str]:
    help_output = help_text("multus-eni-webhook", "serve")
    if help_output is not None:
        return set(re.findall(r"--([a-z][a-z0-9-]*)", help_output)), "multus-eni-webhook serve --help"
    section = contract_text().split("## Webhook command line", 1)
    assert len(section) == 2, "docs/contract.md has no webhook command line section"
    body = section[1].split("\n## ", 1)[0]
    return set(re.findall(r"--([a-z][a-z0-9-]*)", body)), "docs/contract.md"


def test_webhook_flags_exist(rendered):
    known, source = webhook_serve_flags()
    container = webhook_container(rendered["default"])
    assert container["args"][0] == "serve"
    unknown = set(settings(container)) - known
    assert not unknown, f"the Deployment passes flags (or env) {sorted(unknown)} unknown to {source}"
    for required in ("addr", "tls-cert", "tls-key", "sidecar-image"):
        assert required in settings(container), required


def test_sidecar_probe_port_matches_the_sidecar(rendered):
    container = webhook_container(rendered["default"])
    passed = flags(container).get("sidecar-probe-port")
    if passed is None:
        help_output = help_text("multus-eni-webhook", "serve")
        block = option_block(help_output or "", "--sidecar-probe-port")
        default = re.search(r"\[default: (\d+)\]", block or "")
        assert default, "--sidecar-probe-port is not passed and its default is unknown"
        passed = default.group(1)
    port, source = sidecar_default_probe_port()
    assert int(passed) == port, f"webhook injects probes on {passed}, the sidecar listens on {port} ({source})"


def image_parts(image: str) -> tuple[str, str]:
    assert "@" not in image or ":" in image.split("@")[0]
    name, _, tag = image.split("@")[0].rpartition(":")
    assert name and "/" not in tag, f"image {image!r} has no tag"
    return name, tag


def agent_container(docs: list[dict]) -> dict:
    daemonset = only(docs, "DaemonSet", AGENT)
    [container] = daemonset["spec"]["template"]["spec"]["containers"]
    return container


def test_images_are_the_same_release(rendered):
    docs = rendered["default"]
    container = webhook_container(docs)
    images = {
        "webhook": container["image"],
        "sidecar": settings(container)["sidecar-image"],
        "agent": agent_container(docs)["image"],
    }
    version = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    registries = set()
    for part, image in images.items():
        repo, tag = image_parts(image)
        assert repo.endswith(f"/multus-eni-{part}"), image
        assert tag == version, f"{part} {tag}, workspace version {version}"
        registries.add(repo.rsplit("/", 1)[0])
    assert len(registries) == 1, f"same registry: {registries}"


def test_images_entries_reach_all_three_images(tmp_path):
    """An operator's overlay with only `images:` entries (what `kustomize edit set image`
    writes) changes the webhook's, the injected sidecar's and the agent's image."""
    registry = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    digest = "sha256:" + "a" * 64
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(MANIFESTS, tmp_path)],
        "images": [
            {"name": f"ghcr.io/multus-eni/multus-eni-{part}", "newName": f"{registry}/multus-eni-{part}", "digest": digest}
            for part in ("webhook", "sidecar", "agent")
        ],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    docs = render(tmp_path)
    container = webhook_container(docs)
    assert container["image"] == f"{registry}/multus-eni-webhook@{digest}"
    assert settings(container)["sidecar-image"] == f"{registry}/multus-eni-sidecar@{digest}"
    assert agent_container(docs)["image"] == f"{registry}/multus-eni-agent@{digest}"
    # Other env values of the webhook are not images and stay as they are.
    before = {e["name"]: e.get("value") for e in webhook_container(render(MANIFESTS)).get("env", [])}
    after = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert {k: v for k, v in after.items() if k != "MULTUS_ENI_SIDECAR_IMAGE"} == {
        k: v for k, v in before.items() if k != "MULTUS_ENI_SIDECAR_IMAGE"
    }


def test_images_entries_reach_the_injected_sidecar(tmp_path):
    """The image kustomize wrote is the one `multus-eni-webhook inject` injects with the
    Deployment's own settings (flags and env, as the container gets them)."""
    webhook = binary("multus-eni-webhook")
    assert webhook is not None, f"{BIN_DIR}/multus-eni-webhook is missing: cargo build -p multus-eni-webhook"
    overlay = {
        "resources": [os.path.relpath(MANIFESTS, tmp_path)],
        "images": [{"name": "ghcr.io/multus-eni/multus-eni-sidecar", "newName": "registry.example/me/sidecar", "newTag": "v9"}],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    container = webhook_container(render(tmp_path))
    inject_flags = set(re.findall(r"--([a-z][a-z0-9-]*)", help_text("multus-eni-webhook", "inject") or ""))
    env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}
    args = [f"--{k}={v}" for k, v in flags(container).items() if k in inject_flags]
    proc = subprocess.run(
        [str(webhook), "inject", "-f", "-", *args],
        input=yaml.safe_dump_all(render(MANIFESTS / "samples")), env=env,
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    injected = only([d for d in yaml.safe_load_all(proc.stdout) if d], "Deployment")
    [sidecar] = [c for c in injected["spec"]["template"]["spec"]["initContainers"] if c["name"] == "multus-eni-sidecar"]
    assert sidecar["image"] == "registry.example/me/sidecar:v9"


# === IAM policy ===


def ec2_operations() -> set[str]:
    """snake_case names of every aws-sdk-ec2 operation (its src/operation/ modules).

    Read from the crate source cargo downloaded for the version in Cargo.lock.
    """
    lock = tomllib.loads((REPO / "Cargo.lock").read_text())
    versions = [p["version"] for p in lock["package"] if p["name"] == "aws-sdk-ec2"]
    assert len(versions) == 1, f"Cargo.lock has aws-sdk-ec2 versions {versions}"
    cargo_home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    candidates = sorted(cargo_home.glob(f"registry/src/*/aws-sdk-ec2-{versions[0]}/src/operation"))
    assert candidates, (
        f"aws-sdk-ec2 {versions[0]} source not found under {cargo_home}/registry/src: "
        "run `cargo fetch` (or build the sidecar) first"
    )
    ops = {p.stem for p in candidates[0].iterdir() if p.suffix == ".rs" or p.is_dir()}
    assert "assign_private_ip_addresses" in ops, f"unexpected layout of {candidates[0]}"
    return ops


def sidecar_ec2_calls(ops: set[str], root: Path = REPO / "ec2" / "src") -> set[str]:
    """EC2 operations called as SDK fluent builders (`client.assign_private_ip_addresses()`)."""
    called: set[str] = set()
    for source in sorted(root.rglob("*.rs")):
        for name in re.findall(r"\.([a-z][a-z0-9_]*)\s*\(\s*\)", source.read_text()):
            if name in ops:
                called.add(name)
    return called


def iam_action(operation: str) -> str:
    return "ec2:" + "".join(part.capitalize() for part in operation.split("_"))


def policy() -> dict:
    return json.loads((MANIFESTS / "iam-policy.json").read_text())


def policy_actions(doc: dict) -> set[str]:
    actions: set[str] = set()
    for statement in doc["Statement"]:
        action = statement["Action"]
        actions.update([action] if isinstance(action, str) else action)
    return actions


def contract_actions() -> set[str]:
    text = contract_text()
    paragraph = text.split("EC2 actions the sidecar calls", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`(ec2:[A-Za-z0-9]+)`", paragraph))


def test_iam_action_names_map_from_sdk_operations():
    assert iam_action("assign_private_ip_addresses") == "ec2:AssignPrivateIpAddresses"
    assert iam_action("unassign_ipv6_addresses") == "ec2:UnassignIpv6Addresses"
    assert iam_action("describe_network_interfaces") == "ec2:DescribeNetworkInterfaces"


def test_sdk_call_scanner_finds_calls(tmp_path):
    (tmp_path / "eni.rs").write_text(
        "let out = client\n    .describe_network_interfaces()\n    .filters(f)\n    .send()\n    .await?;\n"
        "client.unassign_ipv6_addresses().network_interface_id(id).send().await?;\n"
    )
    ops = {"describe_network_interfaces", "unassign_ipv6_addresses", "assign_private_ip_addresses"}
    assert sidecar_ec2_calls(ops, tmp_path) == {"describe_network_interfaces", "unassign_ipv6_addresses"}


def test_iam_policy_matches_the_sidecar_code():
    ops = ec2_operations()
    in_code = {iam_action(op) for op in sidecar_ec2_calls(ops)}
    in_policy = policy_actions(policy())
    assert in_policy == contract_actions(), "manifests/iam-policy.json vs docs/contract.md"
    assert in_code == in_policy, (
        f"called but not allowed: {sorted(in_code - in_policy)}; "
        f"allowed but never called: {sorted(in_policy - in_code)}"
    )


def test_iam_policy_is_scoped():
    doc = policy()
    assert doc["Version"] == "2012-10-17"
    for statement in doc["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert not [a for a in actions if "*" in a], "no wildcard actions"
        if actions == ["ec2:DescribeNetworkInterfaces"]:
            # Describe* calls support no resource-level permissions: "*" is the only valid value.
            assert statement["Resource"] == "*"
            continue
        # "*" rather than arn:aws:ec2:...: the same policy works in aws-cn and aws-us-gov; the tag
        # condition alone limits it to Multus ENIs (only ENIs carry that tag here).
        assert statement["Resource"] == "*", statement
        assert statement["Condition"] == {
            "StringEquals": {"aws:ResourceTag/node.k8s.amazonaws.com/no_manage": "true"}
        }
    describe = [s for s in doc["Statement"] if s["Action"] == "ec2:DescribeNetworkInterfaces"]
    assert len(describe) == 1


# === images ===


def dockerfile_stages() -> dict[str, dict]:
    """Stages of the root Dockerfile: base image and instructions, by stage name."""
    text = (REPO / "Dockerfile").read_text()
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").rstrip() + " " if raw.endswith("\\") else raw
        if not raw.endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    args = {}
    stages: dict[str, dict] = {}
    stage = None
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and stage is None:
            name, _, value = rest.partition("=")
            args[name] = value
        elif op == "FROM":
            match = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert match, line
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            stage = {"from": base, "lines": []}
            stages[match.group(2) or base] = stage
        elif stage is not None:
            stage["lines"].append((op, rest))
    return stages


def stage_chain(stages: dict[str, dict], name: str) -> list[dict]:
    chain = [stages[name]]
    while chain[-1]["from"] in stages:
        chain.append(stages[chain[-1]["from"]])
    return chain


def cargo_builds(runs: str) -> list[tuple[set[str], str]]:
    """Each `cargo build` invocation of some RUN text: its `-p` packages and its whole text."""
    return [
        (set(re.findall(r"-p\s+(\S+)", command)), command.strip())
        for command in re.findall(r"\bcargo build\b[^&;|]*", runs)
    ]


@pytest.mark.parametrize("target", ["webhook", "sidecar", "agent"])
def test_dockerfile_target(target):
    packages = IMAGE_PACKAGES[target]
    stages = dockerfile_stages()
    assert target in stages, f"Dockerfile has no stage named {target}"
    final = stages[target]
    # The agent runs as root (manifests/agent/daemonset.yaml): distroless's root variant.
    variant = ":latest" if target == "agent" else ":nonroot"
    assert final["from"].startswith("gcr.io/distroless/cc-debian") and final["from"].endswith(variant), final["from"]

    copies = [re.match(r"--from=(\S+)\s+(\S+)\s+(\S+)$", rest) for op, rest in final["lines"] if op == "COPY"]
    assert all(copies), "every COPY takes one file from a build stage"
    copied = {m.group(3): m.group(1) for m in copies}
    assert sorted(copied) == sorted(f"/usr/local/bin/{p}" for p in packages), "the runtime image holds its binaries only"
    for package in packages:
        build = copied[f"/usr/local/bin/{package}"]
        runs = " ".join(rest for s in stage_chain(stages, build) for op, rest in s["lines"] if op == "RUN")
        # One cargo invocation per package: built together, the packages' features would be
        # unified (the agent-mode sidecar would get the full one's AWS SDK).
        own = [command for built, command in cargo_builds(runs) if built == {package}]
        assert own, f"no `cargo build -p {package}` of its own in stage {build}: {cargo_builds(runs)}"
        # The sidecar's images are built for size (Cargo.toml's profile release-sidecar).
        profile = "release-sidecar" if target == "sidecar" else "release"
        flag = "--release" if profile == "release" else f"--profile {profile}"
        assert all(re.search(rf"{flag}(\s|$)", c) and "--locked" in c for c in own), own
        assert not [built for built, _ in cargo_builds(runs) if package in built and built != {package}], (
            f"{package} is built together with other packages"
        )
        assert f"target/{profile}/{package}" in runs
        if profile != "release":
            declared = tomllib.loads((REPO / "Cargo.toml").read_text())["profile"]
            assert declared[profile]["inherits"] == "release", f"profile {profile} is not in Cargo.toml"
    build = copied[f"/usr/local/bin/{packages[0]}"]

    users = [rest for op, rest in final["lines"] if op == "USER"]
    if target == "agent":
        assert users == ["0:0"], "the agent's image user matches the DaemonSet's runAsUser: 0"
    else:
        assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), "numeric non-root USER"
    entrypoint = [json.loads(rest) for op, rest in final["lines"] if op == "ENTRYPOINT"]
    assert entrypoint == [[f"/usr/local/bin/{packages[0]}"]]
    if target == "sidecar":
        # The webhook injects these command paths: direct mode, agent mode.
        assert entrypoint[0][0] == SIDECAR_BINARY_PATH
        assert SIDECAR_AGENT_MODE_BINARY_PATH in copied

    # glibc of the build must not be newer than the runtime's: same Debian release.
    builder = stage_chain(stages, build)[-1]["from"]
    debian = {"bookworm": "12", "trixie": "13"}
    release = next((v for k, v in debian.items() if k in builder), None)
    assert release and final["from"].startswith(f"gcr.io/distroless/cc-debian{release}:"), builder
    rust = re.search(r"rust:(\d+)\.(\d+)", builder)
    minimum = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["rust-version"]
    assert rust and (int(rust.group(1)), int(rust.group(2))) >= tuple(int(x) for x in minimum.split(".")[:2])


def test_dockerignore_keeps_the_workspace():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "target" in patterns and ".git" in patterns
    workspace = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]
    needed = ["Cargo.toml", "Cargo.lock"]
    for member in workspace["members"]:
        needed += [f"{member}/Cargo.toml", f"{member}/src/main.rs"]
    for path in needed:
        excluded = [p for p in patterns if not p.startswith("!") and (
            fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p + "/*") or path.startswith(p.rstrip("/") + "/")
        )]
        assert not excluded, f".dockerignore {excluded} drops {path}, needed by cargo build --locked"


# === certs/ (clusters without cert-manager) ===


def json_patch(document: dict, operations: list[dict]) -> dict:
    """RFC 6902 add/replace/test, enough for a caBundle patch."""
    doc = copy.deepcopy(document)
    for op in operations:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        parent = doc
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        key = (len(parent) if last == "-" else int(last)) if isinstance(parent, list) else last
        if op["op"] == "test":
            assert parent[key] == op["value"], f"patch test failed at {op['path']}"
        elif op["op"] == "replace" or (op["op"] == "add" and not isinstance(parent, list)):
            if op["op"] == "replace":
                assert key in parent if isinstance(parent, dict) else key < len(parent), op
            parent[key] = op["value"]
        elif op["op"] == "add":
            parent.insert(key, op["value"])
        else:
            pytest.fail(f"unexpected patch operation {op}")
    return doc


def strategic_merge_webhooks(document: dict, patch: dict) -> dict:
    """Strategic merge of a MutatingWebhookConfiguration: webhooks merge by name."""
    doc = copy.deepcopy(document)
    by_name = {w["name"]: w for w in doc["webhooks"]}
    for hook in patch.get("webhooks", []):
        assert hook["name"] in by_name, f"patch names webhook {hook['name']} that does not exist"
        target = by_name[hook["name"]]
        target.setdefault("clientConfig", {}).update(hook.get("clientConfig", {}))
    return doc


def test_certs_script_writes_a_matching_secret_and_ca_bundle(rendered, tmp_path):
    import base64

    from cryptography import x509

    webhook = binary("multus-eni-webhook")
    assert webhook is not None, (
        f"{BIN_DIR}/multus-eni-webhook is missing: build it (`cargo build -p multus-eni-webhook`) "
        "or set MULTUS_ENI_BIN_DIR"
    )
    out = tmp_path / "certs"
    env = {**os.environ, "MULTUS_ENI_WEBHOOK": str(webhook)}
    docs = rendered["no-cert-manager"]
    deployment = only(docs, "Deployment", SERVICE)
    [tls_volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    mwc = only(docs, "MutatingWebhookConfiguration")

    bundles = []
    for run in (1, 2):  # idempotent: a second run reuses the CA and issues a new leaf
        proc = subprocess.run(
            [str(REPO / "certs" / "generate.sh"), "--out-dir", str(out)],
            env=env, capture_output=True, text=True, check=False,
        )
        assert proc.returncode == 0, f"run {run}: {proc.stdout}\n{proc.stderr}"

        [secret] = [d for d in yaml.safe_load_all((out / "secret.yaml").read_text()) if d]
        for version in kubernetes_versions():
            kubernetes_validate.validate(secret, version, strict=True)
        assert secret["kind"] == "Secret" and secret["type"] == "kubernetes.io/tls"
        assert secret["metadata"]["name"] == tls_volume["secret"]["secretName"]
        assert secret["metadata"]["namespace"] == NAMESPACE
        if "data" in secret:
            leaf_pem = base64.b64decode(secret["data"]["tls.crt"])
            assert base64.b64decode(secret["data"]["tls.key"])
        else:
            leaf_pem = secret["stringData"]["tls.crt"].encode()
            assert secret["stringData"]["tls.key"]
        leaf = x509.load_pem_x509_certificates(leaf_pem)[0]
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert f"{SERVICE}.{NAMESPACE}.svc" in sans.get_values_for_type(x509.DNSName)

        patch = json.loads((out / "cabundle-patch.json").read_text())
        patched = (
            json_patch(mwc, patch) if isinstance(patch, list) else strategic_merge_webhooks(mwc, patch)
        )
        hook_bundles = {h["clientConfig"]["caBundle"] for h in patched["webhooks"]}
        assert len(hook_bundles) == 1, "every webhook entry gets the same caBundle"
        ca_bundle = base64.b64decode(hook_bundles.pop())
        cas = x509.load_pem_x509_certificates(ca_bundle)
        assert any(ca.subject == leaf.issuer for ca in cas), "caBundle holds no issuer of tls.crt"
        issuer = next(ca for ca in cas if ca.subject == leaf.issuer)
        leaf.verify_directly_issued_by(issuer)  # raises when the signature does not verify
        bundles.append(ca_bundle)
        untouched = copy.deepcopy(patched)
        for hook in untouched["webhooks"]:
            del hook["clientConfig"]["caBundle"]
        assert untouched == mwc, "the patch must set caBundle and nothing else"
    assert bundles[0] == bundles[1], "re-running certs must not change the caBundle"


def test_image_override_overlay_in_docs_renders(tmp_path):
    """docs/install.md shows an overlay that swaps both images; it must keep working."""
    text = (REPO / "docs" / "install.md").read_text()
    blocks = re.findall(r"```yaml\n# my-multus-eni/kustomization.yaml\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/install.md lost its image override example"
    overlay = yaml.safe_load(blocks[0])
    overlay["resources"] = [os.path.relpath(MANIFESTS, tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    docs = render(tmp_path)
    container = webhook_container(docs)
    registry = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    assert container["image"] == f"{registry}/multus-eni-webhook:0.2.0"
    assert settings(container)["sidecar-image"] == f"{registry}/multus-eni-sidecar:0.2.0"
    assert agent_container(docs)["image"] == f"{registry}/multus-eni-agent:0.2.0"


def test_direct_mode_overlay_in_docs_renders(tmp_path):
    """docs/install.md's direct-mode patches apply to the manifests as they are: the flag is
    where the `test` operation expects it, and the agent DaemonSet is gone."""
    text = (REPO / "docs" / "install.md").read_text()
    blocks = re.findall(r"```yaml\n# my-multus-eni/kustomization.yaml, direct mode[^\n]*\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/install.md lost its direct-mode example"
    overlay = yaml.safe_load(blocks[0])
    overlay["resources"] = [os.path.relpath(MANIFESTS, tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    docs = render(tmp_path)
    args = flags(webhook_container(docs))
    assert args["ec2-access"] == "direct" and args["aws-region"]
    assert [a for a in webhook_container(docs)["args"] if a.startswith("--ec2-access")] == ["--ec2-access=direct"]
    assert not all_of(docs, "DaemonSet")


def docs_overlay(tmp_path: Path, title: str) -> list[dict]:
    """Render the overlay docs/install.md shows under `# my-multus-eni/kustomization.yaml, TITLE`
    with its paths pointed at this checkout."""
    text = (REPO / "docs" / "install.md").read_text()
    blocks = re.findall(rf"```yaml\n# my-multus-eni/kustomization.yaml, {re.escape(title)}\n(.*?)```", text, re.S)
    assert len(blocks) == 1, f"docs/install.md lost its {title!r} example"
    overlay = yaml.safe_load(blocks[0])
    prefix = "../multus-eni/manifests"
    overlay["resources"] = [os.path.relpath(MANIFESTS / r.removeprefix(prefix).lstrip("/"), tmp_path) for r in overlay["resources"]]
    overlay["components"] = [
        os.path.relpath(MANIFESTS / c.removeprefix(prefix).lstrip("/"), tmp_path) for c in overlay.get("components", [])
    ]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    return render(tmp_path)


def test_no_cert_manager_overlay_in_docs_has_no_cert_manager_kinds(tmp_path):
    """What certs/generate.sh --overlay applies must not need cert-manager's CRDs."""
    docs = docs_overlay(tmp_path, "without cert-manager")
    assert not [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]
    assert "cert-manager.io/inject-ca-from" not in only(docs, "MutatingWebhookConfiguration")["metadata"].get("annotations", {})
    assert only(docs, "Deployment", SERVICE) and only(docs, "DaemonSet", AGENT)


def test_node_groups_overlay_in_docs_renders(tmp_path):
    docs = docs_overlay(tmp_path, "the agent on labelled nodes only")
    spec = only(docs, "DaemonSet", AGENT)["spec"]["template"]["spec"]
    assert not node_affinity_matches(spec, EC2_LINUX_AMD64)
    assert node_affinity_matches(spec, EC2_LINUX_AMD64 | dict([MULTUS_NODE_LABEL]))
    # the cert-manager install underneath
    assert all_of(docs, "Certificate")


def test_host_network_overlay_in_docs_is_admitted_by_its_namespace(tmp_path):
    """The troubleshooting advice for overlay CNIs: hostNetwork on the webhook is only admitted
    by Pod Security `privileged`, so the overlay relabels the namespace too; the container stays
    non-root without capabilities."""
    docs = docs_overlay(tmp_path, "webhook on the host network")
    ns = only(docs, "Namespace", NAMESPACE)["metadata"]["labels"]
    spec = only(docs, "Deployment", SERVICE)["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "Default"
    assert ns["pod-security.kubernetes.io/enforce"] == "privileged"
    sc = webhook_container(docs)["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and spec["securityContext"]["runAsNonRoot"] is True
    for version in kubernetes_versions():
        kubernetes_validate.validate(only(docs, "Deployment", SERVICE), version, strict=True)


def test_images_expose_the_ports_the_manifests_use(rendered):
    stages = dockerfile_stages()
    exposed = {
        target: {int(p.split("/")[0]) for op, rest in stages[target]["lines"] if op == "EXPOSE" for p in rest.split()}
        for target in ("webhook", "sidecar", "agent")
    }
    args = flags(webhook_container(rendered["default"]))
    assert exposed["webhook"] == {port_of(args["addr"]), port_of(args["metrics-addr"])}
    assert exposed["sidecar"] == {int(args["sidecar-probe-port"])}
    assert exposed["agent"] == {port_of(flags(agent_container(rendered["default"]))["metrics-addr"])}


@pytest.mark.parametrize("ec2_access", ["agent", "gate", "direct"])
def test_sample_injected_with_the_deployment_flags_fits_the_sidecar_image(rendered, ec2_access):
    """`multus-eni-webhook inject` with the Deployment's own flags on the sample: the sidecar it
    adds must run one of the image's binaries (agent mode the agent-mode one, direct mode the
    full one), probe the port the sidecar listens on, run as the image's user, use only flags
    that binary knows, and still pass the schemas. Both EC2 access modes: the Deployment's
    (agent), the one /mutate/gate injects and the one /mutate/direct injects."""
    webhook = binary("multus-eni-webhook")
    assert webhook is not None, f"needs the built binaries in {BIN_DIR}: cargo build --workspace --bins"
    inject_flags = set(re.findall(r"--([a-z][a-z0-9-]*)", help_text("multus-eni-webhook", "inject")))
    serve_args = settings(webhook_container(rendered["default"])) | {"ec2-access": ec2_access}
    args = [f"--{k}={v}" for k, v in serve_args.items() if k in inject_flags]
    assert any(a.startswith("--sidecar-image=") for a in args)
    sample = yaml.safe_dump_all(rendered["samples"])
    proc = subprocess.run(
        [str(webhook), "inject", "-f", "-", *args], input=sample, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    injected = only([d for d in yaml.safe_load_all(proc.stdout) if d], "Deployment")
    for version in kubernetes_versions():
        kubernetes_validate.validate(injected, version, strict=True)

    spec = injected["spec"]["template"]["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    [sidecar] = [c for c in containers if c["name"] == "multus-eni-sidecar"]
    assert sidecar["image"] == serve_args["sidecar-image"]
    stages = dockerfile_stages()
    in_image = [rest.split()[-1] for op, rest in stages["sidecar"]["lines"] if op == "COPY"]
    expected = {
        "agent": SIDECAR_AGENT_MODE_BINARY_PATH,
        "gate": SIDECAR_AGENT_MODE_BINARY_PATH,
        "direct": SIDECAR_BINARY_PATH,
    }[ec2_access]
    assert sidecar["command"] == [expected] and expected in in_image, (sidecar["command"], in_image)
    sidecar_help = help_text(Path(expected).name, "run")
    assert sidecar_help is not None, f"needs the built binaries in {BIN_DIR}: cargo build --workspace --bins"
    uid = int([rest for op, rest in stages["sidecar"]["lines"] if op == "USER"][-1].split(":")[0])
    assert sidecar["securityContext"].get("runAsUser", uid) == uid

    sidecar_flags = flags({"args": sidecar["args"][1:]})
    known = set(re.findall(r"--([a-z][a-z0-9-]*)", sidecar_help))
    assert sidecar["args"][0] == "run" and set(sidecar_flags) <= known, sidecar["args"]
    probe_port = port_of(sidecar_flags.get("probe-addr", f"0.0.0.0:{sidecar_default_probe_port()[0]}"))
    assert probe_port == sidecar_default_probe_port()[0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in sidecar:
            assert sidecar[probe]["httpGet"]["port"] == probe_port, probe

    # What each mode needs from the node agent of the shipped DaemonSet, and nothing more.
    agent_args = flags(agent_container(rendered["default"]))
    env = {e["name"]: e for e in sidecar.get("env", [])}
    host_paths = [v for v in spec.get("volumes", []) if "hostPath" in v]
    assert not [n for n in env if n.startswith("AWS_")] or ec2_access == "direct", env
    if ec2_access == "agent":
        assert sidecar_flags["agent-socket"] == agent_args["socket"]
        [volume] = host_paths
        assert volume["hostPath"]["path"] == str(Path(agent_args["socket"]).parent)
        [mount] = [m for m in sidecar["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True and mount["mountPath"] == str(Path(agent_args["socket"]).parent)
    elif ec2_access == "gate":
        # The node's address from the downward API and the agent's HTTP port, no volume at all:
        # what lets the gate serve Pod Security baseline/restricted namespaces.
        assert "agent-socket" not in sidecar_flags
        assert sidecar_flags["agent-url"] == f"http://$(HOST_IP):{port_of(agent_args['metrics-addr'])}"
        assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        assert not host_paths and not sidecar.get("volumeMounts")
        assert restricted_violations({"securityContext": {}, "containers": [sidecar], "volumes": []}) == []
    else:
        assert "agent-socket" not in sidecar_flags and "agent-url" not in sidecar_flags
        assert not host_paths


def test_certs_script_applies_in_a_working_order(tmp_path):
    """`generate.sh --apply`: overlay first (namespace), then the Secret, then the caBundle patch.

    kubectl is replaced by a recorder: no cluster is touched."""
    webhook = binary("multus-eni-webhook")
    assert webhook is not None, f"{BIN_DIR}/multus-eni-webhook is missing: cargo build -p multus-eni-webhook"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    log = tmp_path / "kubectl.log"
    (fake_bin / "kubectl").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (fake_bin / "kubectl").chmod(0o755)
    out = tmp_path / "certs"
    env = {**os.environ, "MULTUS_ENI_WEBHOOK": str(webhook), "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    proc = subprocess.run(
        [str(REPO / "certs" / "generate.sh"), "--out-dir", str(out), "--apply"],
        env=env, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [
        f"apply -k {MANIFESTS}/overlays/no-cert-manager",
        f"apply -f {out}/secret.yaml",
        f"patch mutatingwebhookconfiguration {SERVICE} --type=json --patch-file {out}/cabundle-patch.json",
    ]

    # The operator's own overlay is what gets applied, with the same order.
    overlay = tmp_path / "my-multus-eni"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [os.path.relpath(MANIFESTS / "overlays" / "no-cert-manager", overlay)]})
    )
    log.unlink()
    proc = subprocess.run(
        [str(REPO / "certs" / "generate.sh"), "--out-dir", str(out), "--overlay", str(overlay), "--apply"],
        env=env, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines()[0] == f"apply -k {overlay}"
    proc = subprocess.run(
        [str(REPO / "certs" / "generate.sh"), "--out-dir", str(out), "--overlay", str(tmp_path / "nowhere")],
        env=env, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2 and "not a kustomization directory" in proc.stderr


# === GitOps ===

SYNC_WAVE = "argocd.argoproj.io/sync-wave"
GITOPS_OVERLAY = MANIFESTS / "overlays" / "gitops-no-cert-manager"


def wave(doc: dict) -> int:
    return int(doc["metadata"].get("annotations", {}).get(SYNC_WAVE, "0"))


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZATIONS))
def test_argo_cd_sync_waves_follow_the_upgrade_order(rendered, kustomization):
    """Argo CD applies one wave at a time and waits for it to be healthy: the agent DaemonSet
    before the webhook Deployment (whose image is the sidecar new pods get, and whose new
    sidecars need the new agent), the MutatingWebhookConfiguration after everything (so no pod
    is sent to a webhook that is not serving yet). Everything the Deployment needs (namespace,
    Secret source, Service) is in an earlier wave."""
    docs = rendered[kustomization]
    mwcs = all_of(docs, "MutatingWebhookConfiguration")
    if not mwcs:
        return  # samples
    [mwc] = mwcs
    deployment = only(docs, "Deployment", SERVICE)
    others = [d for d in docs if d is not mwc]
    assert wave(mwc) > max(wave(d) for d in others), "the webhook configuration is not the last wave"
    daemonsets = all_of(docs, "DaemonSet")
    for daemonset in daemonsets:
        assert wave(daemonset) < wave(deployment), "the agent must be rolled out before the webhook"
    before = [d for d in others if d["kind"] not in ("Deployment", "DaemonSet")]
    assert all(wave(d) < min(wave(deployment), *(wave(d) for d in daemonsets)) for d in before), [
        (d["kind"], d["metadata"]["name"], wave(d)) for d in before
    ]


def test_sync_wave_check_can_fail(rendered):
    docs = copy.deepcopy(rendered["default"])
    only(docs, "DaemonSet", AGENT)["metadata"]["annotations"][SYNC_WAVE] = "2"
    with pytest.raises(AssertionError):
        test_argo_cd_sync_waves_follow_the_upgrade_order({"x": docs}, "x")


def gitops_overlay_copy(tmp_path: Path) -> Path:
    """The GitOps overlay as an operator copies it into their repository, with
    `cabundle-patch.json` replaced by what `multus-eni-webhook certs` wrote."""
    webhook = binary("multus-eni-webhook")
    assert webhook is not None, f"{BIN_DIR}/multus-eni-webhook is missing: cargo build -p multus-eni-webhook"
    certs = tmp_path / "certs"
    proc = subprocess.run([str(webhook), "certs", "--out-dir", str(certs)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    overlay = tmp_path / "my-multus-eni"
    shutil.copytree(GITOPS_OVERLAY, overlay)
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    kustomization["resources"] = [
        os.path.relpath(GITOPS_OVERLAY / r, overlay) if r.startswith("..") else r for r in kustomization["resources"]
    ]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    shutil.copy(certs / "cabundle-patch.json", overlay / "cabundle-patch.json")
    return certs


def test_gitops_overlay_keeps_tls_in_git(tmp_path):
    """No cert-manager and no imperative step: the caBundle of every entry is the CA that
    `certs` wrote, the TLS Secret comes from an ExternalSecret that makes exactly the Secret the
    Deployment mounts, and nothing needs cert-manager's CRDs."""
    import base64

    certs = gitops_overlay_copy(tmp_path)
    docs = render(tmp_path / "my-multus-eni")
    assert not [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]
    mwc = only(docs, "MutatingWebhookConfiguration")
    assert "cert-manager.io/inject-ca-from" not in mwc["metadata"].get("annotations", {})
    ca = (certs / "ca.crt").read_bytes()
    for hook in mwc["webhooks"]:
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca, hook["name"]
    deployment = only(docs, "Deployment", SERVICE)
    [tls_volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    external = only(docs, "ExternalSecret")
    assert external["apiVersion"].startswith("external-secrets.io/")
    assert external["metadata"]["namespace"] == NAMESPACE
    target = external["spec"]["target"]
    assert target["name"] == tls_volume["secret"]["secretName"]
    assert target["template"]["type"] == "kubernetes.io/tls"
    assert sorted(d["secretKey"] for d in external["spec"]["data"]) == ["tls.crt", "tls.key"]
    assert wave(external) < wave(deployment)
    for doc in docs:
        if doc["kind"] != "ExternalSecret":
            for version in kubernetes_versions():
                kubernetes_validate.validate(doc, version, strict=True)


def test_gitops_overlay_placeholder_covers_every_entry_and_cannot_be_applied(rendered):
    """The committed cabundle-patch.json names every entry (so a new entry is not left without
    a caBundle) and its value is not base64: applied unchanged, the API server refuses the
    webhook configuration rather than register one no one can call."""
    import base64
    import binascii

    placeholder = json.loads((GITOPS_OVERLAY / "cabundle-patch.json").read_text())
    entries = only(rendered["default"], "MutatingWebhookConfiguration")["webhooks"]
    assert sorted(op["path"] for op in placeholder) == sorted(
        f"/webhooks/{i}/clientConfig/caBundle" for i in range(len(entries))
    )
    for op in placeholder:
        with pytest.raises(binascii.Error):
            base64.b64decode(op["value"], validate=True)


def test_argo_cd_application_in_docs_ignores_what_cert_manager_injects(rendered):
    """The docs' Application ignores the caBundle the cainjector writes (and respects that on
    sync), names the objects the install really renders, and syncs with pruning."""
    text = (REPO / "docs" / "install.md").read_text()
    [block] = re.findall(r"```yaml\n# Argo CD Application\n(.*?)```", text, re.S)
    app = yaml.safe_load(block)
    assert app["kind"] == "Application"
    assert "RespectIgnoreDifferences=true" in app["spec"]["syncPolicy"]["syncOptions"]
    mwc = only(rendered["default"], "MutatingWebhookConfiguration")
    [ignored] = [i for i in app["spec"]["ignoreDifferences"] if i["kind"] == "MutatingWebhookConfiguration"]
    assert ignored["name"] == mwc["metadata"]["name"]
    assert ignored["group"] == "admissionregistration.k8s.io"
    jq = shutil.which("jq")
    assert jq, "jq is missing: scripts/setup-test-env.sh installs it"
    injected = copy.deepcopy(mwc)
    for hook in injected["webhooks"]:
        hook["clientConfig"]["caBundle"] = "Q0E="
    for expression in ignored["jqPathExpressions"]:
        proc = subprocess.run([jq, "-c", f"[{expression}]"], input=json.dumps(injected), capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == ["Q0E="] * len(mwc["webhooks"]), expression


# === telco install ===


def pod_spec(docs: list[dict], kind: str, name: str) -> dict:
    return only(docs, kind, name)["spec"]["template"]["spec"]


def test_tainted_node_groups_and_private_registry_overlay_in_docs(tmp_path):
    """components/tainted-node-groups and components/private-registry on the default install,
    as the docs show them: the webhook tolerates the taint it selects, its spread can never
    strand a replica, both ServiceAccounts and every injected pod get the pull secret."""
    docs = docs_overlay(tmp_path, "tainted node groups and a private registry")
    spec = pod_spec(docs, "Deployment", SERVICE)
    [(label, value)] = spec["nodeSelector"].items()
    assert {"key": label, "operator": "Equal", "value": value, "effect": "NoSchedule"} in spec["tolerations"]
    for constraint in spec["topologySpreadConstraints"]:
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway", constraint
    for name, namespace in ((SERVICE, NAMESPACE), (AGENT, AGENT_NAMESPACE)):
        account = only(docs, "ServiceAccount", name)
        assert account["metadata"]["namespace"] == namespace
        assert account["imagePullSecrets"] == [{"name": "multus-eni-registry"}], name
    assert flags(webhook_container(docs))["image-pull-secret"] == "multus-eni-registry"
    # The agent already tolerates every taint.
    assert {"operator": "Exists"} in pod_spec(docs, "DaemonSet", AGENT)["tolerations"]
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
            for version in kubernetes_versions():
                kubernetes_validate.validate(doc, version, strict=True)


def test_private_registry_pull_secret_reaches_the_injected_sample(tmp_path):
    """The Deployment's flags with the private-registry component, given to `inject` on the
    sample: the pod template lists the pull secret (the webhook's unit tests cover every entry)."""
    webhook = binary("multus-eni-webhook")
    assert webhook is not None, f"{BIN_DIR}/multus-eni-webhook is missing: cargo build -p multus-eni-webhook"
    docs = docs_overlay(tmp_path, "tainted node groups and a private registry")
    inject_flags = set(re.findall(r"--([a-z][a-z0-9-]*)", help_text("multus-eni-webhook", "inject") or ""))
    assert "image-pull-secret" in inject_flags, "multus-eni-webhook inject has no --image-pull-secret"
    args = [f"--{k}={v}" for k, v in settings(webhook_container(docs)).items() if k in inject_flags]
    sample = yaml.safe_dump_all(render(MANIFESTS / "samples"))
    proc = subprocess.run([str(webhook), "inject", "-f", "-", *args], input=sample, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    injected = only([d for d in yaml.safe_load_all(proc.stdout) if d], "Deployment")
    assert {"name": "multus-eni-registry"} in injected["spec"]["template"]["spec"]["imagePullSecrets"]


def test_topology_spread_patch_fails_loudly_if_the_constraint_moves(tmp_path):
    """The component's `test` operation pins the hostname constraint it relaxes: a reordered
    Deployment makes the overlay fail instead of relaxing the zone constraint."""
    base = tmp_path / "base"
    shutil.copytree(MANIFESTS, base / "manifests")
    deployment = base / "manifests" / "core" / "deployment.yaml"
    doc = yaml.safe_load(deployment.read_text())
    doc["spec"]["template"]["spec"]["topologySpreadConstraints"].reverse()
    deployment.write_text(yaml.safe_dump(doc))
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["../base/manifests"],
        "components": ["../base/manifests/components/tainted-node-groups"],
    }))
    proc = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "test" in proc.stderr.lower(), proc.stderr


def test_agent_aws_environment_overlay_in_docs(tmp_path):
    docs = docs_overlay(tmp_path, "agent AWS environment")
    env = {e["name"]: e.get("value") for e in agent_container(docs)["env"]}
    assert {"AWS_REGION", "AWS_ENDPOINT_URL_EC2", "AWS_ENDPOINT_URL_STS", "HTTPS_PROXY", "NO_PROXY"} <= set(env)
    assert "NODE_NAME" in env, "the overlay must add to the env, not replace it"
    # IMDS must never go through the proxy, on either family.
    assert {"169.254.169.254", "fd00:ec2::254"} <= set(env["NO_PROXY"].split(","))
    for version in kubernetes_versions():
        kubernetes_validate.validate(only(docs, "DaemonSet", AGENT), version, strict=True)


def test_agent_irsa_trust_policy_in_docs_names_the_agents_service_account(rendered):
    text = (REPO / "docs" / "install.md").read_text()
    section = text.split("**IRSA for the agent**", 1)[1]
    [block] = re.findall(r"```json\n(.*?)```", section, re.S)[:1]
    policy = json.loads(block)
    [statement] = policy["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    conditions = statement["Condition"]["StringEquals"]
    [sub] = [v for k, v in conditions.items() if k.endswith(":sub")]
    [aud] = [v for k, v in conditions.items() if k.endswith(":aud")]
    account = only(rendered["default"], "ServiceAccount", AGENT)["metadata"]
    assert sub == f"system:serviceaccount:{account['namespace']}:{account['name']}"
    assert aud == "sts.amazonaws.com"
    provider = statement["Principal"]["Federated"].split("oidc-provider/", 1)[1]
    assert all(k.startswith(provider + ":") for k in conditions), "the conditions name another provider"
