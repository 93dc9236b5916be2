"""Scale simulation: many real sidecars through a rollout against EC2's token buckets, and
the polling baseline through the same rollout against fresh buckets, in one run.

Phases (each for the sidecars, then for the baseline):
  start    every pod appears within a few seconds; ends when every address is on its ENI
  change   a fraction of the pods swap one address (add a new one, delete an old one)
  idle     nothing changes for `--idle` seconds (the sidecars' 60 s resync falls in here)
  release  SIGTERM to every sidecar (the baseline never releases)

Run as root through scripts/bench-scale.sh. Prints a table; `--write-doc` replaces the
marked section of docs/scale.md with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import cluster
from cluster import Emulator, Pod, ProcStats
from ec2_throttle import ACTION_BUCKETS, SOURCE, BucketModel, ThrottlingProxy, summarize
from poller_baseline import PollingFleet

ROOT = Path(__file__).resolve().parent.parent
DESCRIBE = "DescribeNetworkInterfaces"
ASSIGN = "AssignPrivateIpAddresses"
UNASSIGN = "UnassignPrivateIpAddresses"
ACTIONS = [DESCRIBE, ASSIGN, UNASSIGN]


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


@dataclasses.dataclass
class Phase:
    name: str
    started: float
    ended: float = 0.0
    converged: float | None = None  # seconds from start; None when it did not
    optimum: float = 0.0
    needed: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Throttled calls no client could have avoided (BucketModel.unavoidable_throttles).
    unavoidable: int = 0
    calls: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    note: str = ""

    def total(self, key: str = "calls") -> int:
        return sum(row[key] for row in self.calls.values())

    def amplification(self) -> float | None:
        need = sum(self.needed.values())
        return self.total() / need if need else None

    def floor(self) -> float | None:
        """The least amplification the buckets allowed for this phase's arrivals."""
        need = sum(self.needed.values())
        return (need + self.unavoidable) / need if need else None


@dataclasses.dataclass
class RunResult:
    mode: str
    phases: list[Phase]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# === convergence ===


def wait_until(emu: Emulator, subnet: str, done: Any, timeout: float, every: float = 0.5) -> bool:
    """Polls moto directly (not through the proxy: no tokens used) until `done(state)`."""
    deadline = time.monotonic() + timeout
    while True:
        if done(cluster.eni_addresses(emu, subnet)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(every)


def all_assigned(pods: list[Pod], wanted: dict[int, set[str]]) -> Any:
    def check(state: dict[str, set[str]]) -> bool:
        return all(wanted[p.index] <= state.get(p.eni.id, set()) for p in pods)

    return check


def first_ok(
    proxy: ThrottlingProxy, action: str, since: float, prefix: str, at: Callable[[Any], float] = lambda r: r.arrived
) -> dict[str, float]:
    """Address → `at` (by default the arrival) of the first successful `action` request naming it."""
    out: dict[str, float] = {}
    for r in proxy.requests(action):
        if r.arrived >= since and r.status == 200 and r.fault is None:
            for a in r.values(prefix):
                out.setdefault(a, at(r))
    return out


def converged_at(proxy: ThrottlingProxy, since: float, assigned: set[str], unassigned: set[str]) -> float | None:
    """Seconds from `since` to the arrival of the last request that completed the phase."""
    ok_assign = first_ok(proxy, ASSIGN, since, "PrivateIpAddress")
    ok_unassign = first_ok(proxy, UNASSIGN, since, "PrivateIpAddress")
    times = []
    for a in assigned:
        if a not in ok_assign:
            return None
        times.append(ok_assign[a])
    for a in unassigned:
        if a not in ok_unassign:
            return None
        times.append(ok_unassign[a])
    return (max(times) - since) if times else 0.0


def routable_spread(proxy: ThrottlingProxy, since: float, addresses: set[str]) -> tuple[float, float]:
    """p50 and p90 seconds from the rollout start until an address was assigned."""
    ok = first_ok(proxy, ASSIGN, since, "PrivateIpAddress")
    times = [ok[a] - since for a in addresses if a in ok]
    return cluster.percentile(times, 0.5), cluster.percentile(times, 0.9)


def ready_after_assign(proxy: ThrottlingProxy, since: float, pods: list[Pod]) -> list[float]:
    """Per pod: seconds from EC2's answer to the first successful Assign of its last address
    (as the proxy sent it back) to its sidecar's first "readiness changed" to ready (its own
    log; both wall clock): "address on the ENI → /readyz 200"."""
    arrived = first_ok(proxy, ASSIGN, since, "PrivateIpAddress", lambda r: r.answered_wall)
    out = []
    for p in pods:
        if p.sidecar is None or any(a not in arrived for a in p.addresses):
            continue
        assigned = max(arrived[a] for a in p.addresses)
        ready = [
            x["timestamp"]
            for x in p.sidecar.logs()
            if x.get("action") == "readiness" and x.get("ready") is True
        ]
        if ready:
            at = datetime.datetime.fromisoformat(ready[0].replace("Z", "+00:00")).timestamp()
            out.append(at - assigned)
    return out


def ready_count(pods: list[Pod]) -> int:
    """Pods whose sidecar answers 200 on /readyz (asked inside each pod's namespace)."""
    return sum(1 for p in pods if p.sidecar is not None and p.sidecar.probe() == 200)


# === the two modes ===


def change_plan(pods: list[Pod], fraction: float, fresh: list[str]) -> list[tuple[Pod, str, str]]:
    """(pod, old address, new address) for every k-th pod. The old address is the pod's
    last one: deleting the first (primary) address of a subnet would make the kernel flush
    the secondaries with it."""
    count = max(1, round(len(pods) * fraction)) if fraction > 0 else 0
    step = max(1, len(pods) // count) if count else 1
    chosen = pods[::step][:count]
    return [(p, p.addresses[-1], fresh[i]) for i, p in enumerate(chosen)]


def start_agents(emu: Emulator, endpoint: str, pods: list[Pod], log_dir: Path, extra: list[str] | None = None) -> dict[str, Any]:
    """One node agent per node (instance) in the emulator's namespace (it reaches the proxy
    there), with an empty `--netns-dir`: a pod's namespace appears there when the pod is
    created (`link_pod`), as the container runtime puts it on a node."""
    from tests.lib.agent import Agent

    binary = Path(cluster.agent_binary())
    agents: dict[str, Any] = {}
    args = [*cluster.AGENT_ARGS, *(extra or [])]
    for node in sorted({p.eni.node for p in pods}):
        a = Agent(emu.ns, endpoint, log_dir / f"agent-{node}", binary, args, instance_id=node)
        agents[node] = a.start()
    deadline = time.monotonic() + 60
    while not all(a.http("/readyz")[0] == 200 for a in agents.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("agents not ready within 60 s")
        time.sleep(0.2)
    return agents


def link_pod(agents: dict[str, Any], pod: Pod) -> None:
    """The pod's namespace appears in its node agent's `--netns-dir` (the pod is created)."""
    os.symlink(f"/run/netns/{pod.ns_name}", agents[pod.eni.node].netns_dir / pod.ns_name)


def unlink_pod(agents: dict[str, Any], pod: Pod) -> None:
    """The pod's namespace leaves the directory (the pod is deleted)."""
    try:
        os.unlink(agents[pod.eni.node].netns_dir / pod.ns_name)
    except FileNotFoundError:
        pass


def run_sidecars(
    emu: Emulator, world: cluster.World, pods: list[Pod], args: argparse.Namespace, log_dir: Path,
    agent_mode: bool = False,
) -> RunResult:
    model = BucketModel(scope=args.scope)
    proxy = ThrottlingProxy(emu.ns, cluster.MOTO_PORT, cluster.BRIDGE_IP, model).start()
    binary = cluster.sidecar_binary(agent_mode)
    phases: list[Phase] = []
    extra: dict[str, Any] = {"binary": binary}
    agents: dict[str, Any] = {}
    try:
        if agent_mode:
            agents = start_agents(emu, proxy.endpoint, pods, log_dir, args.agent_arg)
            # The agents' start-up Describe (nothing to read yet) is not part of the rollout.
        wanted = {p.index: set(p.addresses) for p in pods}
        # --- start
        start = Phase("start", time.monotonic())
        start.needed = {DESCRIBE: len(pods), ASSIGN: len(pods)}
        start.optimum = model.optimum_seconds(start.needed)
        for p in pods:
            extra_args = list(args.sidecar_arg)
            if agent_mode:
                link_pod(agents, p)
                extra_args.append(f"--agent-socket={agents[p.eni.node].socket}")
            cluster.start_sidecar(binary, proxy.endpoint, p, log_dir, extra_args)
            if args.start_window > 0:
                time.sleep(args.start_window / len(pods))
        extra["spawn_seconds"] = time.monotonic() - start.started
        start.unavoidable = model.unavoidable_throttles(start.needed, extra["spawn_seconds"])
        ok = wait_until(emu, world.subnet_id, all_assigned(pods, wanted), args.phase_timeout)
        all_addr = {a for p in pods for a in p.addresses}
        start.converged = converged_at(proxy, start.started, all_addr, set()) if ok else None
        extra["routable"] = routable_spread(proxy, start.started, all_addr)
        time.sleep(1.0)
        extra["ready_after_start"] = ready_count(pods)
        extra["ready_after_assign"] = ready_after_assign(proxy, start.started, pods)
        dead = [p.index for p in pods if p.proc is not None and p.proc.poll() is not None]
        extra["exited_early"] = dead
        # --- change
        change = Phase("change", time.monotonic())
        start.ended = change.started
        plan = change_plan(pods, args.change_fraction, cluster.fresh_addresses(pods, 4 * len(pods)))
        change.needed = {ASSIGN: len(plan), UNASSIGN: len(plan)}
        levels = model.levels(ACTIONS)
        change.optimum = model.optimum_seconds(change.needed, levels)
        for pod, old, new in plan:
            cluster.batch(pod.ns_name, [f"addr del {old}/20 dev net1", f"addr add {new}/20 dev net1"])
            wanted[pod.index] = (wanted[pod.index] - {old}) | {new}
        change.unavoidable = model.unavoidable_throttles(change.needed, time.monotonic() - change.started, levels)
        olds = {old for _, old, _ in plan}

        def changed(state: dict[str, set[str]]) -> bool:
            held = set().union(*state.values()) if state else set()
            return all_assigned(pods, wanted)(state) and not (olds & held)

        ok = wait_until(emu, world.subnet_id, changed, args.phase_timeout)
        change.converged = converged_at(proxy, change.started, {n for _, _, n in plan}, olds) if ok else None
        time.sleep(1.0)
        # --- idle
        idle = Phase("idle", time.monotonic())
        change.ended = idle.started
        time.sleep(args.idle)
        # --- release
        stats = {p.index: cluster.proc_stats(p.proc.pid) for p in pods if p.proc is not None}
        extra["stats"] = {k: dataclasses.asdict(v) for k, v in stats.items() if v is not None}
        if agents:
            a_stats = [cluster.proc_stats(a.proc.pid) for a in agents.values() if a.proc is not None]
            extra["agent_stats"] = [dataclasses.asdict(v) for v in a_stats if v is not None]
            extra["pods_per_agent"] = max(sum(1 for p in pods if p.eni.node == n) for n in agents)
        release = Phase("release", time.monotonic())
        idle.ended = release.started
        release.needed = {UNASSIGN: len(pods)}  # the ENI is known from the start
        release.optimum = model.optimum_seconds(release.needed, model.levels(ACTIONS))
        release.unavoidable = model.unavoidable_throttles(release.needed, 0.0, model.levels(ACTIONS))
        for p in pods:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        exit_after: dict[int, float] = {}
        deadline = time.monotonic() + args.shutdown_wait
        while len(exit_after) < len(pods) and time.monotonic() < deadline:
            for p in pods:
                if p.index not in exit_after and p.proc is not None and p.proc.poll() is not None:
                    exit_after[p.index] = time.monotonic() - release.started
            time.sleep(0.05)
        extra["exit_codes"] = sorted({p.proc.returncode for p in pods if p.proc is not None and p.proc.poll() is not None})
        extra["not_exited"] = len(pods) - len(exit_after)
        extra["exit_p50"] = cluster.percentile(list(exit_after.values()), 0.5)
        extra["exit_max"] = max(exit_after.values(), default=float("nan"))
        if agent_mode:
            # The agent releases when the pod's network goes, not when its sidecar exits: the
            # pods are deleted once their sidecars stopped.
            for p in pods:
                unlink_pod(agents, p)
        time.sleep(0.5)
        final = set().union(*wanted.values())
        if agent_mode:
            # The agent unassigns what the deleted namespaces held, batched.
            wait_until(emu, world.subnet_id, lambda st: not (final & set().union(*st.values())), args.shutdown_wait)
        release.ended = time.monotonic()
        state = cluster.eni_addresses(emu, world.subnet_id)
        held = set().union(*state.values())
        extra["leaked"] = len(final & held)
        released = final - held
        release.converged = converged_at(proxy, release.started, set(), final) if not (final & held) else None
        extra["released"] = len(released)
        phases = [start, change, idle, release]
        for ph in phases:
            ph.calls = summarize(proxy.requests(), ph.started, ph.ended)
        proxy.check_hooked()
        extra["moto_cpu_seconds"] = cluster.moto_cpu_seconds(emu)
        waves = [r.arrived for r in proxy.requests(DESCRIBE) if idle.started <= r.arrived < idle.ended]
        extra["resync_wave"] = (len(waves), (max(waves) - min(waves)) if waves else 0.0)
    finally:
        for p in pods:
            cluster.stop_sidecar(p)
        for a in agents.values():
            a.kill()
        proxy.stop()
    return RunResult("agent" if agent_mode else "sidecar", phases, extra)


def run_baseline(
    emu: Emulator, world: cluster.World, pods: list[Pod], args: argparse.Namespace
) -> RunResult:
    model = BucketModel(scope=args.scope)
    proxy = ThrottlingProxy(emu.ns, cluster.MOTO_PORT, cluster.BRIDGE_IP, model).start()
    fleet = PollingFleet(emu, proxy.endpoint, pods, period=args.poll_period, sdk_attempts=args.baseline_attempts)
    extra: dict[str, Any] = {}
    try:
        fleet.prepare()
        wanted = {p.index: set(p.addresses) for p in pods}
        start = Phase("start", time.monotonic())
        start.needed = {DESCRIBE: len(pods), ASSIGN: len(pods)}
        start.optimum = model.optimum_seconds(start.needed)
        start.unavoidable = model.unavoidable_throttles(start.needed, 0.0)
        fleet.start()
        ok = wait_until(emu, world.subnet_id, all_assigned(pods, wanted), args.phase_timeout)
        all_addr = {a for p in pods for a in p.addresses}
        start.converged = converged_at(proxy, start.started, all_addr, set()) if ok else None
        extra["routable"] = routable_spread(proxy, start.started, all_addr)
        time.sleep(1.0)
        change = Phase("change", time.monotonic())
        start.ended = change.started
        plan = change_plan(pods, args.change_fraction, cluster.fresh_addresses(pods, 4 * len(pods)))
        change.needed = {ASSIGN: len(plan), UNASSIGN: len(plan)}
        change.optimum = model.optimum_seconds(change.needed, model.levels(ACTIONS))
        change.unavoidable = model.unavoidable_throttles(change.needed, 0.0, model.levels(ACTIONS))
        for pod, old, new in plan:
            wanted[pod.index] = (wanted[pod.index] - {old}) | {new}
            fleet.set_addresses(pod, wanted[pod.index])
        ok = wait_until(emu, world.subnet_id, all_assigned(pods, wanted), args.phase_timeout)
        # The old addresses are never unassigned: the phase does not complete, by design.
        change.note = "old addresses never unassigned"
        assigned_at = converged_at(proxy, change.started, {n for _, _, n in plan}, set()) if ok else None
        extra["change_assigned_after"] = assigned_at
        time.sleep(1.0)
        idle = Phase("idle", time.monotonic())
        change.ended = idle.started
        time.sleep(args.idle)
        release = Phase("release", time.monotonic())
        idle.ended = release.started
        release.needed = {UNASSIGN: len(pods)}  # the ENI is known from the start
        release.note = "never releases"
        fleet.stop()
        release.ended = time.monotonic() + 0.5
        time.sleep(0.5)
        state = cluster.eni_addresses(emu, world.subnet_id)
        held = set().union(*state.values())
        extra["leaked"] = len(set().union(*wanted.values(), {o for _, o, _ in plan}) & held)
        for ph in (start, change, idle, release):
            ph.calls = summarize(proxy.requests(), ph.started, ph.ended)
        proxy.check_hooked()
    finally:
        fleet.stop()
        proxy.stop()
    return RunResult("baseline", [start, change, idle, release], extra)


# === moto's own capacity ===


def measure_moto(emu: Emulator, world: cluster.World, seconds: float = 3.0, threads: int = 4) -> dict[str, float]:
    """Calls per second moto answers straight (no proxy) with `threads` boto3 clients."""
    eni = world.enis[0]
    spare = "10.90.15.200"

    def describe_loop(_: int) -> int:
        ec2 = emu.client()
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            ec2.describe_network_interfaces(Filters=[{"Name": "mac-address", "Values": [eni.mac]}])
            n += 1
        return n

    def assign_loop(i: int) -> int:
        ec2 = emu.client()
        addr = f"10.90.15.{200 + i}"
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            ec2.assign_private_ip_addresses(NetworkInterfaceId=eni.id, PrivateIpAddresses=[addr], AllowReassignment=True)
            ec2.unassign_private_ip_addresses(NetworkInterfaceId=eni.id, PrivateIpAddresses=[addr])
            n += 2
        return n

    del spare
    out = {}
    for name, fn in (("describe_per_s", describe_loop), ("assign_unassign_per_s", assign_loop)):
        with ThreadPoolExecutor(threads, initializer=_setns, initargs=(emu.ns.path,)) as pool:
            t0 = time.monotonic()
            total = sum(pool.map(fn, range(threads)))
            out[name] = total / (time.monotonic() - t0)
    return out


def _setns(path: str) -> None:
    from tests.lib.netns import setns

    setns(path)


# === report ===


def fmt_s(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} s"


def calls_cell(ph: Phase) -> str:
    parts = []
    short = {DESCRIBE: "D", ASSIGN: "A", UNASSIGN: "U"}
    for action in ACTIONS + sorted(set(ph.calls) - set(ACTIONS)):
        row = ph.calls.get(action)
        if row:
            t = f"/{row['throttled']}thr" if row["throttled"] else ""
            parts.append(f"{short.get(action, action)} {row['calls']}{t}")
    return ", ".join(parts) or "0"


def report(args: argparse.Namespace, res: list[RunResult], moto: dict[str, float], setup_s: float, total_s: float) -> str:
    lines = []
    lines.append(
        f"{args.pods} pods on {args.enis} ENIs ({-(-args.enis // args.enis_per_node)} nodes), "
        f"change {args.change_fraction:.0%}, idle {args.idle:.0f} s, bucket scope {args.scope}; "
        f"setup {setup_s:.0f} s, whole run {total_s:.0f} s"
    )
    lines.append("")
    lines.append("| mode | phase | converged | optimum | calls (D=Describe, A=Assign, U=Unassign; thr=throttled) | needed | amplification | floor |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res:
        for ph in r.phases:
            amp = ph.amplification()
            need = sum(ph.needed.values())
            conv = fmt_s(ph.converged) if ph.name != "idle" else f"{args.idle:.0f} s window"
            if ph.note:
                conv = f"{conv} ({ph.note})"
            lines.append(
                f"| {r.mode} | {ph.name} | {conv} | {fmt_s(ph.optimum) if need else '—'} | {calls_cell(ph)} | "
                f"{need if need else '—'} | {f'{amp:.2f}' if amp is not None else '—'} | "
                f"{f'{ph.floor():.2f}' if ph.floor() is not None and not ph.note else '—'} |"
            )
    lines.append("")
    for r in res:
        made = sum(ph.total() for ph in r.phases if ph.name != "idle")
        need = sum(sum(ph.needed.values()) for ph in r.phases if ph.name != "idle")
        thr = sum(ph.total("throttled") for ph in r.phases)
        idle = next(ph for ph in r.phases if ph.name == "idle")
        lines.append(
            f"- {r.mode}: rollout calls {made} for {need} needed (amplification {made / need:.2f}), "
            f"throttled {thr} in all, idle {idle.total() / args.idle:.2f} calls/s "
            f"({idle.total('throttled')} throttled), addresses left on ENIs at the end: {r.extra.get('leaked')}"
        )
    for r in res:
        if "routable" in r.extra:
            p50, p90 = r.extra["routable"]
            lines.append(f"- {r.mode}: an address is routable p50 {p50:.1f} s, p90 {p90:.1f} s after the rollout starts")
    for sc in [r for r in res if r.mode in ("sidecar", "agent")]:
        _sidecar_lines(args, sc, lines)
    sc = next((r for r in res if r.mode == "sidecar"), None)
    ag = next((r for r in res if r.mode == "agent"), None)
    if sc and ag:
        s_start, a_start = sc.phases[0].converged, ag.phases[0].converged
        lines.append(
            f"- agent / direct: mutating calls over the rollout "
            f"{sum(ph.calls.get(ASSIGN, {}).get('calls', 0) + ph.calls.get(UNASSIGN, {}).get('calls', 0) for ph in ag.phases)}"
            f" / {sum(ph.calls.get(ASSIGN, {}).get('calls', 0) + ph.calls.get(UNASSIGN, {}).get('calls', 0) for ph in sc.phases)}; "
            f"time to all routable at start {fmt_s(a_start)} / {fmt_s(s_start)}"
        )
    bl = next((r for r in res if r.mode == "baseline"), None)
    if sc and bl:
        s_made = sum(ph.total() for ph in sc.phases)
        b_made = sum(ph.total() for ph in bl.phases)
        s_start, b_start = sc.phases[0].converged, bl.phases[0].converged
        ratio = f"{b_start / s_start:.1f}×" if s_start and b_start else "—"
        lines.append(
            f"- baseline / sidecar: calls over the whole run {b_made}/{s_made} = {b_made / max(s_made, 1):.1f}×; "
            f"time to all routable at start {fmt_s(b_start)} / {fmt_s(s_start)} = {ratio}"
        )
    lines.append(
        f"- moto alone (4 boto3 clients, no proxy): {moto['describe_per_s']:.0f} DescribeNetworkInterfaces/s, "
        f"{moto['assign_unassign_per_s']:.0f} Assign+Unassign/s; bucket refill: Describe "
        f"{ACTION_BUCKETS[DESCRIBE].refill:.0f}/s, Assign {ACTION_BUCKETS[ASSIGN].refill:.0f}/s"
    )
    lines.append("")
    lines.append(projection(res))
    return "\n".join(lines)


def _sidecar_lines(args: argparse.Namespace, sc: RunResult, lines: list[str]) -> None:
    st = [ProcStats(**v) for v in sc.extra.get("stats", {}).values()]
    if st:
        rss = [s.rss_kib / 1024 for s in st]
        hwm = [s.hwm_kib / 1024 for s in st]
        cpu = [s.cpu_seconds * 1000 for s in st]
        lines.append(
            f"- {sc.mode}: per sidecar ({build_label(sc.extra['binary'])}): RSS p50 {cluster.percentile(rss, .5):.1f} MiB, "
            f"max {max(rss):.1f} MiB (own memory RssAnon p50 "
            f"{cluster.percentile([s.anon_kib / 1024 for s in st], .5):.1f} MiB, binary pages RssFile p50 "
            f"{cluster.percentile([s.file_kib / 1024 for s in st], .5):.1f} MiB, shared); "
            f"VmHWM max {max(hwm):.1f} MiB; CPU for the whole run p50 "
            f"{cluster.percentile(cpu, .5):.0f} ms, max {max(cpu):.0f} ms"
        )
    lines.append(
        f"- {sc.mode}: sidecars spawned in {sc.extra['spawn_seconds']:.1f} s, /readyz 200 after start: "
        f"{sc.extra['ready_after_start']}/{args.pods}, exited early: {len(sc.extra['exited_early'])}; "
        f"SIGTERM → exit p50 {sc.extra['exit_p50']:.1f} s, max {sc.extra['exit_max']:.1f} s, "
        f"exit codes {sc.extra['exit_codes']}, not exited {sc.extra['not_exited']}; released {sc.extra['released']} addresses "
        f"({sc.phases[-1].calls.get(UNASSIGN, {}).get('ok', 0)} successful Unassign calls)"
    )
    waits = sc.extra.get("ready_after_assign") or []
    if waits:
        lines.append(
            f"- {sc.mode}: EC2 answered a pod's address assigned → its sidecar ready ({len(waits)} pods): "
            f"p50 {cluster.percentile(waits, .5):.2f} s, p99 {cluster.percentile(waits, .99):.2f} s, max {max(waits):.2f} s"
        )
    n, span = sc.extra.get("resync_wave", (0, 0.0))
    if n:
        lines.append(f"- sidecar resync while idle: {n} DescribeNetworkInterfaces within {span:.1f} s (jittered: each sidecar's first resync falls ½–1½ × 60 s after its start)")
    if sc.extra.get("moto_cpu_seconds") is not None:
        lines.append(f"- moto CPU from its start to the end of the sidecar run: {sc.extra['moto_cpu_seconds']:.1f} s")
    if sc.extra.get("agent_stats"):
        ast = [ProcStats(**v) for v in sc.extra["agent_stats"]]
        lines.append(
            f"- agents ({len(ast)}, up to {sc.extra['pods_per_agent']} pods each), read after the idle phase: "
            f"RSS max {max(s.rss_kib for s in ast) / 1024:.1f} MiB (RssAnon, the agent's own memory, "
            f"max {max(s.anon_kib for s in ast) / 1024:.1f} MiB; RssFile, the binary's pages shared by every "
            f"agent, max {max(s.file_kib for s in ast) / 1024:.1f} MiB), peak RSS (VmHWM) max "
            f"{max(s.hwm_kib for s in ast) / 1024:.1f} MiB, CPU for the whole run max {max(s.cpu_seconds for s in ast) * 1000:.0f} ms"
        )


def build_label(binary: str) -> str:
    parent = Path(binary).parent.name
    return f"{parent} build" if parent in ("debug", "release") else binary


def projection(res: list[RunResult]) -> str:
    """1,000 pods on 50 nodes and 10,000 pods, from the bucket model and measured figures."""
    d, a, u = ACTION_BUCKETS[DESCRIBE], ACTION_BUCKETS[ASSIGN], ACTION_BUCKETS[UNASSIGN]
    sc = next((r for r in res if r.mode == "sidecar"), None)
    memory = None
    if sc and sc.extra.get("stats"):
        stats = [ProcStats(**v) for v in sc.extra["stats"].values()]
        anon = cluster.percentile([s.anon_kib / 1024 for s in stats], 0.5)
        shared = max(s.file_kib / 1024 for s in stats)
        memory = (anon, shared)
    out = ["| projection | 1,000 pods / 50 nodes | 10,000 pods |", "| --- | --- | --- |"]

    def row(name: str, f: Any) -> None:
        out.append(f"| {name} | {f(1000)} | {f(10000)} |")

    row("optimum to all routable (1 Describe + 1 Assign per pod)",
        lambda n: f"{max((n - d.capacity) / d.refill, (n - a.capacity) / a.refill):.0f} s")
    row("sidecar resync Describe load (60 s) vs refill 20/s", lambda n: f"{n / 60:.1f}/s ({n / 60 / d.refill:.0%})")
    row("baseline poll Describe load (1 s) vs refill 20/s", lambda n: f"{n:.0f}/s ({n / d.refill:.0f}×)")
    row("releases that fit a 10 s shutdown (100 + 10×5)", lambda n: f"{min(n, u.capacity + 10 * u.refill):.0f} of {n}")
    if memory is not None:
        anon, shared = memory
        row("sidecar memory per node (RssAnon p50 × pods per node + the binary's pages once)",
            lambda n: f"{anon * (n / 50 if n == 1000 else n / 500) + shared:.0f} MiB ({n // (50 if n == 1000 else 500)} pods/node)")
    return "\n".join(out)


# === main ===


def command_line() -> str:
    profile = Path(cluster.sidecar_binary()).parent.name
    env = "BENCH_PROFILE=release " if profile == "release" else ""
    return f"{env}scripts/bench-scale.sh " + " ".join(a for a in sys.argv[1:] if a != "--write-doc")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=200)
    ap.add_argument("--enis", type=int, default=30)
    ap.add_argument("--enis-per-node", type=int, default=3)
    ap.add_argument("--change-fraction", type=float, default=0.2)
    ap.add_argument("--idle", type=float, default=65.0, help="seconds of quiet (covers the 60 s resync)")
    ap.add_argument("--start-window", type=float, default=0.0, help="spread sidecar starts over this many seconds")
    ap.add_argument("--phase-timeout", type=float, default=240.0)
    ap.add_argument("--shutdown-wait", type=float, default=20.0)
    ap.add_argument("--scope", choices=["action", "category"], default="action")
    ap.add_argument("--poll-period", type=float, default=1.0)
    ap.add_argument("--baseline-attempts", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-agent", action="store_true", help="skip the rollout in agent mode")
    ap.add_argument("--no-direct", action="store_true", help="skip the rollout in direct mode (bound to (pods - 100) / 5 s)")
    ap.add_argument("--sidecar-arg", action="append", default=[], help="extra sidecar flag (repeatable)")
    ap.add_argument("--agent-arg", action="append", default=[], help="extra multus-eni-agent flag (repeatable)")
    ap.add_argument("--write-doc", action="store_true", help="replace the figures in docs/scale.md")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("scale_sim: needs root (network namespaces)", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    cluster.quiet_proxy_shutdown()
    run_id = os.environ.get("MNE_BENCH_RUN", str(os.getpid()))
    log_dir = Path(tempfile.mkdtemp(prefix=f"mne-bench-{run_id}-"))
    random.seed(1)
    t_all = time.monotonic()
    emu: Emulator | None = None
    pods: list[Pod] = []
    try:
        emu = Emulator(run_id, log_dir)
        emu.moto.start()
        world = cluster.build_world(emu, args.enis, args.enis_per_node)
        moto = measure_moto(emu, world)
        pods = cluster.plan_pods(run_id, world, args.pods)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: cluster.create_pod(emu, p), pods))
        cluster.attach_pods_to_bridge(emu, pods)
        setup_s = time.monotonic() - t_all
        print(f"scale_sim: setup done in {setup_s:.0f} s ({len(pods)} pods, {len(world.enis)} ENIs); sidecar run", flush=True)
        results = [] if args.no_direct else [run_sidecars(emu, world, pods, args, log_dir)]
        all_addr = {a for p in pods for a in p.addresses} | set(cluster.fresh_addresses(pods, 4 * len(pods)))
        if not args.no_agent:
            if results:
                cluster.unassign_all(emu, cluster.eni_addresses(emu, world.subnet_id), all_addr)
                for p in pods:  # the change phase moved some addresses: back to the plan
                    cluster.batch(p.ns_name, ["addr flush dev net1", *[f"addr add {a}/20 dev net1" for a in p.addresses]])
            print("scale_sim: agent-mode run", flush=True)
            results.append(run_sidecars(emu, world, pods, args, log_dir, agent_mode=True))
        if not args.no_baseline:
            # Back to a clean world (sidecars that could not release within their timeout).
            all_addr = {a for p in pods for a in p.addresses} | set(cluster.fresh_addresses(pods, 4 * len(pods)))
            cluster.unassign_all(emu, cluster.eni_addresses(emu, world.subnet_id), all_addr)
            print("scale_sim: baseline run", flush=True)
            results.append(run_baseline(emu, world, pods, args))
        text = report(args, results, moto, setup_s, time.monotonic() - t_all)
        print(text)
        if args.write_doc:
            cluster.write_doc_section("bench-scale", command_line(), text)
        if args.json:
            Path(args.json).write_text(
                json.dumps([dataclasses.asdict(r) for r in results], indent=1, default=str)
            )
        return 0
    except Interrupted as e:
        print(f"scale_sim: interrupted ({e}); cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in pods:
            cluster.stop_sidecar(p)
        for p in pods:
            if p.ns is not None:
                p.ns.close()
            else:
                cluster.delete_namespace(p.ns_name)
        if emu is not None:
            emu.close()
        if args.keep_logs:
            print(f"scale_sim: logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
