"""End-to-end: the HTTP startup gate. The real node agent (`multus-eni-agent`, `--pods all`)
runs in the emulator's namespace and finds a pod's addresses itself, in the pod's network
namespace linked into its `--netns-dir`; the pod runs `multus-eni-sidecar-agent-mode
--agent-url=http://<node address>:9812` as the webhook injects it for namespaces where no
hostPath is allowed: no socket, no volume, no AWS setting. The pod reaches the agent's port on
the node's address through its eth0 (tests/lib/gate.py).

Convergence is awaited by bounded polling; nothing here measures time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

from lib.agent import Agent, AgentPod
from lib.gate import PodLink, Relay, connect_pod_to_node
from lib.moto import World, build_world
from lib.sidecar import Sidecar, aws_env, wait_for

ASSIGN4 = "AssignPrivateIpAddresses"
AGENT_PORT = 9812


class GateNode:
    """One test's node: the agent, pods with their eth0 to the node, gate sidecars."""

    def __init__(self, emulator, tmp_path: Path, agent_binary: Path, sidecar_binary: Path):
        self.emulator = emulator
        self.tmp_path = tmp_path
        self.agent_binary = agent_binary
        self.sidecar_binary = sidecar_binary
        self.world: World = build_world(emulator.ns, emulator.direct)
        self.agent = Agent(
            emulator.ns, emulator.endpoint, tmp_path / "agent", agent_binary, instance_id=self.world.instance_id
        )
        self.pods: list[AgentPod] = []
        self.relays: list[Relay] = []
        self.sidecars: list[Sidecar] = []

    def start_agent(self) -> Agent:
        self.agent.start()
        wait_for(lambda: self.agent.http("/readyz")[0] == 200, "agent /readyz 200")
        return self.agent

    def pod(self, name: str) -> tuple[AgentPod, Relay]:
        """A pod on this node with its eth0 to the node, and the agent's port on the node's
        address (a relay to the agent's loopback listener)."""
        p = AgentPod(self.agent, self.tmp_path, self.sidecar_binary, name)
        self.pods.append(p)
        link: PodLink = connect_pod_to_node(p.ns, self.emulator.ns)
        relay = Relay(self.emulator.ns, (link.host_ip, AGENT_PORT), ("127.0.0.1", self.agent.metrics_port)).start()
        self.relays.append(relay)
        return p, relay

    def gate(self, pod: AgentPod, relay: Relay, interfaces: list[str]) -> Sidecar:
        """The sidecar exactly as /mutate/gate injects it: the agent-mode binary with
        --agent-url and no AWS setting at all."""
        no_aws = {k: None for k in aws_env("")}
        s = Sidecar(
            pod.ns,
            interfaces,
            "",
            self.tmp_path / f"gate-{pod.name}.log",
            args=[f"--agent-url={relay.url}"],
            env={**no_aws, "POD_NAME": pod.name},
            binary=self.sidecar_binary,
        )
        self.sidecars.append(s)
        return s.start()

    def on_eni(self, eni_id: str, *addresses: str) -> bool:
        state = self.emulator.eni(eni_id)
        return all(state.holds(a) for a in addresses)

    def dump(self) -> None:
        if self.agent.starts:
            sys.stderr.write(f"--- agent\n{self.agent.log_text()[-8000:]}\n")
        for s in self.sidecars:
            sys.stderr.write(f"--- gate {s.log_path.name}\n{s.log_text()[-4000:]}\n")
        for r in self.relays:
            sys.stderr.write(f"--- relay {r.url}: {r.accepted} accepted, {r.refused} refused, {r.requests[-5:]}\n")
        sys.stderr.write(f"--- proxy: {self.emulator.proxy.counts()}\n")

    def cleanup(self) -> None:
        for s in self.sidecars:
            s.kill()
        for r in self.relays:
            r.stop()
        for p in self.pods:
            p.delete()
        self.agent.kill()


@pytest.fixture
def node(emulator, tmp_path: Path, agent_binary: Path, sidecar_agent_mode_binary: Path, request) -> Iterator[GateNode]:
    emulator.proxy.reset()
    n = GateNode(emulator, tmp_path, agent_binary, sidecar_agent_mode_binary)
    try:
        yield n
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            n.dump()
        n.cleanup()
        emulator.proxy.reset()


def test_the_gate_opens_when_the_agent_says_routable(node):
    w = node.world
    eni = w.enis[0]
    node.start_agent()
    pod, relay = node.pod("gate-ready")
    v4 = w.v4(70)
    # The agent's Assign waits at the endpoint: the gate must be closed meanwhile.
    node.emulator.proxy.hold(ASSIGN4)
    pod.link("net1", eni.mac, v4)
    s = node.gate(pod, relay, ["net1"])
    assert Path(s.argv[0]).name == "multus-eni-sidecar-agent-mode"
    assert "AWS_REGION" not in s.env and "AWS_ACCESS_KEY_ID" not in s.env

    wait_for(lambda: node.emulator.proxy.calls(ASSIGN4) >= 1, "the agent's Assign of the pod's address")
    wait_for(lambda: s.probe() == 503, "gate /readyz 503 while the address is not on its ENI")
    wait_for(lambda: any(f"address={v4}" in q for q in relay.queries()), "the gate's query for its address")
    assert s.probe() == 503
    node.emulator.proxy.release()

    wait_for(lambda: node.on_eni(eni.id, v4), "the pod's address on its ENI")
    wait_for(lambda: s.probe() == 200, "gate /readyz 200 once the agent says routable")
    # The gate only asked: every EC2 call is the agent's, the gate has no AWS settings.
    assert s.running()
    # Every request the gate sent (unfiltered: relay.queries() keeps only these already).
    assert relay.requests and all(r.startswith("GET /v1/addresses?") for r in relay.requests), relay.requests
    # After the first answer the gate long-polls with the agent's generation.
    wait_for(lambda: any("since=" in q and "wait=" in q for q in relay.queries()), "a long poll with since=")


def test_the_gate_stays_closed_while_the_agent_is_unreachable(node):
    w = node.world
    eni = w.enis[0]
    pod, relay = node.pod("gate-unreachable")
    v4 = w.v4(71)
    pod.link("net1", eni.mac, v4)
    s = node.gate(pod, relay, ["net1"])

    # No agent on the node: the relay accepts and closes, the gate asks again with backoff.
    wait_for(lambda: relay.refused >= 3, "three queries the agent could not answer")
    assert s.running()
    assert s.probe() == 503
    assert relay.requests == [], "nothing reached an agent"

    node.start_agent()
    wait_for(lambda: node.on_eni(eni.id, v4), "the pod's address on its ENI once the agent runs")
    wait_for(lambda: s.probe() == 200, "gate /readyz 200 once the agent answers routable")

    # The agent goes away again: not ready until it is back.
    node.agent.kill()
    refused = relay.refused
    wait_for(lambda: s.probe() == 503, "gate /readyz 503 with the agent gone")
    wait_for(lambda: relay.refused >= refused + 2, "two more unanswered queries")
    assert s.probe() == 503
    node.start_agent()
    wait_for(lambda: s.probe() == 200, "gate /readyz 200 with the agent back")


def test_a_new_address_closes_the_gate_until_it_is_routable(node):
    w = node.world
    eni = w.enis[0]
    node.start_agent()
    pod, relay = node.pod("gate-change")
    first, second = w.v4(72), w.v4(73)
    pod.link("net1", eni.mac, first)
    s = node.gate(pod, relay, ["net1"])
    wait_for(lambda: s.probe() == 200, "gate /readyz 200 for the first address")

    node.emulator.proxy.hold(ASSIGN4)
    pod.add("net1", second)
    # The change starts a new query at once, naming both addresses, without waiting out the
    # long poll under way.
    wait_for(
        lambda: any(f"address={first}" in q and f"address={second}" in q for q in relay.queries()),
        "a query naming both addresses",
    )
    wait_for(lambda: node.emulator.proxy.calls(ASSIGN4) >= 2, "the agent's Assign of the new address")
    assert s.probe() == 503, "the gate opened before the new address was on its ENI"
    node.emulator.proxy.release()
    wait_for(lambda: node.on_eni(eni.id, first, second), "both addresses on the ENI")
    wait_for(lambda: s.probe() == 200, "gate /readyz 200 for both addresses")
