"""A small HTTP proxy in front of the EC2 emulator that counts, times and breaks calls.

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

Where moto is laxer than EC2 the proxy answers as EC2 does, from moto's own data (it never
keeps EC2 state of its own):
- an UnassignPrivateIpAddresses that names an address not on the ENI fails as a whole with
  `InvalidParameterValue` (moto drops the unknown address silently and unassigns the rest);
- an AssignPrivateIpAddresses with `AllowReassignment=true` MOVES an address another ENI holds
  as a secondary (moto copies it: the proxy unassigns it from every other holder after moto
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
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Any, Callable

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
IN_USE = "PrivateIpAddressInUse"
EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15"
# DescribeNetworkInterfaces filters moto gets wrong: the proxy applies them to moto's answer.
PROXY_FILTERS = ("addresses.private-ip-address", "ipv6-addresses.ipv6-address")


@dataclasses.dataclass
class Request:
    """One request as the proxy saw it."""

    action: str
    params: dict[str, list[str]]
    arrived: float  # time.monotonic()
    arrived_wall: float  # time.time()
    status: int = 0
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
        self.imds_down = False
        self.imds_region = "us-east-1"
        self.imds_instance_id: str | None = None  # answered at /latest/meta-data/instance-id
        self.imds_requests = 0
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
                self._mutations = asyncio.Lock()
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
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = self.ns.thread(main, name="fault-proxy")
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
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
        """Forget recorded requests, pending faults, held answers and refused addresses."""
        with self._lock:
            self._requests.clear()
            self._faults.clear()
            self._answer_delays.clear()
            self._refused.clear()
            self._rejected_filters.clear()
            self.page_size = None
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

                # EC2 carries out one address change at a time: two Assigns of one address
                # racing through the proxy must not both see it free (moto would copy it).
                mutating = action.startswith(("Assign", "Unassign"))
                if mutating:
                    await self._mutations.acquire()
                try:
                    fault = self._take_matching_fault(request) or self._take_fault(action)
                    error = _ERRORS[fault] if fault else await self._as_ec2_would_reject(request, headers)
                    if error is None:
                        status, reason, resp_headers, payload = await self._answer_as_ec2(
                            request, method, target, headers, body
                        )
                finally:
                    if mutating:
                        self._mutations.release()
                if error is not None:
                    status, reason, code, message = error
                    payload = (
                        '<?xml version="1.0" encoding="UTF-8"?>\n'
                        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message>"
                        "</Error></Errors><RequestID>fault-proxy</RequestID></Response>"
                    ).encode()
                    request.status, request.fault, request.error = status, fault, code
                    resp_headers = [("Content-Type", "text/xml;charset=UTF-8")]
                else:
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

    async def _as_ec2_would_reject(
        self, request: Request, headers: list[Any]
    ) -> tuple[int, str, str, str] | None:
        """EC2's answer where moto would accept: an Unassign of an address not on the ENI, an
        Assign of an address marked refused."""
        if request.action in ("AssignPrivateIpAddresses", "AssignIpv6Addresses"):
            named = set(request.values("PrivateIpAddress")) | set(request.values("Ipv6Addresses"))
            with self._lock:
                refused = sorted(named & self._refused)
            if refused:
                message = f"Address {refused[0]} is not in the subnet's CIDR block"
                return 400, "Bad Request", NOT_ASSIGNED, message
            return await self._in_use_elsewhere(request, headers)
        if request.action != "UnassignPrivateIpAddresses":
            return None
        eni_id = request.param("NetworkInterfaceId") or ""
        query = urllib.parse.urlencode(
            {"Action": "DescribeNetworkInterfaces", "Version": "2016-11-15", "NetworkInterfaceId.1": eni_id}
        ).encode()
        # The caller's headers carry the region moto reads from the signature's scope.
        kept = [(k, v) for k, v in headers if k.strip().lower() != "content-length"]
        kept.append(("Content-Length", str(len(query))))
        status, _, _, payload = await self._forward("POST", "/", kept, query)
        if status != 200:
            return None  # moto answers the Unassign itself (unknown ENI, ...)
        on_eni = {e.text for e in ET.fromstring(payload).iter() if e.tag.endswith("privateIpAddress")}
        if set(request.values("PrivateIpAddress")) <= on_eni:
            return None
        message = f"Some of the specified addresses are not assigned to interface {eni_id}"
        return 400, "Bad Request", NOT_ASSIGNED, message

    # === EC2's answers where moto differs, computed from moto's own data ===

    async def _upstream(self, headers: list[Any], params: dict[str, str]) -> tuple[int, bytes]:
        """One EC2 call of the proxy's own, signed as the caller's (moto reads the region from
        the signature's scope and checks nothing else)."""
        query = urllib.parse.urlencode({"Version": "2016-11-15", **params}).encode()
        kept = [(k, v) for k, v in headers if k.strip().lower() != "content-length"]
        kept.append(("Content-Length", str(len(query))))
        status, _, _, payload = await self._forward("POST", "/", kept, query)
        return status, payload

    async def _all_enis(self, headers: list[Any]) -> list["_EniView"]:
        status, payload = await self._upstream(headers, {"Action": "DescribeNetworkInterfaces"})
        if status != 200:
            return []
        return [_EniView.of(item) for item in _interface_items(ET.fromstring(payload))]

    async def _in_use_elsewhere(self, request: Request, headers: list[Any]) -> tuple[int, str, str, str] | None:
        """EC2 refuses an Assign of an address another ENI holds, except an IPv4 secondary with
        `AllowReassignment=true` (moved, see `_move_reassigned`)."""
        eni_id = request.param("NetworkInterfaceId") or ""
        others = [e for e in await self._all_enis(headers) if e.id != eni_id]
        if request.action == "AssignIpv6Addresses":
            for a in request.values("Ipv6Addresses"):
                if any(_canonical(a) in e.ipv6 for e in others):
                    return 400, "Bad Request", NOT_ASSIGNED, f"Address {a} is in use."
            return None
        reassign = (request.param("AllowReassignment") or "").lower() == "true"
        for a in request.values("PrivateIpAddress"):
            if any(a == e.primary for e in others) or (not reassign and any(a in e.secondaries for e in others)):
                return 400, "Bad Request", IN_USE, f"Address {a} is already assigned to another interface."
        return None

    async def _move_reassigned(self, request: Request, headers: list[Any]) -> None:
        """After moto assigned with `AllowReassignment=true`: take the addresses off every other
        ENI, as EC2's move does."""
        eni_id = request.param("NetworkInterfaceId") or ""
        named = set(request.values("PrivateIpAddress"))
        for e in await self._all_enis(headers):
            moved = sorted(named & e.secondaries)
            if e.id == eni_id or not moved:
                continue
            params = {"Action": "UnassignPrivateIpAddresses", "NetworkInterfaceId": e.id}
            params.update({f"PrivateIpAddress.{i + 1}": a for i, a in enumerate(moved)})
            await self._upstream(headers, params)

    async def _answer_as_ec2(
        self, request: Request, method: str, target: str, headers: list[Any], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        if request.action == "DescribeNetworkInterfaces":
            return await self._describe(request, method, target, headers)
        answer = await self._forward(method, target, headers, body)
        if (
            request.action == "AssignPrivateIpAddresses"
            and answer[0] == 200
            and (request.param("AllowReassignment") or "").lower() == "true"
        ):
            await self._move_reassigned(request, headers)
        return answer

    async def _describe(
        self, request: Request, method: str, target: str, headers: list[Any]
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """DescribeNetworkInterfaces with the filters moto gets wrong applied here, and pages
        of `page_size` when set."""
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
        status, payload = await self._upstream(headers, kept)
        content = [("Content-Type", "text/xml;charset=UTF-8")]
        if status != 200:
            return status, "Error", content, payload
        root = ET.fromstring(payload)
        interface_set = next(e for e in root.iter() if _local(e.tag) == "networkInterfaceSet")
        items = [i for i in list(interface_set) if _local(i.tag) == "item"]
        for item in items:
            if not _EniView.of(item).matches(ours):
                interface_set.remove(item)
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

    async def _forward(
        self, method: str, target: str, headers: list[Any], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        reader, writer = await asyncio.open_connection(self.host, self.upstream_port)
        try:
            skip = {"connection", "keep-alive", "proxy-connection", "transfer-encoding"}
            lines = [f"{method} {target} HTTP/1.1"]
            lines += [f"{k.strip()}: {v.strip()}" for k, v in headers if k.strip().lower() not in skip]
            lines += ["Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1") + body)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        head_lines = head.decode("latin-1").split("\r\n")
        _, status, reason = (head_lines[0].split(" ", 2) + [""])[:3]
        resp_headers = [
            (k.strip(), v.strip())
            for k, v in (line.split(":", 1) for line in head_lines[1:] if ":" in line)
        ]
        if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in resp_headers):
            payload = _dechunk(payload)
        keep = [
            (k, v)
            for k, v in resp_headers
            if k.lower() not in {"content-length", "transfer-encoding", "connection", "keep-alive"}
        ]
        return int(status), reason, keep, payload


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
        return _EniView(text(item, "networkInterfaceId"), primary, secondaries, ipv6)

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
