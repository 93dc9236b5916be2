"""A small HTTP proxy in front of the EC2 emulator that counts, times and breaks calls, and
answers as EC2 where moto does not.

It runs an asyncio loop on a thread inside the test's network namespace, so the sidecar
reaches it at 127.0.0.1 there. Every request is recorded with its EC2 `Action`, its
parameters and its arrival time (`time.monotonic()` when the request head was read): a
benchmark can compare those timestamps with the moment it changed an address to measure
the sidecar's reaction time. Faults are injected per action: throttling
(`RequestLimitExceeded`, EC2 XML error body, HTTP 503), server errors (HTTP 500
`InternalError`), optionally only for requests a predicate picks (one filter of
DescribeNetworkInterfaces); holding requests until released; or forwarding a request and
holding its answer for a while (EC2 carried the call out, the caller does not know yet).
It also answers as IMDSv2 for the region and, when `imds_instance_id` is set, the instance id
(`/latest/api/token`, `/latest/meta-data/placement/region`, `/latest/meta-data/instance-id`) when the sidecar's `AWS_EC2_METADATA_SERVICE_ENDPOINT`
points at it, with HTTP 500 while `imds_down` is set.
Addresses can be marked as refused: an Assign that names one fails as a whole with
`InvalidParameterValue`, as EC2 answers for an address outside the subnet.

EC2's refusals are decided from an index of who holds what (`_AddressIndex`: address or prefix
→ ENI), not by re-reading moto on every call: at 1,000 addresses on 50 ENIs an unfiltered read
per call made moto the bottleneck of every benchmark. The index is read from moto once (the
first mutating call), then kept up to date from the calls the proxy forwards and from every
DescribeNetworkInterfaces answer it passes on (filtered ones too). A write that bypasses the
proxy (a test's boto3 client straight to moto, `tests/lib/moto.client`) marks it stale, and the
next mutating call reads moto again; a write that bypasses both (raw HTTP to moto) is seen once
a DescribeNetworkInterfaces through the proxy shows the ENI. Mutating calls are serialized per ENI and per address
block (/28, /80), not globally: EC2 carries out one change of an address at a time, so two
Assigns of one address racing through the proxy cannot both succeed.

Where moto is laxer than EC2 the proxy answers as EC2 does:
- an UnassignPrivateIpAddresses or UnassignIpv6Addresses that names an address (or prefix) not
  on the ENI fails as a whole with `InvalidParameterValue`, "Some of the specified addresses are
  not assigned to interface eni-…" (moto drops the unknown address silently and unassigns the
  rest); an Unassign of the ENI's primary address fails with `InvalidParameterValue` (moto
  removes it);
- an AssignPrivateIpAddresses with `AllowReassignment=true` MOVES an address another ENI holds
  as a secondary (moto copies it: the proxy unassigns it from the other holder after moto
  answered); without `AllowReassignment`, or when the address is another ENI's primary, it fails
  with `PrivateIpAddressInUse` (moto copies it regardless);
- an AssignIpv6Addresses naming an address another ENI holds fails with
  `InvalidParameterValue` (IPv6 has no reassignment; moto copies it);
- DescribeNetworkInterfaces with filter `addresses.private-ip-address` matches secondary
  addresses too (moto matches only primaries), and filter `ipv6-addresses.ipv6-address` is
  answered (moto answers HTTP 500): the proxy forwards the call without those filters and drops
  the ENIs that do not match from moto's answer. `reject_filter(name)` restores an endpoint that
  does not know a filter (HTTP 500, as moto), to exercise a caller's fallback.
  (`attachment.instance-id`, `subnet-id`, `mac-address` and tag filters moto answers as EC2.)
- `page_size` (default None: one page, as EC2 without `MaxResults`) cuts DescribeNetworkInterfaces
  answers into pages of that many ENIs with a `nextToken`, to exercise a caller's pagination.
- prefixes (moto has none; this state is the proxy's own, `prefixes(eni_id)` reads it; it lives
  as long as the proxy, and `reset()` keeps it as moto keeps addresses):
  `Ipv4Prefix.N` / `Ipv4PrefixCount` on Assign/UnassignPrivateIpAddresses (/28) and
  `Ipv6Prefix.N` / `Ipv6PrefixCount` on Assign/UnassignIpv6Addresses (/80) are answered by the
  proxy itself (`assignedIpv4PrefixSet`, `assignedIpv6PrefixSet`, `unassignedIpv6PrefixSet`), and
  DescribeNetworkInterfaces answers carry `ipv4PrefixSet/item/ipv4Prefix` and
  `ipv6PrefixSet/item/ipv6Prefix`. Refused as EC2 does: prefixes and addresses in one request
  (`InvalidParameterCombination`); a prefix of the wrong length or not on its boundary, outside
  the ENI's subnet, held by another ENI, or holding an individually assigned address of any ENI
  (`InvalidParameterValue`); an individual address inside any ENI's prefix
  (`InvalidParameterValue`); no free block for a `PrefixCount` (`InsufficientCidrBlocks`); an
  Unassign of a prefix the ENI does not hold, as for an address (same code and message).
- address slots: with `address_limit[eni_id]` (or `default_address_limit`) set, an Assign that
  would put more IPv4 addresses + IPv4 prefixes (primary included), or more IPv6 addresses + IPv6
  prefixes, on the ENI fails with `PrivateIpAddressLimitExceeded` (each prefix takes one slot, as
  on EC2). Unset (the default), there is no limit, as in moto.
Not modelled: addresses moto picks itself for `SecondaryPrivateIpAddressCount` /
`Ipv6AddressCount` may fall in another ENI's prefix (the agent never asks for a count).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Any, AsyncIterator, Callable, Iterable

from . import moto
from .netns import NetNS

THROTTLE = "throttle"
SERVER_ERROR = "5xx"
UNAUTHORIZED = "unauthorized"

_ERRORS = {
    THROTTLE: (503, "Service Unavailable", "RequestLimitExceeded", "Request limit exceeded."),
    SERVER_ERROR: (500, "Internal Server Error", "InternalError", "An internal error has occurred."),
    UNAUTHORIZED: (403, "Forbidden", "UnauthorizedOperation", "You are not authorized to perform this operation."),
}
NOT_ASSIGNED = "InvalidParameterValue"
INVALID = "InvalidParameterValue"
IN_USE = "PrivateIpAddressInUse"
COMBINATION = "InvalidParameterCombination"
LIMIT_EXCEEDED = "PrivateIpAddressLimitExceeded"
NO_FREE_BLOCK = "InsufficientCidrBlocks"
EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15"
# DescribeNetworkInterfaces filters moto gets wrong: the proxy applies them to moto's answer.
PROXY_FILTERS = ("addresses.private-ip-address", "ipv6-addresses.ipv6-address")
# The prefix lengths EC2 delegates, per IP version.
PREFIX_LENGTH = {4: 28, 6: 80}
ADDRESS_ACTIONS = (
    "AssignPrivateIpAddresses",
    "UnassignPrivateIpAddresses",
    "AssignIpv6Addresses",
    "UnassignIpv6Addresses",
)

Error = tuple[int, str, str, str]  # HTTP status, reason, EC2 code, message
Answer = tuple[int, str, list[tuple[str, str]], bytes]  # HTTP status, reason, headers, body


@dataclasses.dataclass
class Request:
    """One request as the proxy saw it."""

    action: str
    params: dict[str, list[str]]
    arrived: float  # time.monotonic()
    arrived_wall: float  # time.time()
    status: int = 0
    answered_wall: float = 0.0  # time.time() when the answer was ready to go back
    fault: str | None = None  # an injected fault
    error: str | None = None  # the EC2 error code answered (injected or as EC2 would)

    def param(self, name: str) -> str | None:
        values = self.params.get(name)
        return values[0] if values else None

    def values(self, prefix: str) -> list[str]:
        """All values of a list parameter (`PrivateIpAddress.1`, `.2`, ...), in order."""
        keys = sorted(
            (k for k in self.params if k.startswith(prefix + ".")),
            key=lambda k: int(k.rsplit(".", 1)[1]) if k.rsplit(".", 1)[1].isdigit() else 0,
        )
        return [self.params[k][0] for k in keys]


@dataclasses.dataclass
class _Fault:
    action: str | None
    kind: str
    remaining: int
    when: Callable[[Request], bool] | None = None


def _refusal(code: str, message: str) -> Error:
    return 400, "Bad Request", code, message


class FaultProxy:
    """Start with `start()`; point `AWS_ENDPOINT_URL_EC2` at `endpoint`."""

    def __init__(self, ns: NetNS, upstream_port: int, host: str = "127.0.0.1"):
        self.ns = ns
        self.host = host
        self.upstream_port = upstream_port
        self.port = 0
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._faults: list[_Fault] = []
        self._held: set[str] = set()
        self._answer_delays: dict[str, list[float]] = {}
        self._refused: set[str] = set()
        self._rejected_filters: set[str] = set()
        self.page_size: int | None = None
        # Address slots per ENI (addresses + prefixes, per IP version); None: no limit, as moto.
        self.address_limit: dict[str, int] = {}
        self.default_address_limit: int | None = None
        self.imds_down = False
        self.imds_region = "us-east-1"
        self.imds_instance_id: str | None = None  # answered at /latest/meta-data/instance-id
        self.imds_requests = 0
        self._index = _AddressIndex()
        self._subnets: dict[str, tuple[ipaddress.IPv4Network | None, list[ipaddress.IPv6Network]]] = {}
        self._stop_watching: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # === control, from the test thread ===

    def start(self) -> "FaultProxy":
        ready = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._release = asyncio.Event()
                self._changes = _KeyLocks()
                self._gate = _WorldGate()
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.host, self.port)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # reported to start()
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            self._server.close()
            # Clients' keep-alive connections are still open: end their handlers while the loop
            # can still close their sockets (else "Event loop is closed" at garbage collection).
            handlers = asyncio.all_tasks(loop)
            for task in handlers:
                task.cancel()
            if handlers:
                loop.run_until_complete(asyncio.gather(*handlers, return_exceptions=True))
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        # Writes that reach moto without the proxy (tests' setup, another node's agent as a
        # test plays it) make the index stale: the next mutating call reads moto again.
        self._stop_watching = moto.watch_direct_writes(self.upstream_port, self._index.mark_stale)
        self._thread = self.ns.thread(main, name="fault-proxy")
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._stop_watching is not None:
            self._stop_watching()
            self._stop_watching = None
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def inject(
        self, kind: str, times: int, action: str | None = None, when: Callable[[Request], bool] | None = None
    ) -> None:
        """Answer the next `times` requests of `action` (any when None) that `when` picks (all
        when None) with a `kind` error."""
        if kind not in _ERRORS:
            raise ValueError(kind)
        with self._lock:
            self._faults.append(_Fault(action, kind, times, when))

    def hold_answer(self, action: str, seconds: float) -> None:
        """Forward the next request of `action` at once but keep its answer for `seconds`."""
        with self._lock:
            self._answer_delays.setdefault(action, []).append(seconds)

    def refuse(self, address: str) -> None:
        """Fail every Assign that names `address` with `InvalidParameterValue`, as a whole."""
        with self._lock:
            self._refused.add(address)

    def reject_filter(self, name: str) -> None:
        """Answer DescribeNetworkInterfaces calls that use filter `name` as moto does for a filter
        it does not know (HTTP 500), like an EC2-compatible endpoint without that filter."""
        with self._lock:
            self._rejected_filters.add(name)

    def hold(self, action: str) -> None:
        """Keep requests of `action` waiting (not forwarded) until `release()`."""
        with self._lock:
            self._held.add(action)

    def release(self) -> None:
        with self._lock:
            self._held.clear()
        if self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    def reset(self) -> None:
        """Forget recorded requests, pending faults, held answers, refused addresses and address
        limits (EC2's state, addresses and prefixes, stays)."""
        with self._lock:
            self._requests.clear()
            self._faults.clear()
            self._answer_delays.clear()
            self._refused.clear()
            self._rejected_filters.clear()
            self.page_size = None
            self.address_limit.clear()
            self.default_address_limit = None
        self.release()

    def requests(self, action: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._requests if action is None or r.action == action]

    def calls(self, action: str | None = None) -> int:
        return len(self.requests(action))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.requests():
            out[r.action] = out.get(r.action, 0) + 1
        return out

    def prefixes(self, eni_id: str) -> set[str]:
        """The IPv4 and IPv6 prefixes EC2 has on `eni_id` (the proxy keeps them: moto has none)."""
        return self._index.prefixes(eni_id)

    # === the proxy itself, on its own loop ===

    def _take_matching_fault(self, request: Request) -> str | None:
        """A fault injected with a `when` predicate that picks this request."""
        with self._lock:
            for f in self._faults:
                if (
                    f.when is not None
                    and f.remaining > 0
                    and (f.action is None or f.action == request.action)
                    and f.when(request)
                ):
                    f.remaining -= 1
                    return f.kind
        return None

    def _take_fault(self, action: str) -> str | None:
        """A fault injected for every request of `action` (the hook bench/ec2_throttle.py's
        ThrottlingProxy overrides)."""
        with self._lock:
            for f in self._faults:
                if f.when is None and f.remaining > 0 and (f.action is None or f.action == action):
                    f.remaining -= 1
                    return f.kind
        return None

    def _is_held(self, action: str) -> bool:
        with self._lock:
            return action in self._held

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                arrived, arrived_wall = time.monotonic(), time.time()
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [tuple(line.split(":", 1)) for line in lines[1:] if ":" in line]
                hmap = {k.strip().lower(): v.strip() for k, v in headers}
                body = await reader.readexactly(int(hmap.get("content-length", "0") or 0))
                params = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
                query = urllib.parse.urlsplit(target).query
                for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items():
                    params.setdefault(k, v)
                if urllib.parse.urlsplit(target).path.startswith("/latest/"):
                    writer.write(self._imds_answer(method, target))
                    await writer.drain()
                    continue
                action = (params.get("Action") or [""])[0]
                request = Request(action, params, arrived, arrived_wall)
                with self._lock:
                    self._requests.append(request)

                while self._is_held(action):
                    assert self._release is not None
                    self._release.clear()
                    if self._is_held(action):
                        await self._release.wait()

                if action in ADDRESS_ACTIONS:
                    fault, error, answer = await self._change(request, method, target, headers, body)
                else:
                    fault = self._take_matching_fault(request) or self._take_fault(action)
                    error = _ERRORS[fault] if fault else None
                    answer = None if fault else await self._answer_as_ec2(request, method, target, headers, body)
                request.answered_wall = time.time()
                if error is not None:
                    status, reason, code, message = error
                    payload = _error_body(code, message)
                    request.status, request.fault, request.error = status, fault, code
                    resp_headers = [("Content-Type", "text/xml;charset=UTF-8")]
                else:
                    assert answer is not None
                    status, reason, resp_headers, payload = answer
                    request.status = status
                    with self._lock:
                        delays = self._answer_delays.get(action)
                        delay = delays.pop(0) if delays else 0.0
                    if delay:
                        await asyncio.sleep(delay)
                out = [f"HTTP/1.1 {status} {reason}"]
                out += [f"{k}: {v}" for k, v in resp_headers]
                out += [f"Content-Length: {len(payload)}", "Connection: keep-alive", "", ""]
                writer.write("\r\n".join(out).encode("latin-1") + payload)
                await writer.drain()
                if hmap.get("connection", "").lower() == "close":
                    return
        except Exception:  # a broken client connection must not kill the proxy
            return
        except asyncio.CancelledError:
            # stop() ends open connections; a handler that ends cancelled makes Python 3.11's
            # stream callback log a traceback, so it ends normally instead.
            return
        finally:
            writer.close()

    def _imds_answer(self, method: str, target: str) -> bytes:
        """IMDSv2 as far as the SDK's region provider reads it."""
        path = urllib.parse.urlsplit(target).path
        with self._lock:
            self.imds_requests += 1
            down, region, instance_id = self.imds_down, self.imds_region, self.imds_instance_id
        headers: list[str] = []
        if down:
            status, body = "500 Internal Server Error", b""
        elif method == "PUT" and path == "/latest/api/token":
            status, body = "200 OK", b"imds-token"
            headers.append("X-aws-ec2-metadata-token-ttl-seconds: 21600")
        elif method == "GET" and path == "/latest/meta-data/placement/region":
            status, body = "200 OK", region.encode()
        elif method == "GET" and path == "/latest/meta-data/instance-id" and instance_id:
            status, body = "200 OK", instance_id.encode()
        else:
            status, body = "404 Not Found", b""
        lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}", "Connection: keep-alive", "", ""]
        return "\r\n".join(lines).encode("latin-1") + body

    # === address changes: decided from the index, one change at a time per address ===

    async def _change(
        self, request: Request, method: str, target: str, headers: list[Any], body: bytes
    ) -> tuple[str | None, Error | None, Answer | None]:
        """An Assign or Unassign: the injected fault, EC2's refusal, or EC2's answer."""
        change = _Change.of(request)
        await self._ensure_index(headers)
        async with self._gate.shared(), self._changes.hold(change.lock_keys()):
            fault = self._take_matching_fault(request) or self._take_fault(request.action)
            if fault:
                return fault, _ERRORS[fault], None
            if not await self._knows_eni(change.eni_id, headers):
                # Unknown to moto too: moto answers (InvalidNetworkInterfaceID.NotFound).
                return None, None, await self._forward(method, target, headers, body)
            error = self._as_ec2_would_reject(change)
            if error is None and change.has_prefixes:
                error = await self._prefix_refusal(change, headers)
            if error is not None:
                return None, error, None
            # From the prefix checks to here nothing awaits: no other change runs in between.
            if change.has_prefixes:
                return None, None, self._change_prefixes(change)
            return None, None, await self._change_addresses(change, method, target, headers, body)

    async def _ensure_index(self, headers: list[Any]) -> None:
        """Read every ENI from moto when the index was never read or went stale (rare: after a
        write that bypassed the proxy), with no address change in flight."""
        if self._index.fresh():
            return
        async with self._gate.exclusive():
            generation = self._index.generation()
            if self._index.fresh():
                return
            views = await self._all_enis(headers)
            if views is not None:
                self._index.seed(views, generation)

    async def _knows_eni(self, eni_id: str, headers: list[Any]) -> bool:
        """Whether the ENI exists, reading it from moto if the index has not seen it yet."""
        if self._index.has(eni_id):
            return True
        versions = self._index.versions()
        status, payload = await self._upstream(headers, {"Action": "DescribeNetworkInterfaces", "NetworkInterfaceId.1": eni_id})
        if status != 200:
            return False
        views = [_EniView.of(i) for i in _interface_items(ET.fromstring(payload))]
        self._index.observe(views, versions)
        return self._index.has(eni_id)

    def _as_ec2_would_reject(self, change: _Change) -> Error | None:
        """EC2's refusal of an address change the index tells apart, or None."""
        if change.mixes_prefixes_and_addresses():
            return _refusal(COMBINATION, "You cannot specify both IP addresses and IP prefixes in the same request.")
        if change.assign:
            with self._lock:
                refused = sorted(set(change.addresses) & {_canonical(a) for a in self._refused})
            if refused:
                return _refusal(INVALID, f"Address {refused[0]} is not in the subnet's CIDR block")
            return self._address_refusal(change) or self._slot_refusal(change)
        if any(self._index.holder(a) == _Holder(change.eni_id, primary=True) for a in change.addresses):
            return _refusal(INVALID, f"The primary IP address of interface {change.eni_id} cannot be unassigned.")
        missing = self._index.not_held(change.eni_id, change.addresses, change.prefixes)
        if missing:
            return _refusal(NOT_ASSIGNED, f"Some of the specified addresses are not assigned to interface {change.eni_id}")
        return None

    def _address_refusal(self, change: _Change) -> Error | None:
        """An Assign of an address another ENI holds, or inside any ENI's prefix."""
        for a in change.addresses:
            prefix = self._index.prefix_over(a)
            if prefix is not None:
                return _refusal(INVALID, f"Address {a} is within prefix {prefix}, which is already assigned.")
            holder = self._index.holder(a)
            if holder is None or holder.eni_id == change.eni_id:
                continue
            if change.family == 6:
                return _refusal(INVALID, f"Address {a} is in use.")
            if holder.primary or not change.reassign:
                return _refusal(IN_USE, f"Address {a} is already assigned to another interface.")
        return None

    def _slot_refusal(self, change: _Change) -> Error | None:
        """EC2's per-interface address limit: every address and every prefix takes one slot."""
        limit = self.address_limit.get(change.eni_id, self.default_address_limit)
        if limit is None:
            return None
        used = self._index.slots_used(change.eni_id, change.family)
        new = len([a for a in change.addresses if not self._index.holds(change.eni_id, a)])
        new += len([p for p in change.prefixes if self._index.prefix_holder(_network(p)) != change.eni_id])
        new += change.address_count + change.prefix_count
        if used + new > limit:
            return _refusal(LIMIT_EXCEEDED, "Number of private addresses will exceed limit.")
        return None

    async def _change_addresses(
        self, change: _Change, method: str, target: str, headers: list[Any], body: bytes
    ) -> Answer:
        """Forward an address change to moto and bring the index along once moto carried it out
        (and, for a reassignment, take the address off its old holder as EC2's move does)."""
        moved = self._index.moved_from(change) if change.reassign else {}
        touched = {change.eni_id, *moved}
        self._index.begin(touched)
        try:
            answer = await self._forward(method, target, headers, body)
            if answer[0] != 200:
                return answer
            for old, addresses in moved.items():
                params = {"Action": "UnassignPrivateIpAddresses", "NetworkInterfaceId": old}
                params.update({f"PrivateIpAddress.{i + 1}": a for i, a in enumerate(addresses)})
                await self._upstream(headers, params)
                self._index.remove(old, addresses)
            if change.assign:
                self._index.add(change.eni_id, change.addresses)
            else:
                self._index.remove(change.eni_id, change.addresses)
            if change.address_count:
                await self._reread(change.eni_id, headers)  # moto picked the addresses
            return answer
        finally:
            self._index.end(touched)

    async def _reread(self, eni_id: str, headers: list[Any]) -> None:
        status, payload = await self._upstream(headers, {"Action": "DescribeNetworkInterfaces", "NetworkInterfaceId.1": eni_id})
        if status == 200:
            for item in _interface_items(ET.fromstring(payload)):
                self._index.replace(_EniView.of(item))

    # === prefixes: the proxy's own state (moto has none) ===

    async def _prefix_refusal(self, change: _Change, headers: list[Any]) -> Error | None:
        """EC2's refusals of a prefix change; for an Assign by count, the free blocks are picked
        here (into `change.picked`) so that the answer names them."""
        if not change.assign:
            return None  # not held: _as_ec2_would_reject
        family, length = change.family, PREFIX_LENGTH[change.family]
        networks = []
        for p in change.prefixes:
            network = _network(p)
            if network is None or network.version != family or network.prefixlen != length:
                return _refusal(INVALID, f"Invalid prefix {p}: IPv{family} prefixes must be /{length}.")
            if str(network.network_address) != _canonical(p.split("/")[0]):
                return _refusal(INVALID, f"Prefix {p} is not aligned on a /{length} boundary.")
            networks.append(network)
        subnet = await self._subnet_blocks(self._index.subnet_of(change.eni_id), headers, family)
        for network in networks:
            if not any(network.subnet_of(block) for block in subnet):  # type: ignore[arg-type]
                return _refusal(INVALID, f"Prefix {network} is not within the subnet of interface {change.eni_id}.")
            holder = self._index.prefix_holder(network)
            if holder is not None and holder != change.eni_id:
                return _refusal(INVALID, f"Prefix {network} is already assigned.")
            inside = self._index.addresses_in(network)
            if inside:
                return _refusal(INVALID, f"Prefix {network} is already assigned: address {sorted(inside)[0]} in it is in use.")
        error = self._slot_refusal(change)
        if error is not None:
            return error
        if change.prefix_count:
            # A block some change in flight names (an address being assigned) is not free.
            busy = self._changes.busy
            change.picked = self._index.free_blocks(subnet, length, change.prefix_count, lambda b: busy(f"block {b}"))
            if len(change.picked) < change.prefix_count:
                message = "There are not enough free cidr blocks in the specified subnet to satisfy the request."
                return _refusal(NO_FREE_BLOCK, message)
        return None

    def _change_prefixes(self, change: _Change) -> Answer:
        """Carry out a prefix change on the proxy's own state and answer as EC2."""
        if change.assign:
            prefixes = [str(_network(p)) for p in change.prefixes] + [str(n) for n in change.picked]
            self._index.add_prefixes(change.eni_id, prefixes)
        else:
            prefixes = [str(_network(p)) for p in change.prefixes]
            self._index.remove_prefixes(change.eni_id, prefixes)
        return 200, "OK", [("Content-Type", "text/xml;charset=UTF-8")], _prefix_answer(change, prefixes)

    async def _subnet_blocks(
        self, subnet_id: str | None, headers: list[Any], family: int
    ) -> list[ipaddress.IPv4Network] | list[ipaddress.IPv6Network]:
        """The ENI subnet's CIDR blocks of one IP version (read once per subnet)."""
        if subnet_id and subnet_id not in self._subnets:
            status, payload = await self._upstream(headers, {"Action": "DescribeSubnets", "SubnetId.1": subnet_id})
            if status == 200:
                root = ET.fromstring(payload)
                v4 = next((e.text for e in root.iter() if _local(e.tag) == "cidrBlock"), None)
                v6 = [ipaddress.IPv6Network(e.text) for e in root.iter() if _local(e.tag) == "ipv6CidrBlock" and e.text]
                self._subnets[subnet_id] = (ipaddress.IPv4Network(v4) if v4 else None, v6)
        v4, v6 = self._subnets.get(subnet_id or "", (None, []))
        if family == 4:
            return [v4] if v4 else []
        return v6

    # === reads ===

    async def _upstream(self, headers: list[Any], params: dict[str, str]) -> tuple[int, bytes]:
        """One EC2 call of the proxy's own, signed as the caller's (moto reads the region from
        the signature's scope and checks nothing else)."""
        query = urllib.parse.urlencode({"Version": "2016-11-15", **params}).encode()
        kept = [(k, v) for k, v in headers if k.strip().lower() != "content-length"]
        kept.append(("Content-Length", str(len(query))))
        status, _, _, payload = await self._forward("POST", "/", kept, query)
        return status, payload

    async def _all_enis(self, headers: list[Any]) -> list["_EniView"] | None:
        status, payload = await self._upstream(headers, {"Action": "DescribeNetworkInterfaces"})
        if status != 200:
            return None
        return [_EniView.of(item) for item in _interface_items(ET.fromstring(payload))]

    async def _answer_as_ec2(
        self, request: Request, method: str, target: str, headers: list[Any], body: bytes
    ) -> Answer:
        if request.action == "DescribeNetworkInterfaces":
            return await self._describe(request, headers)
        answer = await self._forward(method, target, headers, body)
        if answer[0] == 200 and not request.action.startswith(("Describe", "Get")):
            # Creating, deleting or attaching ENIs changes who holds what: read moto again.
            self._index.mark_stale()
        return answer

    async def _describe(self, request: Request, headers: list[Any]) -> Answer:
        """DescribeNetworkInterfaces with the filters moto gets wrong applied here, the ENIs'
        prefixes added, and pages of `page_size` when set. What moto says of each ENI refreshes
        the index."""
        filters = _filters(request.params)
        with self._lock:
            rejected = self._rejected_filters & set(filters)
            page_size = self.page_size
        ours = {n: v for n, v in filters.items() if n in PROXY_FILTERS}
        if rejected:
            message = f"The filter '{sorted(rejected)[0]}' for DescribeNetworkInterfaces has not been implemented"
            payload = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Message>{message}</Message></Error>"
            ).encode()
            return 500, "Internal Server Error", [("Content-Type", "text/xml;charset=UTF-8")], payload
        # moto has no pages: ask for everything, cut pages here.
        drop = {"NextToken", "MaxResults"}
        kept: dict[str, str] = {}
        index = 0
        for k, v in request.params.items():
            if k.startswith("Filter."):
                continue
            if k not in drop:
                kept[k] = v[0]
        for name, values in filters.items():
            if name in ours:
                continue
            index += 1
            kept[f"Filter.{index}.Name"] = name
            kept.update({f"Filter.{index}.Value.{j + 1}": value for j, value in enumerate(values)})
        versions = self._index.versions()
        status, payload = await self._upstream(headers, kept)
        content = [("Content-Type", "text/xml;charset=UTF-8")]
        if status != 200:
            return status, "Error", content, payload
        root = ET.fromstring(payload)
        interface_set = next(e for e in root.iter() if _local(e.tag) == "networkInterfaceSet")
        items = [i for i in list(interface_set) if _local(i.tag) == "item"]
        views = [_EniView.of(item) for item in items]
        self._index.observe(views, versions)
        for item, view in zip(items, views):
            if not view.matches(ours):
                interface_set.remove(item)
            else:
                _add_prefix_sets(item, self._index.prefixes_by_family(view.id))
        if page_size:
            items = [i for i in list(interface_set) if _local(i.tag) == "item"]
            start = int((request.param("NextToken") or "fp-0").removeprefix("fp-") or 0)
            size = min(page_size, int(request.param("MaxResults") or page_size))
            for i, item in enumerate(items):
                if not start <= i < start + size:
                    interface_set.remove(item)
            if start + size < len(items):
                token = ET.SubElement(root, f"{{{EC2_NS}}}nextToken")
                token.text = f"fp-{start + size}"
        ET.register_namespace("", EC2_NS)
        return 200, "OK", content, ET.tostring(root, encoding="utf-8", xml_declaration=True)

    async def _forward(self, method: str, target: str, headers: list[Any], body: bytes) -> Answer:
        reader, writer = await asyncio.open_connection(self.host, self.upstream_port)
        try:
            skip = {"connection", "keep-alive", "proxy-connection", "transfer-encoding"}
            lines = [f"{method} {target} HTTP/1.1"]
            lines += [f"{k.strip()}: {v.strip()}" for k, v in headers if k.strip().lower() not in skip]
            lines += ["Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1") + body)
            await writer.drain()
            head = (await reader.readuntil(b"\r\n\r\n"))[:-4]
            head_lines = head.decode("latin-1").split("\r\n")
            _, status, reason = (head_lines[0].split(" ", 2) + [""])[:3]
            resp_headers = [
                (k.strip(), v.strip())
                for k, v in (line.split(":", 1) for line in head_lines[1:] if ":" in line)
            ]
            length = next((v for k, v in resp_headers if k.lower() == "content-length"), None)
            # Read the answer by its length: moto's server closes the connection ~13 ms after
            # the answer, and waiting for that close was most of a call's time.
            payload = await reader.readexactly(int(length)) if length is not None else await reader.read()
        finally:
            writer.close()
        if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in resp_headers):
            payload = _dechunk(payload)
        keep = [
            (k, v)
            for k, v in resp_headers
            if k.lower() not in {"content-length", "transfer-encoding", "connection", "keep-alive"}
        ]
        return int(status), reason, keep, payload


# === EC2's wire format ===


def _error_body(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message>"
        "</Error></Errors><RequestID>fault-proxy</RequestID></Response>"
    ).encode()


def _prefix_answer(change: "_Change", prefixes: list[str]) -> bytes:
    """EC2's answer to a prefix change (botocore's model: AssignPrivateIpAddressesResult has
    `assignedIpv4PrefixSet/item/ipv4Prefix`; the IPv6 results list plain `item`s)."""
    action = change.action
    root = ET.Element(f"{action}Response", xmlns=EC2_NS + "/")
    ET.SubElement(root, "requestId").text = "fault-proxy"
    if action == "UnassignPrivateIpAddresses":
        ET.SubElement(root, "return").text = "true"
        return ET.tostring(root, encoding="utf-8", xml_declaration=True)
    ET.SubElement(root, "networkInterfaceId").text = change.eni_id
    if action == "AssignPrivateIpAddresses":
        ET.SubElement(root, "assignedPrivateIpAddressesSet")
        prefix_set = ET.SubElement(root, "assignedIpv4PrefixSet")
        for p in prefixes:
            ET.SubElement(ET.SubElement(prefix_set, "item"), "ipv4Prefix").text = p
    else:
        verb = "assigned" if action == "AssignIpv6Addresses" else "unassigned"
        ET.SubElement(root, f"{verb}Ipv6Addresses")
        prefix_set = ET.SubElement(root, f"{verb}Ipv6PrefixSet")
        for p in prefixes:
            ET.SubElement(prefix_set, "item").text = p
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _add_prefix_sets(item: ET.Element, prefixes: dict[int, list[str]]) -> None:
    """NetworkInterface.Ipv4Prefixes / Ipv6Prefixes as EC2 puts them in a describe answer."""
    for family, set_name, field in ((4, "ipv4PrefixSet", "ipv4Prefix"), (6, "ipv6PrefixSet", "ipv6Prefix")):
        if not prefixes.get(family):
            continue
        prefix_set = ET.SubElement(item, f"{{{EC2_NS}}}{set_name}")
        for p in prefixes[family]:
            ET.SubElement(ET.SubElement(prefix_set, f"{{{EC2_NS}}}item"), f"{{{EC2_NS}}}{field}").text = p


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _canonical(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def _network(prefix: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(prefix, strict=False)
    except ValueError:
        return None


def _block(address: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The delegable prefix (/28, /80) an address falls in."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return ipaddress.ip_network(f"{ip}/{PREFIX_LENGTH[ip.version]}", strict=False)


def _filters(params: dict[str, list[str]]) -> dict[str, list[str]]:
    """`Filter.N.Name` / `Filter.N.Value.M` of a query, as {name: values}."""
    out: dict[str, list[str]] = {}
    for key, value in params.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "Filter" and parts[2] == "Name":
            prefix = f"Filter.{parts[1]}.Value."
            values = [v[0] for k, v in sorted(params.items()) if k.startswith(prefix)]
            out.setdefault(value[0], []).extend(values)
    return out


def _interface_items(root: ET.Element) -> list[ET.Element]:
    for e in root.iter():
        if _local(e.tag) == "networkInterfaceSet":
            return [i for i in e if _local(i.tag) == "item"]
    return []


@dataclasses.dataclass
class _EniView:
    """What the proxy reads of one ENI in moto's DescribeNetworkInterfaces answer."""

    id: str
    primary: str
    secondaries: set[str]
    ipv6: set[str]
    subnet_id: str = ""

    @staticmethod
    def of(item: ET.Element) -> "_EniView":
        def child(e: ET.Element, name: str) -> ET.Element | None:
            return next((c for c in e if _local(c.tag) == name), None)

        def text(e: ET.Element | None, name: str) -> str:
            c = child(e, name) if e is not None else None
            return (c.text or "") if c is not None else ""

        def items(name: str) -> list[ET.Element]:
            c = child(item, name)
            return list(c) if c is not None else []

        primary, secondaries, ipv6 = text(item, "privateIpAddress"), set(), set()
        for p in items("privateIpAddressesSet"):
            if text(p, "primary") != "true":
                secondaries.add(text(p, "privateIpAddress"))
        for a in items("ipv6AddressesSet"):
            ipv6.add(_canonical(text(a, "ipv6Address")))
        secondaries.discard(primary)
        return _EniView(text(item, "networkInterfaceId"), primary, secondaries, ipv6, text(item, "subnetId"))

    def matches(self, filters: dict[str, list[str]]) -> bool:
        for name, values in filters.items():
            if name == "addresses.private-ip-address":
                held = {self.primary} | self.secondaries
                if not held & set(values):
                    return False
            elif name == "ipv6-addresses.ipv6-address":
                if not self.ipv6 & {_canonical(v) for v in values}:
                    return False
        return True


# === what a change names ===


@dataclasses.dataclass
class _Change:
    """An Assign or Unassign call as the index needs it: which ENI, which addresses (canonical)
    and prefixes (as sent), how many to pick, and whether it may move addresses."""

    action: str
    eni_id: str
    family: int
    assign: bool
    addresses: list[str]
    prefixes: list[str]
    address_count: int
    prefix_count: int
    reassign: bool
    picked: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = dataclasses.field(default_factory=list)

    @staticmethod
    def of(request: Request) -> "_Change":
        action = request.action
        family = 6 if "Ipv6" in action else 4
        address_param, prefix_param = ("Ipv6Addresses", "Ipv6Prefix") if family == 6 else ("PrivateIpAddress", "Ipv4Prefix")
        count_param = "Ipv6AddressCount" if family == 6 else "SecondaryPrivateIpAddressCount"

        def number(name: str) -> int:
            value = request.param(name) or "0"
            return int(value) if value.isdigit() else 0

        return _Change(
            action=action,
            eni_id=request.param("NetworkInterfaceId") or "",
            family=family,
            assign=action.startswith("Assign"),
            addresses=[_canonical(a) for a in request.values(address_param)],
            prefixes=request.values(prefix_param),
            address_count=number(count_param),
            prefix_count=number(f"Ipv{family}PrefixCount"),
            reassign=(request.param("AllowReassignment") or "").lower() == "true",
        )

    @property
    def has_prefixes(self) -> bool:
        return bool(self.prefixes or self.prefix_count)

    def mixes_prefixes_and_addresses(self) -> bool:
        return self.has_prefixes and bool(self.addresses or self.address_count)

    def lock_keys(self) -> list[str]:
        """What this change must not share with a concurrent one: its ENI (address slots) and
        the /28 or /80 block of every address and prefix it names (an address and a prefix
        holding it share their block). A count-based prefix Assign picks its blocks under the
        ENI's lock without awaiting, so nothing else can pick them in between."""
        keys = [f"eni {self.eni_id}"]
        for a in [*self.addresses, *(p.split("/")[0] for p in self.prefixes)]:
            block = _block(a)
            keys.append(f"block {block}" if block is not None else f"address {a}")
        return keys


# === the index ===


@dataclasses.dataclass(frozen=True)
class _Holder:
    eni_id: str
    primary: bool


@dataclasses.dataclass
class _EniAddresses:
    """One ENI as EC2 has it: addresses as moto has them, prefixes as the proxy keeps them."""

    subnet_id: str
    primary: str
    secondaries: set[str]
    ipv6: set[str]
    prefixes: set[str] = dataclasses.field(default_factory=set)

    def addresses(self) -> set[str]:
        return {self.primary, *self.secondaries, *self.ipv6} - {""}


class _AddressIndex:
    """Who holds each address and prefix, so that EC2's refusals need no read of moto.

    Unknown is a state: until the first full read (`seed`) the index is not `fresh()` and no
    decision is taken from it. A write that bypassed the proxy marks it stale again
    (`mark_stale`, from any thread). An answer from moto read while a change of an ENI was in
    flight is older than what the index knows: per-ENI versions keep it from being applied.
    Called on the proxy's loop, except `mark_stale` and `prefixes` (test threads): a lock
    keeps those consistent.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._enis: dict[str, _EniAddresses] = {}
        self._holders: dict[str, _Holder] = {}  # canonical address → holder
        self._in_block: dict[str, set[str]] = {}  # /28 or /80 block → addresses held inside
        self._prefix_holders: dict[str, str] = {}  # prefix → ENI
        self._seeded = False
        self._stale_generation = 0  # bumped by every write that bypassed the proxy
        self._seeded_generation = -1
        self._versions: dict[str, int] = {}  # per ENI: bumped when a change starts and ends
        self._busy: dict[str, int] = {}  # per ENI: changes in flight

    # --- freshness ---

    def mark_stale(self) -> None:
        with self._lock:
            self._stale_generation += 1

    def generation(self) -> int:
        with self._lock:
            return self._stale_generation

    def fresh(self) -> bool:
        with self._lock:
            return self._seeded and self._seeded_generation == self._stale_generation

    def seed(self, views: list[_EniView], generation: int) -> None:
        """Every ENI from one full read (taken with no change in flight); prefixes of ENIs that
        still exist are kept (moto knows nothing of them)."""
        with self._lock:
            present = {v.id for v in views}
            for eni_id in [e for e in self._enis if e not in present]:
                self._forget(eni_id)
            for view in views:
                self._replace(view)
            self._seeded = True
            self._seeded_generation = generation

    def versions(self) -> dict[str, int]:
        with self._lock:
            return dict(self._versions)

    def observe(self, views: list[_EniView], versions_before: dict[str, int]) -> None:
        """What a DescribeNetworkInterfaces answer said of some ENIs, applied to each ENI no
        change touched since the read was sent."""
        with self._lock:
            for view in views:
                if self._busy.get(view.id, 0) or self._versions.get(view.id, 0) != versions_before.get(view.id, 0):
                    continue
                self._replace(view)

    def replace(self, view: _EniView) -> None:
        with self._lock:
            self._replace(view)

    def begin(self, enis: Iterable[str]) -> None:
        with self._lock:
            for e in enis:
                self._busy[e] = self._busy.get(e, 0) + 1
                self._versions[e] = self._versions.get(e, 0) + 1

    def end(self, enis: Iterable[str]) -> None:
        with self._lock:
            for e in enis:
                self._busy[e] -= 1
                self._versions[e] = self._versions.get(e, 0) + 1

    # --- reads ---

    def has(self, eni_id: str) -> bool:
        with self._lock:
            return eni_id in self._enis

    def subnet_of(self, eni_id: str) -> str | None:
        with self._lock:
            eni = self._enis.get(eni_id)
            return eni.subnet_id if eni else None

    def holder(self, address: str) -> _Holder | None:
        with self._lock:
            return self._holders.get(_canonical(address))

    def holds(self, eni_id: str, address: str) -> bool:
        holder = self.holder(address)
        return holder is not None and holder.eni_id == eni_id

    def prefix_over(self, address: str) -> str | None:
        """The prefix (any ENI's) that holds `address`."""
        block = _block(address)
        with self._lock:
            return str(block) if block is not None and str(block) in self._prefix_holders else None

    def prefix_holder(self, prefix: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str | None:
        with self._lock:
            return self._prefix_holders.get(str(prefix))

    def addresses_in(self, prefix: ipaddress.IPv4Network | ipaddress.IPv6Network) -> set[str]:
        with self._lock:
            return set(self._in_block.get(str(prefix), ()))

    def not_held(self, eni_id: str, addresses: list[str], prefixes: list[str]) -> list[str]:
        """What an Unassign names that the ENI does not hold (its primary counts as not held:
        it cannot be unassigned)."""
        with self._lock:
            eni = self._enis.get(eni_id)
            held = (eni.secondaries | eni.ipv6) if eni else set()
            owned = eni.prefixes if eni else set()
            missing = [a for a in addresses if a not in held]
            return missing + [p for p in prefixes if str(_network(p)) not in owned]

    def slots_used(self, eni_id: str, family: int) -> int:
        with self._lock:
            eni = self._enis.get(eni_id)
            if eni is None:
                return 0
            prefixes = [p for p in eni.prefixes if (":" in p) == (family == 6)]
            addresses = len(eni.ipv6) if family == 6 else 1 + len(eni.secondaries)
            return addresses + len(prefixes)

    def moved_from(self, change: _Change) -> dict[str, list[str]]:
        """For an Assign with reassignment: the other ENIs holding its addresses as secondaries."""
        out: dict[str, list[str]] = {}
        with self._lock:
            for a in change.addresses:
                holder = self._holders.get(a)
                if holder is not None and holder.eni_id != change.eni_id and not holder.primary:
                    out.setdefault(holder.eni_id, []).append(a)
        return out

    def free_blocks(self, subnet: list[Any], length: int, count: int, busy: Callable[[Any], bool]) -> list[Any]:
        """`count` /`length` blocks of the subnet that hold no address and no prefix, lowest
        first, skipping the blocks with the addresses EC2 reserves (the first four, the last)."""
        picked: list[Any] = []
        with self._lock:
            for cidr in subnet:
                blocks = cidr.subnets(new_prefix=length)
                for block in blocks:
                    if len(picked) == count:
                        return picked
                    reserved = block.network_address == cidr.network_address or block.broadcast_address == cidr.broadcast_address
                    taken = str(block) in self._prefix_holders or self._in_block.get(str(block)) or busy(block)
                    if reserved or taken:
                        continue
                    picked.append(block)
        return picked

    def prefixes(self, eni_id: str) -> set[str]:
        with self._lock:
            eni = self._enis.get(eni_id)
            return set(eni.prefixes) if eni else set()

    def prefixes_by_family(self, eni_id: str) -> dict[int, list[str]]:
        prefixes = sorted(self.prefixes(eni_id))
        return {4: [p for p in prefixes if ":" not in p], 6: [p for p in prefixes if ":" in p]}

    # --- changes carried out ---

    def add(self, eni_id: str, addresses: list[str]) -> None:
        with self._lock:
            eni = self._enis.get(eni_id)
            if eni is None:
                return
            for a in addresses:
                (eni.ipv6 if ":" in a else eni.secondaries).add(a)
                self._hold(a, eni_id, primary=False)

    def remove(self, eni_id: str, addresses: list[str]) -> None:
        with self._lock:
            eni = self._enis.get(eni_id)
            if eni is None:
                return
            for a in addresses:
                eni.secondaries.discard(a)
                eni.ipv6.discard(a)
                self._release(a, eni_id)

    def add_prefixes(self, eni_id: str, prefixes: list[str]) -> None:
        with self._lock:
            for p in prefixes:
                self._enis[eni_id].prefixes.add(p)
                self._prefix_holders[p] = eni_id

    def remove_prefixes(self, eni_id: str, prefixes: list[str]) -> None:
        with self._lock:
            for p in prefixes:
                self._enis[eni_id].prefixes.discard(p)
                if self._prefix_holders.get(p) == eni_id:
                    del self._prefix_holders[p]

    # --- internals, under the lock ---

    def _replace(self, view: _EniView) -> None:
        old = self._enis.get(view.id)
        prefixes = old.prefixes if old else set()
        if old is not None:
            for a in old.addresses():
                self._release(a, view.id)
        eni = _EniAddresses(view.subnet_id, view.primary, set(view.secondaries), set(view.ipv6), prefixes)
        self._enis[view.id] = eni
        for a in eni.addresses():
            self._hold(a, view.id, primary=a == view.primary)

    def _forget(self, eni_id: str) -> None:
        eni = self._enis.pop(eni_id)
        for a in eni.addresses():
            self._release(a, eni_id)
        for p in eni.prefixes:
            self._prefix_holders.pop(p, None)

    def _hold(self, address: str, eni_id: str, primary: bool) -> None:
        # moto copies where EC2 refuses, so two ENIs may hold one address in moto's data: the
        # index keeps the last one read, which is the one a caller sees as holder.
        self._holders[address] = _Holder(eni_id, primary)
        block = _block(address)
        if block is not None:
            self._in_block.setdefault(str(block), set()).add(address)

    def _release(self, address: str, eni_id: str) -> None:
        if self._holders.get(address, _Holder("", False)).eni_id != eni_id:
            return
        del self._holders[address]
        block = str(_block(address))
        inside = self._in_block.get(block)
        if inside is not None:
            inside.discard(address)
            if not inside:
                del self._in_block[block]


# === serialization ===


class _KeyLocks:
    """One asyncio lock per key, taken in sorted order (so two changes never wait on each
    other in a cycle), dropped when nobody uses it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def busy(self, key: str) -> bool:
        return key in self._locks

    @contextlib.asynccontextmanager
    async def hold(self, keys: list[str]) -> AsyncIterator[None]:
        wanted = sorted(set(keys))
        for k in wanted:
            self._locks.setdefault(k, (asyncio.Lock(), [0]))[1][0] += 1
        acquired: list[str] = []
        try:
            for k in wanted:
                await self._locks[k][0].acquire()
                acquired.append(k)
            yield
        finally:
            for k in acquired:
                self._locks[k][0].release()
            for k in wanted:
                lock, users = self._locks[k]
                users[0] -= 1
                if users[0] == 0:
                    del self._locks[k]


class _WorldGate:
    """Address changes share it; a full read of moto (rare) takes it alone, so that what it
    reads is not half of a change. A waiting full read goes first: a steady stream of changes
    cannot starve it."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._sharing = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._sharing += 1
        try:
            yield
        finally:
            async with self._cond:
                self._sharing -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._exclusive and not self._sharing)
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()
