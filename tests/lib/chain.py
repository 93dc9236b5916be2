"""The whole path from admission to ENI, as steps shared by tests/test_chain_e2e.py and
scripts/demo.py (one code path: the demo prints what the test asserts).

1. `multus-eni-webhook certs` writes the CA, the Secret and the caBundle patch; the Secret is
   laid out as the kubelet mounts it (`..data` symlink swap layout).
2. The real webhook binary runs with the args of the rendered Deployment
   (`kubectl kustomize manifests/`), only listen addresses and the Secret mount path
   substituted; `/readyz` on the metrics port is awaited.
3. The busybox sample becomes the Pod its ReplicaSet controller would create; it goes through
   an apiserver-like client (tests/lib/apiserver.py: TLS trusting only the patched caBundle)
   as an AdmissionReview CREATE; the JSONPatch is applied; the pod is then named and bound
   to a node as the registry and the scheduler would.
4. The injected sidecar container is taken from the patched pod: command, args and env
   exactly, the image's binary path swapped for the built binary, downward-API env resolved
   from the pod, AWS settings for the emulator added (as IRSA / Pod Identity add theirs), its
   securityContext user, group, capabilities and no_new_privs applied with setpriv(1).
5. Two network namespaces: the node (the EC2 emulator and a fault proxy on an "endpoint"
   address, the host ends of the pod's links) and the pod (`eth0` wired like the VPC CNI
   does, with the primary ENI's MAC; `net1` with the Multus ENI's MAC and the first address
   of the NAD's whereabouts range, mapped into the emulated subnet).
6. The sidecar runs in the pod namespace; the address must land on net1's ENI only,
   `/readyz` on the injected startupProbe's port goes 503 → 200, SIGTERM gives exit 0 and
   releases the address.

Waiting is bounded polling with generous deadlines (`wait_for`); nothing here is timed.
Every step registers its cleanup on the chain; `Chain.close()` (or `with Chain(...)`)
undoes everything, also after a failure.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

from . import apiserver, moto
from .fault_proxy import FaultProxy
from .netns import NetNS
from .sidecar import Sidecar, aws_env, wait_for

REPO = Path(__file__).resolve().parents[2]

SIDECAR_CONTAINER = "multus-eni-sidecar"
# The sidecar image's binaries (Dockerfile, target `sidecar`): path in the image → built binary.
SIDECAR_IMAGE_BINARIES = {
    "/usr/local/bin/multus-eni-sidecar": "multus-eni-sidecar",
    "/usr/local/bin/multus-eni-sidecar-agent-mode": "multus-eni-sidecar-agent-mode",
}
# The image's binary each EC2 access mode must run: agent mode the one without the AWS SDK,
# direct mode the full one.
SIDECAR_IMAGE_BINARY = {
    "agent": "/usr/local/bin/multus-eni-sidecar-agent-mode",
    "direct": "/usr/local/bin/multus-eni-sidecar",
}
WEBHOOK_CONTAINER = "webhook"
NETWORKS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"

# The emulated regional EC2 endpoint: an address on the node namespace's loopback, reached
# from the pod through eth0 and its default route (198.18.0.0/15 is reserved for testing).
EC2_ENDPOINT_IP = "198.18.0.2"
MOTO_PORT = 5000
# The VPC CNI's pod gateway: pod eth0 gets a /32 and a default route via this link-local
# address, which the host end of the veth answers.
POD_GATEWAY = "169.254.1.1"
# A container's PATH when the image sets none (what container runtimes default to).
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

ASSIGN4 = "AssignPrivateIpAddresses"
MUTATING_ACTIONS = {
    "AssignPrivateIpAddresses",
    "UnassignPrivateIpAddresses",
    "AssignIpv6Addresses",
    "UnassignIpv6Addresses",
}


class ChainError(AssertionError):
    """A link of the chain did not hold (manifest drift, a wrong answer, a wrong address)."""


def check(condition: Any, message: str) -> None:
    if not condition:
        raise ChainError(message)


def bin_dir() -> Path:
    """`$MULTUS_ENI_BIN_DIR`, default `<repo>/target/debug` (nothing here builds)."""
    return Path(os.environ.get("MULTUS_ENI_BIN_DIR", REPO / "target" / "debug"))


# === manifests ===


def kustomize(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize PATH`, parsed."""
    if shutil.which("kubectl") is None:
        raise ChainError("kubectl (with kustomize) is not on PATH: scripts/setup-test-env.sh says how to get it")
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise ChainError(f"kubectl kustomize {path} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]
    check(len(found) == 1, f"expected exactly one {kind} {name or ''} in the rendered manifests, found {len(found)}")
    return found[0]


@dataclasses.dataclass
class Manifests:
    """The install (`manifests/`) and the sample (`manifests/samples/`) as rendered."""

    install: list[dict[str, Any]]
    samples: list[dict[str, Any]]

    @classmethod
    def render(cls, repo: Path = REPO) -> "Manifests":
        return cls(kustomize(repo / "manifests"), kustomize(repo / "manifests" / "samples"))

    @property
    def webhook_deployment(self) -> dict[str, Any]:
        return find(self.install, "Deployment", "multus-eni-webhook")

    @property
    def webhook_container(self) -> dict[str, Any]:
        containers = self.webhook_deployment["spec"]["template"]["spec"]["containers"]
        (c,) = [c for c in containers if c["name"] == WEBHOOK_CONTAINER]
        return c

    @property
    def webhook_configuration(self) -> dict[str, Any]:
        return find(self.install, "MutatingWebhookConfiguration")

    @property
    def agent_daemonset(self) -> dict[str, Any]:
        return find(self.install, "DaemonSet", "multus-eni-agent")

    @property
    def agent_container(self) -> dict[str, Any]:
        (c,) = self.agent_daemonset["spec"]["template"]["spec"]["containers"]
        return c

    @property
    def sample_deployment(self) -> dict[str, Any]:
        return find(self.samples, "Deployment")

    @property
    def sample_namespace(self) -> dict[str, Any]:
        return find(self.samples, "Namespace")

    def network_attachment(self, name: str, namespace: str) -> dict[str, Any]:
        found = [
            o
            for o in self.samples
            if o.get("kind") == "NetworkAttachmentDefinition"
            and o["metadata"]["name"] == name
            and o["metadata"].get("namespace", namespace) == namespace
        ]
        check(len(found) == 1, f"NetworkAttachmentDefinition {namespace}/{name} not in the samples")
        return found[0]


def flag_value(args: list[str], flag: str) -> str | None:
    """Value of `--flag=V` or `--flag V` in a container's args."""
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with the value of `flag` replaced (the flag must be there)."""
    out, found, skip = [], False, False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a.startswith(flag + "="):
            out.append(f"{flag}={value}")
            found = True
        elif a == flag and i + 1 < len(args):
            out += [flag, value]
            found, skip = True, True
        else:
            out.append(a)
    check(found, f"the Deployment does not pass {flag}")
    return out


# === processes and files ===


def free_port() -> int:
    """A free loopback TCP port (released again at once; the webhook binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_copy(src: Path, dest_dir: Path) -> Path:
    """A copy of a built binary that a concurrent `cargo build` cannot replace under a
    running process, readable by the sidecar's non-root user."""
    if not src.exists():
        raise ChainError(f"{src} missing: run `cargo build --workspace --bins` first (the chain does not build)")
    dest = dest_dir / src.name
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
    os.chmod(dest, 0o755)
    return dest


def mount_secret(secret: dict[str, Any], mount_dir: Path, default_mode: int) -> None:
    """Lays out a Secret volume as the kubelet does: files in a timestamped directory,
    `..data` pointing at it, and one symlink per key through `..data`."""
    mount_dir.mkdir(parents=True, exist_ok=True)
    stamp = mount_dir / time.strftime("..%Y_%m_%d_%H_%M_%S.000000001")
    stamp.mkdir()
    for key, value in secret.get("data", {}).items():
        path = stamp / key
        path.write_bytes(base64.b64decode(value))
        os.chmod(path, default_mode)
    (mount_dir / "..data").symlink_to(stamp.name)
    for key in secret.get("data", {}):
        (mount_dir / key).symlink_to(f"..data/{key}")


@dataclasses.dataclass
class Process:
    """A child process in its own session, with its output in a log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Process":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, wait, the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace: float = 30) -> None:
        """SIGTERM, then SIGKILL to the whole session if it does not exit within `grace`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def http_status(url: str) -> int | None:
    """Status of a plain GET; None while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


# === the pod the ReplicaSet controller creates ===


def pod_template_hash(template: dict[str, Any]) -> str:
    """A `pod-template-hash` shaped like the controller's (FNV-32a of the template, rendered
    with the name alphabet); not byte-identical to Go's hash of the struct."""
    h = 0x811C9DC5
    for b in json.dumps(template, sort_keys=True).encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return "".join(apiserver.NAME_ALPHABET[ord(c) % len(apiserver.NAME_ALPHABET)] for c in str(h))


def replicaset_pod(deployment: dict[str, Any]) -> dict[str, Any]:
    """The Pod the Deployment's ReplicaSet controller POSTs: the template, its labels plus
    `pod-template-hash`, `generateName` (no name yet) and the controller owner reference."""
    template = copy.deepcopy(deployment["spec"]["template"])
    namespace = deployment["metadata"].get("namespace", "default")
    hash_ = pod_template_hash(template)
    rs_name = f"{deployment['metadata']['name']}-{hash_}"
    meta = template.get("metadata", {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{rs_name}-",
            "namespace": namespace,
            "labels": {**meta.get("labels", {}), "pod-template-hash": hash_},
            "annotations": dict(meta.get("annotations", {})),
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": rs_name,
                    "uid": str(uuid.uuid4()),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template["spec"],
    }


def persist(pod: dict[str, Any], node_name: str, pod_ip: str, host_ip: str) -> dict[str, Any]:
    """What happens after admission: the registry names the pod (`generateName` + suffix) and
    gives it a uid, the scheduler binds it, the CNI gives it an IP."""
    pod = copy.deepcopy(pod)
    meta = pod["metadata"]
    if not meta.get("name"):
        meta["name"] = meta["generateName"] + apiserver.generated_suffix()
    meta["uid"] = str(uuid.uuid4())
    pod["spec"]["nodeName"] = node_name
    pod["status"] = {"phase": "Pending", "hostIP": host_ip, "podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}
    return pod


def injected_sidecar(pod: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The injected sidecar container and where it is (`initContainers[0]` in native mode,
    a regular container in legacy mode)."""
    inits = pod["spec"].get("initContainers") or []
    if inits and inits[0].get("name") == SIDECAR_CONTAINER:
        return inits[0], "initContainers[0]"
    for i, c in enumerate(pod["spec"].get("containers") or []):
        if c.get("name") == SIDECAR_CONTAINER:
            return c, f"containers[{i}]"
    raise ChainError(f"no {SIDECAR_CONTAINER} container in the patched pod")


def field_ref(pod: dict[str, Any], path: str) -> str:
    """A downward-API `fieldRef.fieldPath`, resolved from the pod as the kubelet does."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
    }
    if path in simple:
        value = simple[path]
    elif path.startswith("metadata.labels['") and path.endswith("']"):
        value = meta.get("labels", {}).get(path[len("metadata.labels['") : -2], "")
    elif path.startswith("metadata.annotations['") and path.endswith("']"):
        value = meta.get("annotations", {}).get(path[len("metadata.annotations['") : -2], "")
    else:
        raise ChainError(f"downward API field {path!r} is not emulated here")
    check(value is not None, f"downward API field {path} has no value on the pod")
    return str(value)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion against the variables defined so far; `$$` escapes."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i) and ")" in value[i:]:
            end = value.index(")", i)
            name = value[i + 2 : end]
            out.append(env.get(name, value[i : end + 1]))
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def container_env(container: dict[str, Any], pod: dict[str, Any]) -> dict[str, str]:
    """The container's `env`, resolved as the kubelet resolves it."""
    check(not container.get("envFrom"), "envFrom is not emulated here")
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "fieldRef" in (item.get("valueFrom") or {}):
            env[item["name"]] = field_ref(pod, item["valueFrom"]["fieldRef"]["fieldPath"])
        elif "valueFrom" in item:
            raise ChainError(f"env {item['name']}: {list(item['valueFrom'])} is not emulated here")
        else:
            env[item["name"]] = ""
    return env


def host_path_of(pod_spec: dict[str, Any], container: dict[str, Any], path: str) -> str:
    """The node path behind `path` as the container sees it, through the container's
    hostPath volume mounts (the kubelet bind-mounts `hostPath.path` at `mountPath`)."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        root = mount["mountPath"].rstrip("/")
        host = (volumes.get(mount["name"]) or {}).get("hostPath")
        if host and (path == root or path.startswith(root + "/")):
            return host["path"].rstrip("/") + path[len(root) :]
    raise ChainError(f"{path} is on no hostPath volume of container {container.get('name')}")


def probe_target(container: dict[str, Any], probe: str = "startupProbe") -> tuple[str, int]:
    """(path, port) of an httpGet probe; a named port is looked up in the container."""
    spec = container.get(probe)
    check(spec and "httpGet" in spec, f"the sidecar has no {probe} with httpGet")
    port = spec["httpGet"]["port"]
    if isinstance(port, str) and not port.isdigit():
        named = [p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port]
        check(named, f"{probe} names port {port!r}, which the container does not declare")
        port = named[0]
    return spec["httpGet"].get("path", "/"), int(port)


@dataclasses.dataclass
class RunAs:
    """The part of the sidecar's securityContext a process can apply without a runtime."""

    uid: int
    gid: int
    drop_all_capabilities: bool
    no_new_privs: bool

    def argv(self) -> list[str]:
        out = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        if self.drop_all_capabilities:
            out += ["--inh-caps=-all", "--bounding-set=-all"]
        if self.no_new_privs:
            out.append("--no-new-privs")
        return [*out, "--"]


def run_as(container: dict[str, Any], pod: dict[str, Any]) -> RunAs:
    pod_sc = pod["spec"].get("securityContext") or {}
    sc = container.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", uid))
    check(uid is not None, "the sidecar sets no runAsUser (the image's USER cannot be read here)")
    check(uid != 0 or not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")), "runAsNonRoot with uid 0")
    return RunAs(
        uid=int(uid),
        gid=int(gid),
        drop_all_capabilities="ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
        no_new_privs=sc.get("allowPrivilegeEscalation") is False,
    )


# === addresses ===


def whereabouts_range(nad: dict[str, Any]) -> tuple[ipaddress.IPv4Network, list[ipaddress.IPv4Address]]:
    """The NAD's whereabouts range and its allocatable addresses, lowest first (whereabouts
    hands out the lowest free one)."""
    config = json.loads(nad["spec"]["config"])
    ipam = config.get("ipam") or {}
    check(ipam.get("type") == "whereabouts", "the sample NAD does not use whereabouts IPAM")
    network = ipaddress.ip_network(ipam["range"], strict=False)
    start = ipaddress.ip_address(ipam.get("range_start", str(network.network_address + 1)))
    end = ipaddress.ip_address(ipam.get("range_end", str(network.broadcast_address - 1)))
    excluded = {ipaddress.ip_address(g) for g in [ipam.get("gateway")] if g}
    pool = [a for a in network.hosts() if start <= a <= end and a not in excluded]
    return network, pool


def map_into(
    address: ipaddress.IPv4Address, source: ipaddress.IPv4Network, target: ipaddress.IPv4Network
) -> ipaddress.IPv4Interface:
    """`address` at the same offset in `target` (the emulated subnet), with `target`'s prefix."""
    offset = int(address) - int(source.network_address)
    check(offset < target.num_addresses, f"{address} does not fit into the emulated subnet {target}")
    return ipaddress.ip_interface(f"{target.network_address + offset}/{target.prefixlen}")


# === the chain ===


@dataclasses.dataclass
class CertsResult:
    out_dir: Path
    secret: dict[str, Any]
    cabundle_patch: list[dict[str, Any]]
    mount_dir: Path  # the Secret as the kubelet mounts it
    stderr: str


@dataclasses.dataclass
class WebhookResult:
    argv: list[str]
    addr: tuple[str, int]
    metrics_port: int


@dataclasses.dataclass
class Admission:
    """The sample pod's trip through mutating admission."""

    review_request: dict[str, Any]
    result: apiserver.AdmissionResult
    admitted: dict[str, Any]  # the pod as admitted (patched)
    sidecar: dict[str, Any]
    sidecar_position: str


@dataclasses.dataclass
class SidecarSpec:
    """How the kubelet would start the injected container, here."""

    argv: list[str]  # the container's command + args, binary path substituted
    env: dict[str, str]
    run_as: RunAs
    probe_path: str
    probe_port: int
    injected_env: dict[str, str]  # what came from the pod spec (resolved)


@dataclasses.dataclass
class NetworkResult:
    world: moto.World
    node_name: str
    pod_ip: str
    net1_address: ipaddress.IPv4Interface
    nad_address: ipaddress.IPv4Address
    nad_range: ipaddress.IPv4Network
    enis: dict[str, str]  # role → ENI id: eth0, net1, other


@dataclasses.dataclass
class Readiness:
    statuses: list[int]  # distinct /readyz answers in order (e.g. [503, 200])
    held_assign_calls: int


class Chain:
    """The steps, in order; each registers the cleanup of what it started, and `close()`
    (or leaving a `with Chain() as c:` block) runs them all. The work directory (binaries,
    certs, logs) stays for the caller to print or delete."""

    def __init__(self, workdir: Path | None = None, repo: Path = REPO, ec2_access: str = "agent"):
        self.repo = repo
        # `agent` (the Deployment's default: the node agent calls EC2 for the sidecar) or
        # `direct` (the sidecar calls EC2 itself, as /mutate/direct injects it).
        self.ec2_access = ec2_access
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mne-chain-"))
        os.chmod(self.workdir, 0o755)  # the sidecar's uid must reach its binary
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.bin = self.workdir / "bin"
        self.bin.mkdir(exist_ok=True)
        os.chmod(self.bin, 0o755)
        self._stack = contextlib.ExitStack()
        try:
            self.manifests = Manifests.render(repo)
            self.webhook_binary = private_copy(bin_dir() / "multus-eni-webhook", self.bin)
            # Both, as in the image: the injected command picks one.
            self.sidecar_binaries = {
                path: private_copy(bin_dir() / name, self.bin) for path, name in SIDECAR_IMAGE_BINARIES.items()
            }
            self.sidecar_binary = self.sidecar_binaries[SIDECAR_IMAGE_BINARY[ec2_access]]
            self.agent_binary = private_copy(bin_dir() / "multus-eni-agent", self.bin)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self.webhook: Process | None = None
        self.agent: Process | None = None
        self.agent_metrics_port: int | None = None
        # The node's file system as far as hostPath volumes reach it: /run/multus-eni on the
        # node is <workdir>/node/run/multus-eni here.
        self.node_root = self.workdir / "node"
        self.sidecar: Sidecar | None = None
        self.certs_result: CertsResult | None = None
        self.webhook_result: WebhookResult | None = None
        self.admission: Admission | None = None
        self.pod: dict[str, Any] | None = None
        self._assign_held = False
        self.network: NetworkResult | None = None
        self.node: NetNS | None = None
        self.pod_ns: NetNS | None = None
        self.server: moto.MotoServer | None = None
        self.proxy: FaultProxy | None = None

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops every process and deletes every namespace this chain created."""
        self._stack.close()

    def log_files(self) -> list[Path]:
        return sorted(self.logs.iterdir())

    # --- 1. certs ---

    def generate_certs(self) -> CertsResult:
        out = self.workdir / "certs"
        proc = subprocess.run(
            [str(self.webhook_binary), "certs", "--out-dir", str(out)], capture_output=True, text=True
        )
        check(proc.returncode == 0, f"multus-eni-webhook certs failed ({proc.returncode}): {proc.stderr}")
        for name in ("ca.crt", "ca.key", "tls.crt", "tls.key", "secret.yaml", "cabundle-patch.json"):
            check((out / name).is_file(), f"multus-eni-webhook certs did not write {name}")
        secret = yaml.safe_load((out / "secret.yaml").read_text())
        patch = json.loads((out / "cabundle-patch.json").read_text())

        # The Deployment mounts that Secret: same name, as a directory at the path its flags use.
        pod_spec = self.manifests.webhook_deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        mounts = [
            m
            for m in self.manifests.webhook_container.get("volumeMounts", [])
            if "secret" in volumes.get(m["name"], {})
        ]
        check(len(mounts) == 1, "the webhook Deployment should mount exactly one Secret")
        (mount,) = mounts
        volume = volumes[mount["name"]]["secret"]
        check(
            volume["secretName"] == secret["metadata"]["name"],
            f"certs writes Secret {secret['metadata']['name']}, the Deployment mounts {volume['secretName']}",
        )
        check("subPath" not in mount, "the TLS Secret is mounted with subPath: rotation would never reach the webhook")
        mount_dir = self.workdir / "secret-volume"
        mount_secret(secret, mount_dir, volume.get("defaultMode", 0o644))
        self.certs_result = CertsResult(out, secret, patch, mount_dir, proc.stderr.strip())
        self._container_mount_path = mount["mountPath"]
        return self.certs_result

    # --- 2. webhook ---

    def start_webhook(self) -> WebhookResult:
        assert self.certs_result is not None, "generate_certs first"
        container = self.manifests.webhook_container
        args = list(container.get("args") or [])
        check(args and args[0] == "serve", f"the webhook Deployment does not run `serve`: {args}")

        def host_path(flag: str) -> str:
            value = flag_value(args, flag) or ""
            check(
                value.startswith(self._container_mount_path + "/"),
                f"{flag}={value} is not under the Secret mount {self._container_mount_path}",
            )
            return str(self.certs_result.mount_dir / value[len(self._container_mount_path) + 1 :])

        # The chain runs the sidecar against the EC2 emulator itself (direct mode) until the node
        # agent is part of it; the Deployment's own value (agent) must be there to be replaced.
        args = replace_flag(args, "--ec2-access", self.ec2_access)
        args = replace_flag(args, "--tls-cert", host_path("--tls-cert"))
        args = replace_flag(args, "--tls-key", host_path("--tls-key"))
        env = {"PATH": CONTAINER_PATH, **container_env(container, {"metadata": {}, "spec": {}})}
        log = self.logs / "webhook.log"
        # A free port can be taken by another process before the webhook binds it: that
        # (and only that) is retried with new ports.
        for attempt in range(3):
            port, metrics_port = free_port(), free_port()
            argv = [
                str(self.webhook_binary),
                *replace_flag(
                    replace_flag(args, "--addr", f"127.0.0.1:{port}"), "--metrics-addr", f"127.0.0.1:{metrics_port}"
                ),
            ]
            webhook = self.webhook = Process("webhook", argv, log, env=env).start()
            self._stack.callback(webhook.stop)

            def ready() -> bool:
                check(webhook.running(), f"the webhook exited with {webhook.proc.poll()} before /readyz (log: {log})")
                return http_status(f"http://127.0.0.1:{metrics_port}/readyz") == 200

            try:
                wait_for(ready, "the webhook's /readyz 200", timeout=120)
                break
            except ChainError:
                if attempt == 2 or "Address already in use" not in log.read_text(errors="replace"):
                    raise
        self.webhook_result = WebhookResult(argv, ("127.0.0.1", port), metrics_port)
        return self.webhook_result

    def webhook_configuration(self) -> dict[str, Any]:
        """The MutatingWebhookConfiguration after `kubectl patch` with the certs' caBundle patch."""
        assert self.certs_result is not None
        return jsonpatch.apply_patch(self.manifests.webhook_configuration, self.certs_result.cabundle_patch)

    def client(self) -> apiserver.WebhookClient:
        """The apiserver-like client for the running webhook."""
        assert self.webhook_result is not None, "start_webhook first"
        return apiserver.WebhookClient.for_configuration(self.webhook_configuration(), self.webhook_result.addr)

    # --- 3. admission ---

    def admit_sample_pod(self) -> Admission:
        """The sample Deployment's pod through mutating admission, patch applied."""
        config = self.webhook_configuration()
        hook = config["webhooks"][0]
        namespace = self.manifests.sample_namespace
        ns_labels = {
            **namespace["metadata"].get("labels", {}),
            "kubernetes.io/metadata.name": namespace["metadata"]["name"],
        }
        pod = apiserver.defaulted_pod(replicaset_pod(self.manifests.sample_deployment))
        check(
            pod["metadata"]["namespace"] == namespace["metadata"]["name"],
            "the sample pod is not in the sample namespace",
        )
        review = apiserver.create_review(pod)
        skipped = apiserver.reasons_not_called(hook, review, ns_labels)
        check(not skipped, f"the apiserver would not call the webhook for the sample pod: {skipped}")
        result = self.client().review(review)
        check(result.allowed, f"the webhook denied the sample pod: {result.review.get('response')}")
        check(result.patch, "the webhook allowed the sample pod without a patch")
        admitted = jsonpatch.apply_patch(pod, result.patch)
        sidecar, position = injected_sidecar(admitted)
        self.admission = Admission(review, result, admitted, sidecar, position)
        return self.admission

    def schedule_pod(self) -> dict[str, Any]:
        """The admitted pod named, bound to the emulated node and given its eth0 IP."""
        assert self.admission is not None and self.network is not None
        net = self.network
        self.pod = persist(self.admission.admitted, net.node_name, net.pod_ip, net.world.eth0.primary_ip)
        return self.pod

    # --- 4. the sidecar as the kubelet would start it ---

    def sidecar_spec(self, endpoint: str) -> SidecarSpec:
        assert self.pod is not None, "schedule_pod first"
        container, _ = injected_sidecar(self.pod)
        pod = self.pod
        command = list(container.get("command") or [])
        check(command, "the injected sidecar has no command (the image's entrypoint is not known here)")
        check(
            command[0] in self.sidecar_binaries,
            f"the sidecar command runs {command[0]}, the image has {sorted(self.sidecar_binaries)}",
        )
        expected = SIDECAR_IMAGE_BINARY[self.ec2_access]
        check(
            command[0] == expected,
            f"--ec2-access={self.ec2_access} injected a sidecar running {command[0]}, not {expected}",
        )
        args = list(container.get("args") or [])
        socket_path = flag_value(args, "--agent-socket")
        check(
            (socket_path is not None) == (self.ec2_access == "agent"),
            f"--ec2-access={self.ec2_access} injected a sidecar with --agent-socket={socket_path}",
        )
        if socket_path is not None:
            # The socket as the sidecar container sees it → the node path → this chain's node.
            node_path = host_path_of(pod["spec"], container, socket_path)
            args = replace_flag(args, "--agent-socket", str(self.on_node(node_path)))
        argv = [str(self.sidecar_binaries[command[0]]), *command[1:], *args]
        injected = container_env(container, pod)
        # Direct mode: what IRSA or Pod Identity would add for the emulated account. Agent
        # mode: nothing; the sidecar must work without any AWS setting.
        extra = aws_env(endpoint) if self.ec2_access == "direct" else {}
        clash = {k for k in injected if k in extra and injected[k] != extra[k]}
        check(not clash, f"the injected env sets {sorted(clash)}, which the emulated AWS account needs otherwise")
        path, port = probe_target(container)
        return SidecarSpec(
            argv=argv,
            env={"PATH": CONTAINER_PATH, **injected, **extra},
            run_as=run_as(container, pod),
            probe_path=path,
            probe_port=port,
            injected_env=injected,
        )

    # --- 5. the node, the emulated VPC and the pod's network namespace ---

    def build_network(self) -> NetworkResult:
        node = NetNS()
        self._stack.callback(node.close)
        self.node = node
        node.ip("addr", "add", f"{EC2_ENDPOINT_IP}/32", "dev", "lo")
        self.server = moto.MotoServer(
            node, port=MOTO_PORT, host=EC2_ENDPOINT_IP, log_path=str(self.logs / "moto.log")
        ).start()
        self._stack.callback(self.server.stop)
        self.proxy = FaultProxy(node, MOTO_PORT, host=EC2_ENDPOINT_IP).start()
        self._stack.callback(self.proxy.stop)
        world = moto.build_world(node, self.server.endpoint)
        eth0_eni, net1_eni, other_eni = world.eth0, world.enis[0], world.enis[1]

        taken = {ipaddress.ip_address(a) for e in (eth0_eni, *world.enis) for a in self.eni(e.id).ipv4}
        subnet = ipaddress.ip_network(world.subnet_cidr)
        # The pod's eth0 address, as the VPC CNI gives it: a secondary IP of the primary ENI.
        pod_ip = next(a for a in reversed(list(subnet.hosts())[:-4]) if a not in taken)
        moto.assign(node, self.server.endpoint, eth0_eni.id, str(pod_ip))
        taken.add(pod_ip)

        # net1's address: the lowest whereabouts address whose image in the emulated subnet is
        # free (in a VPC the whereabouts range is reserved from EC2's own allocation).
        template = self.manifests.sample_deployment["spec"]["template"]
        sample_networks = template["metadata"]["annotations"][NETWORKS_ANNOTATION]
        nad_name = sample_networks.split(",")[0].strip().split("@")[0].split("/")[-1]
        nad = self.manifests.network_attachment(nad_name, self.manifests.sample_deployment["metadata"]["namespace"])
        nad_range, pool = whereabouts_range(nad)
        nad_address, net1 = next(
            ((a, map_into(a, nad_range, subnet)) for a in pool if map_into(a, nad_range, subnet).ip not in taken),
            (None, None),
        )
        check(net1 is not None, f"no address of {nad_range} is free in the emulated subnet {subnet}")

        self.network = NetworkResult(
            world=world,
            node_name=f"ip-{world.eth0.primary_ip.replace('.', '-')}.ec2.internal",
            pod_ip=str(pod_ip),
            net1_address=net1,
            nad_address=nad_address,
            nad_range=nad_range,
            enis={"eth0": eth0_eni.id, "net1": net1_eni.id, "other": other_eni.id},
        )
        return self.network

    def build_pod_namespace(self) -> NetNS:
        """The pod's namespace: eth0 wired like the VPC CNI (pod IP /32, default route via
        169.254.1.1 answered by the host end) carrying the primary ENI's MAC; net1 like an
        ipvlan child of the Multus ENI (its MAC) with the whereabouts address."""
        assert self.network is not None and self.node is not None
        w, net = self.network.world, self.network
        pod_ns = NetNS()
        self._stack.callback(pod_ns.close)
        self.pod_ns = pod_ns
        node = self.node

        pod_ns.add_veth("eth0", "veth-pod", w.eth0.mac)
        pod_ns.ip("link", "set", "veth-pod", "netns", node.name)
        node.ip("link", "set", "veth-pod", "up")
        node.ip("addr", "add", f"{POD_GATEWAY}/32", "dev", "veth-pod")
        node.ip("route", "add", f"{net.pod_ip}/32", "dev", "veth-pod")
        pod_ns.ip("addr", "add", f"{net.pod_ip}/32", "dev", "eth0")
        pod_ns.ip("route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link")
        pod_ns.ip("route", "add", "default", "via", POD_GATEWAY, "dev", "eth0")

        net1_eni = next(e for e in w.enis if e.id == net.enis["net1"])
        pod_ns.add_veth("net1", "eth1", net1_eni.mac)
        pod_ns.ip("link", "set", "eth1", "netns", node.name)
        node.ip("link", "set", "eth1", "up")
        pod_ns.add_address("net1", str(net.net1_address))
        return pod_ns

    def on_node(self, node_path: str) -> Path:
        """Where a path of the node's file system lives in this chain (directories created,
        traversable by the sidecar's non-root user)."""
        path = self.node_root / node_path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in [path.parent, *path.parent.parents]:
            if parent == self.workdir or self.workdir not in parent.parents:
                break
            os.chmod(parent, 0o755)
        return path

    # --- 5b. the node agent, as its DaemonSet runs it (agent mode) ---

    def start_agent(self) -> Process:
        """The agent with the DaemonSet's args, its hostPath flags mapped into this chain's
        node, in the node namespace (hostNetwork) with the emulated account's settings (the
        node role's, on a real node). Pods' namespaces are linked into its `--netns-dir`."""
        assert self.network is not None and self.node is not None
        container = self.manifests.agent_container
        pod_spec = self.manifests.agent_daemonset["spec"]["template"]["spec"]
        check(pod_spec.get("hostNetwork") and pod_spec.get("hostPID"), "the agent DaemonSet lacks hostNetwork/hostPID")
        args = list(container.get("args") or [])
        check(args and args[0] == "run", f"the agent DaemonSet does not run `run`: {args}")
        for flag in ("--socket", "--netns-dir", "--state-dir"):
            value = flag_value(args, flag)
            check(value, f"the agent DaemonSet passes no {flag}")
            args = replace_flag(args, flag, str(self.on_node(host_path_of(pod_spec, container, value))))
        for flag in ("--netns-dir", "--state-dir"):
            Path(flag_value(args, flag) or "").mkdir(parents=True, exist_ok=True)
        port = self.agent_metrics_port = free_port()
        args = replace_flag(args, "--metrics-addr", f"127.0.0.1:{port}")
        agent_pod = {"metadata": {"name": "multus-eni-agent-x1y2z", "namespace": "multus-eni-agent"},
                     "spec": {"nodeName": self.network.node_name}}
        env = {"PATH": CONTAINER_PATH, **container_env(container, agent_pod), **aws_env(self.endpoint)}
        # The instance the node is (IMDS on a real node; no IMDS here). An agent from before
        # issue 17 ignores the variable.
        env["MULTUS_ENI_INSTANCE_ID"] = self.network.world.instance_id
        argv = [str(self.agent_binary), *args]
        log = self.logs / "agent.log"
        agent = self.agent = Process("agent", self.node.exec_argv(argv), log, env=env).start()
        self._stack.callback(agent.stop)
        node = self.node

        def ready() -> bool:
            check(agent.running(), f"the agent exited with {agent.proc.poll()} before /readyz (log: {log})")
            return node.call(http_status, f"http://127.0.0.1:{port}/readyz") == 200

        wait_for(ready, "the agent's /readyz 200", timeout=120)
        self.agent_argv = argv
        return agent

    def link_pod_namespace(self) -> None:
        """The pod's namespace in the agent's `--netns-dir`, where the container runtime puts
        it on a node (`/var/run/netns/cni-…`)."""
        assert self.pod_ns is not None and self.agent is not None
        netns_dir = Path(flag_value(self.agent_argv, "--netns-dir") or "")
        link = netns_dir / self.pod_ns.name
        link.symlink_to(self.pod_ns.path)
        self._stack.callback(lambda: link.unlink(missing_ok=True))

    @property
    def endpoint(self) -> str:
        """The EC2 endpoint the sidecar uses: the fault proxy, so a test can hold calls."""
        assert self.proxy is not None
        return self.proxy.endpoint

    def eni(self, eni_id: str) -> moto.EniState:
        assert self.node is not None and self.server is not None
        return moto.eni_state(self.node, self.server.endpoint, eni_id)

    def eni_addresses(self) -> dict[str, moto.EniState]:
        """Each ENI's state by role (eth0, net1, other)."""
        assert self.network is not None
        return {role: self.eni(eni_id) for role, eni_id in self.network.enis.items()}

    def mutating_calls(self) -> list[tuple[str, str | None]]:
        """(action, ENI id) of every address change the sidecar asked EC2 for."""
        assert self.proxy is not None
        return [
            (r.action, r.param("NetworkInterfaceId")) for r in self.proxy.requests() if r.action in MUTATING_ACTIONS
        ]

    # --- 6. the sidecar ---

    def start_sidecar(self, spec: SidecarSpec, hold_assign: bool = True) -> Sidecar:
        """Runs the spec in the pod namespace. With `hold_assign`, the emulator's endpoint
        keeps the first AssignPrivateIpAddresses waiting until `await_readiness` released it,
        so that the 503 before the assignment is observed, not raced."""
        assert self.pod_ns is not None and self.proxy is not None
        if hold_assign:
            self.proxy.hold(ASSIGN4)
            self._assign_held = True
        s = Sidecar(
            self.pod_ns,
            [],
            self.endpoint,
            self.logs / "sidecar.log",
            probe_port=spec.probe_port,
            binary=self.sidecar_binary,
        )
        # The wrapper's own argv/env are for the sidecar tests; the chain runs the injected ones.
        s.argv = [*spec.run_as.argv(), *spec.argv]
        s.env = dict(spec.env)
        self.sidecar = s.start()
        self._stack.callback(s.kill)
        return s

    def await_readiness(self, spec: SidecarSpec) -> Readiness:
        """503 while the assignment is held (if it is), 200 once the address is on the ENI."""
        assert self.sidecar is not None and self.proxy is not None
        s, proxy = self.sidecar, self.proxy
        seen: list[int] = []

        def alive() -> bool:
            check(s.running(), f"the sidecar exited with {s.proc.poll() if s.proc else None} (log: {s.log_path})")
            return True

        def status() -> int | None:
            alive()
            code = s.probe(spec.probe_path)
            if code is not None and (not seen or seen[-1] != code):
                seen.append(code)
            return code

        held = 0
        if self._assign_held:
            wait_for(
                lambda: alive() and proxy.calls(ASSIGN4) >= 1, "the sidecar's AssignPrivateIpAddresses to reach EC2"
            )
            first = wait_for(status, "the sidecar's probe to listen")
            check(first == 503, f"{spec.probe_path} answered {first} while the address was not yet on the ENI")
            held = proxy.calls(ASSIGN4)
            proxy.release()
            self._assign_held = False
        wait_for(lambda: status() == 200, f"{spec.probe_path} 200 on port {spec.probe_port}", timeout=120)
        return Readiness(seen, held)

    def placement_problems(self, before: dict[str, moto.EniState], after: dict[str, moto.EniState]) -> list[str]:
        """Why the address is not where it belongs: on net1's ENI, and nothing changed on
        eth0's ENI nor on the other ENI of the same subnet (empty when all is right)."""
        assert self.network is not None
        address = str(self.network.net1_address.ip)
        problems = []
        if not after["net1"].holds(address):
            problems.append(f"{address} is not on net1's ENI {self.network.enis['net1']}")
        for role in ("eth0", "other"):
            if after[role].holds(address):
                problems.append(f"{address} is on {role}'s ENI {self.network.enis[role]}")
            if after[role] != before[role]:
                problems.append(f"{role}'s ENI changed: {sorted(before[role].ipv4)} -> {sorted(after[role].ipv4)}")
        strays = [(a, e) for a, e in self.mutating_calls() if e != self.network.enis["net1"]]
        if strays:
            problems.append(f"address changes on other ENIs: {strays}")
        return problems

    def probe(self, path: str) -> int | None:
        assert self.sidecar is not None
        return self.sidecar.probe(path)

    def terminate_sidecar(self) -> int:
        """SIGTERM (as the kubelet does on pod deletion) and the exit code."""
        assert self.sidecar is not None
        return self.sidecar.terminate(timeout=120)

    def await_release(self) -> None:
        """net1's address off its ENI. Direct mode releases before the sidecar exits; in agent
        mode the agent answers the release at once and unassigns right after, batched."""
        assert self.network is not None
        address = str(self.network.net1_address.ip)
        wait_for(lambda: not self.eni(self.network.enis["net1"]).holds(address), f"{address} released", timeout=60)

