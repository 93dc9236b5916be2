"""EC2's request throttling as a proxy in front of the EC2 emulator.

EC2 throttles every account per Region with token buckets: each request takes one token
from its bucket; an empty bucket answers `RequestLimitExceeded`; buckets refill at a fixed
rate up to their capacity. The numbers below are AWS's, from "Request throttling for the
Amazon EC2 API" (https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html),
tables "Request token bucket sizes and refill rates":

| action (category on that page)                       | capacity | refill /s |
| ---------------------------------------------------- | -------- | --------- |
| DescribeNetworkInterfaces, filtered or paginated     | 100      | 20        |
|   (non-mutating actions)                             |          |           |
| DescribeNetworkInterfaces, unfiltered and unpaginated| 50       | 10        |
| AssignPrivateIpAddresses (uncategorized)             | 100      | 5         |
| UnassignPrivateIpAddresses (uncategorized)           | 100      | 5         |
| AssignIpv6Addresses (uncategorized)                  | 100      | 5         |
| UnassignIpv6Addresses (mutating actions)             | 50       | 5         |

The page says "Limits are applied to individual API actions, not API action categories":
scope `action` (default) gives every action its own bucket with the numbers above. Scope
`category` is the stricter older reading — one bucket for all mutating calls (50/5) and one
for all non-mutating calls (100/20) — for a worst case.

Every DescribeNetworkInterfaces made in these benchmarks (sidecar and baseline) carries a
filter, so the 100/20 bucket applies; the proxy keys buckets by action only.

The proxy itself is the tests' `FaultProxy` (tests/lib/fault_proxy.py), which records every
request with its action, parameters, arrival time and status; this module only decides,
per request, whether its bucket has a token.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.lib.fault_proxy import THROTTLE, FaultProxy  # noqa: E402
from tests.lib.netns import NetNS  # noqa: E402

SOURCE = "https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html"

MUTATING = "mutating"
NON_MUTATING = "non-mutating"


@dataclasses.dataclass(frozen=True)
class BucketSize:
    """A token bucket's capacity (the burst) and refill rate (tokens per second)."""

    capacity: float
    refill: float


#: Per-action buckets (scope `action`), from the AWS page above.
ACTION_BUCKETS: dict[str, BucketSize] = {
    "DescribeNetworkInterfaces": BucketSize(100, 20),
    "AssignPrivateIpAddresses": BucketSize(100, 5),
    "UnassignPrivateIpAddresses": BucketSize(100, 5),
    "AssignIpv6Addresses": BucketSize(100, 5),
    "UnassignIpv6Addresses": BucketSize(50, 5),
}
#: Category buckets (scope `category`, and the fallback for actions not listed above).
CATEGORY_BUCKETS: dict[str, BucketSize] = {
    NON_MUTATING: BucketSize(100, 20),
    MUTATING: BucketSize(50, 5),
}


def category(action: str) -> str:
    """EC2's split: Describe*/List*/Search*/Get* are non-mutating, the rest mutating."""
    return NON_MUTATING if action.startswith(("Describe", "List", "Search", "Get")) else MUTATING


class TokenBucket:
    """Continuous refill at `refill` tokens/s up to `capacity`; starts full."""

    def __init__(self, size: BucketSize, now: float):
        self.size = size
        self.tokens = float(size.capacity)
        self.stamp = now

    def level(self, now: float) -> float:
        self.tokens = min(self.size.capacity, self.tokens + (now - self.stamp) * self.size.refill)
        self.stamp = now
        return self.tokens

    def take(self, now: float) -> bool:
        if self.level(now) >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class BucketModel:
    """The account's buckets. Thread-safe; the clock is `time.monotonic` unless given."""

    def __init__(self, scope: str = "action", clock: Callable[[], float] = time.monotonic):
        if scope not in ("action", "category"):
            raise ValueError(f"scope must be action or category, not {scope!r}")
        self.scope = scope
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}

    def key(self, action: str) -> str:
        if self.scope == "action" and action in ACTION_BUCKETS:
            return action
        return category(action)

    def size(self, action: str) -> BucketSize:
        key = self.key(action)
        return ACTION_BUCKETS.get(key) or CATEGORY_BUCKETS[key]

    def _bucket(self, action: str, now: float) -> TokenBucket:
        key = self.key(action)
        if key not in self._buckets:
            self._buckets[key] = TokenBucket(self.size(action), now)
        return self._buckets[key]

    def take(self, action: str) -> bool:
        """One request of `action`: True if it passes, False if EC2 would throttle it."""
        with self._lock:
            now = self.clock()
            return self._bucket(action, now).take(now)

    def levels(self, actions: list[str]) -> dict[str, float]:
        """Tokens left now in the buckets of `actions` (full for a bucket never used)."""
        with self._lock:
            now = self.clock()
            return {a: self._bucket(a, now).level(now) for a in actions}

    def optimum_seconds(self, needed: dict[str, int], levels: dict[str, float] | None = None) -> float:
        """The least time in which `needed` calls per action can all pass, starting from
        `levels` tokens (full buckets when None), when they are all ready at once.

        Buckets shared by several actions (scope `category`) are summed.
        """
        per_bucket: dict[str, tuple[float, BucketSize, float]] = {}
        for action, n in needed.items():
            if n <= 0:
                continue
            key = self.key(action)
            size = self.size(action)
            start = size.capacity if levels is None else levels.get(action, size.capacity)
            calls, _, lvl = per_bucket.get(key, (0.0, size, start))
            per_bucket[key] = (calls + n, size, min(lvl, start))
        worst = 0.0
        for calls, size, start in per_bucket.values():
            # The first call needs a whole token; the last one arrives when the bucket has
            # produced `calls` tokens in total.
            short = calls - math.floor(start)
            if short > 0:
                worst = max(worst, short / size.refill)
        return worst


    def unavoidable_throttles(
        self, needed: dict[str, int], spread: float, levels: dict[str, float] | None = None
    ) -> int:
        """Throttled calls no client can avoid when the `needed` calls of independent pods
        first arrive evenly over `spread` seconds: every call beyond what the bucket holds
        plus what it refills meanwhile is answered `RequestLimitExceeded` at least once
        (a pod cannot know the bucket is empty before asking). The floor of amplification
        is (needed + this) / needed.
        """
        per_bucket: dict[str, tuple[float, BucketSize, float]] = {}
        for action, n in needed.items():
            key, size = self.key(action), self.size(action)
            start = size.capacity if levels is None else levels.get(action, size.capacity)
            calls, _, lvl = per_bucket.get(key, (0.0, size, start))
            per_bucket[key] = (calls + n, size, min(lvl, start))
        return sum(
            max(0, math.ceil(calls - math.floor(start) - size.refill * spread))
            for calls, size, start in per_bucket.values()
        )


class ThrottlingProxy(FaultProxy):
    """The tests' fault proxy, answering `RequestLimitExceeded` (HTTP 503, EC2 XML error)
    whenever the request's bucket is empty. Faults injected with `inject()` still win."""

    def __init__(self, ns: NetNS, upstream_port: int, host: str, model: BucketModel):
        super().__init__(ns, upstream_port, host=host)
        self.model = model
        self.decisions = 0

    def _take_fault(self, action: str) -> str | None:  # FaultProxy's per-request hook
        self.decisions += 1
        injected = super()._take_fault(action)
        if injected is not None:
            return injected
        return None if self.model.take(action) else THROTTLE

    def check_hooked(self) -> None:
        """Fails loudly if the base proxy stopped asking us (its hook was renamed)."""
        if self.calls() > 0 and self.decisions == 0:
            raise RuntimeError(
                "ThrottlingProxy: FaultProxy never called _take_fault; the throttling model was not applied"
            )


def summarize(requests: list, since: float, until: float | None = None) -> dict[str, dict[str, int]]:
    """Calls per action in [since, until): total, passed (HTTP 200), throttled, other errors."""
    out: dict[str, dict[str, int]] = {}
    for r in requests:
        if r.arrived < since or (until is not None and r.arrived >= until):
            continue
        row = out.setdefault(r.action, {"calls": 0, "ok": 0, "throttled": 0, "errors": 0})
        row["calls"] += 1
        if r.fault == THROTTLE:
            row["throttled"] += 1
        elif r.status == 200:
            row["ok"] += 1
        else:
            row["errors"] += 1
    return out


if __name__ == "__main__":
    # Self-check of the bucket arithmetic with a fake clock (no namespaces needed).
    t = [0.0]
    m = BucketModel(clock=lambda: t[0])
    passed = sum(m.take("AssignPrivateIpAddresses") for _ in range(150))
    assert passed == 100, passed
    t[0] = 2.0
    passed = sum(m.take("AssignPrivateIpAddresses") for _ in range(50))
    assert passed == 10, passed
    assert m.optimum_seconds({"AssignPrivateIpAddresses": 200, "DescribeNetworkInterfaces": 200}) == 20.0
    c = BucketModel(scope="category", clock=lambda: 0.0)
    assert c.optimum_seconds({"AssignPrivateIpAddresses": 100, "UnassignPrivateIpAddresses": 50}) == 20.0
    print("ec2_throttle: bucket model self-check ok;", SOURCE)
