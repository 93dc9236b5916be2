"""The real sidecar binaries run inside a test network namespace: `multus-eni-sidecar` (both
modes) and `multus-eni-sidecar-agent-mode` (agent mode only, what agent-mode pods run)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from .moto import CREDENTIALS, REGION
from .netns import NetNS

REPO = Path(__file__).resolve().parents[2]
_ports = itertools.count(19811)


FULL = "multus-eni-sidecar"
AGENT_MODE = "multus-eni-sidecar-agent-mode"


def binary_path(name: str = FULL) -> Path:
    """`$MULTUS_ENI_BIN_DIR/<name>`, default `<repo>/target/debug` (pytest does not build: run
    `cargo build --workspace` first)."""
    return Path(os.environ.get("MULTUS_ENI_BIN_DIR", REPO / "target" / "debug")) / name


def aws_env(endpoint: str) -> dict[str, str]:
    """Environment for the SDK chain: region, dummy static credentials, endpoint override,
    and nothing that could make it look elsewhere (no IMDS, no shared config files)."""
    return {
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
        "AWS_ENDPOINT_URL_EC2": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }


class Sidecar:
    """One sidecar process; `stop()`/`kill()` are safe to call more than once."""

    def __init__(
        self,
        ns: NetNS,
        interfaces: list[str],
        endpoint: str,
        log_path: Path,
        args: list[str] | None = None,
        env: dict[str, str | None] | None = None,
        probe_port: int | None = None,
        binary: Path | None = None,
    ):
        self.ns = ns
        self.interfaces = interfaces
        self.probe_port = probe_port or next(_ports)
        # Where the probe is asked: loopback here; the pod IP when the injected args make the
        # sidecar listen there (the chain), as the kubelet asks it.
        self.probe_host = "127.0.0.1"
        self.log_path = log_path
        self.argv = [
            str(binary or binary_path()),
            "run",
            f"--interfaces={','.join(interfaces)}",
            f"--probe-addr=127.0.0.1:{self.probe_port}",
            *(args or []),
        ]
        merged: dict[str, str | None] = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "POD_NAME": "e2e-pod",
            "POD_NAMESPACE": "e2e",
            "NODE_NAME": "e2e-node",
            "RUST_LOG": "info",
            **aws_env(endpoint),
            **(env or {}),
        }
        # A value of None removes the variable (e.g. to run without credentials).
        self.env = {k: v for k, v in merged.items() if v is not None}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Sidecar":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.ns.exec_argv(self.argv),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    # === observation ===

    def probe(self, path: str = "/readyz") -> int | None:
        """HTTP status of a probe path, None while nothing listens."""
        import urllib.error
        import urllib.request

        def get() -> int | None:
            try:
                with urllib.request.urlopen(f"http://{self.probe_host}:{self.probe_port}{path}", timeout=2) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code
            except OSError:
                return None

        return self.ns.call(get)

    def probe_text(self, path: str = "/readyz") -> str | None:
        """Body of a probe answer (the reason of a 503), None while nothing listens."""
        import urllib.error
        import urllib.request

        def get() -> str | None:
            try:
                with urllib.request.urlopen(f"http://{self.probe_host}:{self.probe_port}{path}", timeout=2) as r:
                    return r.read().decode()
            except urllib.error.HTTPError as e:
                return e.read().decode()
            except OSError:
                return None

        return self.ns.call(get)

    def pause(self) -> None:
        """SIGSTOP: the process reads nothing (its netlink socket fills) until `resume()`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # === shutdown ===

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, wait, return the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()


DEFAULT_TIMEOUT = float(os.environ.get("MULTUS_ENI_E2E_TIMEOUT", "120"))


def wait_for(check: Callable[[], Any], what: str, timeout: float | None = None, interval: float = 0.1) -> Any:
    """Polls `check` until it returns something truthy; fails with `what` after `timeout`
    (default `$MULTUS_ENI_E2E_TIMEOUT`, 120 s). The deadline is generous on purpose: this
    waits for convergence, it measures nothing."""
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    checks = 0
    while True:
        value = check()
        checks += 1
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s ({checks} checks) waiting for {what}")
        time.sleep(interval)
