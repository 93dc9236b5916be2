"""The real `multus-eni-agent` run in the emulator's namespace (it reaches EC2 through the fault
proxy there), and pods for it: each pod a network namespace of its own, linked into the
agent's `--netns-dir`, with a sidecar in agent mode inside.

Several agents share this host: each has its own socket, netns directory and state
directory. A simulated node (`SimNode`) is an agent bound to an instance of its own
(`--instance-id`, a Multus ENI and a VPC CNI ENI attached to it, see `moto.add_node`).

Claims a test makes by hand come from a process started inside the pod's namespace
(`claim_from`, tests/lib/claim_client.py): the agent reads the caller's namespace from the
peer's pid, and a pytest thread that entered a namespace is reported with pytest's pid (the
host's namespace).
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import sidecar as sidecar_lib
from .sidecar import wait_for
from .moto import CREDENTIALS, REGION, NodeEnis
from .netns import NetNS

_ports = itertools.count(19900)


CLAIM_CLIENT = Path(__file__).resolve().parent / "claim_client.py"


def binary_path() -> Path:
    return sidecar_lib.binary_path().parent / "multus-eni-agent"


@functools.lru_cache(maxsize=None)
def supports_flag(binary: Path, flag: str) -> bool:
    """Whether `binary run` knows `flag`: the agent before issue 17 has no `--instance-id`,
    and the tests still run against it (to see them fail for the reason they name)."""
    out = subprocess.run([str(binary), "run", "--help"], capture_output=True, text=True)
    return flag in out.stdout


class Agent:
    """One agent process; `start()` again after `kill()` restarts it with the same state."""

    def __init__(
        self,
        ns: NetNS,
        endpoint: str,
        workdir: Path,
        binary: Path | None = None,
        args: list[str] | None = None,
        instance_id: str | None = None,
    ):
        self.ns = ns
        self.instance_id = instance_id
        self.endpoint = endpoint
        self.workdir = workdir
        self.socket = workdir / "run" / "agent.sock"
        self.netns_dir = workdir / "netns"
        self.state_dir = workdir / "state"
        self.netns_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = next(_ports)
        # What `--metrics-addr` binds ("[::]" for the DaemonSet's dual-stack default); the
        # tests reach it at 127.0.0.1 either way.
        self.metrics_host = "127.0.0.1"
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
            f"--metrics-addr={self.metrics_host}:{self.metrics_port}",
            f"--netns-dir={self.netns_dir}",
            f"--state-dir={self.state_dir}",
            *self._instance_args(),
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

    def _instance_args(self) -> list[str]:
        if self.instance_id is None or not supports_flag(self.binary, "--instance-id"):
            return []
        return [f"--instance-id={self.instance_id}"]

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

    def status(self) -> dict[str, Any]:
        """`GET /status` as JSON ({} when not answered)."""
        code, text = self.http("/status")
        return json.loads(text) if code == 200 and text else {}

    def status_of(self, address: str) -> list[dict[str, Any]]:
        return [a for a in self.status().get("addresses", []) if a.get("address") == address]

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the agent process, in KiB."""
        assert self.proc is not None
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def first_timeout_at(self, what: str) -> float:
        """Waits (60 s at most) for the agent's first log line with outcome `timeout` (an EC2
        call whose answer never came) and returns its time (seconds since the epoch)."""
        line = wait_for(
            lambda: [x for x in self.logs() if x.get("outcome") == "timeout"],
            f"the agent's {what} timed out",
            timeout=60,
        )[0]
        return datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()

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

    def add(self, name: str, address: str, nodad: bool = True) -> None:
        self.ns.add_address(name, address + ("/64" if ":" in address else "/24"), nodad=nodad)

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


def claim_line(interfaces: list[dict[str, Any]], v: int = 1, seq: int = 1) -> str:
    return json.dumps({"type": "claim", "v": v, "seq": seq, "interfaces": interfaces})


def claim_from(
    ns: NetNS | None,
    socket_path: Path,
    mode: str,
    arg: str,
    own_pid_namespace: bool = False,
    timeout: float = 30,
) -> dict[str, Any]:
    """Runs tests/lib/claim_client.py as a process inside `ns` (the host's namespace when None),
    optionally in a pid namespace of its own; returns its report
    ({"answers": [...], "closed": bool, "sent": n})."""
    argv = [sys.executable, str(CLAIM_CLIENT), str(socket_path), mode, arg, str(timeout)]
    if own_pid_namespace:
        argv = ["unshare", "--pid", "--fork", *argv]
    if ns is not None:
        argv = ns.exec_argv(argv)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    if out.returncode != 0:
        raise AssertionError(f"claim client failed ({out.returncode}): {out.stderr.strip()}")
    return json.loads(out.stdout)


def claim(ns: NetNS | None, socket_path: Path, interfaces: list[dict[str, Any]], v: int = 1, **kw: Any) -> dict[str, Any]:
    """One claim from a process inside `ns`; returns the claim client's report."""
    return claim_from(ns, socket_path, "claim", claim_line(interfaces, v), **kw)


class SimNode:
    """One simulated node: an instance of its own in EC2 (`moto.NodeEnis`) and its agent, bound
    to that instance with `--instance-id`; pods are network namespaces linked into the agent's
    `--netns-dir`."""

    def __init__(
        self,
        name: str,
        enis: NodeEnis,
        ns: NetNS,
        endpoint: str,
        tmp_path: Path,
        agent_binary: Path,
        sidecar_binary: Path,
        args: list[str],
    ):
        self.name = name
        self.enis = enis
        self.tmp_path = tmp_path
        self.sidecar_binary = sidecar_binary
        self.agent = Agent(ns, endpoint, tmp_path / f"node-{name}", agent_binary, args, instance_id=enis.instance_id)
        self.pods: list[AgentPod] = []

    def pod(self, name: str | None = None, sidecar_binary: Path | None = None) -> AgentPod:
        p = AgentPod(self.agent, self.tmp_path, sidecar_binary or self.sidecar_binary, name or f"{self.name}-pod-{len(self.pods)}")
        self.pods.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.pods:
            p.delete()
        self.agent.kill()


__all__ = ["Agent", "AgentPod", "SimNode", "claim", "claim_from", "REGION", "CREDENTIALS"]
