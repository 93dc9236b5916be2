"""End-to-end: the agent under EC2 faults and early callers (issue 22, "Agent under faults at
scale" and "Sidecars learn at once"), on the two-node harness of tests/lib/nodes.py. Each test
failed on the agent before the issue.
"""

from __future__ import annotations

import os
import time

from lib import moto
from lib.nodes import ASSIGN4, UNASSIGN4, Cluster
from lib.nodes import cluster  # noqa: F401 (the fixture)
from lib.sidecar import wait_for


def test_an_unassign_refused_for_an_address_already_gone_releases_the_rest_at_once(cluster: Cluster):
    """A pod's two addresses are released in one Unassign, but one was already taken off the
    ENI: EC2 refuses the whole call without naming it. The agent reads the ENI and unassigns
    the other at once: two Unassign calls in all (halving the batch cost more, and each part
    waited a backoff of its own), nothing left on the ENI."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    gone, kept = w.v4(120), w.v4(121)
    p = a.pod()
    p.link("net1", e.multus.mac, gone, kept)
    wait_for(lambda: cluster.holds(e.multus, gone, kept), "both addresses assigned")
    moto.unassign(cluster.emulator.ns, cluster.emulator.direct, e.multus.id, gone)
    p.delete()
    wait_for(lambda: cluster.lacks(e.multus, kept), "the other address released")
    unassigns = cluster.calls((UNASSIGN4,))
    assert len(unassigns) == 2, [sorted(r.values("PrivateIpAddress")) for r in unassigns]
    assert unassigns[0].error == "InvalidParameterValue", unassigns[0]
    assert sorted(unassigns[1].values("PrivateIpAddress")) == [kept]
    cluster.resyncs(a, 2)
    assert cluster.lacks(e.multus, gone, kept)
    assert len(cluster.calls((UNASSIGN4,))) == 2


def test_an_assign_that_timed_out_is_read_back_before_anything_else(cluster: Cluster):
    """EC2 carries out an Assign but the answer never comes (every SDK attempt times out, 30 s):
    its outcome is unknown, so the agent reads the ENI before deciding anything for the address,
    finds it there, and sends no other Assign (it sent it again at once, as if not done)."""
    # No resync during the 30 s: what the agent knows of the ENI comes from its own calls.
    a = cluster.node("--resync-interval=120s", "--batch-interval=500ms")
    e, w = a.enis, cluster.world
    address = w.v4(125)
    for _ in range(4):
        cluster.proxy.hold_answer(ASSIGN4, 45)
    p = a.pod()
    p.link("net1", e.multus.mac, address)
    wait_for(lambda: cluster.holds(e.multus, address), "EC2 carried the Assign out")
    at = a.agent.first_timeout_at("Assign")
    wait_for(lambda: [s["state"] for s in a.agent.status_of(address)] == ["routable"], "routable after the read")
    time.sleep(3)  # the node-wide backoff after a timeout is 0.5 s: an assign sent again is in
    again = [r for r in cluster.calls((ASSIGN4,), address) if r.arrived_wall > at]
    assert not again, f"{len(again)} Assign calls after the timeout, before reading what EC2 did"


def test_a_sidecar_that_connects_before_its_namespace_is_read_is_held_not_refused(cluster: Cluster):
    """The sidecar connects before its pod's entry is in --netns-dir (the runtime is still
    creating it): it is held, then served once the entry appears; never refused as "not a pod"
    (47 sidecars of 1,000 were before)."""
    a = cluster.node()
    e, w = a.enis, cluster.world
    p = a.pod()
    os.unlink(p.link_path)
    p.link("net1", e.multus.mac, w.v4(126))
    s = p.start_sidecar(["net1"])
    time.sleep(1.5)
    os.symlink(p.ns.path, p.link_path)
    wait_for(lambda: s.probe() == 200, "the sidecar ready")
    assert a.agent.metric("multus_eni_agent_refusals_total", 'reason="not_a_pod"') == 0
