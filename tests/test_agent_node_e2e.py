"""End-to-end: the agent watches its node (issue 17). Two simulated nodes, each an instance of
its own in the EC2 emulator with a Multus ENI (`no_manage`) and a VPC CNI ENI (untagged, holding
a VPC CNI pod's addresses), each with its own agent (`--instance-id`, `--netns-dir`, state
directory). Pods are network namespaces linked into their node's `--netns-dir` with veth links
carrying ENI MACs (what an ipvlan child looks like); claims made by hand come from a process
started inside the pod's namespace (tests/lib/claim_client.py).

Each finding of issue 17's "Why" is one test here. Convergence is awaited by bounded polling;
"never happens" is checked over several of the agent's own resyncs (counted at the proxy), not
over a fixed time, except the conflict test, whose subject is a rate (Assign calls per 30 s).
"""

from __future__ import annotations

import os
import time

import pytest

from lib import moto
from lib.agent import claim, claim_from, supports_flag
from lib.netns import run
from lib.nodes import ASSIGN4, ASSIGNS, DESCRIBE, FAST, UNASSIGN4, UNASSIGNS, metric_sum
from lib.nodes import cluster  # noqa: F401 (the fixture)
from lib.sidecar import wait_for


# === issue 17, "Why": one test per finding ===


@pytest.mark.parametrize("ipv6_filter", ["answered", "rejected"])
def test_a_vpc_cni_pods_address_is_never_moved_to_the_multus_eni(cluster, ipv6_filter):
    """(a) A pod whose net1 (the Multus ENI's MAC) holds addresses that the node's VPC CNI ENI
    holds as secondaries: neither the IPv4 nor the IPv6 one is ever assigned to the Multus ENI,
    with the endpoint's IPv6 holder filter answered or rejected (then the subnet is read)."""
    if ipv6_filter == "rejected":
        cluster.proxy.reject_filter("ipv6-addresses.ipv6-address")
    a = cluster.node()
    e, w = a.enis, cluster.world
    control = w.v4(20)
    p = a.pod()
    p.link("net1", e.multus.mac, control, e.vpc_cni_v4, e.vpc_cni_v6)
    p.start_sidecar(["net1"])
    wait_for(lambda: cluster.holds(e.multus, control), "the pod's own address on the Multus ENI (positive control)")
    cluster.resyncs(a)
    for address in (e.vpc_cni_v4, e.vpc_cni_v6):
        assert cluster.holds(e.vpc_cni, address), f"the VPC CNI ENI lost its pod's address {address}"
        assert cluster.lacks(e.multus, address), f"{address} is on the Multus ENI"
    for address in (e.vpc_cni_v4, e.vpc_cni_v6):
        assert not cluster.calls(ASSIGNS + UNASSIGNS, address), f"a call carried {address}"
        states = [s["state"] for s in a.agent.status_of(address)]
        assert states == ["refused"], f"{address}: {states}"
    assert a.agent.metric("multus_eni_agent_refusals_total", 'reason="held_by_not_no_manage"') >= 2


def test_another_nodes_eni_mac_is_refused_and_that_nodes_pod_keeps_its_address(cluster):
    """(b) A pod on node A whose interface carries node B's Multus ENI MAC: A refuses it, never
    calls on B's ENI, and B's pod keeps its address over several of A's resyncs."""
    a, b = cluster.node(), cluster.node()
    w = cluster.world
    b_address, intruder_address = w.v4(30), w.v4(31)
    bp = b.pod()
    bp.link("net1", b.enis.multus.mac, b_address)
    bp.start_sidecar(["net1"])
    wait_for(lambda: cluster.holds(b.enis.multus, b_address), "node B's pod address on B's ENI")
    intruder = a.pod("intruder")
    intruder.link("net1", b.enis.multus.mac, intruder_address)
    intruder.start_sidecar(["net1"])
    # Several resyncs of both agents (they run at the same interval; counted on B's ENIs, which
    # an agent that acts on the intruder's MAC reads too).
    cluster.resyncs(b, 10)
    assert not cluster.calls(UNASSIGNS, b_address), "node B's pod lost its address"
    assert cluster.holds(b.enis.multus, b_address)
    assert not cluster.calls(ASSIGNS, intruder_address), "node A assigned on another instance's ENI"
    assert cluster.lacks(b.enis.multus, intruder_address)
    assert [s["state"] for s in a.agent.status_of(intruder_address)] == ["refused"]
    assert a.agent.metric("multus_eni_agent_refusals_total", 'reason="not_this_instance"') >= 1
    assert intruder.sidecar.probe() == 503
    assert b.enis.multus.id not in str(a.agent.checkpoint())


def test_a_caller_outside_the_nodes_pod_namespaces_is_refused(cluster):
    """(c) A process in a namespace of its own (not under --netns-dir), in the agent's own (the
    node's host) namespace or in the test host's, is answered with an error, whatever it holds;
    a pod is served (positive control)."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    stranger_address, host_address, pod_address = w.v4(40), w.v4(41), w.v4(42)
    stranger = cluster.stranger()
    stranger.add_veth("net1", "p1", e.multus.mac)
    stranger.add_address("net1", stranger_address + "/24")
    host = cluster.emulator.ns  # where the agent runs: the node's host network namespace
    host_link = f"h{os.getpid() % 100000}"
    host.add_veth(host_link, host_link + "p", e.multus.mac)
    try:
        host.add_address(host_link, host_address + "/24")
        for ns, address in ((stranger, stranger_address), (host, host_address), (None, host_address)):
            report = claim(ns, a.agent.socket, [{"name": "net1", "mac": e.multus.mac, "addresses": [address]}])
            assert [x["type"] for x in report["answers"]] == ["error"], report
            assert report["closed"], "the connection is closed after the error"
    finally:
        host.del_link(host_link)
    p = a.pod()
    p.link("net1", e.multus.mac, pod_address)
    report = claim(p.ns, a.agent.socket, [{"name": "net1", "mac": e.multus.mac, "addresses": [pod_address]}])
    assert report["answers"][-1]["type"] == "status" and report["answers"][-1]["routable"] is True, report
    assert cluster.holds(e.multus, pod_address)
    assert not cluster.calls(ASSIGNS, stranger_address) and not cluster.calls(ASSIGNS, host_address)
    assert a.agent.metric("multus_eni_agent_refusals_total", 'reason="not_a_pod"') >= 3


def test_an_address_the_hosts_interface_takes_is_held_and_reclaimed_once_its_link_is_gone(cluster):
    """The node's host namespace is followed by its address events alone (its links are a veth
    per pod): addresses a host interface takes after the agent started are held, never
    reclaimed even with --reclaim-unowned; once the link is deleted (the kernel reports its
    addresses deleted, IPv4 and IPv6) they are reclaimed like any leak."""
    a = cluster.node("--reclaim-unowned", *FAST)
    e, w = a.enis, cluster.world
    v4, v6 = w.v4(43), w.v6(0x43)
    host = cluster.emulator.ns  # where the agent runs: the node's host network namespace
    host_link = f"k{os.getpid() % 100000}"
    host.add_veth(host_link, host_link + "p")
    try:
        host.add_address(host_link, v4 + "/32")
        host.add_address(host_link, v6 + "/128")
        for address in (v4, v6):
            moto.assign(cluster.emulator.ns, cluster.emulator.direct, e.multus.id, address)
        cluster.resyncs(a, 4)  # 8 s, past --reclaim-after (4 s)
        assert cluster.holds(e.multus, v4, v6), "an address held on the host was reclaimed"
    finally:
        host.del_link(host_link)
    wait_for(lambda: cluster.lacks(e.multus, v4, v6), "reclaimed once the host's link is gone")
    assert a.agent.metric("multus_eni_agent_reclaims_total") == 2


def test_a_huge_line_is_cut_off_and_memory_stays_bounded_while_other_pods_are_served(cluster):
    """(d) One connection sends up to 96 MiB without a newline: the agent cuts it off at the line
    limit, its peak RSS stays far below its DaemonSet limit, and another pod is served."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    flooder, other = a.pod("flooder"), a.pod("other")
    flooder.link("net1", e.multus.mac, w.v4(45))
    other.link("net1", e.multus.mac, w.v4(46))
    s = other.start_sidecar(["net1"])
    report = claim_from(flooder.ns, a.agent.socket, "flood", str(96 << 20))
    assert report["closed"], f"the agent read {report['sent']} bytes of one line and kept the connection"
    assert report["sent"] < 8 << 20, report["sent"]
    memory = a.agent.memory_kib()
    assert memory["VmHWM"] < 64 * 1024, f"agent peak RSS {memory}"
    assert a.agent.metric("multus_eni_agent_limit_hits_total", 'limit="line_length"') >= 1
    wait_for(lambda: s.probe() == 200, "the other pod's sidecar ready")
    assert cluster.holds(e.multus, w.v4(46))
    assert a.agent.running()


def test_a_sidecar_sigtermed_while_its_pod_keeps_its_addresses_unassigns_nothing(cluster):
    """(e) A sidecar restart (liveness, upgrade) while the pod's interfaces keep their addresses."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    v4, v6 = w.v4(50), w.v6(0x50)
    p = a.pod()
    p.link("net1", e.multus.mac, v4, v6)
    s = p.start_sidecar(["net1"])
    wait_for(lambda: s.probe() == 200, "sidecar ready")
    assert s.terminate() == 0
    cluster.resyncs(a, 3)
    assert not cluster.calls(UNASSIGNS, v4) and not cluster.calls(UNASSIGNS, v6)
    assert cluster.holds(e.multus, v4, v6)
    # The restarted sidecar is ready again at once, with no new Assign.
    assigns = len(cluster.calls(ASSIGNS))
    s2 = p.start_sidecar(["net1"])
    wait_for(lambda: s2.probe() == 200, "the restarted sidecar ready")
    assert len(cluster.calls(ASSIGNS)) == assigns


def test_pods_without_a_sidecar_are_adopted_before_and_after_the_agent_starts_and_released_when_deleted(cluster):
    """(f) `--pods all` (the default): a pod namespace that existed before the agent started and
    one made after are made routable without any sidecar; deleting a pod's namespace releases
    its address (cause: the namespace is gone, not a reclaim)."""
    a = cluster.node(start=False)
    e, w = a.enis, cluster.world
    before, after = w.v4(60), w.v4(61)
    early = a.pod("early")
    early.link("net1", e.multus.mac, before, w.v6(0x60))
    cluster.start(a)
    wait_for(lambda: cluster.holds(e.multus, before, w.v6(0x60)), "the pre-existing pod's addresses on the ENI")
    late = a.pod("late")
    late.link("net1", e.multus.mac, after)
    wait_for(lambda: cluster.holds(e.multus, after), "the new pod's address on the ENI")
    wait_for(lambda: [s["state"] for s in a.agent.status_of(after)] == ["routable"], "/status says routable")
    assert a.agent.status_of(after)[0]["eni"] == e.multus.id

    late.delete()
    wait_for(lambda: cluster.lacks(e.multus, after), "the deleted pod's address off the ENI")
    assert cluster.holds(e.multus, before, w.v6(0x60))
    assert a.agent.metric("multus_eni_agent_reclaims_total") == 0, "released as a leak, not as a deleted pod"
    assert metric_sum(a.agent, "multus_eni_agent_releases_total", exclude='cause="release"') >= 1
    assert any(after in str(line) for line in a.agent.logs() if "releas" in str(line).lower())


def test_a_duplicate_address_on_two_nodes_is_a_bounded_visible_conflict(cluster):
    """(g) The same address held by a pod on each of two nodes: a handful of Assign calls in
    30 s (not one per resync), and the conflict shows on the metric and in /status."""
    a, b = cluster.node(), cluster.node()
    address = cluster.world.v4(70)
    for n in (a, b):
        p = n.pod()
        p.link("net1", n.enis.multus.mac, address)
        p.start_sidecar(["net1"])
    wait_for(lambda: cluster.calls(ASSIGNS, address), "a first Assign")
    time.sleep(30)  # the subject is a rate: Assign calls per 30 s
    count = len(cluster.calls(ASSIGNS, address))
    # Each agent: its first Assign and one take-back, then a retry no sooner than 5 min later.
    assert count <= 5, f"{count} Assign calls for {address} in 30 s"
    conflicts = [n.agent.metric("multus_eni_agent_address_conflicts") for n in (a, b)]
    assert max(conflicts) >= 1, conflicts
    states = [s["state"] for n in (a, b) for s in n.agent.status_of(address)]
    assert "conflict" in states, states


# === more of issue 17's "Tests and numbers" ===


def test_release_while_the_assign_is_in_flight(cluster):
    """The pod's namespace is deleted while EC2 carries out its Assign (the answer held back):
    once the answer arrives, the address is unassigned."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    address = w.v4(80)
    cluster.proxy.hold_answer(ASSIGN4, 3)
    p = a.pod()
    p.link("net1", e.multus.mac, address)
    wait_for(lambda: cluster.calls((ASSIGN4,), address), "the Assign sent")
    p.delete()
    wait_for(lambda: cluster.calls((UNASSIGN4,), address), "an Unassign after the Assign's answer")
    wait_for(lambda: cluster.lacks(e.multus, address), "the address off the ENI")
    cluster.resyncs(a, 2)
    assert cluster.lacks(e.multus, address)
    assert a.agent.metric("multus_eni_agent_reclaims_total") == 0


def test_an_ec2_rejection_leaves_the_other_addresses_assigned_and_is_retried_with_backoff(cluster):
    a = cluster.node()
    e, w = a.enis, cluster.world
    bad, good = w.v4(85), w.v4(86)
    cluster.proxy.refuse(bad)
    p1, p2 = a.pod(), a.pod()
    p1.link("net1", e.multus.mac, bad)
    p2.link("net1", e.multus.mac, good)
    wait_for(lambda: cluster.holds(e.multus, good), "the other pod's address assigned")
    wait_for(lambda: a.agent.status_of(bad) and a.agent.status_of(bad)[0]["reason"], "a reason for the rejected one")
    assert a.agent.status_of(bad)[0]["state"] != "routable"
    tried = len(cluster.calls(ASSIGNS, bad))
    cluster.resyncs(a, 6)
    retries = len(cluster.calls(ASSIGNS, bad)) - tried
    # Retried (at least once in 6 resyncs), and with a backoff of its own (not every resync).
    assert retries >= 1, "a rejected address was never tried again over 6 resyncs"
    assert retries < 4, f"{retries} retries of a rejected address over 6 resyncs: no backoff of its own"
    assert cluster.lacks(e.multus, bad) and cluster.holds(e.multus, good)


def test_ipv6_release_and_reclaim(cluster):
    """An address the pod lets go of is released; one it let go of while the agent was down
    (the agent's own: it assigned it) is reclaimed after the restart."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    kept, removed, leaked = w.v6(0x90), w.v6(0x91), w.v6(0x92)
    p = a.pod()
    p.link("net1", e.multus.mac, kept, removed, leaked)
    wait_for(lambda: cluster.holds(e.multus, kept, removed, leaked), "the IPv6 addresses on the ENI")
    p.remove("net1", removed)
    wait_for(lambda: cluster.lacks(e.multus, removed), "the removed IPv6 address released")
    a.agent.kill()
    p.remove("net1", leaked)  # let go of while the agent was down
    a.agent.start()
    wait_for(lambda: cluster.lacks(e.multus, leaked), "the leaked IPv6 address reclaimed")
    assert cluster.holds(e.multus, kept)
    reclaims = [x for x in a.agent.logs() if x.get("action") == "reclaim" and x.get("outcome") != "unowned"]
    assert [x["address"] for x in reclaims] == [leaked]


def test_tentative_and_dad_failed_addresses_are_not_assigned(cluster):
    a = cluster.node()
    e, w = a.enis, cluster.world
    control, tentative, duplicate = w.v6(0xA0), w.v6(0xA1), w.v6(0xA2)
    p = a.pod()
    p.link("net1", e.multus.mac, control)
    # Ten DAD probes a second apart: an address added now stays tentative for ~10 s.
    run(["ip", "netns", "exec", p.ns.name, "sysctl", "-qw", "net.ipv6.conf.net1.dad_transmits=10",
         "net.ipv6.conf.net1.accept_dad=1"])
    # The duplicate: the veth's other end (same link) holds it first.
    p.ns.add_address("p1", duplicate + "/64")
    p.add("net1", duplicate, nodad=False)
    p.add("net1", tentative, nodad=False)
    wait_for(lambda: cluster.holds(e.multus, control), "the usable address assigned (positive control)")
    out = p.ns.ip("-6", "addr", "show", "to", tentative + "/128", "dev", "net1").stdout
    assert "tentative" in out, out
    cluster.resyncs(a, 2)
    still = p.ns.ip("-6", "addr", "show", "to", tentative + "/128", "dev", "net1").stdout
    assert "tentative" in still, f"DAD ended before the check: {still}"
    assert not cluster.calls(ASSIGNS, tentative), "a tentative address was assigned"
    wait_for(lambda: "tentative" not in p.ns.ip("-6", "addr", "show", "to", tentative + "/128", "dev", "net1").stdout,
             "DAD passed")
    wait_for(lambda: cluster.holds(e.multus, tentative), "the address assigned once DAD passed")
    assert "dadfailed" in p.ns.ip("-6", "addr", "show", "to", duplicate + "/128", "dev", "net1").stdout
    cluster.resyncs(a, 2)
    assert not cluster.calls(ASSIGNS, duplicate) and cluster.lacks(e.multus, duplicate)


def test_a_peer_in_a_pid_namespace_of_its_own(cluster):
    """Every Kubernetes pod has its own pid namespace: a caller there, in a pod's network
    namespace, is served (the agent, hostPID, reads its pid translated); the same caller in a
    namespace that is no pod is refused."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    p = a.pod()
    p.link("net1", e.multus.mac, w.v4(95))
    report = claim(p.ns, a.agent.socket, [{"name": "net1", "mac": e.multus.mac, "addresses": [w.v4(95)]}],
                   own_pid_namespace=True)
    assert report["answers"][-1].get("routable") is True, report
    stranger = cluster.stranger()
    stranger.add_veth("net1", "p1", e.multus.mac)
    stranger.add_address("net1", w.v4(96) + "/24")
    report = claim(stranger, a.agent.socket, [{"name": "net1", "mac": e.multus.mac, "addresses": [w.v4(96)]}],
                   own_pid_namespace=True)
    assert [x["type"] for x in report["answers"]] == ["error"], report
    assert not cluster.calls(ASSIGNS, w.v4(96))


def test_a_claim_of_an_unknown_protocol_version_is_answered_with_an_error(cluster):
    a = cluster.node()
    e, w = a.enis, cluster.world
    p = a.pod()
    p.link("net1", e.multus.mac, w.v4(97))
    report = claim(p.ns, a.agent.socket, [{"name": "net1", "mac": e.multus.mac, "addresses": [w.v4(97)]}], v=99)
    (answer,) = report["answers"]
    assert answer["type"] == "error", answer
    assert "version" in answer["message"] or "99" in answer["message"], answer


def test_the_nodes_enis_are_read_over_every_page(cluster):
    """EC2 may answer DescribeNetworkInterfaces in pages: with one ENI per page, the Multus ENI
    (the instance's second) is on page two."""
    cluster.proxy.page_size = 1
    a = cluster.node()
    e, w = a.enis, cluster.world
    p = a.pod()
    p.link("net1", e.multus.mac, w.v4(98))
    wait_for(lambda: cluster.holds(e.multus, w.v4(98)), "the pod's address on the ENI found on page two")
    assert any(r.param("NextToken") for r in cluster.proxy.requests(DESCRIBE)), "the agent followed nextToken"


def test_the_previous_release_sidecar_becomes_ready_against_this_agent(cluster, previous_sidecar_agent_mode_binary):
    """Issue 18 item 4: a sidecar of the previous release (0.1.0, protocol v1, `--agent-socket`;
    conftest.PREVIOUS_RELEASE, whose fixture checks the binary's --version) already running in
    pods keeps working after the agent is upgraded."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    p = a.pod(sidecar_binary=previous_sidecar_agent_mode_binary)
    v4, v6 = w.v4(99), w.v6(0x99)
    p.link("net1", e.multus.mac, v4, v6)
    s = p.start_sidecar(["net1"])
    wait_for(lambda: s.probe() == 200, "the previous release's sidecar ready")
    assert cluster.holds(e.multus, v4, v6)
    assert [x["state"] for x in a.agent.status_of(v4)] == ["routable"]
    assert s.argv[0] == str(previous_sidecar_agent_mode_binary)
    # Beside it, a sidecar of this release: the agent sees one of each version.
    q = a.pod()
    q.link("net1", e.multus.mac, w.v4(98))
    current = q.start_sidecar(["net1"])
    wait_for(lambda: current.probe() == 200, "this release's sidecar ready")
    wait_for(lambda: a.agent.metric("multus_eni_agent_sidecars", 'protocol="2"') == 1, "one v2 sidecar counted")
    assert a.agent.metric("multus_eni_agent_sidecars", 'protocol="1"') == 1
    # The old sidecar's release (SIGTERM) is answered in its own version: it exits cleanly.
    assert s.terminate() == 0


# === the node's view and EC2's answers decide readiness ===


def test_a_missing_netns_dir_is_an_unknown_node_not_an_empty_one(cluster):
    """The agent starts while --netns-dir is missing: not ready, over several resyncs. The
    directory appears: ready, the pod is managed. It is moved away (unreadable): not ready
    again and nothing is released or reclaimed (--reclaim-after is 4 s); it comes back: ready."""
    a = cluster.node(start=False)
    e, w = a.enis, cluster.world
    address = w.v4(110)
    netns_dir = a.agent.netns_dir
    parked = netns_dir.with_name("netns-away")
    p = a.pod()
    p.link("net1", e.multus.mac, address)
    netns_dir.rename(parked)
    a.agent.start()
    cluster.resyncs(a)
    assert a.agent.http("/readyz")[0] == 503, "ready without its pods' namespaces"
    assert not cluster.calls(ASSIGNS + UNASSIGNS)
    parked.rename(netns_dir)
    wait_for(lambda: a.agent.http("/readyz")[0] == 200, "ready once the directory exists")
    wait_for(lambda: cluster.holds(e.multus, address), "the pod's address assigned")
    netns_dir.rename(parked)
    wait_for(lambda: a.agent.http("/readyz")[0] == 503, "not ready while the directory is gone")
    cluster.resyncs(a, 4)
    assert cluster.holds(e.multus, address), "released while the node's pods were unknown"
    assert not cluster.calls(UNASSIGNS, address)
    assert a.agent.metric("multus_eni_agent_reclaims_total") == 0
    parked.rename(netns_dir)
    wait_for(lambda: a.agent.http("/readyz")[0] == 200, "ready again")
    assert cluster.holds(e.multus, address)


def test_credential_errors_make_the_agent_not_ready_until_ec2_accepts_it(cluster):
    """EC2 answers UnauthorizedOperation (no IAM policy on the node role): the agent is not
    ready, says so in a gauge and in `status`, and backs off (`--auth-backoff`: 30 s by default,
    12 s here, then doubling), not a call per resync; once EC2 accepts it again it becomes ready
    without a restart."""
    from lib.fault_proxy import UNAUTHORIZED

    # 12 s: longer than the 10 s window below (at most one call in it), and the test waits the
    # first backoff (12-24 s with jitter) instead of the default's 30-60 s.
    backoff = ["--auth-backoff=12s"] if supports_flag(cluster.agent_binary, "--auth-backoff") else []
    a = cluster.node(*FAST, *backoff, start=False)
    cluster.proxy.inject(UNAUTHORIZED, 1000, DESCRIBE)
    a.agent.start()
    wait_for(lambda: a.agent.metric("multus_eni_agent_ec2_auth_failing") == 1, "the credentials gauge")
    assert a.agent.http("/readyz")[0] == 503
    status = a.agent.status()
    assert "UnauthorizedOperation" in (status.get("last_ec2_error") or ""), status
    # --resync-interval is 2 s: a call per resync would be ~5 in 10 s; the backoff allows 1.
    seen = cluster.proxy.calls(DESCRIBE)
    time.sleep(10)
    assert cluster.proxy.calls(DESCRIBE) - seen <= 1, "credential errors are retried at the resync pace"
    cluster.proxy.reset()
    wait_for(lambda: a.agent.http("/readyz")[0] == 200, "ready once EC2 accepts the agent", timeout=120)
    assert a.agent.metric("multus_eni_agent_ec2_auth_failing") == 0


def test_the_status_command_prints_the_nodes_table(cluster):
    """`multus-eni-agent status` (what an operator runs with kubectl exec) prints each pod
    address with its ENI and state, as table and as JSON."""
    import json
    import subprocess

    a = cluster.node()
    e, w = a.enis, cluster.world
    routable, refused = w.v4(120), e.vpc_cni_v4
    p = a.pod()
    p.link("net1", e.multus.mac, routable, refused)
    wait_for(lambda: cluster.holds(e.multus, routable), "the pod's address assigned")
    wait_for(lambda: [s["state"] for s in a.agent.status_of(routable)] == ["routable"], "the table says routable")

    def run_status(*args: str) -> str:
        argv = [str(a.agent.binary), "status", f"--addr=127.0.0.1:{a.agent.metrics_port}", *args]
        out = subprocess.run(a.agent.ns.exec_argv(argv), capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    table = run_status().splitlines()
    assert table[0].startswith(f"instance {e.instance_id}  ready true"), table[0]
    rows = {line.split()[2]: line.split() for line in table[2:]}
    assert rows[routable][3:5] == [e.multus.id, "routable"], rows
    assert rows[refused][4] == "refused" and e.vpc_cni.id in " ".join(rows[refused]), rows
    as_json = json.loads(run_status("--output=json"))
    assert {r["address"]: r["state"] for r in as_json["addresses"]} == {routable: "routable", refused: "refused"}
