"""The moto EC2 emulator run inside a test network namespace, and a small EC2 world on it.

Known moto 5.2.x gaps (never designed around in the product): assigning an address held by
another ENI copies it instead of moving it (or refusing it); addresses are not validated; filter
`ipv6-addresses.ipv6-address` answers HTTP 500; `addresses.private-ip-address` matches only
primaries; DescribeNetworkInterfaces has no pages; there are no prefixes; the first call takes
~1.5 s. The fault proxy (tests/lib/fault_proxy.py) answers as EC2 for each of these but
validation and speed; tests/test_fault_proxy.py checks it. Writes made with `client()` straight
to moto are reported to the proxy (`watch_direct_writes`), whose index of who holds what they
change. `attachment.instance-id` moto answers as
EC2 (the ENIs attached to that instance, none after a detach).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from .netns import NetNS

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
AMI = "ami-12c6146b"


def moto_server_path() -> str:
    """`moto_server` next to the running Python (the repo's .venv)."""
    return str(Path(sys.executable).parent / "moto_server")


class MotoServer:
    """`moto_server` on `host:port` inside `ns`; `stop()` kills its process group."""

    def __init__(self, ns: NetNS, port: int = 5000, host: str = "127.0.0.1", log_path: str | None = None):
        self.ns, self.port, self.host = ns, port, host
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60) -> "MotoServer":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.ns.exec_argv([moto_server_path(), "-H", self.host, "-p", str(self.port)]),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                self.ns.call(_http_get, f"{self.endpoint}/moto-api/data.json")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        # The first EC2 call is slow (~1.5 s): pay it here, not inside a test's wait.
        self.ns.call(lambda: client(self.endpoint).describe_regions())
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()


def _http_get(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status


def client(endpoint: str) -> Any:
    """A boto3 EC2 client; use it only on a thread inside the emulator's namespace. Its writes
    are reported to `watch_direct_writes` watchers of the endpoint's port."""
    import boto3

    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint, **CREDENTIALS)
    port = urllib.parse.urlsplit(endpoint).port
    ec2.meta.events.register("after-call.ec2", functools.partial(_report_write, port))
    return ec2


# Watchers of writes made straight to a moto server (by port), not through the fault proxy: the
# proxy keeps an index of who holds which address and must read moto again after them.
_watchers: dict[int | None, list[Callable[[], None]]] = {}
_watchers_lock = threading.Lock()


def watch_direct_writes(port: int, callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` (on the writer's thread) after every write a `client()` sends to a server
    on `port`; returns the function that stops watching. Keyed by port only: a server of another
    namespace on the same port costs a watcher a spurious re-read, never a missed write."""
    with _watchers_lock:
        _watchers.setdefault(port, []).append(callback)

    def stop() -> None:
        with _watchers_lock:
            _watchers.get(port, []).remove(callback)

    return stop


def _report_write(port: int | None, model: Any = None, **_: Any) -> None:
    if model is None or model.name.startswith(("Describe", "Get")):
        return
    with _watchers_lock:
        callbacks = list(_watchers.get(port, ()))
    for callback in callbacks:
        callback()


@dataclasses.dataclass
class Eni:
    id: str
    mac: str
    primary_ip: str


@dataclasses.dataclass
class World:
    """A VPC with a dual-stack subnet, an instance (its primary ENI is eth0's) and extra
    ENIs attached to it, two or more in the same subnet."""

    endpoint: str
    vpc_id: str
    subnet_id: str
    subnet_cidr: str
    ipv6_prefix: str  # "2400:...:3900::" of the subnet's /64
    instance_id: str
    eth0: Eni
    enis: list[Eni]

    def v4(self, host: int) -> str:
        """Address `host` in the subnet (e.g. 50 → 10.x.y.50)."""
        return self.subnet_cidr.rsplit(".", 1)[0] + f".{host}"

    def v6(self, host: int) -> str:
        """Address `host` in the subnet's /64, in canonical form (moto's prefixes may carry
        leading zeros, `0a0b`, which EC2 and the sidecar print as `a0b`)."""
        return str(ipaddress.IPv6Address(f"{self.ipv6_prefix}{host:x}"))


_world_counter = [0]


def build_world(ns: NetNS, endpoint: str, extra_enis: int = 2) -> World:
    """Creates the world in the emulator (each call gets its own VPC)."""
    _world_counter[0] += 1
    n = _world_counter[0] % 250

    def make() -> World:
        ec2 = client(endpoint)
        vpc = ec2.create_vpc(CidrBlock=f"10.{n}.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]
        v6_block = vpc["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"]  # .../56
        v6_64 = v6_block.replace("/56", "/64")
        subnet = ec2.create_subnet(VpcId=vpc["VpcId"], CidrBlock=f"10.{n}.1.0/24", Ipv6CidrBlock=v6_64)["Subnet"]
        # Primary IPs fixed low in the subnet (.5, .6, ...): tests use .10 and up, and a
        # random primary equal to a test address would make a change a silent no-op.
        inst = ec2.run_instances(
            ImageId=AMI, MinCount=1, MaxCount=1, SubnetId=subnet["SubnetId"], PrivateIpAddress=f"10.{n}.1.5"
        )["Instances"][0]
        primary = inst["NetworkInterfaces"][0]
        eth0 = Eni(primary["NetworkInterfaceId"], primary["MacAddress"], primary["PrivateIpAddress"])
        enis = []
        for i in range(extra_enis):
            e = create_multus_eni(ec2, subnet["SubnetId"], inst["InstanceId"], i + 1, f"10.{n}.1.{6 + i}")
            enis.append(Eni(e["NetworkInterfaceId"], e["MacAddress"], e["PrivateIpAddress"]))
        return World(
            endpoint=endpoint,
            vpc_id=vpc["VpcId"],
            subnet_id=subnet["SubnetId"],
            subnet_cidr=subnet["CidrBlock"],
            ipv6_prefix=v6_64.split("/")[0],
            instance_id=inst["InstanceId"],
            eth0=eth0,
            enis=enis,
        )

    return ns.call(make)


def create_multus_eni(ec2: Any, subnet_id: str, instance_id: str, device_index: int, private_ip: str) -> dict[str, Any]:
    """An ENI as a Multus node has it: created in `subnet_id`, attached to the instance at
    `device_index` and tagged `node.k8s.amazonaws.com/no_manage=true`. Call it on a thread inside
    the emulator's namespace; returns EC2's NetworkInterface."""
    e = ec2.create_network_interface(SubnetId=subnet_id, PrivateIpAddress=private_ip)["NetworkInterface"]
    ec2.attach_network_interface(NetworkInterfaceId=e["NetworkInterfaceId"], InstanceId=instance_id, DeviceIndex=device_index)
    ec2.create_tags(
        Resources=[e["NetworkInterfaceId"]],
        Tags=[{"Key": "node.k8s.amazonaws.com/no_manage", "Value": "true"}],
    )
    return e


@dataclasses.dataclass
class Subnet:
    """Another dual-stack subnet of a world's VPC."""

    id: str
    cidr: str
    ipv6_prefix: str

    def v4(self, host: int) -> str:
        return self.cidr.rsplit(".", 1)[0] + f".{host}"

    def v6(self, host: int) -> str:
        return str(ipaddress.IPv6Address(f"{self.ipv6_prefix}{host:x}"))


def add_subnet(ns: NetNS, world: World, index: int = 1) -> Subnet:
    """Subnet `index` of `world`'s VPC besides its first: `10.n.<1 + index>.0/24` and the
    `index`-th /64 after the world's."""
    first = ipaddress.IPv6Network(world.ipv6_prefix + "/64")
    v6 = ipaddress.IPv6Network((int(first.network_address) + (index << 64), 64))
    cidr = world.subnet_cidr.rsplit(".", 2)[0] + f".{1 + index}.0/24"

    def make() -> Subnet:
        ec2 = client(world.endpoint)
        sub = ec2.create_subnet(VpcId=world.vpc_id, CidrBlock=cidr, Ipv6CidrBlock=str(v6))["Subnet"]
        return Subnet(sub["SubnetId"], sub["CidrBlock"], str(v6.network_address))

    return ns.call(make)


def attach_multus_eni(ns: NetNS, endpoint: str, subnet_id: str, instance_id: str, device_index: int, private_ip: str) -> Eni:
    """`create_multus_eni` from the test's thread: another Multus ENI attached to an instance."""

    def make() -> Eni:
        e = create_multus_eni(client(endpoint), subnet_id, instance_id, device_index, private_ip)
        return Eni(e["NetworkInterfaceId"], e["MacAddress"], e["PrivateIpAddress"])

    return ns.call(make)


@dataclasses.dataclass(frozen=True)
class EniState:
    ipv4: frozenset[str]
    ipv6: frozenset[str]
    tags: dict[str, str] = dataclasses.field(hash=False, compare=False, default_factory=dict)

    def holds(self, address: str) -> bool:
        canonical = str(ipaddress.ip_address(address))
        return canonical in (self.ipv6 if ":" in address else self.ipv4)


def eni_state(ns: NetNS, endpoint: str, eni_id: str) -> EniState:
    def read() -> EniState:
        n = client(endpoint).describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
        return EniState(
            ipv4=frozenset(p["PrivateIpAddress"] for p in n.get("PrivateIpAddresses", [])),
            ipv6=frozenset(str(ipaddress.IPv6Address(a["Ipv6Address"])) for a in n.get("Ipv6Addresses", [])),
            tags={t["Key"]: t["Value"] for t in n.get("TagSet", [])},
        )

    return ns.call(read)


def assign(ns: NetNS, endpoint: str, eni_id: str, address: str) -> None:
    """Put `address` on an ENI directly (as another node or pod would)."""

    def do() -> None:
        ec2 = client(endpoint)
        if ":" in address:
            ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Addresses=[address])
        else:
            ec2.assign_private_ip_addresses(
                NetworkInterfaceId=eni_id, PrivateIpAddresses=[address], AllowReassignment=True
            )

    ns.call(do)


def unassign(ns: NetNS, endpoint: str, eni_id: str, address: str) -> None:
    def do() -> None:
        ec2 = client(endpoint)
        if ":" in address:
            ec2.unassign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Addresses=[address])
        else:
            ec2.unassign_private_ip_addresses(NetworkInterfaceId=eni_id, PrivateIpAddresses=[address])

    ns.call(do)


@dataclasses.dataclass
class NodeEnis:
    """One simulated node's instance in EC2: its own instance in the world's subnet, a Multus
    ENI (tagged `no_manage`) and a VPC CNI ENI (untagged) holding a VPC CNI pod's addresses as
    secondaries, as a node of a Multus node group has them."""

    instance_id: str
    eth0: Eni
    multus: Eni
    vpc_cni: Eni
    vpc_cni_v4: str  # a VPC CNI pod's IPv4, a secondary of `vpc_cni`
    vpc_cni_v6: str  # a VPC CNI pod's IPv6, on `vpc_cni`


def add_node(ns: NetNS, world: World, index: int) -> NodeEnis:
    """A node instance in `world`'s subnet. Its addresses are fixed from .160 + 8 * index (tests
    use .10 to .159), so that a random one never equals a test's address."""
    base = 160 + 8 * index
    if base + 7 > 254:
        raise ValueError(f"node index {index} out of the subnet's fixed range")

    def make() -> NodeEnis:
        ec2 = client(world.endpoint)
        inst = ec2.run_instances(
            ImageId=AMI, MinCount=1, MaxCount=1, SubnetId=world.subnet_id, PrivateIpAddress=world.v4(base)
        )["Instances"][0]
        primary = inst["NetworkInterfaces"][0]
        eth0 = Eni(primary["NetworkInterfaceId"], primary["MacAddress"], primary["PrivateIpAddress"])
        m = create_multus_eni(ec2, world.subnet_id, inst["InstanceId"], 1, world.v4(base + 1))
        v = ec2.create_network_interface(SubnetId=world.subnet_id, PrivateIpAddress=world.v4(base + 2))["NetworkInterface"]
        ec2.attach_network_interface(NetworkInterfaceId=v["NetworkInterfaceId"], InstanceId=inst["InstanceId"], DeviceIndex=2)
        v4, v6 = world.v4(base + 3), world.v6(0x1000 + base)
        ec2.assign_private_ip_addresses(NetworkInterfaceId=v["NetworkInterfaceId"], PrivateIpAddresses=[v4])
        ec2.assign_ipv6_addresses(NetworkInterfaceId=v["NetworkInterfaceId"], Ipv6Addresses=[v6])
        return NodeEnis(
            instance_id=inst["InstanceId"],
            eth0=eth0,
            multus=Eni(m["NetworkInterfaceId"], m["MacAddress"], m["PrivateIpAddress"]),
            vpc_cni=Eni(v["NetworkInterfaceId"], v["MacAddress"], v["PrivateIpAddress"]),
            vpc_cni_v4=v4,
            vpc_cni_v6=v6,
        )

    return ns.call(make)
