"""A simulated cluster for the benchmarks: an emulator namespace (moto + the throttling
proxy on a bridge), one network namespace per pod, nodes with Multus ENIs in the emulator,
and real sidecar processes.

Addressing: everything lives in namespaces created here. The emulator namespace holds a
bridge `br0` with 10.251.0.1/16; every pod namespace has an `eth0` veth on that bridge
(10.251.x.y/16) to reach the proxy, and a `net1` veth carrying its ENI's MAC with the pod's
Multus addresses (VPC subnet 10.90.0.0/20). The root namespace is never used for traffic.
A sidecar runs in its pod's namespace (`ip netns exec`), so its netlink view is that pod.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.lib import moto as motolib  # noqa: E402
from tests.lib.netns import NetNS, run  # noqa: E402
from tests.lib.sidecar import Sidecar  # noqa: E402

BRIDGE_IP = "10.251.0.1"
BRIDGE_NET = ipaddress.IPv4Network("10.251.0.0/16")
# Every bench agent's flags: a pod's eth0 here is a veth on the emulator's bridge, standing in for
# a VPC CNI pod's eth0. The agent does not look up the MAC of a real one (its addresses are on a
# VPC CNI ENI of the instance); the bridge's addresses are on no ENI, so they are left to the
# bench as --ignore-cidrs leaves addresses to a workload, and cost no lookup either.
AGENT_ARGS = [f"--ignore-cidrs={BRIDGE_NET}"]
VPC_CIDR = "10.90.0.0/16"
SUBNET_CIDR = "10.90.0.0/20"
POD_POOL_START = ipaddress.IPv4Address("10.90.4.10")
MOTO_PORT = 5000
PROBE_PORT = 9811
CLK_TCK = os.sysconf("SC_CLK_TCK")


def quiet_proxy_shutdown() -> None:
    """The fault proxy's loop is stopped with keep-alive connections still open; asyncio
    then reports each dropped handler. Harmless at the end of a run: keep it off the report."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    default = sys.unraisablehook

    def hook(u: Any) -> None:
        if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
            return
        default(u)

    sys.unraisablehook = hook


def sidecar_binary(agent_mode: bool = False) -> str:
    """`MULTUS_ENI_SIDECAR_BIN`, else the release build if present, else the debug build. In
    agent mode, the agent-mode binary beside it (what the webhook injects), if built."""
    env = os.environ.get("MULTUS_ENI_SIDECAR_BIN")
    if env:
        full = Path(env)
    else:
        root = Path(__file__).resolve().parent.parent
        found = [root / "target" / p / "multus-eni-sidecar" for p in ("release-sidecar", "debug")]
        full = next((p for p in found if p.exists()), None)
        if full is None:
            raise SystemExit("no sidecar binary: run `cargo build -p multus-eni-sidecar` or set MULTUS_ENI_SIDECAR_BIN")
    slim = full.parent / "multus-eni-sidecar-agent-mode"
    return str(slim if agent_mode and slim.exists() else full)


def agent_binary() -> str:
    """`MULTUS_ENI_AGENT_BIN`, else the agent beside the sidecar binary."""
    return os.environ.get("MULTUS_ENI_AGENT_BIN") or str(Path(sidecar_binary()).parent / "multus-eni-agent")


@dataclasses.dataclass
class Eni:
    id: str
    mac: str
    node: str


@dataclasses.dataclass
class Pod:
    index: int
    ns_name: str
    eni: Eni
    addresses: list[str]
    ns: NetNS | None = None
    sidecar: Sidecar | None = None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0


class Emulator:
    """The emulator namespace: bridge, moto on the bridge address."""

    def __init__(self, run_id: str, log_dir: Path):
        self.run_id = run_id
        self.ns = NetNS(f"mne-{run_id}-emu")
        self.ns.ip("link", "add", "br0", "type", "bridge")
        self.ns.ip("addr", "add", f"{BRIDGE_IP}/{BRIDGE_NET.prefixlen}", "dev", "br0")
        self.ns.ip("link", "set", "br0", "up")
        self.moto = motolib.MotoServer(self.ns, port=MOTO_PORT, host=BRIDGE_IP, log_path=str(log_dir / "moto.log"))

    @property
    def moto_endpoint(self) -> str:
        return self.moto.endpoint

    def client(self) -> Any:
        """A boto3 EC2 client straight to moto (not throttled); only on threads in `ns`."""
        return motolib.client(self.moto.endpoint)

    def close(self) -> None:
        self.moto.stop()
        self.ns.close()


@dataclasses.dataclass
class World:
    vpc_id: str
    subnet_id: str
    nodes: list[str]
    enis: list[Eni]


def build_world(emu: Emulator, enis: int, enis_per_node: int = 3) -> World:
    """A VPC, a /20 subnet, ceil(enis / enis_per_node) instances (nodes), each with up to
    `enis_per_node` extra ENIs tagged no_manage (the Multus ENIs)."""

    def make() -> World:
        ec2 = emu.client()
        vpc = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]
        subnet = ec2.create_subnet(VpcId=vpc["VpcId"], CidrBlock=SUBNET_CIDR)["Subnet"]
        nodes: list[str] = []
        out: list[Eni] = []
        n_nodes = -(-enis // enis_per_node)
        for n in range(n_nodes):
            inst = ec2.run_instances(
                ImageId=motolib.AMI,
                MinCount=1,
                MaxCount=1,
                InstanceType="c5.4xlarge",
                SubnetId=subnet["SubnetId"],
                PrivateIpAddress=f"10.90.1.{n + 10}",
            )["Instances"][0]
            nodes.append(inst["InstanceId"])
            for d in range(min(enis_per_node, enis - len(out))):
                e = motolib.create_multus_eni(
                    ec2, subnet["SubnetId"], inst["InstanceId"], d + 1, f"10.90.2.{len(out) + 10}"
                )
                out.append(Eni(e["NetworkInterfaceId"], e["MacAddress"], inst["InstanceId"]))
        return World(vpc["VpcId"], subnet["SubnetId"], nodes, out)

    return emu.ns.call(make)


def plan_pods(run_id: str, world: World, count: int) -> list[Pod]:
    """Pod i sits on ENI i mod len(enis); even pods get two addresses, odd pods one."""
    pods = []
    next_ip = POD_POOL_START
    for i in range(count):
        n = 2 if i % 2 == 0 else 1
        addrs = [str(next_ip + k) for k in range(n)]
        next_ip += n
        pods.append(Pod(i, f"mne-{run_id}-p{i}", world.enis[i % len(world.enis)], addrs))
    return pods


def fresh_addresses(pods: list[Pod], start_after: int) -> list[str]:
    """Addresses beyond every pod's own, for address changes."""
    base = POD_POOL_START + start_after
    return [str(base + i) for i in range(len(pods))]


def pod_eth0_ip(i: int) -> str:
    host = i + 2
    return str(BRIDGE_NET.network_address + host)


def create_pod(emu: Emulator, pod: Pod) -> None:
    """The pod's namespace: `net1` (veth, ENI MAC, the pod's addresses) and `eth0` on the
    emulator's bridge. Two `ip -batch` runs per pod."""
    pod.ns = NetNS(pod.ns_name)
    eth_peer = f"vp{pod.index}"
    lines = [
        "link add net1 type veth peer name net1p",
        f"link set net1 address {pod.eni.mac}",
        "link set net1p up",
        "link set net1 up",
        *[f"addr add {a}/20 dev net1" for a in pod.addresses],
        f"link add eth0 type veth peer name {eth_peer} netns {emu.ns.name}",
        f"addr add {pod_eth0_ip(pod.index)}/{BRIDGE_NET.prefixlen} dev eth0",
        "link set eth0 up",
    ]
    batch(pod.ns.name, lines)


def batch(ns_name: str, lines: list[str]) -> None:
    proc = subprocess.run(
        ["ip", "-n", ns_name, "-batch", "-"], input="\n".join(lines) + "\n", capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ip -n {ns_name} -batch failed: {proc.stderr.strip()}")


def attach_pods_to_bridge(emu: Emulator, pods: list[Pod]) -> None:
    batch(emu.ns.name, [f"link set vp{p.index} master br0 up" for p in pods])


def start_sidecar(binary: str, endpoint: str, pod: Pod, log_dir: Path, extra_args: list[str]) -> None:
    """The real sidecar in the pod's namespace, through the tests' wrapper
    (tests/lib/sidecar.py: `ip netns exec`, which execs it, so the pid is the sidecar's)."""
    pod.sidecar = Sidecar(
        pod.ns,
        ["net1"],
        endpoint,
        log_dir / f"sidecar-{pod.index}.log",
        args=extra_args,
        env={
            "POD_NAME": f"bench-{pod.index}",
            "POD_NAMESPACE": "bench",
            "NODE_NAME": pod.eni.node,
            "MULTUS_ENI_LOG_FORMAT": "json",
            "RUST_LOG": os.environ.get("RUST_LOG", "info"),
        },
        probe_port=PROBE_PORT,
        binary=Path(binary),
    ).start()
    pod.proc = pod.sidecar.proc
    pod.started = time.monotonic()


@dataclasses.dataclass
class ProcStats:
    rss_kib: int
    hwm_kib: int
    cpu_seconds: float
    anon_kib: int = 0  # RssAnon: the process's own memory
    file_kib: int = 0  # RssFile: mapped file pages (the binary), shared between processes


def proc_stats(pid: int) -> ProcStats | None:
    """RSS, its anonymous and file parts, peak RSS (VmHWM) from /proc/PID/status, CPU
    (utime+stime) from /proc/PID/stat."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = {}
    for line in status.splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    rest = stat.rsplit(")", 1)[1].split()
    # Fields after "(comm)": state is field 3, utime/stime are fields 14/15.
    utime, stime = int(rest[11]), int(rest[12])
    return ProcStats(
        rss_kib=int(fields.get("VmRSS", "0 kB").split()[0]),
        hwm_kib=int(fields.get("VmHWM", "0 kB").split()[0]),
        cpu_seconds=(utime + stime) / CLK_TCK,
        anon_kib=int(fields.get("RssAnon", "0 kB").split()[0]),
        file_kib=int(fields.get("RssFile", "0 kB").split()[0]),
    )


def moto_cpu_seconds(emu: Emulator) -> float | None:
    """CPU seconds moto (the EC2 emulator) used so far: its share of a phase says whether a
    figure is the agents' or the emulator's."""
    proc = emu.moto.proc
    s = proc_stats(proc.pid) if proc is not None else None
    return s.cpu_seconds if s else None


def eni_addresses(emu: Emulator, subnet_id: str) -> dict[str, set[str]]:
    """Every ENI of the subnet → its private IPv4 addresses, straight from moto."""

    def read() -> dict[str, set[str]]:
        ec2 = emu.client()
        out: dict[str, set[str]] = {}
        pages = ec2.get_paginator("describe_network_interfaces").paginate(
            Filters=[{"Name": "subnet-id", "Values": [subnet_id]}]
        )
        for page in pages:
            for n in page["NetworkInterfaces"]:
                out[n["NetworkInterfaceId"]] = {p["PrivateIpAddress"] for p in n.get("PrivateIpAddresses", [])}
        return out

    return emu.ns.call(read)


def unassign_all(emu: Emulator, state: dict[str, set[str]], addresses: set[str]) -> int:
    """Removes `addresses` from every ENI straight on moto (resets the world between runs)."""

    def do() -> int:
        ec2 = emu.client()
        n = 0
        for eni, held in state.items():
            ours = sorted(held & addresses)
            if ours:
                ec2.unassign_private_ip_addresses(NetworkInterfaceId=eni, PrivateIpAddresses=ours)
                n += len(ours)
        return n

    return emu.ns.call(do)


def stop_sidecar(pod: Pod) -> None:
    """SIGKILL a sidecar this benchmark started (its own session) and reap it."""
    if pod.sidecar is not None:
        pod.sidecar.kill()


def delete_namespace(name: str) -> None:
    """Kill what still runs in the namespace (only processes started here), then delete it."""
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "del", name], check=False)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def write_doc_section(marker: str, command: str, text: str) -> None:
    """Replaces the text between `<!-- MARKER:begin -->` and `<!-- MARKER:end -->` in
    docs/scale.md (appending the markers when missing) with `text` and the command."""
    doc = Path(__file__).resolve().parent.parent / "docs" / "scale.md"
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    body = doc.read_text() if doc.exists() else "# Scale and speed\n"
    if begin not in body:
        body += f"\n{begin}\n{end}\n"
    head, _, rest = body.partition(begin)
    _, _, tail = rest.partition(end)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    doc.write_text(f"{head}{begin}\nLast run {stamp}: `{command}`\n\n{text}\n{end}{tail}")
