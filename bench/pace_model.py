"""A discrete-event model of node agents' Assign calls against the account's bucket, to
choose the agent's `--batch-interval` before running the scale bench.

It mirrors agent/src/batch.rs and agent/src/node.rs: pods arrive round-robin over the nodes
(one ENI each) during `spawn` seconds, as `scripts/bench-scale.sh` starts them; each node
sends everything queued for its ENI in one call when no call is in flight and `interval`
has passed since its previous call started (0: group commit alone); a throttled call puts
its addresses back and the node waits its backoff (500 ms doubling to 8 s, plus 0-100 %
jitter) before the next call. With `--aimd` (agent/src/pacing.rs, issue 22) a throttled call
also halves the node's rate of calls (its interval doubles, from at least 1 s, jittered ±20 %,
up to twice the base) and each call that goes through adds back a tenth of the base rate. The bucket is
AssignPrivateIpAddresses' (100 calls, 5/s, bench/ec2_throttle.py); a call costs `latency`
seconds.

It is a model: it reproduced the measured group-commit run (400 pods on 40 nodes: 278
Assign calls, 115 throttled, all routable 12.9 s after the last pod; the model says
~300, ~150, ~11 s) before it was used to pick 3 s. For 5 s at 1,000 pods on 50 nodes over 12 s
it said 223 calls, 23 throttled, 8.6 s; the bench measured 224, 24 and 7.6 s on a rollout of 13 s,
and 5 s became the default (issue 22, docs/scale.md "Pacing").

    .venv/bin/python bench/pace_model.py
    .venv/bin/python bench/pace_model.py --nodes 50 --pods 1000 --spawn 12 --intervals 0 3 5 8
    .venv/bin/python bench/pace_model.py --nodes 50 --pods 1000 --spawn 12 --intervals 3 --aimd
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics

CAPACITY = 100.0
REFILL_PER_S = 5.0
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 8.0


def rollout(
    nodes: int, pods: int, spawn: float, interval: float, latency: float, seed: int, aimd: bool = False
) -> tuple[int, int, float]:
    """One rollout: (Assign calls, throttled calls, seconds from the last pod to all routable)."""
    rnd = random.Random(seed)
    tokens, refilled_at = CAPACITY, 0.0

    def take(t: float) -> bool:
        nonlocal tokens, refilled_at
        tokens = min(CAPACITY, tokens + (t - refilled_at) * REFILL_PER_S)
        refilled_at = t
        if tokens >= 1:
            tokens -= 1
            return True
        return False

    events: list[tuple[float, int, str, int, int]] = []
    order = 0
    for i in range(pods):
        heapq.heappush(events, (i * spawn / pods, order, "arrive", i % nodes, 0))
        order += 1
    queued = [0] * nodes
    busy = [False] * nodes
    timer_set = [False] * nodes
    not_before = [0.0] * nodes
    backoff = [BACKOFF_MIN_S] * nodes
    last_call = [float("-inf")] * nodes
    base_rate = 1.0 / max(interval, 0.001)
    rate = [base_rate] * nodes
    gap = [interval] * nodes
    calls = throttled = 0
    last_success = 0.0

    def dispatch(t: float, n: int) -> None:
        nonlocal calls, order
        if busy[n] or not queued[n] or timer_set[n]:
            return
        start = max(t, not_before[n], last_call[n] + gap[n])
        if start > t:
            timer_set[n] = True
            heapq.heappush(events, (start, order, "timer", n, 0))
            order += 1
            return
        busy[n], last_call[n] = True, t
        if aimd and rate[n] < base_rate:
            gap[n] = (1.0 / rate[n]) * (0.8 + 0.4 * rnd.random())
        else:
            gap[n] = interval
        calls += 1
        ok = take(t)
        heapq.heappush(events, (t + latency, order, "done" if ok else "throttled", n, queued[n]))
        order += 1
        queued[n] = 0

    while events:
        t, _, kind, n, count = heapq.heappop(events)
        if kind == "arrive":
            queued[n] += 1
        elif kind == "timer":
            timer_set[n] = False
        elif kind == "done":
            busy[n] = False
            backoff[n] = BACKOFF_MIN_S
            last_success = max(last_success, t)
            rate[n] = min(base_rate, rate[n] + base_rate / 10)
        else:
            busy[n] = False
            throttled += 1
            rate[n] = max(1 / (2 * max(interval, 1.0)), min(rate[n], 1.0 / max(interval, 1.0)) / 2)
            queued[n] += count
            not_before[n] = t + backoff[n] * (1 + rnd.random())
            backoff[n] = min(backoff[n] * 2, BACKOFF_MAX_S)
        dispatch(t, n)
    last_pod = (pods - 1) * spawn / pods
    return calls, throttled, last_success - last_pod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=40)
    ap.add_argument("--pods", type=int, default=400)
    ap.add_argument("--spawn", type=float, default=4.9, help="seconds over which the pods appear")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds per EC2 call")
    ap.add_argument("--intervals", type=float, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--aimd", action="store_true", help="also model the agent's pacing to the account (issue 22)")
    args = ap.parse_args()
    print(f"{args.pods} pods on {args.nodes} nodes over {args.spawn} s, {args.runs} runs each")
    print("| --batch-interval | pacing | Assign calls | throttled | last pod → all routable p50 (max) |")
    print("| --- | --- | --- | --- | --- |")
    for interval in args.intervals:
        for aimd in [False, True] if args.aimd else [False]:
            runs = [
                rollout(args.nodes, args.pods, args.spawn, interval, args.latency, seed, aimd)
                for seed in range(args.runs)
            ]
            tails = [r[2] for r in runs]
            print(
                f"| {interval:g} s | {'AIMD' if aimd else 'fixed'} | {statistics.mean(r[0] for r in runs):.0f} | "
                f"{statistics.mean(r[1] for r in runs):.0f} | {statistics.median(tails):.1f} s ({max(tails):.1f} s) |"
            )


if __name__ == "__main__":
    main()
