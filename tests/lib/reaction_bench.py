"""Quick sidecar figures: reaction time (address added → EC2 request at the fault proxy),
EC2 calls per change, idle CPU and RSS of one sidecar. Root needed; build first.

    cargo build -p multus-eni-sidecar
    cd tests && ../.venv/bin/python -m lib.reaction_bench [N]

Reaction time is measured from just before `ip addr add` is started (so it includes that
process's start, a few ms) to the arrival of the request head at the proxy.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import moto
from .fault_proxy import FaultProxy
from .netns import NetNS
from .sidecar import Sidecar, wait_for


def main(n: int) -> None:
    ns = NetNS()
    server = moto.MotoServer(ns).start()
    proxy = FaultProxy(ns, server.port).start()
    sidecar = None
    try:
        world = moto.build_world(ns, server.endpoint)
        eni = world.enis[0]
        ns.add_veth("net1", "pbench", eni.mac)
        log = Path(tempfile.mkdtemp(prefix="mne-bench-")) / "sidecar.log"
        sidecar = Sidecar(ns, ["net1"], proxy.endpoint, log).start()
        wait_for(lambda: sidecar.probe() == 200, "ready")
        proxy.reset()
        reactions = []
        for i in range(n):
            address = world.v4(10 + i)
            before = proxy.calls()
            started = time.monotonic()
            ns.ip("addr", "add", address + "/24", "dev", "net1")
            wait_for(lambda: proxy.calls() > before, "the EC2 call")
            reactions.append((proxy.requests()[before].arrived - started) * 1000)
            wait_for(lambda: moto.eni_state(ns, server.endpoint, eni.id).holds(address), "assigned")
        reactions.sort()
        print(f"changes: {n}; EC2 calls: {proxy.counts()}; calls per change: {proxy.calls() / n:.2f}")
        print(
            f"reaction ms: p50 {statistics.median(reactions):.1f}, "
            f"p90 {reactions[int(0.9 * (n - 1))]:.1f}, max {reactions[-1]:.1f}"
        )
        assert sidecar.proc is not None
        pid = sidecar.proc.pid

        def cpu_seconds() -> float:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        c0 = cpu_seconds()
        time.sleep(20)
        idle = cpu_seconds() - c0
        status = {
            k: v.strip()
            for k, v in (line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        }
        print(f"idle CPU over 20 s: {idle:.3f} s; VmRSS {status['VmRSS']}; threads {status['Threads']}")
    finally:
        if sidecar is not None:
            sidecar.kill()
        proxy.stop()
        server.stop()
        ns.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
