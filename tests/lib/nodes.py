"""Two (or more) simulated nodes in one EC2 emulator, for the agent's end-to-end tests: each an
instance of its own with a Multus ENI (`no_manage`) and a VPC CNI ENI, its own agent
(`--instance-id`, `--netns-dir`, state directory) and pods (network namespaces linked into its
`--netns-dir`). `Cluster` is one test's world; the `cluster` fixture makes and cleans it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

from . import moto
from .agent import SimNode
from .fault_proxy import Request
from .netns import NetNS
from .sidecar import wait_for

ASSIGN4 = "AssignPrivateIpAddresses"
UNASSIGN4 = "UnassignPrivateIpAddresses"
ASSIGN6 = "AssignIpv6Addresses"
UNASSIGN6 = "UnassignIpv6Addresses"
DESCRIBE = "DescribeNetworkInterfaces"
ASSIGNS = (ASSIGN4, ASSIGN6)
UNASSIGNS = (UNASSIGN4, UNASSIGN6)
# Short intervals: the tests wait for the agent's own cycles, these keep the waits short.
FAST = ["--resync-interval=2s", "--batch-interval=500ms", "--reclaim-after=4s"]


def named(r: Request) -> set[str]:
    return set(r.values("PrivateIpAddress")) | set(r.values("Ipv6Addresses"))


class Cluster:
    """One test's world: a VPC and subnet in the emulator, nodes on it, cleaned up afterwards."""

    def __init__(self, emulator, tmp_path: Path, agent_binary: Path, sidecar_binary: Path):
        self.emulator = emulator
        self.proxy = emulator.proxy
        self.tmp_path = tmp_path
        self.agent_binary = agent_binary
        self.sidecar_binary = sidecar_binary
        self.world = moto.build_world(emulator.ns, emulator.direct, extra_enis=0)
        self.nodes: list[SimNode] = []
        self.strangers: list[NetNS] = []

    def node(self, *args: str, start: bool = True) -> SimNode:
        name = "ab"[len(self.nodes)] if len(self.nodes) < 2 else str(len(self.nodes))
        enis = moto.add_node(self.emulator.ns, self.world, len(self.nodes))
        n = SimNode(name, enis, self.emulator.ns, self.emulator.endpoint, self.tmp_path, self.agent_binary,
                    self.sidecar_binary, list(args or FAST))
        self.nodes.append(n)
        if start:
            self.start(n)
        return n

    def start(self, n: SimNode) -> None:
        n.agent.start()
        wait_for(lambda: n.agent.http("/readyz")[0] == 200, f"agent {n.name} /readyz 200")

    def stranger(self) -> NetNS:
        """A network namespace that is no pod of any node (not under a --netns-dir)."""
        ns = NetNS()
        self.strangers.append(ns)
        return ns

    def eni(self, eni_id: str) -> moto.EniState:
        return self.emulator.eni(eni_id)

    def holds(self, eni: moto.Eni, *addresses: str) -> bool:
        state = self.eni(eni.id)
        return all(state.holds(a) for a in addresses)

    def lacks(self, eni: moto.Eni, *addresses: str) -> bool:
        state = self.eni(eni.id)
        return not any(state.holds(a) for a in addresses)

    def calls(self, actions: tuple[str, ...], address: str | None = None, eni: moto.Eni | None = None) -> list[Request]:
        return [
            r
            for r in self.proxy.requests()
            if r.action in actions
            and (address is None or address in named(r))
            and (eni is None or r.param("NetworkInterfaceId") == eni.id)
        ]

    def describes_of(self, n: SimNode) -> int:
        """DescribeNetworkInterfaces calls that read `n`'s ENIs (by instance id, or by MAC)."""
        marks = {n.enis.instance_id, n.enis.multus.mac}
        return sum(1 for r in self.proxy.requests(DESCRIBE) if any(v[0] in marks for v in r.params.values()))

    def resyncs(self, n: SimNode, count: int = 3) -> None:
        """Wait until `n`'s agent has read its ENIs `count` more times."""
        seen = self.describes_of(n)
        wait_for(lambda: self.describes_of(n) >= seen + count, f"{count} resyncs of node {n.name}")

    def dump(self) -> None:
        for n in self.nodes:
            sys.stderr.write(f"--- agent {n.name} ({n.enis.instance_id})\n{n.agent.log_text()[-8000:]}\n")
            sys.stderr.write(f"--- status {n.name}: {n.agent.status()}\n")
            for p in n.pods:
                if p.sidecar is not None:
                    sys.stderr.write(f"--- sidecar {p.name}\n{p.sidecar.log_text()[-3000:]}\n")
            for e in (n.enis.multus, n.enis.vpc_cni):
                sys.stderr.write(f"--- {e.id} ({e.mac}): {self.eni(e.id)}\n")
        sys.stderr.write(f"--- proxy: {self.proxy.counts()}\n")
        for r in self.proxy.requests():
            if r.action in ASSIGNS + UNASSIGNS:
                sys.stderr.write(f"    {r.action} {r.param('NetworkInterfaceId')} {sorted(named(r))} {r.error or r.status}\n")

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()
        for ns in self.strangers:
            ns.close()


@pytest.fixture
def cluster(emulator, tmp_path: Path, agent_binary: Path, sidecar_agent_mode_binary: Path, request) -> Iterator[Cluster]:
    emulator.proxy.reset()
    c = Cluster(emulator, tmp_path, agent_binary, sidecar_agent_mode_binary)
    try:
        yield c
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            c.dump()
        c.cleanup()
        emulator.proxy.reset()


def metric_sum(agent, name: str, exclude: str | None = None) -> float:
    """The sum of every sample of `name` (all labels), but those whose labels contain `exclude`."""
    _, text = agent.http("/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if exclude is None or exclude not in line:
                total += float(line.split()[-1])
    return total
