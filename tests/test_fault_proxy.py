"""The EC2 emulator's fidelity where the agent depends on it: boto3 through the fault proxy in
front of moto, each behaviour in which moto differs from EC2 checked on its own, so that a
fidelity bug shows up as itself and not as an agent test failing for a reason it does not name.
"""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from lib import moto
from lib.fault_proxy import IN_USE, NOT_ASSIGNED


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
