"""The EC2 emulator's own throughput: moto + the fault proxy under many concurrent clients.

Starts moto and the tests' fault proxy (tests/lib) in a namespace of their own, creates
`--enis` ENIs in one subnet and drives `--addresses` addresses through Assign then Unassign
(`--rounds` times) from `--clients` concurrent clients, all through the proxy. The clients run
in a separate process (raw HTTP, no boto3: signing would cost more CPU than the call), so the
proxy's CPU share is its own thread's and not the clients'.

Prints mutating calls/s sustained, p50/p99 latency, the calls EC2 refused (must be 0: every
address is free when assigned and held when unassigned), the addresses left on the ENIs at the
end (must be 0), and the CPU share of moto's process
and of the proxy's thread over the run (utime + stime from /proc, over wall time). The
benchmarks that run the agent at 1,000 addresses are only as good as this figure: see
docs/scale.md, "The emulator".

Run as root: `.venv/bin/python bench/emulator_throughput.py [--enis 50] [--addresses 1000]
[--clients 32] [--rounds 2] [--batch 1] [--timeout 300]`; ~1 min at the defaults. Every
namespace and process it made is removed on exit, Ctrl-C, SIGTERM or timeout.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import multiprocessing
import os
import queue
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.lib import moto as motolib  # noqa: E402
from tests.lib.fault_proxy import FaultProxy  # noqa: E402
from tests.lib.netns import NetNS, setns  # noqa: E402

VPC_CIDR = "10.90.0.0/16"
SUBNET_CIDR = "10.90.0.0/20"  # 4,096 addresses: ENI primaries at .1.x, pod addresses from .4.0
ENI_PRIMARIES = ipaddress.IPv4Address("10.90.1.10")
POD_ADDRESSES = ipaddress.IPv4Address("10.90.4.0")
# moto reads the region from the signature's scope and checks nothing else.
AUTH = (
    "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=0"
)


def cpu_seconds(stat_path: str) -> float:
    """utime + stime of a process or thread, from its /proc stat file."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build_enis(ns: NetNS, endpoint: str, count: int) -> list[str]:
    """`count` ENIs in one subnet, created straight on moto (setup is not measured)."""

    def make() -> list[str]:
        ec2 = motolib.client(endpoint)
        vpc = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]
        subnet = ec2.create_subnet(VpcId=vpc["VpcId"], CidrBlock=SUBNET_CIDR)["Subnet"]
        return [
            ec2.create_network_interface(SubnetId=subnet["SubnetId"], PrivateIpAddress=str(ENI_PRIMARIES + i))[
                "NetworkInterface"
            ]["NetworkInterfaceId"]
            for i in range(count)
        ]

    return ns.call(make)


def plan(enis: list[str], addresses: int, batch: int) -> list[tuple[str, list[str]]]:
    """Address i on ENI i mod len(enis), `batch` addresses per call (all on one ENI)."""
    per_eni: dict[str, list[str]] = {e: [] for e in enis}
    for i in range(addresses):
        per_eni[enis[i % len(enis)]].append(str(POD_ADDRESSES + i))
    calls = []
    for eni, held in per_eni.items():
        calls += [(eni, held[k : k + batch]) for k in range(0, len(held), batch)]
    # Interleave ENIs so that concurrent clients hit different ENIs, as 50 nodes' agents do.
    calls.sort(key=lambda c: int(ipaddress.IPv4Address(c[1][0])) % 1_000_003)
    return calls


def client_process(ns_path: str, host: str, port: int, clients: int, phases: list, out: "multiprocessing.Queue") -> None:
    """Runs in its own process inside the namespace: each phase's calls from `clients`
    threads, each with one keep-alive connection; reports (phase, latencies, refused, wall)."""
    setns(ns_path)
    for action, calls in phases:
        work: queue.Queue = queue.Queue()
        for c in calls:
            work.put(c)
        latencies: list[float] = []
        refused: list[str] = []
        lock = threading.Lock()

        def run() -> None:
            conn = http.client.HTTPConnection(host, port, timeout=120)
            while True:
                try:
                    eni, addresses = work.get_nowait()
                except queue.Empty:
                    break
                params = {"Action": action, "Version": "2016-11-15", "NetworkInterfaceId": eni}
                params.update({f"PrivateIpAddress.{i + 1}": a for i, a in enumerate(addresses)})
                body = urllib.parse.urlencode(params)
                headers = {"Content-Type": "application/x-www-form-urlencoded", "Authorization": AUTH}
                start = time.monotonic()
                conn.request("POST", "/", body, headers)
                response = conn.getresponse()
                answer = response.read()
                took = time.monotonic() - start
                with lock:
                    latencies.append(took)
                    if response.status != 200:
                        refused.append(answer.decode(errors="replace")[:200])
            conn.close()

        started = time.monotonic()
        threads = [threading.Thread(target=run) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.put((action, latencies, refused, time.monotonic() - started))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--enis", type=int, default=50)
    parser.add_argument("--addresses", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="addresses per call")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before the run is abandoned")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2

    # SIGTERM ends the run like Ctrl-C: through `finally`, which removes what it made.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logs = Path(tempfile.mkdtemp(prefix="mne-emu-bench-"))
    ns = NetNS()
    server = proxy = worker = None
    deadline = time.monotonic() + args.timeout
    try:
        server = motolib.MotoServer(ns, log_path=str(logs / "moto.log")).start()
        proxy = FaultProxy(ns, server.port).start()
        enis = build_enis(ns, server.endpoint, args.enis)
        calls = plan(enis, args.addresses, args.batch)
        phases = []
        for _ in range(args.rounds):
            phases += [("AssignPrivateIpAddresses", calls), ("UnassignPrivateIpAddresses", calls)]

        assert proxy._thread is not None and proxy._thread.native_id is not None
        moto_stat = f"/proc/{server.proc.pid}/stat"
        proxy_stat = f"/proc/{os.getpid()}/task/{proxy._thread.native_id}/stat"
        moto_before, proxy_before = cpu_seconds(moto_stat), cpu_seconds(proxy_stat)
        started = time.monotonic()
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        worker = ctx.Process(
            target=client_process, args=(ns.path, proxy.host, proxy.port, args.clients, phases, out)
        )
        worker.start()
        results = [out.get(timeout=max(1.0, deadline - time.monotonic())) for _ in phases]
        worker.join(10)
        wall = time.monotonic() - started
        moto_cpu, proxy_cpu = cpu_seconds(moto_stat) - moto_before, cpu_seconds(proxy_stat) - proxy_before

        left = ns.call(lambda: sum(
            len(n["PrivateIpAddresses"]) - 1
            for n in motolib.client(server.endpoint).describe_network_interfaces(NetworkInterfaceIds=enis)["NetworkInterfaces"]
        ))
        latencies = [x for _, lat, _, _ in results for x in lat]
        refused = [x for _, _, ref, _ in results for x in ref]
        busy = sum(w for *_, w in results)
        print(
            f"emulator: {args.enis} ENIs, {args.addresses} addresses, {args.batch} per call, "
            f"{args.clients} clients, {args.rounds} rounds of Assign + Unassign"
        )
        for action, lat, ref, w in results:
            print(f"  {action:<28} {len(lat):>5} calls in {w:6.2f} s = {len(lat) / w:7.1f}/s, refused {len(ref)}")
        print(f"mutating calls/s sustained: {len(latencies) / busy:.1f} ({len(latencies)} calls in {busy:.2f} s)")
        print(f"latency p50 {percentile(latencies, 0.5) * 1000:.1f} ms, p99 {percentile(latencies, 0.99) * 1000:.1f} ms, "
              f"mean {statistics.mean(latencies) * 1000:.1f} ms")
        print(f"refused by EC2 (must be 0): {len(refused)}" + (f", first: {refused[0]}" if refused else ""))
        print(f"secondary addresses left on the ENIs in moto after the last Unassign (must be 0): {left}")
        print(f"CPU over {wall:.2f} s: moto {moto_cpu:.2f} s ({100 * moto_cpu / wall:.0f}% of one core), "
              f"proxy thread {proxy_cpu:.2f} s ({100 * proxy_cpu / wall:.0f}%)")
        return 1 if refused or left else 0
    finally:
        if worker is not None and worker.is_alive():
            worker.kill()
        if proxy is not None:
            proxy.stop()
        if server is not None:
            server.stop()
        ns.close()


if __name__ == "__main__":
    sys.exit(main())
