"""End-to-end: the real sidecar binary against the moto EC2 emulator, both inside a network
namespace the test creates; pod interfaces are veth links carrying the ENIs' MACs. Direct mode,
so `multus-eni-sidecar`; two tests check that `multus-eni-sidecar-agent-mode` has no direct mode.

Convergence is awaited by bounded polling of the emulator; nothing here measures time.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lib.fault_proxy import SERVER_ERROR, THROTTLE
from lib.moto import World, assign, build_world, unassign
from lib.sidecar import DEFAULT_TIMEOUT, wait_for

ASSIGN4 = "AssignPrivateIpAddresses"
UNASSIGN4 = "UnassignPrivateIpAddresses"
ASSIGN6 = "AssignIpv6Addresses"
UNASSIGN6 = "UnassignIpv6Addresses"
DESCRIBE = "DescribeNetworkInterfaces"
MUTATING = {ASSIGN4, UNASSIGN4, ASSIGN6, UNASSIGN6}


def world(pod) -> World:
    w = build_world(pod.ns, pod.emulator.direct)
    pod.worlds.append(w)
    return w


def on_eni(pod, eni_id: str, *addresses: str) -> bool:
    state = pod.emulator.eni(eni_id)
    return all(state.holds(a) for a in addresses)


def off_eni(pod, eni_id: str, *addresses: str) -> bool:
    state = pod.emulator.eni(eni_id)
    return not any(state.holds(a) for a in addresses)


def mutating_calls_on(pod, eni_id: str) -> list:
    return [r for r in pod.emulator.proxy.requests() if r.action in MUTATING and r.param("NetworkInterfaceId") == eni_id]


def test_addresses_present_at_start_are_assigned_and_eth0_is_never_touched(pod):
    w = world(pod)
    eni = w.enis[0]
    eth0_before = pod.emulator.eni(w.eth0.id)
    pod.link("eth0", w.eth0.mac, w.eth0.primary_ip, w.v4(200))
    v4, v6 = w.v4(50), w.v6(0x50)
    pod.link("net1", eni.mac, v4, v6)

    s = pod.start_sidecar(["net1"])
    wait_for(lambda: on_eni(pod, eni.id, v4, v6), "net1's addresses on its ENI")
    wait_for(lambda: s.probe() == 200, "/readyz 200")
    assert s.probe("/healthz") == 200

    assert pod.emulator.eni(w.eth0.id) == eth0_before
    assert not mutating_calls_on(pod, w.eth0.id)
    proxy = pod.emulator.proxy
    # One call per kind for the ENI, nothing repeated.
    assert proxy.calls(ASSIGN4) == 1 and proxy.calls(ASSIGN6) == 1
    (a4,) = proxy.requests(ASSIGN4)
    assert a4.values("PrivateIpAddress") == [v4]
    assert a4.param("AllowReassignment") == "true"
    (lookup,) = [r for r in proxy.requests(DESCRIBE) if r.param("Filter.1.Name") == "mac-address"]
    assert lookup.values("Filter.1.Value") == [eni.mac]


def test_readiness_flips_from_503_to_200_once_assigned(pod):
    w = world(pod)
    eni = w.enis[0]
    pod.link("net1", eni.mac, w.v4(51))
    proxy = pod.emulator.proxy
    proxy.hold(ASSIGN4)
    s = pod.start_sidecar(["net1"])
    wait_for(lambda: proxy.calls(ASSIGN4) >= 1, "the assign call to reach EC2")
    wait_for(lambda: s.probe() is not None, "the probe to listen")
    assert s.probe() == 503
    proxy.release()
    wait_for(lambda: s.probe() == 200, "/readyz 200 after the assignment")
    assert on_eni(pod, eni.id, w.v4(51))


def test_added_and_removed_addresses_follow_netlink_events(pod):
    w = world(pod)
    eni = w.enis[0]
    pod.link("net1", eni.mac)
    s = pod.start_sidecar(["net1"])
    wait_for(lambda: s.probe() == 200, "ready with no addresses yet")
    proxy = pod.emulator.proxy

    v4, v6 = w.v4(60), w.v6(0x60)
    pod.add("net1", v4)
    wait_for(lambda: on_eni(pod, eni.id, v4), "added IPv4 on the ENI")
    pod.add("net1", v6)
    wait_for(lambda: on_eni(pod, eni.id, v6), "added IPv6 on the ENI")
    wait_for(lambda: s.probe() == 200, "ready again")
    assert proxy.calls(ASSIGN4) == 1 and proxy.calls(ASSIGN6) == 1

    pod.remove("net1", v4)
    wait_for(lambda: off_eni(pod, eni.id, v4), "removed IPv4 gone from the ENI")
    pod.remove("net1", v6)
    wait_for(lambda: off_eni(pod, eni.id, v6), "removed IPv6 gone from the ENI")
    assert proxy.calls(UNASSIGN4) == 1 and proxy.calls(UNASSIGN6) == 1
    assert on_eni(pod, eni.id, eni.primary_ip), "the primary IP stays"
    assert s.running()


def test_ipv4_held_by_another_eni_is_reassigned(pod):
    w = world(pod)
    ours, other = w.enis[0], w.enis[1]
    address = w.v4(70)
    assign(pod.ns, pod.emulator.direct, other.id, address)
    pod.link("net1", ours.mac, address)
    s = pod.start_sidecar(["net1"])
    wait_for(lambda: on_eni(pod, ours.id, address), "the address on our ENI")
    wait_for(lambda: s.probe() == 200, "ready")
    (call,) = pod.emulator.proxy.requests(ASSIGN4)
    # EC2 moves it thanks to AllowReassignment (moto copies; we do not rely on either).
    assert call.param("AllowReassignment") == "true"
    assert not mutating_calls_on(pod, other.id)


def test_ipv6_held_by_another_eni_is_unassigned_there_first(pod):
    w = world(pod)
    ours, other = w.enis[0], w.enis[1]
    address = w.v6(0x70)
    assign(pod.ns, pod.emulator.direct, other.id, address)
    pod.link("net1", ours.mac, address)
    s = pod.start_sidecar(["net1"])
    wait_for(lambda: on_eni(pod, ours.id, address), "the IPv6 on our ENI")
    assert off_eni(pod, other.id, address)
    wait_for(lambda: s.probe() == 200, "ready")
    proxy = pod.emulator.proxy
    (unassign_call,) = proxy.requests(UNASSIGN6)
    (assign_call,) = proxy.requests(ASSIGN6)
    assert unassign_call.param("NetworkInterfaceId") == other.id
    assert assign_call.param("NetworkInterfaceId") == ours.id
    assert unassign_call.arrived < assign_call.arrived


def test_interface_that_appears_late_is_waited_for(pod):
    w = world(pod)
    eni = w.enis[0]
    s = pod.start_sidecar(["net1"])
    wait_for(lambda: "does not exist yet" in s.log_text(), "the waiting log line")
    wait_for(lambda: s.probe() == 503, "/readyz 503 while net1 is missing")
    pod.link("net1", eni.mac, w.v4(80), w.v6(0x80))
    wait_for(lambda: on_eni(pod, eni.id, w.v4(80), w.v6(0x80)), "the late interface's addresses on the ENI")
    wait_for(lambda: s.probe() == 200, "ready")


def test_throttling_and_server_errors_converge_with_bounded_calls(pod):
    w = world(pod)
    eni = w.enis[0]
    proxy = pod.emulator.proxy
    proxy.inject(THROTTLE, 2, action=ASSIGN4)
    proxy.inject(SERVER_ERROR, 2, action=DESCRIBE)
    proxy.inject(THROTTLE, 1, action=ASSIGN6)
    pod.link("net1", eni.mac, w.v4(90), w.v6(0x90))
    s = pod.start_sidecar(["net1"])
    wait_for(lambda: on_eni(pod, eni.id, w.v4(90), w.v6(0x90)), "convergence despite faults")
    wait_for(lambda: s.probe() == 200, "ready")
    faulted = [r for r in proxy.requests() if r.fault]
    assert len(faulted) == 5, proxy.counts()
    # A throttled call costs exactly itself: the SDK does not retry it against the empty
    # bucket, the event loop does, after its backoff.
    assert proxy.calls(ASSIGN4) == 2 + 1, proxy.counts()
    assert proxy.calls(ASSIGN6) == 1 + 1, proxy.counts()
    assert proxy.calls() <= 5 + 8, proxy.counts()
    loop_retries = [l for l in s.logs() if l.get("outcome") == "retry"]
    # The throttled IPv6 Assign does not hold the IPv4 one back: both are made in the first
    # pass, the second pass retries both, the third the IPv4 one alone.
    assert len(loop_retries) == 2, loop_retries
    assert all("RequestLimitExceeded" in l.get("error", "") for l in loop_retries), loop_retries
    # Server errors are retried by the SDK within the pass: the loop never saw them.
    assert not any("InternalError" in l.get("error", "") for l in s.logs()), s.log_text()


def test_resync_while_throttled_does_not_describe_again(pod):
    w = world(pod)
    eni = w.enis[0]
    proxy = pod.emulator.proxy
    proxy.inject(THROTTLE, 2, action=ASSIGN4)
    pod.link("net1", eni.mac, w.v4(95))
    # Resyncs every ~1 s fall inside the 2–4 s and 4–8 s waits after the throttled calls.
    s = pod.start_sidecar(["net1"], "--resync-interval", "1s")
    wait_for(lambda: on_eni(pod, eni.id, w.v4(95)), "assigned after the throttling")
    # moto may show the address before the proxy has recorded the answer it forwarded.
    wait_for(lambda: any(r.action == ASSIGN4 and r.status == 200 for r in proxy.requests()), "answer recorded")
    calls = proxy.requests()
    assigned = next(i for i, r in enumerate(calls) if r.action == ASSIGN4 and r.status == 200)
    before = [r.action for r in calls[:assigned]]
    assert before == [DESCRIBE, ASSIGN4, ASSIGN4], before
    # Once calls succeed again, the resync reads the ENI as before.
    wait_for(lambda: proxy.calls(DESCRIBE) >= 2, "a resync after the recovery")
    assert s.probe() == 200


def test_sigterm_releases_only_our_addresses_and_exits_0(pod):
    w = world(pod)
    eni, other = w.enis[0], w.enis[1]
    mine4, mine6, moved = w.v4(100), w.v6(0x100), w.v4(101)
    neighbour = w.v4(102)  # another pod's address on the same ENI
    assign(pod.ns, pod.emulator.direct, eni.id, neighbour)
    pod.link("net1", eni.mac, mine4, mine6, moved)
    s = pod.start_sidecar(["net1"])
    wait_for(lambda: on_eni(pod, eni.id, mine4, mine6, moved), "assigned")
    # Someone moves one of our addresses to another ENI meanwhile; the sidecar is not told.
    unassign(pod.ns, pod.emulator.direct, eni.id, moved)
    assign(pod.ns, pod.emulator.direct, other.id, moved)
    pod.emulator.proxy.reset()

    assert s.terminate() == 0
    assert off_eni(pod, eni.id, mine4, mine6)
    assert on_eni(pod, eni.id, neighbour, eni.primary_ip)
    assert on_eni(pod, other.id, moved)
    assert not mutating_calls_on(pod, other.id)
    # The release starts from the sidecar's own picture (no Describe); EC2 rejects the
    # Unassign that still names the moved address, and only then is the ENI read again.
    calls = pod.emulator.proxy.requests()
    first, retried = [r for r in calls if r.action == UNASSIGN4]
    assert calls[0].action != DESCRIBE, [r.action for r in calls]
    assert sorted(first.values("PrivateIpAddress")) == sorted([mine4, moved]), first.params
    assert first.error == "InvalidParameterValue", first
    assert [r.action for r in calls[calls.index(first) + 1 :]].count(DESCRIBE) == 1, [r.action for r in calls]
    assert retried.values("PrivateIpAddress") == [mine4] and retried.status == 200, retried


def test_release_on_exit_false_keeps_addresses(pod):
    w = world(pod)
    eni = w.enis[0]
    pod.link("net1", eni.mac, w.v4(110))
    s = pod.start_sidecar(["net1"], "--release-on-exit", "false")
    wait_for(lambda: on_eni(pod, eni.id, w.v4(110)), "assigned")
    assert s.terminate() == 0
    assert on_eni(pod, eni.id, w.v4(110))


def test_mac_without_eni_warns_and_does_not_block_readiness(pod):
    w = world(pod)
    eni = w.enis[0]
    pod.link("net1", eni.mac, w.v4(120))
    pod.link("net2", "02:42:ac:11:00:02", "192.168.77.7")
    s = pod.start_sidecar(["net1", "net2"])
    wait_for(lambda: on_eni(pod, eni.id, w.v4(120)), "net1 assigned")
    wait_for(lambda: s.probe() == 200, "ready although net2 has no ENI")
    warnings = [l for l in s.logs() if l.get("outcome") == "no_eni"]
    assert len(warnings) == 1 and warnings[0].get("interface") == "net2", warnings
    assert all("192.168.77.7" not in r.values("PrivateIpAddress") for r in pod.emulator.proxy.requests(ASSIGN4))


def test_missing_no_manage_tag_is_warned_about_once(pod):
    w = world(pod)
    eni = w.enis[0]
    pod.ns.call(
        lambda: __import__("lib.moto", fromlist=["client"])
        .client(pod.emulator.direct)
        .delete_tags(Resources=[eni.id], Tags=[{"Key": "node.k8s.amazonaws.com/no_manage"}])
    )
    pod.link("net1", eni.mac, w.v4(130))
    s = pod.start_sidecar(["net1"])
    wait_for(lambda: on_eni(pod, eni.id, w.v4(130)), "assigned anyway")
    warnings = [l for l in s.logs() if l.get("outcome") == "missing_no_manage_tag"]
    assert len(warnings) == 1 and warnings[0].get("eni") == eni.id


def test_resync_heals_drift(pod):
    w = world(pod)
    eni = w.enis[0]
    pod.link("net1", eni.mac, w.v4(140))
    s = pod.start_sidecar(["net1"], "--resync-interval", "1s")
    wait_for(lambda: on_eni(pod, eni.id, w.v4(140)), "assigned")
    unassign(pod.ns, pod.emulator.direct, eni.id, w.v4(140))
    wait_for(lambda: on_eni(pod, eni.id, w.v4(140)), "re-assigned by the resync")
    assert s.running()


def test_two_interfaces_on_two_enis_in_the_same_subnet(pod):
    w = world(pod)
    a, b = w.enis[0], w.enis[1]
    pod.link("net1", a.mac, w.v4(150))
    pod.link("n3", b.mac, w.v4(151))
    s = pod.start_sidecar(["net1", "n3"])
    wait_for(lambda: on_eni(pod, a.id, w.v4(150)) and on_eni(pod, b.id, w.v4(151)), "each on its own ENI")
    wait_for(lambda: s.probe() == 200, "ready")
    assert off_eni(pod, a.id, w.v4(151)) and off_eni(pod, b.id, w.v4(150))


def test_missing_credentials_log_the_fixes_and_keep_retrying(pod):
    w = world(pod)
    eni = w.enis[0]
    pod.link("net1", eni.mac, w.v4(160))
    s = pod.start_sidecar(["net1"], env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None})
    wait_for(lambda: len([l for l in s.logs() if l.get("outcome") == "retry"]) >= 3, "three failed attempts")
    assert s.running(), "no crash loop"
    errors = [l for l in s.logs() if l.get("level") == "ERROR" and l.get("outcome") == "retry"]
    assert len(errors) == 1, "one clear error, then quieter retries"
    for fix in ("hop limit to 2", "IRSA", "Pod Identity"):
        assert fix in errors[0]["message"]
    assert s.probe() == 503 and s.probe("/healthz") == 200
    assert pod.emulator.proxy.calls() == 0
    assert s.terminate() == 0


def test_the_agent_mode_binary_without_a_socket_refuses_to_start_and_calls_no_ec2(pod, sidecar_agent_mode_binary):
    """multus-eni-sidecar-agent-mode has no direct mode: given everything direct mode would use
    (credentials, region, the emulator's endpoint) but no --agent-socket, it must exit at once
    with the reason, not fall back to calling EC2 itself."""
    w = world(pod)
    eni = w.enis[0]
    v4 = w.v4(170)
    pod.link("net1", eni.mac, v4)
    s = pod.start_sidecar(["net1"], binary=sidecar_agent_mode_binary)
    assert s.proc is not None
    code = s.proc.wait(timeout=DEFAULT_TIMEOUT)
    assert code != 0
    text = s.log_text()
    for part in ("runs agent mode only", "--agent-socket", "/usr/local/bin/multus-eni-sidecar"):
        assert part in text, text
    assert s.probe("/healthz") is None, "it never listened"
    assert pod.emulator.proxy.calls() == 0
    assert not pod.emulator.eni(eni.id).holds(v4)

    # The same command line on the full binary is direct mode, which does call EC2.
    full = pod.start_sidecar(["net1"])
    wait_for(lambda: on_eni(pod, eni.id, v4), "the full binary's direct mode assigned it")
    assert full.terminate() == 0


def defined_symbols(binary) -> str | None:
    """`nm --defined-only` of a binary; None when it is stripped (a release build)."""
    nm = shutil.which("nm")
    assert nm, "nm (binutils, which cargo's linker needs anyway) is not on PATH"
    out = subprocess.run([nm, "--defined-only", str(binary)], capture_output=True, text=True, check=False)
    return out.stdout if out.returncode == 0 and out.stdout else None


def test_the_agent_mode_binary_links_no_aws_sdk(sidecar_binary, sidecar_agent_mode_binary):
    """Even from `cargo build --workspace`, where the sidecar library is built with `direct` for
    the full binary: the agent-mode binary never reaches direct mode, so the linker leaves the
    SDK, rustls and direct mode's code out of it."""
    full = defined_symbols(sidecar_binary)
    if full is None:
        pytest.skip("stripped binaries (release build): no symbols to inspect")
    markers = ("aws_sdk_ec2", "aws_config", "rustls", "run_direct")
    # The check sees them where they are linked in, so their absence below means something.
    assert all(m in full for m in markers), [m for m in markers if m not in full]
    agent_mode = defined_symbols(sidecar_agent_mode_binary)
    assert agent_mode and "run_agent_mode_only" in agent_mode
    assert [m for m in markers if m in agent_mode] == []


def test_tentative_ipv6_is_assigned_once_dad_completes(pod):
    w = world(pod)
    eni = w.enis[0]
    pod.link("net1", eni.mac)
    s = pod.start_sidecar(["net1"])
    wait_for(lambda: s.probe() == 200, "ready with no addresses yet")
    address = w.v6(0x170)
    pod.add("net1", address, nodad=False)  # the kernel runs DAD: tentative for ~1 s
    wait_for(lambda: on_eni(pod, eni.id, address), "the IPv6 on the ENI after DAD")
    wait_for(lambda: s.probe() == 200, "ready")
    (call,) = pod.emulator.proxy.requests(ASSIGN6)
    assert call.values("Ipv6Addresses") == [address]
    assert "still tentative" in s.log_text()


# === issue 12: no address lost to a signal, an error or a dropped event ===


def test_sigterm_while_an_assign_is_in_flight_releases_its_address(pod):
    w = world(pod)
    eni = w.enis[0]
    address = w.v4(180)
    proxy = pod.emulator.proxy
    proxy.hold_answer(ASSIGN4, 2.0)
    pod.link("net1", eni.mac, address)
    s = pod.start_sidecar(["net1"])
    # EC2 carried the Assign out; its answer is still on the way when SIGTERM arrives.
    wait_for(lambda: on_eni(pod, eni.id, address), "the Assign carried out")
    assert s.terminate() == 0
    assert off_eni(pod, eni.id, address), s.log_text()
    assert on_eni(pod, eni.id, eni.primary_ip)


def test_a_refused_ipv6_address_does_not_hold_back_the_others(pod):
    w = world(pod)
    a, b = w.enis[0], w.enis[1]
    bad6, good6 = w.v6(0x190), w.v6(0x191)
    a4, b4, b4_2 = w.v4(190), w.v4(191), w.v4(192)
    proxy = pod.emulator.proxy
    proxy.refuse(bad6)  # as EC2 refuses an address outside the subnet's prefix
    pod.link("net1", a.mac, a4, bad6, good6)
    pod.link("n3", b.mac, b4, b4_2)
    s = pod.start_sidecar(["net1", "n3"])
    wait_for(
        lambda: on_eni(pod, a.id, a4, good6) and on_eni(pod, b.id, b4, b4_2),
        "every address but the refused one on its ENI",
        timeout=30,
    )
    assert off_eni(pod, a.id, bad6)
    # /readyz and the log say which address is missing and why, with EC2's request id.
    wait_for(lambda: bad6 in (s.probe_text() or ""), "/readyz names the refused address")
    body = s.probe_text() or ""
    assert s.probe() == 503 and "InvalidParameterValue" in body, body
    failed = [l for l in s.logs() if l.get("outcome") == "failed" and bad6 in l.get("address", "")]
    assert failed and "request id fault-proxy" in failed[0].get("error", ""), failed
    # The refused address is narrowed down by halving: the good one was assigned alone.
    assert any(r.values("Ipv6Addresses") == [good6] and r.status == 200 for r in proxy.requests(ASSIGN6))


def test_an_address_added_after_a_rejected_one_is_assigned_without_waiting_for_it(pod):
    """A rejected address backs off on its own: an address added meanwhile goes in its own
    Assign at once, not in the rejected one's retry (issue 18: it waited out the rejected
    address's whole backoff). Asserted by the calls EC2 sees, not by time."""
    w = world(pod)
    eni = w.enis[0]
    bad6, late6 = w.v6(0x1A0), w.v6(0x1A1)
    proxy = pod.emulator.proxy
    proxy.refuse(bad6)
    pod.link("net1", eni.mac, w.v4(195), bad6)
    s = pod.start_sidecar(["net1"])

    def attempts(address: str) -> list:
        return [r for r in proxy.requests(ASSIGN6) if address in r.values("Ipv6Addresses")]

    wait_for(lambda: any(r.status != 200 for r in attempts(bad6)), "EC2's rejection of the bad address")
    pod.add("net1", late6)
    wait_for(lambda: on_eni(pod, eni.id, late6), "the late address on its ENI")
    first_late = attempts(late6)[0]
    # Its first Assign named it alone: the rejected address was not retried with it.
    assert first_late.values("Ipv6Addresses") == [late6], first_late.values("Ipv6Addresses")
    # The emulator may show the address on the ENI a moment before the proxy records its answer.
    wait_for(lambda: first_late.status != 0, "the proxy's record of the answer")
    assert first_late.status == 200
    # The rejected address keeps being retried on its own backoff, and stays off the ENI.
    wait_for(lambda: len(attempts(bad6)) >= 2, "a second attempt of the rejected address")
    assert all(r.values("Ipv6Addresses") == [bad6] for r in attempts(bad6)[1:])
    assert off_eni(pod, eni.id, bad6)
    assert s.probe() == 503


def test_dropped_netlink_events_are_recovered_without_a_resync(pod):
    w = world(pod)
    eni = w.enis[0]
    pod.link("net1", eni.mac, w.v4(200))
    s = pod.start_sidecar(["net1"], "--resync-interval", "10m")
    wait_for(lambda: s.probe() == 200, "ready")
    late = w.v4(201)
    # Starve the sidecar's netlink socket: while it is stopped, thousands of address events
    # overflow its receive buffer, and the kernel drops the last ones, our address among them.
    s.pause()
    try:
        flood = "".join(f"address add 169.254.{i // 250}.{i % 250 + 1}/32 dev net1 scope link\n" for i in range(3000))
        flood += "".join(f"address del 169.254.{i // 250}.{i % 250 + 1}/32 dev net1 scope link\n" for i in range(3000))
        flood += f"address add {late}/24 dev net1\n"
        subprocess.run(pod.ns.exec_argv(["ip", "-batch", "-"]), input=flood, text=True, check=True)
    finally:
        s.resume()
    wait_for(lambda: on_eni(pod, eni.id, late), "the address whose event was dropped on the ENI", timeout=30)
    assert any(l.get("outcome") == "overrun" for l in s.logs()), s.log_text()
    assert s.running()


def test_an_address_the_stale_picture_shows_on_the_eni_is_assigned_at_once(pod):
    w = world(pod)
    eni = w.enis[0]
    vip = w.v4(210)
    # Another pod on the node holds the VIP when the sidecar reads the ENI.
    assign(pod.ns, pod.emulator.direct, eni.id, vip)
    pod.link("net1", eni.mac, w.v4(211))
    s = pod.start_sidecar(["net1"], "--resync-interval", "10m")
    wait_for(lambda: s.probe() == 200, "ready")
    # That pod lets the VIP go and ours takes it over: our picture still shows it on the ENI.
    unassign(pod.ns, pod.emulator.direct, eni.id, vip)
    pod.add("net1", vip)
    wait_for(lambda: on_eni(pod, eni.id, vip), "the VIP on the ENI again", timeout=30)
    wait_for(lambda: s.probe() == 200, "ready")


IPV6_FILTER = "ipv6-addresses.ipv6-address"


def is_ipv6_holder_lookup(r) -> bool:
    return r.action == DESCRIBE and r.param("Filter.1.Name") == IPV6_FILTER


def test_a_5xx_on_the_ipv6_filter_does_not_give_it_up_for_good(pod):
    w = world(pod)
    eni = w.enis[0]
    proxy = pod.emulator.proxy
    # EC2's passing trouble: as many 500 InternalError as the SDK makes attempts.
    proxy.inject(SERVER_ERROR, 3, action=DESCRIBE, when=is_ipv6_holder_lookup)
    pod.link("net1", eni.mac, w.v6(0x220))
    s = pod.start_sidecar(["net1"])
    wait_for(lambda: on_eni(pod, eni.id, w.v6(0x220)), "the IPv6 on the ENI")
    lookups = [r for r in proxy.requests() if is_ipv6_holder_lookup(r)]
    # The filter was tried again after the 5xx (moto then answers it as an emulator that
    # lacks it does, and only that makes the sidecar read the subnet instead).
    assert len(lookups) > 3 and all(r.fault for r in lookups[:3]) and not lookups[3].fault, [
        (r.status, r.fault) for r in lookups
    ]
    assert s.running()


def test_a_throttled_ipv6_assign_does_not_look_up_the_holders_again(pod):
    w = world(pod)
    eni = w.enis[0]
    proxy = pod.emulator.proxy
    proxy.inject(THROTTLE, 2, action=ASSIGN6)
    pod.link("net1", eni.mac, w.v6(0x230))
    s = pod.start_sidecar(["net1"], "--resync-interval", "10m")
    wait_for(lambda: on_eni(pod, eni.id, w.v6(0x230)), "the IPv6 on the ENI")
    wait_for(lambda: s.probe() == 200, "ready")
    assert proxy.calls(ASSIGN6) == 3, proxy.counts()
    holder_lookups = [
        r for r in proxy.requests(DESCRIBE) if r.param("Filter.1.Name") in (IPV6_FILTER, "subnet-id")
    ]
    # One lookup (the filter, retried by the SDK on moto's 500, then the subnet), not one per retry.
    subnet_reads = [r for r in holder_lookups if r.param("Filter.1.Name") == "subnet-id"]
    assert len(subnet_reads) <= 1, [(r.param("Filter.1.Name"), r.status) for r in holder_lookups]


def test_a_region_imds_did_not_give_at_start_is_looked_for_again(pod):
    w = world(pod)
    eni = w.enis[0]
    proxy = pod.emulator.proxy
    proxy.imds_down = True
    try:
        pod.link("net1", eni.mac, w.v4(240))
        env = {
            "AWS_REGION": None,
            "AWS_EC2_METADATA_DISABLED": None,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": proxy.endpoint + "/",
        }
        s = pod.start_sidecar(["net1"], env=env)
        wait_for(lambda: any(l.get("outcome") == "no_region" for l in s.logs()), "no region at start")
        wait_for(lambda: any(l.get("outcome") == "retry" for l in s.logs()), "a failed pass")
        proxy.imds_down = False  # IMDS answers now (network up, hop limit fixed)
        wait_for(lambda: on_eni(pod, eni.id, w.v4(240)), "assigned once the region is found")
        assert any(l.get("outcome") == "region_found" for l in s.logs()), s.log_text()
    finally:
        proxy.imds_down = False
