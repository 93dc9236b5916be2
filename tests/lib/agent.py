"""The real `multus-eni-agent` run in the emulator's namespace (it reaches EC2 through the fault
proxy there), and pods for it: each pod a network namespace of its own, linked into the
agent's `--netns-dir`, with a sidecar in agent mode inside.

Several agents share this host: each has its own socket, netns directory and state
directory, and its node's ENIs are those whose MACs its pods carry.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from . import sidecar as sidecar_lib
from .moto import CREDENTIALS, REGION
from .netns import NetNS

_ports = itertools.count(19900)


def binary_path() -> Path:
    return sidecar_lib.binary_path().parent / "multus-eni-agent"


class Agent:
    """One agent process; `start()` again after `kill()` restarts it with the same state."""

    def __init__(self, ns: NetNS, endpoint: str, workdir: Path, binary: Path | None = None, args: list[str] | None = None):
        self.ns = ns
        self.endpoint = endpoint
        self.workdir = workdir
        self.socket = workdir / "run" / "agent.sock"
        self.netns_dir = workdir / "netns"
        self.state_dir = workdir / "state"
        self.netns_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = next(_ports)
        self.binary = binary or binary_path()
        self.args = list(args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"agent-{self.starts}.log"

    def start(self, *extra: str) -> "Agent":
        self.starts += 1
        argv = [
            str(self.binary),
            "run",
            f"--socket={self.socket}",
            f"--metrics-addr=127.0.0.1:{self.metrics_port}",
            f"--netns-dir={self.netns_dir}",
            f"--state-dir={self.state_dir}",
            *self.args,
            *extra,
        ]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "NODE_NAME": "e2e-node",
            "RUST_LOG": "info",
            **sidecar_lib.aws_env(self.endpoint),
        }
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.ns.exec_argv(argv), env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        if getattr(self, "_log", None):
            self._log.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # === observation ===

    def http(self, path: str) -> tuple[int | None, str]:
        import urllib.error
        import urllib.request

        def get() -> tuple[int | None, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, ""
            except OSError:
                return None, ""

        return self.ns.call(get)

    def metric(self, name: str, labels: str = "") -> float:
        """A sample of `/metrics`, e.g. metric("multus_eni_agent_refusals_total", 'reason="not_held"')."""
        _, text = self.http("/metrics")
        want = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for i in range(1, self.starts + 1):
            path = self.workdir / f"agent-{i}.log"
            for line in path.read_text(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"raw": line})
        return out

    def log_text(self) -> str:
        return "".join((self.workdir / f"agent-{i}.log").read_text(errors="replace") for i in range(1, self.starts + 1))

    def checkpoint(self) -> dict[str, Any]:
        path = self.state_dir / "agent.json"
        return json.loads(path.read_text()) if path.exists() else {}


class AgentPod:
    """A pod on an agent's node: its own network namespace (linked into the agent's
    `--netns-dir`), veth links carrying ENI MACs, and optionally a sidecar in agent mode."""

    def __init__(self, agent: Agent, tmp_path: Path, sidecar_binary: Path, name: str):
        self.agent = agent
        self.ns = NetNS()
        self.name = name
        self.tmp_path = tmp_path
        self.sidecar_binary = sidecar_binary
        self.link_path = agent.netns_dir / self.ns.name
        os.symlink(self.ns.path, self.link_path)
        self.sidecar: sidecar_lib.Sidecar | None = None
        self._links = 0

    def link(self, name: str, mac: str, *addresses: str) -> None:
        self._links += 1
        self.ns.add_veth(name, f"p{self._links}", mac)
        for a in addresses:
            self.add(name, a)

    def add(self, name: str, address: str) -> None:
        self.ns.add_address(name, address + ("/64" if ":" in address else "/24"))

    def remove(self, name: str, address: str) -> None:
        self.ns.del_address(name, address + ("/64" if ":" in address else "/24"))

    def start_sidecar(self, interfaces: list[str], *args: str) -> sidecar_lib.Sidecar:
        # No AWS settings at all: agent mode must not need them.
        no_aws = {k: None for k in sidecar_lib.aws_env("")}
        self.sidecar = sidecar_lib.Sidecar(
            self.ns,
            interfaces,
            "",
            self.tmp_path / f"sidecar-{self.name}.log",
            args=[f"--agent-socket={self.agent.socket}", "--resync-interval=1s", *args],
            env={**no_aws, "POD_NAME": self.name},
            binary=self.sidecar_binary,
        )
        return self.sidecar.start()

    def delete(self) -> None:
        """The pod is gone: its sidecar killed, its namespace deleted."""
        if self.sidecar is not None:
            self.sidecar.kill()
        try:
            os.unlink(self.link_path)
        except FileNotFoundError:
            pass
        self.ns.close()


def raw_claim(pod_ns: NetNS, socket_path: Path, interfaces: list[dict[str, Any]]) -> dict[str, Any]:
    """Connects to the agent from inside `pod_ns` as any process could, sends one claim and
    returns the first status answer."""

    def talk() -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(str(socket_path))
            s.sendall((json.dumps({"type": "claim", "v": 1, "seq": 1, "interfaces": interfaces}) + "\n").encode())
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    raise AssertionError(f"agent closed the connection; got {buf!r}")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    answer = json.loads(line)
                    # The first status may say "pending" while the ENI is being read.
                    if answer.get("type") != "status" or all(a["state"] != "pending" for a in answer["addresses"]):
                        return answer

    return pod_ns.call(talk)


__all__ = ["Agent", "AgentPod", "raw_claim", "REGION", "CREDENTIALS"]
