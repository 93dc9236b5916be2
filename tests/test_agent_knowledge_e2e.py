"""End-to-end: the agent acts only on what it has seen (issue 21). Each finding of the issue's
"Why" is one test, on the two-node harness of tests/lib/nodes.py (each node its own instance,
ENIs, agent and `--netns-dir`); each failed on the agent before the issue.

"Never happens" is checked over several of the agent's own resyncs (counted at the proxy); a
rate (calls per toggle) over the toggles the test makes.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse

from lib import moto
from lib.agent import claim_from, claim_line
from lib.netns import run
from lib.nodes import ASSIGNS, DESCRIBE, UNASSIGNS, UNASSIGN6, Cluster
from lib.nodes import cluster  # noqa: F401 (the fixture)
from lib.sidecar import wait_for

SLOW_RESYNC = ["--resync-interval=120s", "--batch-interval=500ms", "--reclaim-after=4s"]


def gate(agent, *addresses: str) -> dict:
    """The agent's HTTP gate (`/v1/addresses`), as the gate sidecar asks it."""
    query = "&".join("address=" + urllib.parse.quote(a) for a in addresses)
    code, text = agent.http(f"/v1/addresses?{query}")
    assert code == 200, (code, text)
    return json.loads(text)


def gate_state(agent, address: str) -> str:
    return gate(agent, address)["addresses"][0]["state"]


def test_the_gate_never_opens_on_another_instances_mac_and_a_macvlan_interface_stays_routable(cluster: Cluster):
    """(1) A pod on node A whose net1 carries node B's Multus ENI MAC is never `routable` at
    A's gate (it was `no_eni`, which opens the gate); once looked up it is `refused` naming B's
    ENI. Control: an interface whose MAC no ENI has (macvlan) is `no_eni`, routable."""
    a, b = cluster.node(), cluster.node()
    w = cluster.world
    intruder_address, macvlan_address = w.v4(31), w.v4(32)
    intruder = a.pod("intruder")
    intruder.link("net1", b.enis.multus.mac, intruder_address)
    seen = set()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        seen.add(gate_state(a.agent, intruder_address))
    wait_for(lambda: gate_state(a.agent, intruder_address) == "refused", "refused once B's ENI is found")
    cluster.resyncs(a, 3)
    seen.add(gate_state(a.agent, intruder_address))
    assert "routable" not in seen and "no_eni" not in seen, seen
    answer = gate(a.agent, intruder_address)
    assert answer["routable"] is False and answer["addresses"][0]["eni"] == b.enis.multus.id, answer
    macvlan = a.pod("macvlan")
    macvlan.link("net1", "02:00:00:6d:76:01", macvlan_address)
    wait_for(lambda: gate_state(a.agent, macvlan_address) == "no_eni", "the macvlan address no_eni")
    assert gate(a.agent, macvlan_address)["routable"] is True
    assert not cluster.calls(ASSIGNS, intruder_address)


def test_a_multus_eni_attached_after_the_start_is_found_by_its_mac_and_the_gate_waits_for_the_assign(cluster: Cluster):
    """(1) An ENI attached to A's instance after A's agent started (resync 120 s): a pod on it
    is `pending` at the gate until its address is on that ENI (it was `no_eni`, routable), and
    the agent finds the ENI by looking up the MAC, in seconds, not at the next resync."""
    a = cluster.node(*SLOW_RESYNC)
    w = cluster.world
    late = moto.attach_multus_eni(cluster.emulator.ns, cluster.emulator.direct, w.subnet_id, a.enis.instance_id, 3, w.v4(166))
    address = w.v4(33)
    cluster.proxy.hold("AssignPrivateIpAddresses")
    started = time.monotonic()
    p = a.pod()
    p.link("net1", late.mac, address)
    wait_for(lambda: cluster.calls(ASSIGNS, address), "the Assign on the new ENI (held at the proxy)", timeout=60)
    assert time.monotonic() - started < 60, "found at a resync, not by the lookup"
    assert cluster.calls(ASSIGNS, address)[0].param("NetworkInterfaceId") == late.id
    states = {gate_state(a.agent, address) for _ in range(20)}
    assert states == {"pending"}, f"the gate said {states} before the address was on the ENI"
    cluster.proxy.release()
    wait_for(lambda: gate_state(a.agent, address) == "routable", "routable once assigned")
    assert cluster.holds(late, address)


def test_an_ipv6_address_held_in_another_subnet_is_never_unassigned_there(cluster: Cluster):
    """(2) A pod on A holds the IPv6 address of B's pod, whose Multus ENI is in another subnet:
    A's ENI cannot take it, so A never unassigns it from B (B's pod lost it twice)."""
    a, b = cluster.node(), cluster.node()
    other = moto.add_subnet(cluster.emulator.ns, cluster.world, 1)
    b_eni = moto.attach_multus_eni(cluster.emulator.ns, cluster.emulator.direct, other.id, b.enis.instance_id, 3, other.v4(10))
    address = other.v6(0x50)
    bp = b.pod()
    bp.link("net1", b_eni.mac, address)
    wait_for(lambda: cluster.holds(b_eni, address), "B's pod address on B's ENI in the other subnet")
    ap = a.pod()
    ap.link("net1", a.enis.multus.mac, address)
    wait_for(lambda: a.agent.status_of(address), "A sees its pod's address")
    cluster.resyncs(a, 5)
    assert not cluster.calls(UNASSIGNS, address, b_eni), "A unassigned B's pod's address"
    assert cluster.holds(b_eni, address)
    assert [s["state"] for s in a.agent.status_of(address)] != ["routable"]
    assert not cluster.calls((UNASSIGN6,), address)


def test_a_conflict_survives_the_pods_release_and_the_agents_restart(cluster: Cluster):
    """(3) A pod on A keeps removing and re-adding the address of B's pod: each agent takes it
    once, then A waits (13 Assign and 10 Unassign calls in 30 s before); A's restart keeps the
    history (the checkpoint) and makes no new take."""
    a, b = cluster.node(), cluster.node()
    address = cluster.world.v4(75)
    bp = b.pod()
    bp.link("net1", b.enis.multus.mac, address)
    wait_for(lambda: cluster.holds(b.enis.multus, address), "B's pod address on B's ENI")
    ap = a.pod()
    ap.link("net1", a.enis.multus.mac, address)
    wait_for(lambda: "conflict" in [s["state"] for n in (a, b) for s in n.agent.status_of(address)], "a conflict shown")
    for _ in range(6):
        ap.remove("net1", address)
        cluster.resyncs(a, 1)
        ap.add("net1", address)
        cluster.resyncs(a, 1)
    assigns, unassigns = len(cluster.calls(ASSIGNS, address)), len(cluster.calls(UNASSIGNS, address))
    assert assigns <= 5 and unassigns <= 2, f"{assigns} Assign and {unassigns} Unassign calls over 6 toggles"
    assert a.agent.checkpoint().get("conflicts", {}).get(address), a.agent.checkpoint()
    before = len(cluster.calls(ASSIGNS, address, a.enis.multus))
    a.agent.kill()
    a.agent.start()
    wait_for(lambda: a.agent.http("/readyz")[0] == 200, "A ready again")
    cluster.resyncs(a, 4)
    assert len(cluster.calls(ASSIGNS, address, a.enis.multus)) == before, "A took it again after its restart"
    assert [s["state"] for s in a.agent.status_of(address)] == ["conflict"]


def test_an_address_no_pod_ever_held_is_unowned_kept_and_reclaimed_only_when_asked(cluster: Cluster):
    """(4) Addresses put on A's Multus ENI outside the agent (a DaemonSet migrated from, a DPDK
    pod without a netdev) stay past --reclaim-after (4 s), counted and listed as `unowned`;
    `--reclaim-unowned` reclaims them. Control: an address a deleted pod held is reclaimed."""
    a = cluster.node(start=False)
    e, w = a.enis, cluster.world
    v4, v6, owned = w.v4(80), w.v6(0x80), w.v4(81)
    p = a.pod()
    p.link("net1", e.multus.mac, owned)
    cluster.start(a)
    wait_for(lambda: cluster.holds(e.multus, owned), "the pod's address assigned")
    for address in (v4, v6):
        moto.assign(cluster.emulator.ns, cluster.emulator.direct, e.multus.id, address)
    a.agent.kill()
    p.delete()
    a.agent.start()
    wait_for(lambda: cluster.lacks(e.multus, owned), "the deleted pod's address reclaimed (control)")
    cluster.resyncs(a, 4)
    assert cluster.holds(e.multus, v4, v6), "an address no pod ever held was reclaimed"
    assert a.agent.metric("multus_eni_agent_unowned_addresses") == 2
    assert {u["address"] for u in a.agent.status()["unowned"]} == {v4, v6}
    a.agent.kill()
    a.agent.start("--reclaim-unowned")
    wait_for(lambda: cluster.lacks(e.multus, v4, v6), "unowned addresses reclaimed with --reclaim-unowned")


def test_a_stale_file_in_the_netns_dir_does_not_switch_reclaim_off(cluster: Cluster):
    """(5) A regular file in --netns-dir is no pod: it is ignored, and a pod deleted while the
    agent was down still has its address reclaimed (it was an unreadable namespace, so nothing
    was ever reclaimed again)."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    address = w.v4(85)
    (a.agent.netns_dir / "stale").write_text("not a namespace\n")
    p = a.pod()
    p.link("net1", e.multus.mac, address)
    wait_for(lambda: cluster.holds(e.multus, address), "the pod's address assigned")
    a.agent.kill()
    p.delete()
    a.agent.start()
    wait_for(lambda: a.agent.http("/readyz")[0] == 200, "ready with a stale file in --netns-dir")
    wait_for(lambda: cluster.lacks(e.multus, address), "the deleted pod's address reclaimed")
    assert any(x.get("outcome") == "ignored" and x.get("netns") == "stale" for x in a.agent.logs())


def test_claims_naming_unknown_macs_cost_no_describe(cluster: Cluster):
    """(6) One pod's connection sends, for 10 s, claims naming 800 MACs no interface of the
    node carries: the agent looks none of them up (183 Describe calls in 10 s before)."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    p = a.pod()
    p.link("net1", e.multus.mac, w.v4(90))
    wait_for(lambda: cluster.holds(e.multus, w.v4(90)), "the pod's address assigned")
    macs = [f"02:00:{i >> 8:02x}:{i & 0xff:02x}:00:01" for i in range(800)]
    interfaces = [{"name": f"x{i}", "mac": m, "addresses": [w.v4(90)]} for i, m in enumerate(macs)]
    line = claim_line(interfaces, v=2)
    assert len(line) < 65536, "within --max-line-bytes: the claims are read, not cut off"
    before = len(cluster.proxy.requests(DESCRIBE))
    report = claim_from(p.ns, a.agent.socket, "repeat", line, timeout=10)
    assert not report["closed"] and report["sent"] > 10 * len(line), report["sent"]
    window = cluster.proxy.requests(DESCRIBE)[before:]
    describes = [r for r in window if any(m in str(r.params) for m in macs)]
    assert not describes, f"{len(describes)} Describe calls looked up MACs a caller named"
    # The resyncs' reads of the instance (--resync-interval=2s), and nothing per claim.
    others = [r for r in window if e.instance_id not in str(r.params)]
    assert len(others) <= 1, [r.params for r in others]
    assert a.agent.running()


def test_one_address_on_two_enis_of_this_instance_is_on_one_and_a_conflict_on_the_other(cluster: Cluster):
    """(7) Two pods on A, one per Multus ENI, hold the same address: it is assigned to one ENI
    and shown `conflict` on the other, never moved between them (78 Assign calls in 20 s)."""
    a = cluster.node(start=False)
    w = cluster.world
    second = moto.attach_multus_eni(cluster.emulator.ns, cluster.emulator.direct, w.subnet_id, a.enis.instance_id, 3, w.v4(166))
    cluster.start(a)
    address = w.v4(95)
    for eni in (a.enis.multus, second):
        p = a.pod()
        p.link("net1", eni.mac, address)
    wait_for(lambda: cluster.holds(a.enis.multus, address) or cluster.holds(second, address), "the address on one ENI")
    cluster.resyncs(a, 6)
    assert len(cluster.calls(ASSIGNS, address)) <= 2, [c.param("NetworkInterfaceId") for c in cluster.calls(ASSIGNS, address)]
    assert cluster.holds(a.enis.multus, address) != cluster.holds(second, address), "on both ENIs, or neither"
    assert sorted(s["state"] for s in a.agent.status_of(address)) == ["conflict", "routable"]


def test_two_interfaces_on_one_mac_both_get_ready(cluster: Cluster):
    """(8) Two ipvlan children of one master carry the same MAC: a sidecar managing both is
    ready once both addresses are on the ENI (the second was refused as not held)."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    p = a.pod()
    p.link("net1", e.multus.mac, w.v4(100))
    p.link("net2", e.multus.mac, w.v4(101))
    s = p.start_sidecar(["net1", "net2"])
    wait_for(lambda: s.probe() == 200, "the sidecar ready for both interfaces")
    assert cluster.holds(e.multus, w.v4(100), w.v4(101))


def test_the_http_port_is_dual_stack_cuts_idle_connections_and_serves_status_to_loopback_only(cluster: Cluster):
    """(9) `--metrics-addr=[::]:PORT` (the DaemonSet's): answered on 127.0.0.1 and [::1]; 30
    idle connections are cut within the header timeout (they stayed open 40 s and more before);
    `/status` from one of the node's own non-loopback addresses is refused, the gate is not."""
    a = cluster.node(start=False)
    a.agent.metrics_host = "[::]"
    a.agent.args += ["--http-header-timeout=2s"]
    ns = cluster.emulator.ns
    link = f"hs{a.agent.metrics_port % 10000}"
    ns.add_veth(link, link + "p")
    ns.add_address(link, "fd00:6d6e:6501::1/64")
    ns.add_address(link, "169.254.77.1/24")
    try:
        cluster.start(a)
        port = a.agent.metrics_port

        def get(host: str, path: str) -> int:
            import urllib.error
            import urllib.request

            try:
                with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert ns.call(get, "127.0.0.1", "/status") == 200
        assert ns.call(get, "[::1]", "/status") == 200
        assert ns.call(get, "[fd00:6d6e:6501::1]", "/status") == 403
        assert ns.call(get, "169.254.77.1", "/status") == 403
        assert ns.call(get, "[fd00:6d6e:6501::1]", "/readyz") == 200

        def idle_closed(count: int, wait: float) -> int:
            conns = [socket.create_connection(("127.0.0.1", port), timeout=wait) for _ in range(count)]
            closed = 0
            for c in conns:
                try:
                    closed += c.recv(1) == b""
                except OSError:
                    closed += 1
                finally:
                    c.close()
            return closed

        assert ns.call(idle_closed, 30, 8.0) == 30, "idle connections still open after the header timeout"
        assert a.agent.metric("multus_eni_agent_limit_hits_total", 'limit="http_header_timeout"') >= 30
    finally:
        ns.del_link(link)


def test_an_address_back_in_duplicate_address_detection_keeps_its_assignment(cluster: Cluster):
    """An IPv6 address that goes through DAD again (its link went down and up, the address
    kept) is still the pod's: it stays assigned while tentative (it was released at once)."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    address = w.v6(0xB0)
    p = a.pod()
    p.link("net1", e.multus.mac)
    run(["ip", "netns", "exec", p.ns.name, "sysctl", "-qw", "net.ipv6.conf.net1.dad_transmits=4",
         "net.ipv6.conf.net1.accept_dad=1", "net.ipv6.conf.net1.keep_addr_on_down=1"])
    p.add("net1", address, nodad=False)
    wait_for(lambda: cluster.holds(e.multus, address), "assigned once DAD passed")
    p.ns.ip("link", "set", "net1", "down")
    p.ns.ip("link", "set", "net1", "up")
    shown = p.ns.ip("-6", "addr", "show", "dev", "net1").stdout
    assert "tentative" in shown, f"not back in DAD: {shown}"
    wait_for(lambda: "tentative" not in p.ns.ip("-6", "addr", "show", "dev", "net1").stdout, "DAD passed again")
    assert not cluster.calls(UNASSIGNS, address), "released while in DAD again"
    assert cluster.holds(e.multus, address)


def test_a_vpc_cni_pods_veth_is_never_looked_up(cluster: Cluster):
    """A VPC CNI pod's eth0 is a veth with a random MAC, holding addresses of the VPC CNI's ENI of
    this instance: the agent changes nothing for it whatever EC2 would say of that MAC, so it never
    looks it up (it did, once per pod: 110 Describe calls for a full node, at most
    --max-mac-lookups per resync), and the address reads `no_eni` through the VPC CNI's ENI. The
    pod's Multus interface is served as before."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    veth = "0e:5a:00:00:00:09"
    p = a.pod()
    p.link("eth0", veth, e.vpc_cni_v4)
    p.link("net1", e.multus.mac, w.v4(95))
    wait_for(lambda: cluster.holds(e.multus, w.v4(95)), "the Multus address assigned")
    cluster.resyncs(a, 3)
    lookups = [r for r in cluster.proxy.requests(DESCRIBE) if veth in str(r.params).lower()]
    assert not lookups, f"{len(lookups)} Describe calls for the veth's MAC"
    rows = a.agent.status_of(e.vpc_cni_v4)
    assert [(r["state"], r["eni"]) for r in rows] == [("no_eni", e.vpc_cni.id)], rows
