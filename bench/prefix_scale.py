"""Prefix mode against per-address mode (issue 23): mutating EC2 calls for a rollout of PODS pods
on NODES nodes (one Multus ENI each), each node's pods in its own aligned block of the subnet
(what whereabouts node slices and NVIDIA's IPAM hand out), then a second rollout of new pods into
the same blocks. The same run, the same EC2 token buckets (tests' fault proxy + bench
ec2_throttle's BucketModel), for both modes; one agent per node, pods are network namespaces in
its `--netns-dir` (no sidecars: the agent manages every pod, `--pods all`).

  phase 1  every pod appears; ends when every agent's table says every address is routable
  phase 2  every pod is deleted, and new pods holding the same addresses appear (a Deployment
           rollout into the same node blocks, IPAM reusing freed addresses); ends as phase 1

Root. `.venv/bin/python bench/prefix_scale.py [--pods 1000 --nodes 50 --block 32]`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cluster
from cluster import Emulator, Pod
from ec2_throttle import BucketModel, ThrottlingProxy, summarize

MUTATING = ("AssignPrivateIpAddresses", "UnassignPrivateIpAddresses")
# The node blocks: 10.90.8.0/21 of the /20 subnet (2,048 addresses), away from the ENIs' own.
BLOCKS = ipaddress.IPv4Network("10.90.8.0/21")


def plan(run_id: str, world: cluster.World, pods: int, block: int) -> list[Pod]:
    """Pod i on node i mod NODES, one address each, taken in order from its node's block."""
    out = []
    used = [0] * len(world.enis)
    for i in range(pods):
        n = i % len(world.enis)
        if used[n] >= block:
            raise SystemExit(f"more than {block} pods on a node: raise --block")
        address = BLOCKS.network_address + n * block + used[n]
        used[n] += 1
        out.append(Pod(i, f"mne-{run_id}-p{i}", world.enis[n], [str(address)]))
    return out


def routable(agents: dict, total: int) -> bool:
    count = 0
    for a in agents.values():
        rows = a.status().get("addresses", [])
        count += sum(1 for r in rows if r["state"] == "routable")
    return count >= total


def link(agents: dict, pods: list[Pod], suffix: str) -> None:
    for p in pods:
        os.symlink(f"/run/netns/{p.ns_name}", agents[p.eni.node].netns_dir / f"{p.ns_name}{suffix}")


def unlink(agents: dict, pods: list[Pod], suffix: str) -> None:
    for p in pods:
        (agents[p.eni.node].netns_dir / f"{p.ns_name}{suffix}").unlink(missing_ok=True)


def mutating(proxy: ThrottlingProxy, since: float, until: float) -> tuple[int, int]:
    s = summarize(proxy.requests(), since, until)
    return sum(s.get(a, {}).get("calls", 0) for a in MUTATING), sum(s.get(a, {}).get("throttled", 0) for a in MUTATING)


def run_mode(emu: Emulator, pods: list[Pod], log_dir: Path, tag: str, agent_args: list[str], timeout: float) -> dict:
    proxy = ThrottlingProxy(emu.ns, cluster.MOTO_PORT, cluster.BRIDGE_IP, BucketModel(scope="action")).start()
    agents: dict = {}
    out: dict = {}
    try:
        from tests.lib.agent import Agent

        binary = Path(cluster.agent_binary())
        for node in sorted({p.eni.node for p in pods}):
            agents[node] = Agent(emu.ns, proxy.endpoint, log_dir / f"agent-{tag}-{node}", binary, agent_args, instance_id=node).start()
        deadline = time.monotonic() + 60
        while not all(a.http("/readyz")[0] == 200 for a in agents.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("agents not ready within 60 s")
            time.sleep(0.2)
        for phase, suffix in (("first", ""), ("second", "-r2")):
            if phase == "second":
                unlink(agents, pods, "")
                time.sleep(5)  # the agents saw the pods go (address mode releases)
            started = time.monotonic()
            moto_before = cluster.moto_cpu_seconds(emu) or 0.0
            link(agents, pods, suffix)
            spawned = time.monotonic()
            deadline = started + timeout
            while not routable(agents, len(pods)) and time.monotonic() < deadline:
                time.sleep(0.5)
            done = time.monotonic()
            moto_share = ((cluster.moto_cpu_seconds(emu) or 0.0) - moto_before) / max(done - started, 1e-3)
            calls, throttled = mutating(proxy, started - (5 if phase == "second" else 0), done)
            out[phase] = {
                "routable": done < deadline,
                "after_start_s": round(done - started, 1),
                "after_last_pod_s": round(done - spawned, 1),
                "mutating_calls": calls,
                "throttled": throttled,
                "moto_cpu_share": round(100 * moto_share),
            }
            print(f"  {phase}: {out[phase]}", flush=True)
        out["prefixes_gauge"] = sum(a.metric("multus_eni_agent_prefixes") for a in agents.values())
    finally:
        for a in agents.values():
            a.kill()
        proxy.stop()
    return out


def clean(emu: Emulator, world: cluster.World, pods: list[Pod]) -> None:
    """Unassigns every address and prefix the run left (straight on the emulator)."""
    cluster.unassign_all(emu, cluster.eni_addresses(emu, world.subnet_id), {a for p in pods for a in p.addresses})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--block", type=int, default=32, help="addresses per node block (a multiple of 16)")
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--agent-arg", action="append", default=[])
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("prefix_scale: needs root (network namespaces)", file=sys.stderr)
        return 2
    cluster.quiet_proxy_shutdown()
    run_id = os.environ.get("MNE_BENCH_RUN", str(os.getpid()))
    log_dir = Path(tempfile.mkdtemp(prefix=f"mne-prefix-{run_id}-"))
    emu = None
    pods: list[Pod] = []
    try:
        emu = Emulator(run_id, log_dir)
        emu.moto.start()
        world = cluster.build_world(emu, args.nodes, 1)
        pods = plan(run_id, world, args.pods, args.block)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: cluster.create_pod(emu, p), pods))
        cluster.attach_pods_to_bridge(emu, pods)
        common = [*cluster.AGENT_ARGS, "--resync-interval=60s", *args.agent_arg]
        results = {}
        print(f"prefix_scale: {args.pods} pods on {args.nodes} nodes, blocks of {args.block}; per-address mode", flush=True)
        results["address"] = run_mode(emu, pods, log_dir, "address", common, args.timeout)
        clean(emu, world, pods)
        print("prefix_scale: prefix mode", flush=True)
        results["prefix"] = run_mode(emu, pods, log_dir, "prefix", [*common, f"--prefix-ranges={BLOCKS}"], args.timeout)
        print("| mode | rollout | all routable after the start (after the last pod) | mutating calls | throttled | moto CPU (of one core) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for mode, r in results.items():
            for phase in ("first", "second"):
                p = r[phase]
                ok = "" if p["routable"] else " (timed out)"
                print(f"| {mode} | {phase} | {p['after_start_s']} s ({p['after_last_pod_s']} s){ok} | {p['mutating_calls']} | {p['throttled']} | {p['moto_cpu_share']} % |")
        print(f"prefixes on the ENIs at the end (prefix mode): {results['prefix']['prefixes_gauge']:.0f}")
        return 0
    finally:
        for p in pods:
            if p.ns is not None:
                p.ns.close()
        if emu is not None:
            emu.close()
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
