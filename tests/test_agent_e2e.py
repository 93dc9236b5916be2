"""End-to-end: node agents (`multus-eni-agent`) and sidecars in agent mode as real processes.
Each agent runs in the emulator's namespace and reaches EC2 through the fault proxy; each pod
is a network namespace of its own, linked into its agent's `--netns-dir`, with veth links
carrying the ENIs' MACs (what an ipvlan child looks like). The sidecar is
`multus-eni-sidecar-agent-mode`, what the webhook injects in agent mode; one test runs the full
`multus-eni-sidecar` in agent mode too.

Convergence is awaited by bounded polling; nothing here measures time.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Iterator

import pytest

from lib.agent import Agent, AgentPod, claim, supports_flag
from lib.moto import World, add_node, assign, build_world
from lib.sidecar import wait_for

ASSIGN4 = "AssignPrivateIpAddresses"
UNASSIGN4 = "UnassignPrivateIpAddresses"
ASSIGN6 = "AssignIpv6Addresses"
UNASSIGN6 = "UnassignIpv6Addresses"
DESCRIBE = "DescribeNetworkInterfaces"
MUTATING = {ASSIGN4, UNASSIGN4, ASSIGN6, UNASSIGN6}


class Node:
    """One test's node: a world in the emulator, agents and pods; cleaned up afterwards."""

    def __init__(self, emulator, tmp_path: Path, agent_binary: Path, sidecar_binary: Path):
        self.emulator = emulator
        self.tmp_path = tmp_path
        self.agent_binary = agent_binary
        self.sidecar_binary = sidecar_binary
        self.agents: list[Agent] = []
        self.pods: list[AgentPod] = []
        self.world: World = build_world(emulator.ns, emulator.direct)

    def agent(self, *args: str, name: str = "a") -> Agent:
        a = Agent(
            self.emulator.ns,
            self.emulator.endpoint,
            self.tmp_path / f"agent-{name}",
            self.agent_binary,
            list(args),
            instance_id=self.world.instance_id,
        )
        self.agents.append(a)
        a.start()
        wait_for(lambda: a.http("/readyz")[0] == 200, "agent /readyz 200")
        return a

    def pod(self, agent: Agent, name: str | None = None, sidecar_binary: Path | None = None) -> AgentPod:
        binary = sidecar_binary or self.sidecar_binary
        p = AgentPod(agent, self.tmp_path, binary, name or f"pod-{len(self.pods)}")
        self.pods.append(p)
        return p

    def eni(self, eni_id: str):
        return self.emulator.eni(eni_id)

    def on_eni(self, eni_id: str, *addresses: str) -> bool:
        state = self.eni(eni_id)
        return all(state.holds(a) for a in addresses)

    def off_eni(self, eni_id: str, *addresses: str) -> bool:
        state = self.eni(eni_id)
        return not any(state.holds(a) for a in addresses)

    def calls_on(self, eni_id: str, *actions: str) -> list:
        wanted = set(actions) or MUTATING
        return [r for r in self.emulator.proxy.requests() if r.action in wanted and r.param("NetworkInterfaceId") == eni_id]

    def dump(self) -> None:
        for a in self.agents:
            sys.stderr.write(f"--- agent {a.workdir}\n{a.log_text()[-8000:]}\n")
        for p in self.pods:
            if p.sidecar is not None:
                sys.stderr.write(f"--- sidecar {p.name}\n{p.sidecar.log_text()[-3000:]}\n")
        for e in [self.world.eth0, *self.world.enis]:
            sys.stderr.write(f"--- {e.id} ({e.mac}): {self.eni(e.id)}\n")
        sys.stderr.write(f"--- proxy: {self.emulator.proxy.counts()}\n")

    def cleanup(self) -> None:
        for p in self.pods:
            p.delete()
        for a in self.agents:
            a.kill()


@pytest.fixture
def node(emulator, tmp_path: Path, agent_binary: Path, sidecar_agent_mode_binary: Path, request) -> Iterator[Node]:
    emulator.proxy.reset()
    n = Node(emulator, tmp_path, agent_binary, sidecar_agent_mode_binary)
    try:
        yield n
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            n.dump()
        n.cleanup()
        emulator.proxy.reset()


def released(agent: Agent) -> float:
    """Every release the agent counted, whatever its cause."""
    _, text = agent.http("/metrics")
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("multus_eni_agent_releases_total"))


def environ(pid: int) -> dict[str, str]:
    """The environment a process runs with (/proc/<pid>/environ)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_claim_is_assigned_pod_becomes_ready_and_sigterm_releases(node):
    w = node.world
    eni = w.enis[0]
    agent = node.agent()
    p = node.pod(agent)
    v4, v6 = w.v4(50), w.v6(0x50)
    p.link("net1", eni.mac, v4, v6)
    s = p.start_sidecar(["net1"])
    assert Path(s.argv[0]).name == "multus-eni-sidecar-agent-mode"

    wait_for(lambda: node.on_eni(eni.id, v4, v6), "the pod's addresses on its ENI")
    wait_for(lambda: s.probe() == 200, "sidecar /readyz 200")
    assert node.calls_on(eni.id, ASSIGN4)[0].values("PrivateIpAddress") == [v4]
    assert not node.calls_on(w.eth0.id)
    # The sidecar process runs without any AWS setting: every EC2 call is the agent's.
    assert s.proc is not None
    assert not [k for k in environ(s.proc.pid) if k.startswith("AWS_")], environ(s.proc.pid)
    assert node.emulator.proxy.calls(DESCRIBE) >= 1

    # The pod is deleted: its sidecar stops, then its namespace goes.
    assert s.terminate() == 0
    p.delete()
    wait_for(lambda: node.off_eni(eni.id, v4, v6), "released addresses off the ENI")
    assert node.eni(eni.id).holds(eni.primary_ip)
    assert released(agent) == 2
    assert agent.metric("multus_eni_agent_reclaims_total") == 0


def test_the_full_sidecar_binary_runs_agent_mode_too(node, sidecar_binary: Path):
    """Pods run multus-eni-sidecar-agent-mode in agent mode, but the image's entrypoint (the full
    binary) must still speak to the agent: pods injected before the agent-mode binary existed
    run it with --agent-socket."""
    w = node.world
    eni = w.enis[0]
    agent = node.agent()
    p = node.pod(agent, sidecar_binary=sidecar_binary)
    v4 = w.v4(51)
    p.link("net1", eni.mac, v4)
    s = p.start_sidecar(["net1"])
    assert Path(s.argv[0]).name == "multus-eni-sidecar"

    wait_for(lambda: node.on_eni(eni.id, v4), "the pod's address on its ENI")
    wait_for(lambda: s.probe() == 200, "sidecar /readyz 200")
    assert node.calls_on(eni.id, ASSIGN4)[0].values("PrivateIpAddress") == [v4]
    assert s.terminate() == 0
    p.delete()
    wait_for(lambda: node.off_eni(eni.id, v4), "released address off the ENI")
    assert released(agent) == 1


def test_pods_started_together_share_a_few_assign_calls_and_release_in_a_few_unassign_calls(node):
    w = node.world
    eni = w.enis[0]
    # Group commit alone: the pace has a test of its own (below).
    agent = node.agent("--batch-interval=0s")
    proxy = node.emulator.proxy
    pods, addresses = [], []
    proxy.hold(ASSIGN4)
    for i in range(8):
        p = node.pod(agent)
        a = w.v4(60 + i)
        p.link("net1", eni.mac, a)
        p.start_sidecar(["net1"])
        pods.append(p)
        addresses.append(a)
    # The first Assign is held at the proxy; everything claimed meanwhile queues behind it.
    wait_for(lambda: proxy.calls(ASSIGN4) >= 1, "the first Assign sent")
    wait_for(lambda: agent.metric("multus_eni_agent_pending_addresses") + len(proxy.requests(ASSIGN4)[0].values("PrivateIpAddress")) == 8,
             "every claim queued behind the first call")
    proxy.release()
    wait_for(lambda: node.on_eni(eni.id, *addresses), "every pod's address on the ENI")
    wait_for(lambda: all(p.sidecar.probe() == 200 for p in pods), "every sidecar ready")
    assert len(node.calls_on(eni.id, ASSIGN4)) == 2

    proxy.hold(UNASSIGN4)
    for p in pods:
        p.sidecar.proc.send_signal(signal.SIGTERM)
    for p in pods:
        assert p.sidecar.proc.wait(30) == 0, "the release is answered at once, even with Unassign stuck"
        p.delete()
    wait_for(lambda: proxy.calls(UNASSIGN4) >= 1, "the first Unassign sent")
    wait_for(lambda: released(agent) == 8, "every release recorded")
    proxy.release()
    wait_for(lambda: node.off_eni(eni.id, *addresses), "every address off the ENI")
    assert len(node.calls_on(eni.id, UNASSIGN4)) == 2


def test_claims_within_the_batch_interval_wait_for_it_and_share_one_call(node):
    """The pace (`--batch-interval`, 5 s by default): the first claim after a quiet period goes
    at once; claims that follow within the interval wait for it and go out together. A long
    interval (20 s) makes the grouping independent of the host's speed."""
    w = node.world
    eni = w.enis[0]
    agent = node.agent("--batch-interval=20s")
    first = node.pod(agent)
    first.link("net1", eni.mac, w.v4(90))
    first.start_sidecar(["net1"])
    wait_for(lambda: node.on_eni(eni.id, w.v4(90)), "the first pod's address on the ENI")
    later = [w.v4(91 + i) for i in range(3)]
    for a in later:
        p = node.pod(agent)
        p.link("net1", eni.mac, a)
        p.start_sidecar(["net1"])
    wait_for(lambda: node.on_eni(eni.id, *later), "the later pods' addresses on the ENI")
    calls = node.calls_on(eni.id, ASSIGN4)
    assert [sorted(c.values("PrivateIpAddress")) for c in calls] == [[w.v4(90)], sorted(later)]


def test_an_ipv6_address_is_taken_from_another_multus_eni_first_and_never_from_the_vpc_cnis(node):
    """IPv6 has no reassignment: refused by EC2 at the first try, the agent unassigns the address
    from the Multus ENI holding it, then assigns it; an ENI without `no_manage` keeps its address
    and the claim says why."""
    w = node.world
    ours, other = w.enis[0], w.enis[1]
    moved, kept = w.v6(0x90), w.v6(0x91)
    assign(node.emulator.ns, node.emulator.direct, other.id, moved)
    assign(node.emulator.ns, node.emulator.direct, w.eth0.id, kept)
    agent = node.agent()
    p = node.pod(agent)
    p.link("net1", ours.mac, moved, kept)
    s = p.start_sidecar(["net1"])
    wait_for(lambda: node.on_eni(ours.id, moved), "the moved IPv6 on our ENI")
    assert node.off_eni(other.id, moved)
    proxy = node.emulator.proxy
    (unassign_call,) = proxy.requests(UNASSIGN6)
    assert unassign_call.param("NetworkInterfaceId") == other.id
    assert unassign_call.values("Ipv6Addresses") == [moved]
    # The first assign takes nothing (EC2 refuses an address another ENI holds); the one that
    # succeeds comes after the unassign there.
    assign_calls = proxy.requests(ASSIGN6)
    succeeded = [c for c in assign_calls if c.status == 200]
    assert [c.values("Ipv6Addresses") for c in succeeded] == [[moved]]
    assert unassign_call.arrived < succeeded[0].arrived
    assert all(c.status != 200 for c in assign_calls if c.arrived < unassign_call.arrived)
    assert len(assign_calls) <= 2, [c.values("Ipv6Addresses") for c in assign_calls]
    wait_for(lambda: agent.metric("multus_eni_agent_refusals_total", 'reason="held_by_not_no_manage"') == 1, "the refusal counted")
    assert node.on_eni(w.eth0.id, kept) and node.off_eni(ours.id, kept)
    assert not node.calls_on(w.eth0.id)
    assert s.probe() == 503, "the pod waits: one of its addresses is not routable"


def test_a_connected_claim_is_checked_again_at_resync(node):
    """A sidecar that stays connected but stops reporting (here: stopped) does not keep an
    address its namespace dropped: the resync's netns scan shrinks the claim."""
    w = node.world
    eni = w.enis[0]
    agent = node.agent("--resync-interval=1s", "--batch-interval=0s")
    p = node.pod(agent)
    kept, dropped = w.v4(100), w.v4(101)
    p.link("net1", eni.mac, kept, dropped)
    s = p.start_sidecar(["net1"])
    wait_for(lambda: node.on_eni(eni.id, kept, dropped), "both addresses on the ENI")
    s.proc.send_signal(signal.SIGSTOP)
    try:
        p.remove("net1", dropped)
        wait_for(lambda: node.off_eni(eni.id, dropped), "the dropped address released at a resync")
        assert node.on_eni(eni.id, kept)
        assert agent.metric("multus_eni_agent_releases_total", 'cause="gone"') == 1
    finally:
        s.proc.send_signal(signal.SIGCONT)


def test_a_claim_for_an_address_the_caller_does_not_hold_is_refused(node):
    """The claim comes from a process inside the intruder's pod namespace (the agent reads the
    caller's namespace from the peer's pid), for an address a second pod of the node holds; the
    intruder's claim of its own address is served (positive control). `--pods sidecar`: the
    second pod has no sidecar, so nothing else wants its address on the ENI."""
    w = node.world
    eni = w.enis[0]
    agent = node.agent(*(["--pods=sidecar"] if supports_flag(node.agent_binary, "--pods") else []))
    intruder, victim = node.pod(agent, "intruder"), node.pod(agent, "victim")
    intruder.link("net1", eni.mac, w.v4(70))
    victim.link("net1", eni.mac, w.v4(71))
    report = claim(intruder.ns, agent.socket, [{"name": "net1", "mac": eni.mac, "addresses": [w.v4(71)]}])
    answer = report["answers"][-1]
    assert answer["type"] == "status" and answer["routable"] is False, report
    assert [a["state"] for a in answer["addresses"]] == ["refused"]
    assert agent.metric("multus_eni_agent_refusals_total", 'reason="not_held"') == 1
    # No call ever names the address the intruder does not hold. (Its own .70 may already be
    # on its way: with its sidecar connected, the intruder's pod is one the agent manages.)
    assert not [c for c in node.calls_on(eni.id) if w.v4(71) in c.values("PrivateIpAddress")]
    assert node.off_eni(eni.id, w.v4(71))

    report = claim(intruder.ns, agent.socket, [{"name": "net1", "mac": eni.mac, "addresses": [w.v4(70)]}])
    answer = report["answers"][-1]
    assert answer["type"] == "status" and answer["routable"] is True, report
    assert node.on_eni(eni.id, w.v4(70)) and node.off_eni(eni.id, w.v4(71))
    assert [c.values("PrivateIpAddress") for c in node.calls_on(eni.id, ASSIGN4)] == [[w.v4(70)]]


def test_an_address_on_an_eni_without_no_manage_is_refused(node):
    w = node.world
    agent = node.agent()
    p = node.pod(agent)
    # eth0's ENI belongs to the VPC CNI (no no_manage tag).
    p.link("eth0", w.eth0.mac, w.v4(80))
    s = p.start_sidecar(["eth0"])
    wait_for(lambda: agent.metric("multus_eni_agent_refusals_total", 'reason="not_no_manage"') == 1, "the refusal counted")
    assert s.probe() == 503
    assert not node.calls_on(w.eth0.id)
    assert node.off_eni(w.eth0.id, w.v4(80))


def test_a_killed_sidecar_keeps_its_address_while_its_netns_holds_it(node):
    w = node.world
    eni = w.enis[0]
    agent = node.agent("--resync-interval=1s", "--reclaim-after=1s")
    p = node.pod(agent)
    a = w.v4(90)
    p.link("net1", eni.mac, a)
    s = p.start_sidecar(["net1"])
    wait_for(lambda: s.probe() == 200, "sidecar ready")
    s.kill()
    # Several resyncs (each one Describe of the node plus a netns scan) pass...
    seen = node.emulator.proxy.calls(DESCRIBE)
    wait_for(lambda: node.emulator.proxy.calls(DESCRIBE) >= seen + 3, "three resyncs")
    # ...and the address stays: the namespace still holds it (a restarting sidecar).
    assert node.on_eni(eni.id, a)
    assert not node.calls_on(eni.id, UNASSIGN4)
    p.delete()
    wait_for(lambda: node.off_eni(eni.id, a), "the address released once the namespace is gone")
    # Released because the namespace went away, not reclaimed as a leak later.
    assert agent.metric("multus_eni_agent_reclaims_total") == 0
    assert agent.metric("multus_eni_agent_releases_total", 'cause="gone"') == 1


def test_a_restarted_agent_reclaims_leaks_but_never_an_address_a_netns_holds(node):
    w = node.world
    eni = w.enis[0]
    agent = node.agent("--resync-interval=1s", "--reclaim-after=2s")
    gone, kept = node.pod(agent, "gone"), node.pod(agent, "kept")
    a_gone, a_kept = w.v4(100), w.v4(101)
    gone.link("net1", eni.mac, a_gone)
    s = gone.start_sidecar(["net1"])
    wait_for(lambda: s.probe() == 200, "sidecar ready")
    # A pod without a sidecar whose address is on the ENI (put there by someone else).
    kept.link("net1", eni.mac, a_kept)
    assign(node.emulator.ns, node.emulator.direct, eni.id, a_kept)

    agent.kill()
    gone.delete()  # SIGKILL and netns deleted while the agent is down: nobody released it
    assert node.on_eni(eni.id, a_gone)
    agent.start()
    wait_for(lambda: node.off_eni(eni.id, a_gone), "the leaked address reclaimed after the restart")
    reclaims = [e for e in agent.logs() if e.get("action") == "reclaim"]
    assert [e["address"] for e in reclaims] == [a_gone]
    seen = node.emulator.proxy.calls(DESCRIBE)
    wait_for(lambda: node.emulator.proxy.calls(DESCRIBE) >= seen + 4, "several more resyncs past --reclaim-after")
    assert node.on_eni(eni.id, a_kept), "an address held in a netns of the node is never reclaimed"
    assert node.eni(eni.id).holds(eni.primary_ip)


def test_an_agent_killed_under_load_comes_back_without_losing_an_address(node):
    w = node.world
    eni = w.enis[0]
    agent = node.agent("--resync-interval=1s", "--reclaim-after=1s")
    pods, addresses = [], []
    for i in range(6):
        p = node.pod(agent)
        a = w.v4(110 + i)
        p.link("net1", eni.mac, a)
        p.start_sidecar(["net1"])
        pods.append(p)
        addresses.append(a)
    wait_for(lambda: sum(1 for p in pods if p.sidecar.probe() == 200) >= 2, "some pods ready")
    agent.kill()  # mid-rollout
    wait_for(lambda: all(p.sidecar.probe() == 503 for p in pods), "every sidecar unready while the agent is down")
    # More pods arrive while it is down.
    for i in range(6, 9):
        p = node.pod(agent)
        a = w.v4(110 + i)
        p.link("net1", eni.mac, a)
        p.start_sidecar(["net1"])
        pods.append(p)
        addresses.append(a)
    agent.start()
    wait_for(lambda: all(p.sidecar.probe() == 200 for p in pods), "every pod ready again")
    assert node.on_eni(eni.id, *addresses)
    seen = node.emulator.proxy.calls(DESCRIBE)
    wait_for(lambda: node.emulator.proxy.calls(DESCRIBE) >= seen + 3, "resyncs past --reclaim-after")
    assert node.on_eni(eni.id, *addresses)
    assert not node.calls_on(eni.id, UNASSIGN4), "no live pod's address was ever unassigned"
    assert all(p.sidecar.running() for p in pods)


def test_two_nodes_in_one_subnet_each_assign_on_their_own_eni(node):
    """Two nodes, each an instance of its own with its Multus ENI and its agent."""
    w = node.world
    nodes = [add_node(node.emulator.ns, w, i) for i in range(2)]
    agents = []
    for i, n in enumerate(nodes):
        a = Agent(node.emulator.ns, node.emulator.endpoint, node.tmp_path / f"node-{i}", node.agent_binary,
                  instance_id=n.instance_id)
        node.agents.append(a)
        a.start()
        wait_for(lambda: a.http("/readyz")[0] == 200, f"agent {i} /readyz 200")
        agents.append(a)
    p1, p2 = node.pod(agents[0]), node.pod(agents[1])
    a1, a2 = w.v4(120), w.v4(121)
    p1.link("net1", nodes[0].multus.mac, a1)
    p2.link("net1", nodes[1].multus.mac, a2)
    s1, s2 = p1.start_sidecar(["net1"]), p2.start_sidecar(["net1"])
    wait_for(lambda: s1.probe() == 200 and s2.probe() == 200, "both pods ready")
    assert node.on_eni(nodes[0].multus.id, a1) and node.off_eni(nodes[0].multus.id, a2)
    assert node.on_eni(nodes[1].multus.id, a2) and node.off_eni(nodes[1].multus.id, a1)
    for a, n, other in ((agents[0], nodes[0], nodes[1]), (agents[1], nodes[1], nodes[0])):
        assert n.multus.id in str(a.checkpoint()) and other.multus.id not in str(a.checkpoint())


def test_throttling_and_server_errors_are_retried_once_per_node(node):
    from lib.fault_proxy import SERVER_ERROR, THROTTLE

    w = node.world
    eni = w.enis[0]
    agent = node.agent()
    proxy = node.emulator.proxy
    proxy.inject(THROTTLE, 2, ASSIGN4)
    proxy.inject(SERVER_ERROR, 1, ASSIGN4)
    pods, addresses = [], []
    for i in range(4):
        p = node.pod(agent)
        a = w.v4(130 + i)
        p.link("net1", eni.mac, a)
        p.start_sidecar(["net1"])
        pods.append(p)
        addresses.append(a)
    wait_for(lambda: all(p.sidecar.probe() == 200 for p in pods), "every pod ready despite the faults")
    assert node.on_eni(eni.id, *addresses)
    assert agent.metric("multus_eni_agent_throttles_total") == 2
    # The SDK retries the 5xx itself; throttled calls are retried by the agent only.
    assert agent.metric("multus_eni_agent_ec2_calls_total", 'action="AssignPrivateIpAddresses",outcome="throttled",kind="address"') == 2
    # Never more Assign calls than pods: the faulted ones are exactly the three injected.
    calls = node.calls_on(eni.id, ASSIGN4)
    assert len([c for c in calls if c.fault is None]) <= len(pods)
    assert len([c for c in calls if c.fault is not None]) == 3


def test_an_address_change_is_claimed_again_and_the_old_address_released(node):
    w = node.world
    eni = w.enis[0]
    agent = node.agent()
    p = node.pod(agent)
    old, new = w.v4(140), w.v4(141)
    p.link("net1", eni.mac, old)
    s = p.start_sidecar(["net1"])
    wait_for(lambda: s.probe() == 200 and node.on_eni(eni.id, old), "first address routable")
    # Old one first: deleting a subnet's primary address flushes its secondaries.
    p.remove("net1", old)
    p.add("net1", new)
    wait_for(lambda: node.on_eni(eni.id, new) and node.off_eni(eni.id, old), "new address on, old one off")
    wait_for(lambda: s.probe() == 200, "ready again")


def test_readiness_waits_for_the_assign(node):
    w = node.world
    eni = w.enis[0]
    agent = node.agent()
    proxy = node.emulator.proxy
    proxy.hold(ASSIGN4)
    p = node.pod(agent)
    a = w.v4(150)
    p.link("net1", eni.mac, a)
    s = p.start_sidecar(["net1"])
    wait_for(lambda: proxy.calls(ASSIGN4) == 1, "the Assign sent (and held)")
    # The agent sends it as soon as the pod's namespace holds the address, which may be before
    # the sidecar listens.
    wait_for(lambda: s.probe() is not None, "the sidecar's probe answering")
    assert s.probe() == 503
    proxy.release()
    wait_for(lambda: s.probe() == 200, "ready once the Assign went through")
    assert node.on_eni(eni.id, a)
    assert agent.metric("multus_eni_agent_claim_to_routable_seconds_count") == 1
