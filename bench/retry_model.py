"""A discrete-event model of the sidecar's EC2 retries against the account's buckets, to
predict what a change of the retry parameters does before rebuilding the sidecar.

It mirrors ec2/src/eni.rs and sidecar/src/run.rs: each reconcile pass makes a
DescribeNetworkInterfaces when the ENI is unknown or stale, then one
AssignPrivateIpAddresses; every call is retried by the SDK (standard mode: up to
`sdk_attempts` attempts, waiting rand(0,1) × 0.2 s × 2^retry; 1 attempt where the SDK
leaves throttling to the loop); a failed pass waits the event loop's backoff (backon:
`loop_min` doubling to `loop_max`, plus a random 0–100 % of that delay) and marks the ENI
stale (re-described next pass) when `stale_on_throttle`. On SIGTERM the release makes one
Unassign, preceded by a Describe when `release_describes`, and either gives up at the first
failure or retries with backoff (`release_min` doubling to `release_max`, jittered) until
the shutdown timeout. Each policy below is one state of the code, named by its commit.

It is a model: calibrate it against a measured `scripts/bench-scale.sh` run (the same
spawn spread and pod count) before trusting its "after" figures.

    .venv/bin/python bench/retry_model.py --pods 200 --spawn 3
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import random
from typing import Callable, Iterator

from ec2_throttle import BucketModel

DESCRIBE, ASSIGN, UNASSIGN = "DescribeNetworkInterfaces", "AssignPrivateIpAddresses", "UnassignPrivateIpAddresses"
RTT = 0.01  # seconds per EC2 round trip through the proxy


@dataclasses.dataclass
class Policy:
    sdk_attempts: int = 3
    sdk_initial: float = 0.2
    loop_min: float = 1.0
    loop_max: float = 30.0
    loop_factor: float = 2.0
    stale_on_throttle: bool = True
    release_retries: bool = False
    release_keeps_picture: bool = False
    release_describes: bool = True
    release_min: float = 0.25
    release_max: float = 2.0
    shutdown_timeout: float = 10.0


@dataclasses.dataclass
class Outcome:
    calls: dict[str, int]
    throttled: dict[str, int]
    converged: float
    released: int = 0


class Sim:
    def __init__(self, seed: int):
        self.now = 0.0
        self.model = BucketModel(clock=lambda: self.now)
        self.queue: list[tuple[float, int, Iterator[float]]] = []
        self.seq = 0
        self.rng = random.Random(seed)
        self.calls: dict[str, int] = {}
        self.throttled: dict[str, int] = {}

    def spawn(self, at: float, proc: Callable[[], Iterator[float]]) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (at, self.seq, proc()))

    def run(self) -> None:
        while self.queue:
            self.now, seq, gen = heapq.heappop(self.queue)
            try:
                wait = next(gen)
            except StopIteration:
                continue
            heapq.heappush(self.queue, (self.now + wait, seq, gen))

    def call(self, action: str) -> bool:
        self.calls[action] = self.calls.get(action, 0) + 1
        ok = self.model.take(action)
        if not ok:
            self.throttled[action] = self.throttled.get(action, 0) + 1
        return ok


def sdk_call(sim: Sim, p: Policy, action: str, result: list[bool]) -> Iterator[float]:
    for attempt in range(p.sdk_attempts):
        yield RTT
        if sim.call(action):
            result.append(True)
            return
        if attempt + 1 < p.sdk_attempts:
            yield sim.rng.random() * min(p.sdk_initial * 2**attempt, 5.0)
    result.append(False)


def loop_delays(sim: Sim, p: Policy) -> Iterator[float]:
    d = p.loop_min
    while True:
        yield d + d * sim.rng.random()
        d = min(d * p.loop_factor, p.loop_max)


def start_phase(pods: int, spawn: float, p: Policy, seed: int = 1) -> Outcome:
    sim = Sim(seed)
    done: list[float] = []

    def pod() -> Iterator[float]:
        stale, delays = True, loop_delays(sim, p)
        while True:
            ok: list[bool] = []
            if stale:
                yield from sdk_call(sim, p, DESCRIBE, ok)
                if not ok[-1]:
                    yield next(delays)
                    continue
                stale = False
            yield from sdk_call(sim, p, ASSIGN, ok)
            if ok[-1]:
                done.append(sim.now)
                return
            stale = p.stale_on_throttle
            yield next(delays)

    for i in range(pods):
        sim.spawn(spawn * i / pods + 0.1, pod)
    sim.run()
    return Outcome(sim.calls, sim.throttled, max(done))


def release_phase(pods: int, p: Policy, seed: int = 1) -> Outcome:
    sim = Sim(seed)
    released: list[float] = []

    def pod() -> Iterator[float]:
        deadline = sim.now + p.shutdown_timeout
        delay, described = p.release_min, not p.release_describes
        while sim.now < deadline:
            ok: list[bool] = []
            if not described:
                yield from sdk_call(sim, p, DESCRIBE, ok)
                described = ok[-1]
            if described:
                yield from sdk_call(sim, p, UNASSIGN, ok)
                if ok[-1] and sim.now <= deadline:
                    released.append(sim.now)
                    return
                described = p.release_keeps_picture
            if not p.release_retries:
                return
            yield min(delay + delay * sim.rng.random(), max(0.0, deadline - sim.now))
            delay = min(delay * 2, p.release_max)

    for _ in range(pods):
        sim.spawn(0.0, pod)
    sim.run()
    return Outcome(sim.calls, sim.throttled, max(released, default=0.0), len(released))


def describe(name: str, o: Outcome, needed: int) -> str:
    made = sum(o.calls.values())
    thr = sum(o.throttled.values())
    per = ", ".join(f"{k.replace('NetworkInterfaces', '').replace('PrivateIpAddresses', '')} {v}" for k, v in sorted(o.calls.items()))
    extra = f", released {o.released}" if o.released else ""
    return f"| {name} | {per} | {thr} | {made / needed:.2f} | {o.converged:.1f} s{extra} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=200)
    ap.add_argument("--spawn", type=float, default=7.0, help="seconds over which the sidecars start")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    now = Policy(
        sdk_attempts=1,
        stale_on_throttle=False,
        loop_min=1.0,
        loop_max=8.0,
        release_retries=True,
        release_keeps_picture=True,
        release_describes=False,
        release_min=2.0,
        release_max=8.0,
    )
    policies = {
        "until 0913ffe (SDK 3 attempts on throttling, stale on throttle, release gives up)": Policy(),
        "0913ffe (SDK 3 attempts on throttling, release retries)": Policy(
            stale_on_throttle=False, release_retries=True
        ),
        "5a9febc (SDK leaves throttling to the loop, loop backoff from 2 s, release retries and keeps its picture)": Policy(
            sdk_attempts=1, stale_on_throttle=False, loop_min=2.0, release_retries=True, release_keeps_picture=True
        ),
        "f61301a (release from the loop's picture: no Describe; release backoff 2 s to 8 s)": dataclasses.replace(
            now, loop_min=2.0, loop_max=30.0
        ),
        "2 s doubling to 8 s for throttled passes (until issue 12)": dataclasses.replace(now, loop_min=2.0),
        "now (issue 12: throttled passes back off from 1 s: a lone pod throttled 3 times waits 7-14 s, was 14-28 s)": now,
        "same, shutdown timeout 25 s": dataclasses.replace(now, shutdown_timeout=25.0),
    }
    print(f"model: {args.pods} pods starting over {args.spawn:.0f} s, random seed {args.seed}")
    print("needed: start 1 Describe + 1 Assign per pod; release 1 Unassign per pod (the ENI is known)")
    print("| policy, phase | calls | throttled | amplification | last success |")
    print("| --- | --- | --- | --- | --- |")
    for name, p in policies.items():
        s = start_phase(args.pods, args.spawn, p, args.seed)
        r = release_phase(args.pods, p, args.seed)
        print(describe(f"{name}: start", s, 2 * args.pods))
        print(describe(f"{name}: release", r, args.pods))


if __name__ == "__main__":
    main()
