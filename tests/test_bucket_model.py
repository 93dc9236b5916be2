"""The EC2 token-bucket model behind the scale benchmark (bench/ec2_throttle.py): the figures
in docs/scale.md (optimum, amplification floor) are only as right as this arithmetic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from ec2_throttle import BucketModel  # noqa: E402

DESCRIBE, ASSIGN, UNASSIGN6 = "DescribeNetworkInterfaces", "AssignPrivateIpAddresses", "UnassignIpv6Addresses"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_passes_its_burst_then_refills_at_its_rate():
    clock = Clock()
    model = BucketModel(clock=clock)
    assert sum(model.take(ASSIGN) for _ in range(150)) == 100
    clock.now = 1.0  # AssignPrivateIpAddresses refills 5 tokens per second
    assert sum(model.take(ASSIGN) for _ in range(10)) == 5
    # Another action's bucket is untouched by the scope `action` default.
    assert sum(model.take(DESCRIBE) for _ in range(150)) == 100


def test_category_scope_shares_one_mutating_bucket():
    model = BucketModel(scope="category", clock=Clock())
    passed = sum(model.take(ASSIGN) for _ in range(40)) + sum(model.take(UNASSIGN6) for _ in range(40))
    assert passed == 50


def test_optimum_is_the_time_the_slowest_bucket_needs():
    model = BucketModel(clock=Clock())
    # 200 assigns: 100 at once, the other 100 at 5/s; 200 describes need 5 s at 20/s.
    assert model.optimum_seconds({DESCRIBE: 200, ASSIGN: 200}) == pytest.approx(20.0)
    assert model.optimum_seconds({DESCRIBE: 100, ASSIGN: 100}) == 0.0


def test_unavoidable_throttles_count_calls_beyond_burst_and_refill():
    model = BucketModel(clock=Clock())
    # Over 3 s: describes 200 - (100 + 20 * 3) = 40, assigns 200 - (100 + 5 * 3) = 85.
    assert model.unavoidable_throttles({DESCRIBE: 200, ASSIGN: 200}, 3.0) == 125
    # Spread wide enough for the refill to keep up: nothing is unavoidable.
    assert model.unavoidable_throttles({DESCRIBE: 200, ASSIGN: 200}, 20.0) == 0
    # From a drained bucket every call beyond the refill is.
    assert model.unavoidable_throttles({ASSIGN: 20}, 2.0, levels={ASSIGN: 0.5}) == 10
