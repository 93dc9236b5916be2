"""Shared pytest fixtures: network namespaces, the EC2 emulator, the fault proxy and the
sidecar processes. Everything runs inside namespaces the tests create and delete."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import moto, sidecar  # noqa: E402
from lib.fault_proxy import FaultProxy  # noqa: E402
from lib.netns import NetNS  # noqa: E402


# The release the version-skew tests run beside this one, and the commit
# scripts/build-previous-sidecar.sh builds it from (CHANGELOG.md names both; tests/test_versions.py
# checks that the commit is that release).
PREVIOUS_RELEASE = "0.1.0"  # protocol v1
# This release, as Cargo.toml's [workspace.package] says.
CURRENT_RELEASE = tomllib.loads((Path(__file__).resolve().parent.parent / "Cargo.toml").read_text())["workspace"][
    "package"
]["version"]
PREVIOUS_RELEASE_COMMIT = "db67960"


def private_binary(path: Path, tmp_path_factory: pytest.TempPathFactory, package: str) -> Path:
    """A private hard link to (or copy of) a built binary: a concurrent `cargo build`
    relinking target/debug must not swap it under a running test."""
    if not path.exists():
        pytest.fail(f"{path} missing: run `cargo build -p {package}` first (pytest does not build)")
    private = tmp_path_factory.mktemp("bin") / path.name
    try:
        os.link(path, private)
    except OSError:
        shutil.copy2(path, private)
    return private


@pytest.fixture(scope="session")
def sidecar_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full sidecar, `multus-eni-sidecar` (direct and agent mode)."""
    return private_binary(sidecar.binary_path(sidecar.FULL), tmp_path_factory, sidecar.FULL)


@pytest.fixture(scope="session")
def sidecar_agent_mode_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`multus-eni-sidecar-agent-mode`: what the webhook injects in agent mode. It must be this
    release's: scripts/build-previous-sidecar.sh builds the previous one in the same target
    directory, and a version-skew test run with two old sidecars would time out, not fail."""
    path = sidecar.binary_path(sidecar.AGENT_MODE)
    if path.exists():
        version = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=False).stdout
        assert version.split()[-1:] == [CURRENT_RELEASE], (
            f"{path} says {version.strip()!r}, not {CURRENT_RELEASE}: "
            f"run `cargo build -p {sidecar.AGENT_MODE}` (the previous release's build replaced it)"
        )
    return private_binary(path, tmp_path_factory, sidecar.AGENT_MODE)


@pytest.fixture(scope="session")
def previous_sidecar_agent_mode_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's `multus-eni-sidecar-agent-mode` (scripts/build-previous-sidecar.sh
    builds it into target/prev-release/): pods injected before an agent upgrade run it. Missing:
    a skip locally, a failure under CI=true (a version-skew test that never runs proves nothing)."""
    base = Path(os.environ.get("MULTUS_ENI_PREV_BIN_DIR", sidecar.REPO / "target" / "prev-release"))
    path = base / sidecar.AGENT_MODE
    if not path.exists():
        message = (
            f"{path} missing: run scripts/build-previous-sidecar.sh (builds {PREVIOUS_RELEASE} "
            f"from {PREVIOUS_RELEASE_COMMIT})"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    # The binary must be that release, not a leftover of another build.
    version = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=False).stdout
    assert version.split()[-1:] == [PREVIOUS_RELEASE], (
        f"{path} says {version.strip()!r}, not {PREVIOUS_RELEASE}: run scripts/build-previous-sidecar.sh"
    )
    return private_binary(path, tmp_path_factory, sidecar.AGENT_MODE)


@pytest.fixture(scope="session")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The node agent, as for the sidecar."""
    from lib import agent

    return private_binary(agent.binary_path(), tmp_path_factory, "multus-eni-agent")


@pytest.fixture(scope="session")
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")


class Emulator:
    """A namespace with moto_server and the fault proxy in front of it."""

    def __init__(self, ns: NetNS, server: moto.MotoServer, proxy: FaultProxy):
        self.ns, self.server, self.proxy = ns, server, proxy

    @property
    def endpoint(self) -> str:
        """Where the sidecar sends its EC2 calls (through the proxy)."""
        return self.proxy.endpoint

    @property
    def direct(self) -> str:
        """Where the test itself talks to the emulator (not counted by the proxy)."""
        return self.server.endpoint

    def eni(self, eni_id: str) -> moto.EniState:
        return moto.eni_state(self.ns, self.direct, eni_id)


@pytest.fixture(scope="module")
def emulator(require_root: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    logs = tmp_path_factory.mktemp("emulator")
    ns = NetNS()
    server = proxy = None
    try:
        server = moto.MotoServer(ns, log_path=str(logs / "moto.log")).start()
        proxy = FaultProxy(ns, server.port).start()
        yield Emulator(ns, server, proxy)
    finally:
        if proxy is not None:
            proxy.stop()
        if server is not None:
            server.stop()
        ns.close()


class Pod:
    """The pod side of one test: veth links named like the pod's interfaces in the
    emulator's namespace, and the sidecars started for them. Cleaned up after the test."""

    def __init__(self, emulator: Emulator, tmp_path: Path, binary: Path):
        self.emulator = emulator
        self.binary = binary
        self.ns = emulator.ns
        self.tmp_path = tmp_path
        self.links: list[str] = []
        self.worlds: list[moto.World] = []
        self.sidecars: list[sidecar.Sidecar] = []

    def link(self, name: str, mac: str, *addresses: str) -> None:
        """An interface `name` carrying `mac` (an ipvlan child carries its master's MAC)."""
        peer = f"p{len(self.links)}-{os.getpid() % 100000}"
        self.ns.add_veth(name, peer, mac)
        self.links.append(name)
        for a in addresses:
            self.add(name, a)

    def add(self, name: str, address: str, nodad: bool = True) -> None:
        self.ns.add_address(name, address + ("/64" if ":" in address else "/24"), nodad=nodad)

    def remove(self, name: str, address: str) -> None:
        self.ns.del_address(name, address + ("/64" if ":" in address else "/24"))

    def start_sidecar(
        self, interfaces: list[str], *args: str, env: dict[str, str | None] | None = None, binary: Path | None = None
    ) -> sidecar.Sidecar:
        s = sidecar.Sidecar(
            self.ns,
            interfaces,
            self.emulator.endpoint,
            self.tmp_path / f"sidecar-{len(self.sidecars)}.log",
            args=list(args),
            env=env,
            binary=binary or self.binary,
        )
        self.sidecars.append(s)
        return s.start()

    def cleanup(self) -> None:
        for s in self.sidecars:
            s.kill()
        for name in self.links:
            self.ns.del_link(name)


@pytest.fixture
def pod(emulator: Emulator, sidecar_binary: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pod]:
    emulator.proxy.reset()
    p = Pod(emulator, tmp_path, sidecar_binary)
    try:
        yield p
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for s in p.sidecars:
                sys.stderr.write(f"--- {s.log_path}\n{s.log_text()[-6000:]}\n")
            for w in p.worlds:
                for e in [w.eth0, *w.enis]:
                    sys.stderr.write(f"--- {e.id} ({e.mac}): {emulator.eni(e.id)}\n")
            sys.stderr.write(f"--- proxy: {emulator.proxy.counts()}\n")
        p.cleanup()
        emulator.proxy.reset()


# === CI: a skip of these is a failure ===

# Test modules that prove a feature works end to end, or that what an operator applies is
# consistent: under CI=true a skip of any of their tests (not root, a binary missing, a stripped
# build, promtool missing) is a failure, so CI cannot pass with a feature untested.
# Every `test_*_e2e.py` (agent, agent node, sidecar, chain) counts, present and future.
# The hooks below run in pytest-xdist's workers too (scripts/test.sh): tests/test_ci_skips.py
# checks both ways.
MUST_NOT_SKIP = frozenset({"test_manifests.py", "test_alert_rules.py"})
MUST_NOT_SKIP_PATTERN = "test_*_e2e.py"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_is_failure(path: Path | str) -> bool:
    name = Path(str(path)).name
    return in_ci() and (name in MUST_NOT_SKIP or fnmatch.fnmatch(name, MUST_NOT_SKIP_PATTERN))


def skip_reason(rep: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = rep.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def fail_skip(rep: pytest.TestReport | pytest.CollectReport) -> None:
    rep.longrepr = (
        f"{skip_reason(rep)}\n(skipped under CI=true, which is a failure for this module: "
        "tests/conftest.py MUST_NOT_SKIP; run as root with the binaries built, see scripts/test.sh)"
    )
    rep.outcome = "failed"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, "wasxfail") and skip_is_failure(item.path):
        fail_skip(rep)
    setattr(item, f"rep_{rep.when}", rep)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A module-level skip (`pytest.skip(allow_module_level=True)`, `importorskip`) as well."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and skip_is_failure(getattr(collector, "path", "")):
        fail_skip(rep)
