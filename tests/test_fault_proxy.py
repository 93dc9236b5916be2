"""The EC2 emulator's fidelity where the agent depends on it: boto3 through the fault proxy in
front of moto, each behaviour in which moto differs from EC2 checked on its own, so that a
fidelity bug shows up as itself and not as an agent test failing for a reason it does not name.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest
from botocore.exceptions import ClientError

from lib import moto
from lib.fault_proxy import COMBINATION, IN_USE, INVALID, LIMIT_EXCEEDED, NO_FREE_BLOCK, NOT_ASSIGNED


@pytest.fixture
def world(emulator) -> moto.World:
    emulator.proxy.reset()
    yield moto.build_world(emulator.ns, emulator.direct, extra_enis=2)
    emulator.proxy.reset()


def via_proxy(emulator, fn) -> Any:
    """`fn(ec2)` with a boto3 client that talks to the proxy, on a thread in its namespace."""
    return emulator.ns.call(lambda: fn(moto.client(emulator.endpoint)))


def ids(answer: dict[str, Any]) -> set[str]:
    return {n["NetworkInterfaceId"] for n in answer["NetworkInterfaces"]}


def test_reassignment_moves_an_ipv4_secondary_off_its_old_eni(emulator, world):
    a, b = world.enis
    address = world.v4(40)
    moto.assign(emulator.ns, emulator.direct, a.id, address)
    assert emulator.eni(a.id).holds(address)
    via_proxy(
        emulator,
        lambda ec2: ec2.assign_private_ip_addresses(
            NetworkInterfaceId=b.id, PrivateIpAddresses=[address], AllowReassignment=True
        ),
    )
    assert emulator.eni(b.id).holds(address)
    assert not emulator.eni(a.id).holds(address), "EC2 moves the address; moto alone copies it"
    assert emulator.eni(a.id).holds(a.primary_ip)


def test_assign_without_reassignment_of_a_held_address_fails(emulator, world):
    a, b = world.enis
    address = world.v4(41)
    moto.assign(emulator.ns, emulator.direct, a.id, address)
    with pytest.raises(ClientError) as e:
        via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=b.id, PrivateIpAddresses=[address]))
    assert e.value.response["Error"]["Code"] == IN_USE
    assert emulator.eni(a.id).holds(address) and not emulator.eni(b.id).holds(address)


def test_another_enis_primary_is_never_reassigned(emulator, world):
    a, b = world.enis
    with pytest.raises(ClientError) as e:
        via_proxy(
            emulator,
            lambda ec2: ec2.assign_private_ip_addresses(
                NetworkInterfaceId=b.id, PrivateIpAddresses=[a.primary_ip], AllowReassignment=True
            ),
        )
    assert e.value.response["Error"]["Code"] == IN_USE
    assert emulator.eni(a.id).holds(a.primary_ip) and not emulator.eni(b.id).holds(a.primary_ip)


def test_an_ipv6_address_held_by_another_eni_is_not_assigned(emulator, world):
    a, b = world.enis
    address = world.v6(0x40)
    moto.assign(emulator.ns, emulator.direct, a.id, address)
    with pytest.raises(ClientError) as e:
        via_proxy(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=b.id, Ipv6Addresses=[address]))
    assert e.value.response["Error"]["Code"] == NOT_ASSIGNED
    assert emulator.eni(a.id).holds(address) and not emulator.eni(b.id).holds(address)
    # Free again: assigned.
    moto.unassign(emulator.ns, emulator.direct, a.id, address)
    via_proxy(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=b.id, Ipv6Addresses=[address]))
    assert emulator.eni(b.id).holds(address)


def test_the_address_filter_matches_secondaries_and_primaries(emulator, world):
    a, b = world.enis
    secondary = world.v4(42)
    moto.assign(emulator.ns, emulator.direct, a.id, secondary)

    def by_address(*values: str):
        return lambda ec2: ec2.describe_network_interfaces(
            Filters=[{"Name": "addresses.private-ip-address", "Values": list(values)}]
        )

    assert ids(via_proxy(emulator, by_address(secondary))) == {a.id}
    assert ids(via_proxy(emulator, by_address(b.primary_ip))) == {b.id}
    assert ids(via_proxy(emulator, by_address(secondary, b.primary_ip))) == {a.id, b.id}
    assert ids(via_proxy(emulator, by_address(world.v4(43)))) == set()
    # Combined with a filter moto applies itself.
    both = via_proxy(
        emulator,
        lambda ec2: ec2.describe_network_interfaces(
            Filters=[
                {"Name": "addresses.private-ip-address", "Values": [secondary, b.primary_ip]},
                {"Name": "network-interface-id", "Values": [b.id]},
            ]
        ),
    )
    assert ids(both) == {b.id}
    # The answer keeps everything moto says about the ENI.
    (eni,) = via_proxy(emulator, by_address(secondary))["NetworkInterfaces"]
    assert eni["MacAddress"] == a.mac and {"Key": "node.k8s.amazonaws.com/no_manage", "Value": "true"} in eni["TagSet"]


def test_the_ipv6_filter_is_answered_and_can_be_rejected(emulator, world):
    a, b = world.enis
    address = world.v6(0x44)
    moto.assign(emulator.ns, emulator.direct, b.id, address)

    def by_v6(value: str):
        return lambda ec2: ec2.describe_network_interfaces(
            Filters=[{"Name": "ipv6-addresses.ipv6-address", "Values": [value]}]
        )

    assert ids(via_proxy(emulator, by_v6(address))) == {b.id}
    assert ids(via_proxy(emulator, by_v6(world.v6(0x45)))) == set()
    emulator.proxy.reject_filter("ipv6-addresses.ipv6-address")
    with pytest.raises(ClientError) as e:
        via_proxy(emulator, by_v6(address))
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500


def test_the_instance_filter_lists_exactly_the_enis_attached_there(emulator, world):
    answer = via_proxy(
        emulator,
        lambda ec2: ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": [world.instance_id]}]),
    )
    assert ids(answer) == {world.eth0.id, *(e.id for e in world.enis)}
    assert all(n["Attachment"]["InstanceId"] == world.instance_id for n in answer["NetworkInterfaces"])
    nowhere = via_proxy(
        emulator,
        lambda ec2: ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": ["i-0000000000000000"]}]),
    )
    assert ids(nowhere) == set()


def test_pages_when_asked(emulator, world):
    emulator.proxy.page_size = 2
    pages = via_proxy(
        emulator,
        lambda ec2: list(
            ec2.get_paginator("describe_network_interfaces").paginate(
                Filters=[{"Name": "subnet-id", "Values": [world.subnet_id]}]
            )
        ),
    )
    assert [len(p["NetworkInterfaces"]) for p in pages] == [2, 1]
    assert set().union(*(ids(p) for p in pages)) == {world.eth0.id, *(e.id for e in world.enis)}
    assert [r.param("NextToken") for r in emulator.proxy.requests("DescribeNetworkInterfaces")] == [None, "fp-2"]


def refusal(emulator, fn) -> tuple[str, str]:
    """EC2's error code and message for `fn(ec2)` through the proxy (fails if it succeeded)."""
    with pytest.raises(ClientError) as e:
        via_proxy(emulator, fn)
    return e.value.response["Error"]["Code"], e.value.response["Error"]["Message"]


def described(emulator, eni_id: str) -> dict[str, Any]:
    (eni,) = via_proxy(emulator, lambda ec2: ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id]))[
        "NetworkInterfaces"
    ]
    return eni


def v4_prefixes(emulator, eni_id: str) -> set[str]:
    return {p["Ipv4Prefix"] for p in described(emulator, eni_id).get("Ipv4Prefixes", [])}


def v6_prefixes(emulator, eni_id: str) -> set[str]:
    return {p["Ipv6Prefix"] for p in described(emulator, eni_id).get("Ipv6Prefixes", [])}


def v4_block(world: moto.World, host: int) -> str:
    """The /28 of the world's subnet that starts at host `host` (a multiple of 16)."""
    return f"{world.v4(host)}/28"


def v6_block(world: moto.World, index: int) -> str:
    """The `index`-th /80 of the world's subnet /64."""
    net = ipaddress.IPv6Network(f"{world.ipv6_prefix}/64")
    return str(next(itertools.islice(net.subnets(new_prefix=80), index, None)))


# === one address change at a time ===


def race(emulator, action: str, calls: list) -> list[BaseException | None]:
    """Send `calls` (each `fn(ec2)`) at once: the proxy holds `action` until every call has
    arrived, then lets them all go together. Returns each call's error (None: it succeeded)."""
    emulator.proxy.hold(action)
    futures = [emulator.ns.submit(lambda fn=fn: fn(moto.client(emulator.endpoint))) for fn in calls]
    deadline = time.monotonic() + 20
    while emulator.proxy.calls(action) < len(calls):
        assert time.monotonic() < deadline, "the racing calls never reached the proxy"
        time.sleep(0.02)
    emulator.proxy.release()
    out: list[BaseException | None] = []
    for f in futures:
        try:
            f.result(30)
            out.append(None)
        except ClientError as e:
            out.append(e)
    return out


def test_two_concurrent_assigns_of_one_address_to_two_enis_exactly_one_succeeds(emulator, world):
    """EC2 carries out one change of an address at a time: the loser sees the address held."""
    a, b = world.enis
    for host in (50, 51, 52):
        address = world.v4(host)
        errors = race(
            emulator,
            "AssignPrivateIpAddresses",
            [
                lambda ec2, e=e: ec2.assign_private_ip_addresses(NetworkInterfaceId=e.id, PrivateIpAddresses=[address])
                for e in (a, b)
            ],
        )
        assert sum(e is None for e in errors) == 1, errors
        (lost,) = [e for e in errors if e is not None]
        assert lost.response["Error"]["Code"] == IN_USE
        holders = [e.id for e in (a, b) if emulator.eni(e.id).holds(address)]
        assert len(holders) == 1, f"{address} on {holders}: moto copied it"


def test_concurrent_reassignments_leave_the_address_on_exactly_one_eni(emulator, world):
    a, b = world.enis
    address = world.v4(53)
    errors = race(
        emulator,
        "AssignPrivateIpAddresses",
        [
            lambda ec2, e=e: ec2.assign_private_ip_addresses(
                NetworkInterfaceId=e.id, PrivateIpAddresses=[address], AllowReassignment=True
            )
            for e in (a, b)
        ],
    )
    assert errors == [None, None], "a reassignment of a held secondary moves it"
    assert [emulator.eni(e.id).holds(address) for e in (a, b)].count(True) == 1


# === the index sees what bypasses the proxy ===


def test_a_write_straight_to_moto_is_seen_by_the_next_change(emulator, world):
    a, b = world.enis
    address = world.v4(54)
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, PrivateIpAddresses=[address]))
    moto.unassign(emulator.ns, emulator.direct, a.id, address)
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=b.id, PrivateIpAddresses=[address]))
    assert emulator.eni(b.id).holds(address), "the index still had the address on the first ENI"
    moto.unassign(emulator.ns, emulator.direct, b.id, address)
    moto.assign(emulator.ns, emulator.direct, a.id, address)
    code, _ = refusal(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=b.id, PrivateIpAddresses=[address]))
    assert code == IN_USE


def raw_assign(emulator, eni_id: str, address: str) -> None:
    """An Assign straight to moto over plain HTTP: nothing reports it to the proxy."""

    def send() -> int:
        body = urllib.parse.urlencode(
            {"Action": "AssignPrivateIpAddresses", "Version": "2016-11-15", "NetworkInterfaceId": eni_id, "PrivateIpAddress.1": address}
        ).encode()
        auth = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=0"
        request = urllib.request.Request(emulator.direct + "/", body, {"Authorization": auth}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status

    assert emulator.ns.call(send) == 200


def test_a_describe_answer_refreshes_what_the_proxy_knows_of_an_eni(emulator, world):
    a, b = world.enis
    address = world.v4(55)
    # The index is read (this change), then moto changes behind the proxy's back.
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=b.id, PrivateIpAddresses=[world.v4(56)]))
    raw_assign(emulator, a.id, address)
    # A filtered read through the proxy shows the address on its ENI: from then on it is held.
    assert address in {p["PrivateIpAddress"] for p in described(emulator, a.id)["PrivateIpAddresses"]}
    code, _ = refusal(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=b.id, PrivateIpAddresses=[address]))
    assert code == IN_USE
    assert not emulator.eni(b.id).holds(address)


# === unassigning what the ENI does not hold ===


def test_an_ipv4_unassign_naming_an_address_not_held_fails_as_a_whole(emulator, world):
    a, _ = world.enis
    held, other = world.v4(57), world.v4(58)
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, PrivateIpAddresses=[held]))
    code, message = refusal(
        emulator, lambda ec2: ec2.unassign_private_ip_addresses(NetworkInterfaceId=a.id, PrivateIpAddresses=[held, other])
    )
    assert (code, message) == (NOT_ASSIGNED, f"Some of the specified addresses are not assigned to interface {a.id}")
    assert emulator.eni(a.id).holds(held), "EC2 unassigns nothing when it refuses the call"


def test_an_ipv6_unassign_naming_an_address_not_held_fails_as_a_whole(emulator, world):
    a, _ = world.enis
    held, other = world.v6(0x57), world.v6(0x58)
    via_proxy(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=a.id, Ipv6Addresses=[held]))
    code, message = refusal(
        emulator, lambda ec2: ec2.unassign_ipv6_addresses(NetworkInterfaceId=a.id, Ipv6Addresses=[held, other])
    )
    assert (code, message) == (NOT_ASSIGNED, f"Some of the specified addresses are not assigned to interface {a.id}")
    assert emulator.eni(a.id).holds(held)
    via_proxy(emulator, lambda ec2: ec2.unassign_ipv6_addresses(NetworkInterfaceId=a.id, Ipv6Addresses=[held]))
    assert not emulator.eni(a.id).holds(held)


def test_an_enis_primary_address_is_not_unassigned(emulator, world):
    a, _ = world.enis
    code, message = refusal(
        emulator, lambda ec2: ec2.unassign_private_ip_addresses(NetworkInterfaceId=a.id, PrivateIpAddresses=[a.primary_ip])
    )
    assert code == INVALID and "primary" in message
    assert emulator.eni(a.id).holds(a.primary_ip), "moto alone removes it"


# === prefixes ===


def test_an_ipv4_prefix_is_assigned_described_and_unassigned(emulator, world):
    a, b = world.enis
    prefix = v4_block(world, 128)
    answer = via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4Prefixes=[prefix]))
    assert answer["AssignedIpv4Prefixes"] == [{"Ipv4Prefix": prefix}] and answer["NetworkInterfaceId"] == a.id
    assert v4_prefixes(emulator, a.id) == {prefix} and v4_prefixes(emulator, b.id) == set()
    assert emulator.proxy.prefixes(a.id) == {prefix}
    (call,) = [r for r in emulator.proxy.requests("AssignPrivateIpAddresses") if r.values("Ipv4Prefix")]
    assert call.values("Ipv4Prefix") == [prefix] and call.status == 200
    # Listed by an instance-wide read too, beside what moto says of the ENI.
    listed = via_proxy(
        emulator,
        lambda ec2: ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": [world.instance_id]}]),
    )["NetworkInterfaces"]
    (eni,) = [n for n in listed if n["NetworkInterfaceId"] == a.id]
    assert eni["Ipv4Prefixes"] == [{"Ipv4Prefix": prefix}] and eni["MacAddress"] == a.mac
    via_proxy(emulator, lambda ec2: ec2.unassign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4Prefixes=[prefix]))
    assert v4_prefixes(emulator, a.id) == set() and emulator.proxy.prefixes(a.id) == set()


def test_an_ipv4_prefix_count_picks_free_aligned_blocks_of_the_subnet(emulator, world):
    a, b = world.enis
    taken = v4_block(world, 16)
    held = world.v4(33)  # in the /28 at .32
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=b.id, Ipv4Prefixes=[taken]))
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=b.id, PrivateIpAddresses=[held]))
    answer = via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4PrefixCount=2))
    picked = {p["Ipv4Prefix"] for p in answer["AssignedIpv4Prefixes"]}
    assert len(picked) == 2 and v4_prefixes(emulator, a.id) == picked
    subnet = ipaddress.IPv4Network(world.subnet_cidr)
    for p in picked:
        net = ipaddress.IPv4Network(p)  # strict: raises if not on its boundary
        assert net.prefixlen == 28 and net.subnet_of(subnet) and p != taken
        assert ipaddress.IPv4Address(held) not in net and ipaddress.IPv4Address(a.primary_ip) not in net


def test_a_prefix_count_the_subnet_cannot_hold_is_refused(emulator, world):
    """The /24 has 16 blocks of /28; the first and the last hold addresses EC2 reserves."""
    a, _ = world.enis
    code, _ = refusal(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4PrefixCount=15))
    assert code == NO_FREE_BLOCK and emulator.proxy.prefixes(a.id) == set()
    answer = via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4PrefixCount=14))
    assert len(answer["AssignedIpv4Prefixes"]) == 14


def test_an_ipv6_prefix_is_assigned_described_and_unassigned(emulator, world):
    a, b = world.enis
    prefix = v6_block(world, 7)
    answer = via_proxy(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=a.id, Ipv6Prefixes=[prefix]))
    assert answer["AssignedIpv6Prefixes"] == [prefix]
    counted = via_proxy(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=b.id, Ipv6PrefixCount=1))
    (picked,) = counted["AssignedIpv6Prefixes"]
    assert ipaddress.IPv6Network(picked).prefixlen == 80 and picked != prefix
    assert ipaddress.IPv6Network(picked).subnet_of(ipaddress.IPv6Network(f"{world.ipv6_prefix}/64"))
    assert v6_prefixes(emulator, a.id) == {prefix} and v6_prefixes(emulator, b.id) == {picked}
    assert emulator.proxy.prefixes(b.id) == {picked}
    gone = via_proxy(emulator, lambda ec2: ec2.unassign_ipv6_addresses(NetworkInterfaceId=a.id, Ipv6Prefixes=[prefix]))
    assert gone["UnassignedIpv6Prefixes"] == [prefix]
    assert v6_prefixes(emulator, a.id) == set()


def test_prefixes_and_addresses_in_one_request_are_refused(emulator, world):
    a, _ = world.enis
    code, _ = refusal(
        emulator,
        lambda ec2: ec2.assign_private_ip_addresses(
            NetworkInterfaceId=a.id, PrivateIpAddresses=[world.v4(60)], Ipv4Prefixes=[v4_block(world, 144)]
        ),
    )
    assert code == COMBINATION
    code, _ = refusal(
        emulator,
        lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=a.id, Ipv6AddressCount=1, Ipv6Prefixes=[v6_block(world, 3)]),
    )
    assert code == COMBINATION
    assert v4_prefixes(emulator, a.id) == set() and not emulator.eni(a.id).holds(world.v4(60))


def test_a_prefix_another_eni_holds_is_refused(emulator, world):
    a, b = world.enis
    prefix, v6 = v4_block(world, 160), v6_block(world, 9)
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4Prefixes=[prefix]))
    via_proxy(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=a.id, Ipv6Prefixes=[v6]))
    code, message = refusal(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=b.id, Ipv4Prefixes=[prefix]))
    assert code == INVALID and "already assigned" in message
    code, message = refusal(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=b.id, Ipv6Prefixes=[v6]))
    assert code == INVALID and "already assigned" in message
    assert emulator.proxy.prefixes(a.id) == {prefix, v6} and emulator.proxy.prefixes(b.id) == set()


def test_a_prefix_over_an_individually_assigned_address_is_refused(emulator, world):
    a, b = world.enis
    address, v6 = world.v4(180), world.v6(0x20)
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, PrivateIpAddresses=[address]))
    moto.assign(emulator.ns, emulator.direct, a.id, v6)
    for eni in (a, b):  # another ENI's address, and the ENI's own
        code, message = refusal(
            emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=eni.id, Ipv4Prefixes=[v4_block(world, 176)])
        )
        assert code == INVALID and address in message
    v6_prefix = str(ipaddress.IPv6Network(f"{v6}/80", strict=False))
    code, _ = refusal(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=b.id, Ipv6Prefixes=[v6_prefix]))
    assert code == INVALID
    assert emulator.proxy.prefixes(a.id) == set() and emulator.proxy.prefixes(b.id) == set()


def test_a_misaligned_or_wrong_length_prefix_is_refused(emulator, world):
    a, _ = world.enis
    for bad in (f"{world.v4(200)}/28", f"{world.v4(192)}/27", f"{world.v4(192)}/29"):
        code, _ = refusal(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4Prefixes=[bad]))
        assert code == INVALID, bad
    misaligned_v6 = f"{world.v6(0x1000)}/80"
    code, _ = refusal(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=a.id, Ipv6Prefixes=[misaligned_v6]))
    assert code == INVALID
    assert emulator.proxy.prefixes(a.id) == set()


def test_a_prefix_outside_the_enis_subnet_is_refused(emulator, world):
    a, _ = world.enis
    outside = str(ipaddress.IPv4Network(world.subnet_cidr).network_address + 256) + "/28"  # the next /24
    code, message = refusal(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4Prefixes=[outside]))
    assert code == INVALID and "subnet" in message
    code, _ = refusal(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=a.id, Ipv6Prefixes=["2001:db8::/80"]))
    assert code == INVALID
    assert emulator.proxy.prefixes(a.id) == set()


def test_no_free_address_slot_is_refused(emulator, world):
    """Each prefix takes one of the ENI's address slots, as an address does (primary included)."""
    a, b = world.enis
    emulator.proxy.address_limit[a.id] = 3  # the primary + two more
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, PrivateIpAddresses=[world.v4(70)]))
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4Prefixes=[v4_block(world, 208)]))
    code, _ = refusal(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4Prefixes=[v4_block(world, 224)]))
    assert code == LIMIT_EXCEEDED
    code, _ = refusal(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, PrivateIpAddresses=[world.v4(71)]))
    assert code == LIMIT_EXCEEDED
    # Another ENI has no such limit; a freed slot takes the prefix.
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=b.id, PrivateIpAddresses=[world.v4(71)]))
    via_proxy(emulator, lambda ec2: ec2.unassign_private_ip_addresses(NetworkInterfaceId=a.id, PrivateIpAddresses=[world.v4(70)]))
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4Prefixes=[v4_block(world, 224)]))
    assert v4_prefixes(emulator, a.id) == {v4_block(world, 208), v4_block(world, 224)}
    # IPv6 slots are counted apart: with a limit of 1, `b` (two IPv4 addresses) takes one IPv6
    # prefix, and not a second.
    emulator.proxy.default_address_limit = 1
    via_proxy(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=b.id, Ipv6Prefixes=[v6_block(world, 11)]))
    code, _ = refusal(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=b.id, Ipv6Prefixes=[v6_block(world, 12)]))
    assert code == LIMIT_EXCEEDED
    assert v6_prefixes(emulator, b.id) == {v6_block(world, 11)}


def test_an_address_inside_a_prefix_is_not_assigned_individually(emulator, world):
    a, b = world.enis
    prefix, v6 = v4_block(world, 240), v6_block(world, 13)
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4Prefixes=[prefix]))
    via_proxy(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=a.id, Ipv6Prefixes=[v6]))
    inside = world.v4(245)
    for eni in (b, a):  # another ENI's prefix, and the ENI's own
        code, message = refusal(
            emulator,
            lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=eni.id, PrivateIpAddresses=[inside], AllowReassignment=True),
        )
        assert code == INVALID and prefix in message
        assert not emulator.eni(eni.id).holds(inside)
    inside_v6 = str(ipaddress.IPv6Network(v6).network_address + 5)
    code, _ = refusal(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=b.id, Ipv6Addresses=[inside_v6]))
    assert code == INVALID and not emulator.eni(b.id).holds(inside_v6)


def test_an_unassign_of_a_prefix_not_held_is_refused(emulator, world):
    a, b = world.enis
    prefix, v6 = v4_block(world, 96), v6_block(world, 15)
    via_proxy(emulator, lambda ec2: ec2.assign_private_ip_addresses(NetworkInterfaceId=a.id, Ipv4Prefixes=[prefix]))
    via_proxy(emulator, lambda ec2: ec2.assign_ipv6_addresses(NetworkInterfaceId=a.id, Ipv6Prefixes=[v6]))
    code, message = refusal(emulator, lambda ec2: ec2.unassign_private_ip_addresses(NetworkInterfaceId=b.id, Ipv4Prefixes=[prefix]))
    assert (code, message) == (NOT_ASSIGNED, f"Some of the specified addresses are not assigned to interface {b.id}")
    code, _ = refusal(emulator, lambda ec2: ec2.unassign_ipv6_addresses(NetworkInterfaceId=b.id, Ipv6Prefixes=[v6]))
    assert code == NOT_ASSIGNED
    assert emulator.proxy.prefixes(a.id) == {prefix, v6}
