"""The HTTP startup gate's path to the node agent, as a pod has it: the pod's `eth0` is a veth
into the node's namespace, and the agent's HTTP port is reached on the node's address (what
`status.hostIP` gives the injected sidecar).

The agent under test listens on loopback in the node's namespace (tests/lib/agent.py starts it
with `--metrics-addr=127.0.0.1:<port>`); a plain TCP relay on the node's address forwards each
connection there, byte for byte, and records the request line it carried. With the agent
stopped the relay still accepts and then closes: to the sidecar that is an agent that does not
answer, like a node whose agent pod is down.
"""

from __future__ import annotations

import itertools
import re
import select
import socket
import threading
from dataclasses import dataclass

from .netns import NetNS

_links = itertools.count(1)

# An HTTP/1.x request line (`GET /v1/addresses?... HTTP/1.1`).
REQUEST_LINE = re.compile(rb"[A-Z]+ \S+ HTTP/1\.[01]")


@dataclass
class PodLink:
    """The pod's eth0 and the node's end of it."""

    pod_ip: str
    host_ip: str


def connect_pod_to_node(pod_ns: NetNS, node_ns: NetNS) -> PodLink:
    """A veth `eth0` in the pod's namespace whose peer is in the node's, a /30 between them."""
    n = next(_links)
    assert n < 16000, "out of /30s"
    third, fourth = divmod(n * 4, 256)
    host_ip, pod_ip = f"10.252.{third}.{fourth + 1}", f"10.252.{third}.{fourth + 2}"
    peer = f"gw{n}-{id(pod_ns) % 10000}"
    pod_ns.add_veth("eth0", peer)
    pod_ns.ip("link", "set", peer, "netns", node_ns.name)
    node_ns.ip("addr", "add", f"{host_ip}/30", "dev", peer)
    node_ns.ip("link", "set", peer, "up")
    pod_ns.ip("addr", "add", f"{pod_ip}/30", "dev", "eth0")
    return PodLink(pod_ip=pod_ip, host_ip=host_ip)


class Relay:
    """Listens on `listen` inside `ns` and forwards every connection to `upstream` (also inside
    `ns`). `requests` holds every request line the client sent over a forwarded connection; `accepted`
    counts connections, forwarded or not."""

    def __init__(self, ns: NetNS, listen: tuple[str, int], upstream: tuple[str, int]):
        self.ns = ns
        self.listen = listen
        self.upstream = upstream
        self.requests: list[str] = []
        self.accepted = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._server: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen[0]}:{self.listen[1]}"

    def start(self) -> "Relay":
        self.ns.thread(self._serve, name=f"relay-{self.listen[1]}")
        assert self._ready.wait(10), "relay did not start"
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()

    def queries(self, path: str = "/v1/addresses") -> list[str]:
        """The request lines for `path` seen so far."""
        with self._lock:
            return [r for r in self.requests if r.split(" ")[1:2] and r.split(" ")[1].startswith(path)]

    def _serve(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(self.listen)
        server.listen(64)
        server.settimeout(0.2)
        self._server = server
        self._ready.set()
        while not self._stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            # A thread started here stays in this namespace (it inherits the creator's).
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            with self._lock:
                self.refused += 1
            conn.close()
            return
        up.settimeout(None)
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([conn, up], [], [], 0.5)
                for src in readable:
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is conn:
                        # Every request line the client sends, not only a connection's first:
                        # a request on a kept-alive connection is a request too.
                        lines = [
                            line.decode(errors="replace")
                            for line in data.split(b"\r\n")
                            if REQUEST_LINE.fullmatch(line)
                        ]
                        with self._lock:
                            self.requests.extend(lines)
                    (up if src is conn else conn).sendall(data)
        except OSError:
            return
        finally:
            conn.close()
            up.close()


__all__ = ["PodLink", "Relay", "connect_pod_to_node"]
