"""Sidecar reaction benchmark: from an address change in the pod's namespace to the EC2
request arriving at the proxy; EC2 calls per change; idle CPU; RSS; binary size. With
`--agent` the sidecar runs in agent mode beside one multus-eni-agent (which makes the calls);
the agent's RSS is reported too.

The address is added and deleted with one rtnetlink message sent from this process (a
socket opened inside the pod's namespace), so the start timestamp is taken right before
the kernel sees the change — no `ip` process start-up in the measurement. The arrival
timestamp is the proxy's (tests/lib/fault_proxy.py: `time.monotonic()` when the request
head was read), on the same clock.

Run as root through scripts/bench-sidecar.sh.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cluster
from cluster import Emulator
from ec2_throttle import BucketModel, ThrottlingProxy

RTM_NEWADDR, RTM_DELADDR = 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
IFA_ADDRESS, IFA_LOCAL = 1, 2


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: object) -> None:
    raise Interrupted(f"signal {signum}")


class AddressSocket:
    """An rtnetlink socket opened inside a namespace; adds/deletes IPv4 addresses there."""

    def __init__(self, sock: socket.socket, ifindex: int):
        self.sock, self.ifindex, self.seq = sock, ifindex, 0

    def _rtattr(self, kind: int, data: bytes) -> bytes:
        raw = struct.pack("HH", 4 + len(data), kind) + data
        return raw + b"\0" * (-len(raw) % 4)

    def change(self, add: bool, address: str, prefix: int) -> None:
        self.seq += 1
        packed = ipaddress.IPv4Address(address).packed
        body = struct.pack("BBBBI", socket.AF_INET, prefix, 0, 0, self.ifindex)
        body += self._rtattr(IFA_LOCAL, packed) + self._rtattr(IFA_ADDRESS, packed)
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if add else 0)
        kind = RTM_NEWADDR if add else RTM_DELADDR
        self.sock.send(struct.pack("IHHII", 16 + len(body), kind, flags, self.seq, 0) + body)

    def ack(self) -> None:
        reply = self.sock.recv(65536)
        _, kind, _, _, _ = struct.unpack("IHHII", reply[:16])
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack("i", reply[16:20])
            if err != 0:
                raise OSError(-err, os.strerror(-err))


def open_socket(ifname: str) -> AddressSocket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    sock.bind((0, 0))
    return AddressSocket(sock, socket.if_nametoindex(ifname))


def wait_arrival(proxy: ThrottlingProxy, action: str, address: str, since: float, timeout: float = 10.0) -> float | None:
    """The proxy's arrival time of the first `action` request naming `address` after `since`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in proxy.requests(action):
            if r.arrived >= since and address in r.values("PrivateIpAddress"):
                return r.arrived
        time.sleep(0.0005)
    return None


def timed_change(nl: AddressSocket, proxy: ThrottlingProxy, add: bool, address: str) -> tuple[float, float]:
    """Adds (or deletes) `address` with one rtnetlink message; returns when the kernel was told
    and when the Assign (Unassign) naming it arrived at the proxy, on the same clock."""
    action = "AssignPrivateIpAddresses" if add else "UnassignPrivateIpAddresses"
    t0 = time.monotonic()
    nl.change(add, address, 20)
    nl.ack()
    at = wait_arrival(proxy, action, address, t0)
    if at is None:
        raise RuntimeError(f"no {action} for {address}")
    return t0, at


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument(
        "--settle", type=float, default=None,
        help="pause after each call is seen (default 0.3 s; agent mode 5.2 s: the agent paces one ENI's "
        "calls 5 s apart (--batch-interval), so changes closer together are batched by design, and "
        "'low load' is one change per interval)",
    )
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--agent", action="store_true", help="agent mode: the sidecar beside one multus-eni-agent")
    ap.add_argument("--write-doc", action="store_true", help="replace the figures in docs/scale.md")
    args = ap.parse_args()
    if args.settle is None:
        args.settle = 5.2 if args.agent else 0.3
    if args.agent and args.write_doc:
        print("reaction: --write-doc records direct mode only", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("reaction: needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    cluster.quiet_proxy_shutdown()
    run_id = os.environ.get("MNE_BENCH_RUN", str(os.getpid()))
    log_dir = Path(tempfile.mkdtemp(prefix=f"mne-bench-{run_id}-"))
    binary = cluster.sidecar_binary(args.agent)
    emu: Emulator | None = None
    pod = None
    proxy = None
    agents: dict = {}
    try:
        emu = Emulator(run_id, log_dir)
        emu.moto.start()
        world = cluster.build_world(emu, 1)
        pod = cluster.plan_pods(run_id, world, 1)[0]
        cluster.create_pod(emu, pod)
        cluster.attach_pods_to_bridge(emu, [pod])
        proxy = ThrottlingProxy(emu.ns, cluster.MOTO_PORT, cluster.BRIDGE_IP, BucketModel()).start()
        extra_args = []
        if args.agent:
            from scale_sim import link_pod, start_agents

            agents = start_agents(emu, proxy.endpoint, [pod], log_dir)
            link_pod(agents, pod)
            extra_args.append(f"--agent-socket={agents[pod.eni.node].socket}")
        t_start = time.monotonic()
        cluster.start_sidecar(binary, proxy.endpoint, pod, log_dir, extra_args)
        first = pod.addresses[-1]
        arrived = wait_arrival(proxy, "AssignPrivateIpAddresses", first, t_start, timeout=30)
        if arrived is None:
            raise RuntimeError("the sidecar never assigned its first address; see --keep-logs")
        startup = arrived - t_start
        time.sleep(max(1.0, args.settle))
        assert pod.ns is not None
        nl = pod.ns.call(open_socket, "net1")
        add_ms: list[float] = []
        del_ms: list[float] = []
        calls_before = proxy.calls()
        t_changes = time.monotonic()
        for i in range(args.changes):
            address = str(ipaddress.IPv4Address("10.90.8.10") + i)
            t0, at = timed_change(nl, proxy, True, address)
            add_ms.append((at - t0) * 1000)
            time.sleep(args.settle)
            t0, at = timed_change(nl, proxy, False, address)
            del_ms.append((at - t0) * 1000)
            time.sleep(args.settle)
        changes = 2 * args.changes
        calls = proxy.calls() - calls_before
        by_action = {}
        for r in proxy.requests():
            if r.arrived >= t_changes:
                by_action[r.action] = by_action.get(r.action, 0) + 1
        assert pod.proc is not None
        time.sleep(2.0)
        s0 = cluster.proc_stats(pod.proc.pid)
        t_idle = time.monotonic()
        time.sleep(args.idle)
        s1 = cluster.proc_stats(pod.proc.pid)
        idle_actions: dict[str, int] = {}
        for r in proxy.requests():
            if r.arrived >= t_idle:
                idle_actions[r.action] = idle_actions.get(r.action, 0) + 1
        idle_calls = sum(idle_actions.values())
        if s0 is None or s1 is None:
            raise RuntimeError("the sidecar exited")
        a_stats = [cluster.proc_stats(a.proc.pid) for a in agents.values() if a.proc is not None]
        idle_cpu_ms = (s1.cpu_seconds - s0.cpu_seconds) * 1000
        size = os.path.getsize(binary)
        stripped = "not stripped" not in subprocess.run(["file", "-b", binary], capture_output=True, text=True).stdout
        proxy.check_hooked()

        def pct(v: list[float], q: float) -> str:
            return f"{cluster.percentile(v, q):.1f} ms"

        profile = Path(binary).parent.name
        lines = [
            f"sidecar binary: {binary} ({profile}), {size / 1024 / 1024:.1f} MiB, {'stripped' if stripped else 'with symbols'}"
            + (", agent mode" if args.agent else ", direct mode"),
            f"start → first AssignPrivateIpAddresses: {startup * 1000:.0f} ms",
            "",
            "| measure | p50 | p99 | max |",
            "| --- | --- | --- | --- |",
            f"| `ip addr add` → AssignPrivateIpAddresses at the proxy ({len(add_ms)} changes) | {pct(add_ms, .5)} | {pct(add_ms, .99)} | {max(add_ms):.1f} ms |",
            f"| `ip addr del` → UnassignPrivateIpAddresses at the proxy ({len(del_ms)} changes) | {pct(del_ms, .5)} | {pct(del_ms, .99)} | {max(del_ms):.1f} ms |",
            "",
            f"- EC2 calls per change: {calls / changes:.2f} ({calls} calls for {changes} changes: "
            + ", ".join(f"{k} {v}" for k, v in sorted(by_action.items()))
            + ")",
            f"- idle CPU over {args.idle:.0f} s: {idle_cpu_ms:.0f} ms ({idle_cpu_ms / 10 / args.idle:.3f} % of one core), "
            f"EC2 calls while idle: {idle_calls}"
            + (f" ({', '.join(f'{k} {v}' for k, v in sorted(idle_actions.items()))}: the 60 s resync)" if idle_calls else ""),
            f"- RSS {s1.rss_kib / 1024:.1f} MiB = {s1.rss_kib} KiB (RssAnon {s1.anon_kib / 1024:.1f} MiB, RssFile {s1.file_kib / 1024:.1f} MiB), "
            f"peak (VmHWM) {s1.hwm_kib / 1024:.1f} MiB",
        ]
        for a in a_stats:
            if a is not None:
                lines.append(
                    f"- agent RSS {a.rss_kib / 1024:.1f} MiB (RssAnon {a.anon_kib / 1024:.1f} MiB, RssFile "
                    f"{a.file_kib / 1024:.1f} MiB), peak (VmHWM) {a.hwm_kib / 1024:.1f} MiB"
                )
        print("\n".join(lines))
        if args.write_doc:
            env = "BENCH_PROFILE=release " if profile == "release" else ""
            flags = " ".join(a for a in sys.argv[1:] if a != "--write-doc")
            cluster.write_doc_section("bench-sidecar", f"{env}scripts/bench-sidecar.sh {flags}".strip(), "\n".join(lines))
        return 0
    except Interrupted as e:
        print(f"reaction: interrupted ({e}); cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if pod is not None:
            cluster.stop_sidecar(pod)
            if pod.ns is not None:
                pod.ns.close()
            else:
                cluster.delete_namespace(pod.ns_name)
        for a in agents.values():
            a.kill()
        if proxy is not None:
            proxy.stop()
        if emu is not None:
            emu.close()
        if args.keep_logs:
            print(f"reaction: logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
