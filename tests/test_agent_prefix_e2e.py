"""End-to-end: prefix mode (issue 23) on the two-node harness of tests/lib/nodes.py. Each node's
agent runs with `--prefix-ranges` covering a /26 of the world's subnet (.64-.127: four /28 node
blocks) and one IPv6 /80 of its /64; a pod address inside wants its delegated prefix (/28, /80)
on the ENI instead of itself. Calls are counted at the EC2 emulator (tests/lib/fault_proxy.py,
which models prefixes as EC2 does); "never happens" is checked over several of the agent's own
resyncs.
"""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.parse

from lib import moto
from lib.fault_proxy import Request
from lib.nodes import ASSIGN4, ASSIGN6, ASSIGNS, FAST, UNASSIGN4, UNASSIGN6, UNASSIGNS, Cluster
from lib.nodes import cluster  # noqa: F401 (the fixture)
from lib.sidecar import wait_for


def v6_block(w) -> ipaddress.IPv6Network:
    """An IPv6 /80 of the world subnet's /64 (the IPAM's block for a node)."""
    net = ipaddress.IPv6Network(w.ipv6_prefix + "/64")
    return ipaddress.IPv6Network((int(net.network_address) + (7 << 48), 80))


def v6_in(w, host: int) -> str:
    return str(v6_block(w).network_address + host)


def block(address: str) -> str:
    """The delegated prefix of `address`, as EC2 (and the emulator) names it."""
    length = 80 if ":" in address else 28
    return str(ipaddress.ip_network(f"{address}/{length}", strict=False))


def prefix_args(w, release_after: str = "3s") -> list[str]:
    return [*FAST, f"--prefix-ranges={w.v4(64)}/26,{v6_block(w)}", f"--prefix-release-after={release_after}"]


def prefixes_of(r: Request) -> set[str]:
    return {str(ipaddress.ip_network(p)) for p in r.values("Ipv4Prefix") + r.values("Ipv6Prefix")}


def prefix_calls(cluster: Cluster, actions: tuple[str, ...], prefix: str | None = None, eni: moto.Eni | None = None) -> list[Request]:
    return [
        r
        for r in cluster.proxy.requests()
        if r.action in actions
        and prefixes_of(r)
        and (prefix is None or prefix in prefixes_of(r))
        and (eni is None or r.param("NetworkInterfaceId") == eni.id)
    ]


def gate(agent, *addresses: str) -> dict:
    query = "&".join("address=" + urllib.parse.quote(a) for a in addresses)
    code, text = agent.http(f"/v1/addresses?{query}")
    assert code == 200, (code, text)
    return json.loads(text)


def rows(agent, address: str) -> list[dict]:
    return agent.status_of(address)


def routable_through(agent, address: str, prefix: str) -> bool:
    return [(r["state"], r.get("prefix")) for r in rows(agent, address)] == [("routable", prefix)]


def test_one_call_for_many_pods_of_a_block_and_a_later_pod_routable_with_no_call(cluster: Cluster):
    """Six pods of one /28 cost one AssignPrivateIpAddresses naming the prefix only; a pod that
    comes later is routable at the gate with zero calls; no address of the range is ever
    assigned individually; gauge and call counters show the prefix."""
    w = cluster.world
    a = cluster.node(*prefix_args(w, "10m"))
    e = a.enis
    addresses = [w.v4(h) for h in range(65, 71)]
    prefix = block(addresses[0])
    for i, address in enumerate(addresses):
        a.pod(f"p{i}").link("net1", e.multus.mac, address)
    wait_for(lambda: all(routable_through(a.agent, x, prefix) for x in addresses), "every pod routable through the prefix")
    assert prefix in cluster.proxy.prefixes(e.multus.id)
    calls = prefix_calls(cluster, ASSIGNS, eni=e.multus)
    assert len(calls) == 1 and prefixes_of(calls[0]) == {prefix}, [(r.action, r.params) for r in calls]
    assert not calls[0].values("PrivateIpAddress"), "a prefix call never names addresses"
    before = len(cluster.proxy.requests(ASSIGN4)) + len(cluster.proxy.requests(ASSIGN6))
    later = w.v4(78)
    started = time.monotonic()
    a.pod("later").link("net1", e.multus.mac, later)
    wait_for(lambda: gate(a.agent, later)["routable"], "the later pod routable at the gate")
    took = time.monotonic() - started
    cluster.resyncs(a, 2)
    after = len(cluster.proxy.requests(ASSIGN4)) + len(cluster.proxy.requests(ASSIGN6))
    assert after == before, "a later pod of the block made a call"
    for x in [*addresses, later]:
        assert not cluster.calls(ASSIGNS + UNASSIGNS, x), f"{x} was named in a call"
    assert a.agent.metric("multus_eni_agent_prefixes") == 1
    assert a.agent.metric("multus_eni_agent_ec2_calls_total", 'action="AssignPrivateIpAddresses",outcome="success",kind="prefix"') == 1
    assert took < 5, f"the later pod waited {took:.1f}s"
    status = a.agent.status()
    assert {"eni": e.multus.id, "prefix": prefix, "state": "in_use"} in status["prefixes"], status["prefixes"]


def test_a_prefix_is_reused_within_the_release_delay_and_given_back_once_after_it(cluster: Cluster):
    """`--prefix-release-after=3s`: a pod that replaces the last one within the delay reuses the
    prefix with no call; once the last pod is gone for the delay, one Unassign gives it back."""
    w = cluster.world
    a = cluster.node(*prefix_args(w, "3s"))
    e = a.enis
    first, second = w.v4(81), w.v4(82)
    prefix = block(first)
    p = a.pod("first")
    p.link("net1", e.multus.mac, first)
    wait_for(lambda: routable_through(a.agent, first, prefix), "the first pod routable")
    p.delete()
    q = a.pod("second")
    q.link("net1", e.multus.mac, second)
    wait_for(lambda: routable_through(a.agent, second, prefix), "the second pod routable")
    cluster.resyncs(a, 3)
    assert len(prefix_calls(cluster, ASSIGNS, prefix)) == 1, "reused within the delay: no new Assign"
    assert not prefix_calls(cluster, UNASSIGNS, prefix), "given back while a pod held an address in it"
    gone = time.monotonic()
    q.delete()
    wait_for(lambda: prefix not in cluster.proxy.prefixes(e.multus.id), "the prefix given back", timeout=30)
    assert time.monotonic() - gone >= 3, "given back before --prefix-release-after"
    cluster.resyncs(a, 2)
    unassigns = prefix_calls(cluster, UNASSIGNS, prefix)
    assert len(unassigns) == 1 and unassigns[0].action == UNASSIGN4, [(r.action, r.params) for r in unassigns]
    assert a.agent.metric("multus_eni_agent_prefixes") == 0
    assert not a.agent.checkpoint().get("prefixes"), a.agent.checkpoint()


def test_a_prefix_another_node_holds_or_with_an_individual_address_inside_is_refused_and_never_forced(cluster: Cluster):
    """Node B holds a /28 (its pod's block); A's pod with an address in it gets `refused` with
    EC2's reason, and B keeps the prefix. The same for a /28 with an address assigned
    individually on B's ENI. A tries each once (then its backoff), never with a reassignment."""
    w = cluster.world
    a, b = cluster.node(*prefix_args(w, "10m")), cluster.node(*prefix_args(w, "10m"))
    b_address, a_address = w.v4(97), w.v4(98)
    taken = block(b_address)
    bp = b.pod("b")
    bp.link("net1", b.enis.multus.mac, b_address)
    wait_for(lambda: routable_through(b.agent, b_address, taken), "B's pod routable through its prefix")
    # An address put on B's ENI individually (outside the agents) in another /28 of the range.
    single, a_other = w.v4(113), w.v4(114)
    moto.assign(cluster.emulator.ns, cluster.emulator.endpoint, b.enis.multus.id, single)
    ap = a.pod("a")
    ap.link("net1", a.enis.multus.mac, a_address, a_other)
    wait_for(lambda: [r["state"] for r in rows(a.agent, a_address)] == ["refused"], "A's address refused")
    wait_for(lambda: [r["state"] for r in rows(a.agent, a_other)] == ["refused"], "A's second address refused")
    reason = rows(a.agent, a_address)[0]["reason"]
    assert "already assigned" in reason and taken in reason, reason
    assert "in use" in rows(a.agent, a_other)[0]["reason"], rows(a.agent, a_other)
    public = gate(a.agent, a_address)["addresses"][0]
    assert public["state"] == "refused" and "already assigned" not in (public["reason"] or ""), public
    cluster.resyncs(a, 3)
    assert taken in cluster.proxy.prefixes(b.enis.multus.id), "B lost its prefix"
    assert cluster.holds(b.enis.multus, single), "B's individual address moved"
    assert routable_through(b.agent, b_address, taken)
    tries = prefix_calls(cluster, (ASSIGN4,), eni=a.enis.multus)
    assert 2 <= len(tries) <= 4, f"{len(tries)} tries in a few seconds (backoff 10 s)"
    assert not any(r.param("AllowReassignment") == "true" for r in tries)
    assert not prefix_calls(cluster, UNASSIGNS, eni=b.enis.multus), "A called on B's ENI"
    assert not cluster.calls(ASSIGNS, a_address) and not cluster.calls(ASSIGNS, a_other), "an individual address in a range"


def test_addresses_outside_the_ranges_stay_per_address_and_never_share_a_call_with_a_prefix(cluster: Cluster):
    """One pod with an address inside a range and one outside: the outside one is assigned as
    an address, the inside one by its prefix, in separate calls."""
    w = cluster.world
    a = cluster.node(*prefix_args(w, "10m"))
    e = a.enis
    inside, outside = w.v4(66), w.v4(20)
    p = a.pod()
    p.link("net1", e.multus.mac, inside, outside)
    wait_for(lambda: routable_through(a.agent, inside, block(inside)), "the inside address routable")
    wait_for(lambda: cluster.holds(e.multus, outside), "the outside address assigned")
    assert [(r["state"], r.get("prefix")) for r in rows(a.agent, outside)] == [("routable", None)]
    assert len(cluster.calls(ASSIGNS, outside)) == 1
    for r in cluster.proxy.requests():
        if r.action in ASSIGNS + UNASSIGNS:
            assert not (prefixes_of(r) and (r.values("PrivateIpAddress") or r.values("Ipv6Addresses"))), r.params
    assert cluster.lacks(e.multus, inside), "the inside address was assigned individually"


def test_a_restart_keeps_the_block(cluster: Cluster):
    """The agent killed and started again with its pods still there: no Unassign, no new
    Assign; the prefix is in the checkpoint and the pods stay routable through it."""
    w = cluster.world
    a = cluster.node(*prefix_args(w, "3s"))
    e = a.enis
    addresses = [w.v4(68), v6_in(w, 5)]
    p = a.pod()
    p.link("net1", e.multus.mac, *addresses)
    wait_for(lambda: all(routable_through(a.agent, x, block(x)) for x in addresses), "routable through both prefixes")
    saved = a.agent.checkpoint()
    assert saved.get("version") == 3 and sorted(saved["prefixes"][e.multus.id]) == sorted(block(x) for x in addresses), saved
    calls = len(prefix_calls(cluster, ASSIGNS + UNASSIGNS))
    a.agent.kill()
    a.agent.start()
    wait_for(lambda: a.agent.http("/readyz")[0] == 200, "ready again")
    wait_for(lambda: all(routable_through(a.agent, x, block(x)) for x in addresses), "routable after the restart")
    cluster.resyncs(a, 4)
    assert len(prefix_calls(cluster, ASSIGNS + UNASSIGNS)) == calls, "the restart made a prefix call"
    assert {block(x) for x in addresses} <= cluster.proxy.prefixes(e.multus.id)
    assert not [s for s in a.agent.status().get("prefixes", []) if s["state"] == "unowned"]


def test_ipv6_a_80_is_assigned_once_reused_and_given_back(cluster: Cluster):
    """IPv6 the same way: pods of one /80 cost one AssignIpv6Addresses naming the prefix; a later
    pod none; after the last pod left for the delay, one UnassignIpv6Addresses."""
    w = cluster.world
    a = cluster.node(*prefix_args(w, "3s"))
    e = a.enis
    addresses = [v6_in(w, h) for h in (0x10, 0x11, 0x12)]
    prefix = block(addresses[0])
    pods = []
    for i, address in enumerate(addresses):
        pods.append(a.pod(f"v6-{i}"))
        pods[-1].link("net1", e.multus.mac, address)
    wait_for(lambda: all(routable_through(a.agent, x, prefix) for x in addresses), "every IPv6 pod routable")
    later = v6_in(w, 0xFFFF)
    pods.append(a.pod("later"))
    pods[-1].link("net1", e.multus.mac, later)
    wait_for(lambda: gate(a.agent, later)["routable"], "the later IPv6 pod routable")
    cluster.resyncs(a, 2)
    assigns = prefix_calls(cluster, (ASSIGN6,), prefix)
    assert len(assigns) == 1 and not assigns[0].values("Ipv6Addresses"), [r.params for r in assigns]
    for x in [*addresses, later]:
        assert not cluster.calls(ASSIGNS + UNASSIGNS, x), f"{x} was named in a call"
    for p in pods:
        p.delete()
    wait_for(lambda: prefix not in cluster.proxy.prefixes(e.multus.id), "the /80 given back", timeout=30)
    cluster.resyncs(a, 2)
    assert len(prefix_calls(cluster, (UNASSIGN6,), prefix)) == 1


def test_a_prefix_assign_that_timed_out_is_read_back_before_it_is_sent_again(cluster: Cluster):
    """EC2 carries out the prefix's Assign but the answer never comes (every SDK attempt times
    out, 30 s): the agent reads the ENI before it sends anything more for it, finds the prefix,
    and the pod is routable through it with that one call (it sent the prefix again at once)."""
    w = cluster.world
    # No resync during the 30 s: what the agent knows of the ENI comes from its own calls.
    a = cluster.node(f"--prefix-ranges={w.v4(64)}/26", "--resync-interval=120s", "--batch-interval=500ms")
    e = a.enis
    address = w.v4(100)
    prefix = block(address)
    for _ in range(4):
        cluster.proxy.hold_answer(ASSIGN4, 45)
    a.pod().link("net1", e.multus.mac, address)
    wait_for(lambda: prefix in cluster.proxy.prefixes(e.multus.id), "EC2 carried the prefix's Assign out")
    at = a.agent.first_timeout_at("prefix Assign")
    wait_for(lambda: routable_through(a.agent, address, prefix), "routable through the prefix after the read")
    time.sleep(3)  # the node-wide backoff after a timeout is 0.5 s: a prefix sent again is in
    # The SDK's own attempts within its 30 s are before `at`; the agent's come after.
    again = [r for r in prefix_calls(cluster, ASSIGNS, prefix) if r.arrived_wall > at]
    assert not again, f"{len(again)} prefix Assign calls after the timeout, before reading what EC2 did"
