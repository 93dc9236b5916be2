"""Network namespaces for tests: create, run commands inside, enter from Python threads.

Everything a test does over the network stays inside namespaces it created. A Python
thread joins a namespace with setns(2) (through ctypes; Python 3.11 has no os.setns),
and every socket that thread opens afterwards lives in that namespace.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import os
import subprocess
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()


def setns(path: str) -> None:
    """Move the calling thread into the network namespace at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def unique_name(prefix: str = "mne") -> str:
    """A namespace name unique to this process: `mne-<pid>-<n>`."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, raising with its stderr when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class NetNS:
    """A network namespace owned by the test; `close()` deletes it (idempotent)."""

    def __init__(self, name: str | None = None):
        self.name = name or unique_name()
        run(["ip", "netns", "add", self.name])
        self.path = f"/run/netns/{self.name}"
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.ip("link", "set", "lo", "up")

    # === commands inside the namespace ===

    def exec_argv(self, argv: list[str]) -> list[str]:
        """`argv` prefixed so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `ip ARGS` inside the namespace."""
        return run(["ip", "-n", self.name, *args], check=check)

    def add_veth(self, name: str, peer: str, mac: str | None = None, up: bool = True) -> None:
        """A veth pair inside the namespace; `name` gets `mac` (e.g. an ENI's MAC).

        The kernel here has no ipvlan/dummy links; a veth end with the ENI's MAC is what an
        ipvlan child looks like to the sidecar (same MAC as its master).
        """
        self.ip("link", "add", name, "type", "veth", "peer", "name", peer)
        if mac:
            self.ip("link", "set", name, "address", mac)
        if up:
            self.ip("link", "set", peer, "up")
            self.ip("link", "set", name, "up")

    def del_link(self, name: str) -> None:
        self.ip("link", "del", name, check=False)

    def add_address(self, ifname: str, cidr: str, nodad: bool = True) -> None:
        """Add an address; IPv6 gets `nodad` (unless told otherwise) so it is usable, not
        tentative, at once."""
        extra = ["nodad"] if ":" in cidr and nodad else []
        self.ip("addr", "add", cidr, "dev", ifname, *extra)

    def del_address(self, ifname: str, cidr: str) -> None:
        self.ip("addr", "del", cidr, "dev", ifname)

    # === Python code inside the namespace ===

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` on a worker thread that lives in this namespace and return its result."""
        return self.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=4,
                    thread_name_prefix=f"netns-{self.name}",
                    initializer=setns,
                    initargs=(self.path,),
                )
            executor = self._executor
        return executor.submit(fn, *args, **kwargs)

    def thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        """A started daemon thread that runs `target` inside this namespace."""

        def body() -> None:
            setns(self.path)
            target()

        t = threading.Thread(target=body, name=name, daemon=True)
        t.start()
        return t

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
        run(["ip", "netns", "del", self.name], check=False)

    def __enter__(self) -> "NetNS":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
