"""Node agent benchmark (issue 17): what it costs the agent to watch a node of 110 pods.

One simulated node (one instance, three Multus ENIs, moto behind the bench's proxy), 110 pod
namespaces created before the agent starts, none with a sidecar (`--pods all`):

- adoption: the agent starts and makes every pod's address routable (time, EC2 calls);
- watch reaction: an address added in a pod without a sidecar → its AssignPrivateIpAddresses at the
  proxy, and the holder lookup (DescribeNetworkInterfaces) before it; an address deleted →
  UnassignPrivateIpAddresses. The address is changed with one rtnetlink message from this
  process (the start timestamp is taken right before the kernel sees it); arrivals are the
  proxy's, on the same clock. One change per `--batch-interval` (the first change after a quiet
  period goes at once);
- idle: RSS with 110 watched namespaces and `--connections` idle socket connections (opened by
  one process in each pod namespace), CPU over `--idle` seconds, EC2 calls meanwhile, and the
  DescribeNetworkInterfaces calls per resync (issue 21: 1, the instance's read; MAC lookups of
  the pods' veths are answered once and kept);
- idle HTTP: RSS with `--http-connections` idle TCP connections opened to the agent's HTTP port
  (more than its default `--max-http-connections`, 1,024: the rest are closed at accept), and how
  many are still open after the header timeout (`--http-header-timeout`);
- release: a pod's namespace deleted → the UnassignPrivateIpAddresses of its addresses.

Run as root through scripts/bench-agent.sh; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cluster
from cluster import Emulator
from ec2_throttle import BucketModel, ThrottlingProxy
from reaction import Interrupted, _on_signal, open_socket, timed_change, wait_arrival
from scale_sim import all_assigned, link_pod, start_agents, unlink_pod, wait_until

HOLD_CONNECTIONS = """
import socket, sys
conns = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    conns.append(s)
print("connected", flush=True)
sys.stdin.read()
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=110)
    ap.add_argument("--changes", type=int, default=30)
    ap.add_argument("--deletes", type=int, default=20)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--idle", type=float, default=65.0, help="idle window (covers one 60 s resync)")
    ap.add_argument("--http-connections", type=int, default=3000)
    ap.add_argument("--http-header-timeout", default="10s")
    ap.add_argument("--batch-interval", default="1s")
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("agent_watch: needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    cluster.quiet_proxy_shutdown()
    interval = float(args.batch_interval.rstrip("s"))
    settle = interval + 0.3
    run_id = os.environ.get("MNE_BENCH_RUN", str(os.getpid()))
    log_dir = Path(tempfile.mkdtemp(prefix=f"mne-bench-{run_id}-"))
    emu: Emulator | None = None
    proxy = None
    pods: list[cluster.Pod] = []
    agents: dict = {}
    holders: list[subprocess.Popen[str]] = []
    try:
        emu = Emulator(run_id, log_dir)
        emu.moto.start()
        world = cluster.build_world(emu, 3)
        pods = cluster.plan_pods(run_id, world, args.pods)
        for p in pods:
            cluster.create_pod(emu, p)
        proxy = ThrottlingProxy(emu.ns, cluster.MOTO_PORT, cluster.BRIDGE_IP, BucketModel()).start()
        per_pod = math.ceil(args.connections / len(pods))
        extra = [
            f"--batch-interval={args.batch_interval}",
            f"--max-connections-per-pod={per_pod + 1}",
            f"--http-header-timeout={args.http_header_timeout}",
        ]
        t_start = time.monotonic()
        agents = start_agents(emu, proxy.endpoint, pods, log_dir, extra)
        (agent,) = agents.values()
        for p in pods:
            link_pod(agents, p)
        wanted = {p.index: set(p.addresses) for p in pods}
        if not wait_until(emu, world.subnet_id, all_assigned(pods, wanted), 120):
            raise RuntimeError("the agent did not adopt every pod within 120 s")
        adoption = time.monotonic() - t_start
        adoption_calls = {k: v for k, v in proxy_counts(proxy, t_start).items()}
        time.sleep(settle)

        # --- watch reaction: adds and deletes in a pod without a sidecar.
        probe = pods[0]
        assert probe.ns is not None
        nl = probe.ns.call(open_socket, "net1")
        add_ms, lookup_ms, del_ms = [], [], []
        for i in range(args.changes):
            address = str(ipaddress.IPv4Address("10.90.12.10") + i)
            t0, at = timed_change(nl, proxy, True, address)
            add_ms.append((at - t0) * 1000)
            lookups = [r.arrived for r in proxy.requests("DescribeNetworkInterfaces") if t0 <= r.arrived <= at]
            if lookups:
                lookup_ms.append((min(lookups) - t0) * 1000)
            time.sleep(settle)
            t0, at = timed_change(nl, proxy, False, address)
            del_ms.append((at - t0) * 1000)
            time.sleep(settle)

        # --- idle: 110 namespaces watched, N idle connections from the pods.
        for p in pods:
            holder = subprocess.Popen(
                ["ip", "netns", "exec", p.ns_name, sys.executable, "-c", HOLD_CONNECTIONS, str(agent.socket), str(per_pod)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            holders.append(holder)
        for h in holders:
            assert h.stdout is not None
            if h.stdout.readline().strip() != "connected":
                raise RuntimeError("a connection holder failed")
        time.sleep(2.0)
        s0 = cluster.proc_stats(agent.proc.pid)
        t_idle = time.monotonic()
        time.sleep(args.idle)
        s1 = cluster.proc_stats(agent.proc.pid)
        if s0 is None or s1 is None:
            raise RuntimeError("the agent exited")
        idle_calls = proxy_counts(proxy, t_idle)
        resyncs = max(1, round(args.idle / 60.0))
        refused = agent.metric("multus_eni_agent_limit_hits_total", 'limit="connections_per_pod"')
        for h in holders:
            h.kill()
            h.wait()
        holders.clear()

        # --- idle HTTP connections: RSS while they are open, then the header timeout cuts them.
        http = emu.ns.call(idle_http, agent.metrics_port, args.http_connections, agent.proc.pid,
                           float(args.http_header_timeout.rstrip("s")))

        # --- release: a pod's namespace is deleted.
        rel_ms = []
        for p in pods[1 : 1 + args.deletes]:
            address = p.addresses[0]
            t0 = time.monotonic()
            unlink_pod(agents, p)
            assert p.ns is not None
            p.ns.close()
            at = wait_arrival(proxy, "UnassignPrivateIpAddresses", address, t0, timeout=30)
            if at is None:
                raise RuntimeError(f"no UnassignPrivateIpAddresses for {address} after its namespace was deleted")
            rel_ms.append((at - t0) * 1000)
            time.sleep(settle)
        proxy.check_hooked()

        def pct(v: list[float], q: float) -> str:
            return f"{cluster.percentile(v, q):.1f} ms"

        binary = cluster.agent_binary()
        profile = Path(binary).parent.name
        idle_cpu_ms = (s1.cpu_seconds - s0.cpu_seconds) * 1000
        lookups = f"{len(lookup_ms)} of {len(add_ms)} adds looked up a holder first" if lookup_ms else "no add needed a holder lookup"
        lines = [
            f"agent binary: {binary} ({profile}); {len(pods)} pod namespaces without a sidecar, 3 Multus ENIs, "
            f"--batch-interval={args.batch_interval}",
            f"adoption: {len(pods)} namespaces linked into --netns-dir as the agent started, every address routable {adoption:.1f} s later "
            f"({', '.join(f'{k} {v}' for k, v in sorted(adoption_calls.items()))})",
            "",
            "| measure | p50 | p99 | max |",
            "| --- | --- | --- | --- |",
            f"| address added in a pod without sidecar → AssignPrivateIpAddresses ({len(add_ms)}) | {pct(add_ms, .5)} | {pct(add_ms, .99)} | {max(add_ms):.1f} ms |",
            *(
                [f"| … → a holder lookup (DescribeNetworkInterfaces) before it ({len(lookup_ms)}) | {pct(lookup_ms, .5)} | {pct(lookup_ms, .99)} | {max(lookup_ms):.1f} ms |"]
                if lookup_ms
                else []
            ),
            f"| address deleted → UnassignPrivateIpAddresses ({len(del_ms)}) | {pct(del_ms, .5)} | {pct(del_ms, .99)} | {max(del_ms):.1f} ms |",
            f"| namespace deleted → UnassignPrivateIpAddresses ({len(rel_ms)}) | {pct(rel_ms, .5)} | {pct(rel_ms, .99)} | {max(rel_ms):.1f} ms |",
            "",
            f"- idle with {len(pods)} namespaces watched and {per_pod * len(pods)} idle connections "
            f"({per_pod} per pod; refused: {refused:.0f}): RSS {s1.rss_kib / 1024:.1f} MiB (RssAnon "
            f"{s1.anon_kib / 1024:.1f} MiB), peak (VmHWM) {s1.hwm_kib / 1024:.1f} MiB",
            f"- {lookups} (an assign goes out without AllowReassignment first)",
            f"- idle CPU over {args.idle:.0f} s: {idle_cpu_ms:.0f} ms ({idle_cpu_ms / 10 / args.idle:.3f} % of one core); "
            f"EC2 calls meanwhile: {', '.join(f'{k} {v}' for k, v in sorted(idle_calls.items())) or 'none'}",
            f"- DescribeNetworkInterfaces per resync with {len(pods)} pods: "
            f"{idle_calls.get('DescribeNetworkInterfaces', 0) / resyncs:.1f} (over {resyncs} resync(s))",
            f"- {http['opened']} idle HTTP connections ({http['refused']} closed at accept by --max-http-connections): "
            f"RSS {http['rss_kib'] / 1024:.1f} MiB (RssAnon "
            f"{http['anon_kib'] / 1024:.1f} MiB) while open; {http['open_after']} still open "
            f"{http['waited']:.0f} s later (--http-header-timeout={args.http_header_timeout})",
        ]
        print("\n".join(lines))
        return 0
    except Interrupted as e:
        print(f"agent_watch: interrupted ({e}); cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for h in holders:
            h.kill()
        for a in agents.values():
            a.kill()
        for p in pods:
            if p.ns is not None:
                p.ns.close()
            else:
                cluster.delete_namespace(p.ns_name)
        if proxy is not None:
            proxy.stop()
        if emu is not None:
            emu.close()
        if args.keep_logs:
            print(f"agent_watch: logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


def idle_http(port: int, count: int, pid: int, timeout: float) -> dict[str, float]:
    """Opens `count` TCP connections to the agent's HTTP port that never send a request; the
    agent's RSS while they are open, and how many are still open after the header timeout."""
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 256), hard))
    conns = []
    try:
        for _ in range(count):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)
        refused = 0
        for c in conns:
            c.setblocking(False)
            try:
                refused += c.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                refused += 1
        stats = cluster.proc_stats(pid)
        waited = timeout + 5
        time.sleep(waited)
        still = 0
        for c in conns:
            try:
                still += c.recv(1) != b""
            except BlockingIOError:
                still += 1
            except OSError:
                pass
        return {
            "opened": len(conns),
            "rss_kib": stats.rss_kib if stats else 0,
            "anon_kib": stats.anon_kib if stats else 0,
            "open_after": still,
            "refused": refused,
            "waited": waited,
        }
    finally:
        for c in conns:
            c.close()


def proxy_counts(proxy: ThrottlingProxy, since: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in proxy.requests():
        if r.arrived >= since:
            out[r.action] = out.get(r.action, 0) + 1
    return out


if __name__ == "__main__":
    sys.exit(main())
