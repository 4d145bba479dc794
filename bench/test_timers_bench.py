"""Cost of the loop's timer heap with 1,000 to 1,000,000 live timers (pytest-benchmark).

Not part of the test suite; run it as::

    python -m pytest bench/test_timers_bench.py --benchmark-only -q -p no:cacheprovider

The loop keeps every deadline (head read, connect, idle tunnel, keep-alive,
response, a held request's departure) in one heap (ext/c/elbasy_timers.h).
Each benchmark call is ``ROUNDS`` hold operations in C at a fixed heap size:
take the earliest entry, push the next deadline of that connection, due
0–60 s later. Nanoseconds per timer is the mean / ROUNDS. The heap is filled
directly, with no sockets: a process here may hold 20,000 fds at most, so the
loop itself cannot reach 100,000 live deadlines on this machine, but the
structure it uses can be measured there and beyond.
"""

from __future__ import annotations

import random

import pytest

from elbasy._timers import TimerHeap

ROUNDS = 100_000
SPREAD_NS = 60 * 1_000_000_000  # deadlines up to a minute out: the idle and keep-alive ones


@pytest.mark.parametrize("live", [1_000, 10_000, 100_000, 1_000_000])
@pytest.mark.benchmark(max_time=2.0, min_rounds=5, warmup=True, warmup_iterations=2)
def test_timer_hold(benchmark, live: int) -> None:
    rng = random.Random(live)
    heap = TimerHeap(capacity=live)
    for fd in range(live):
        heap.push(rng.randrange(SPREAD_NS), fd, fd)
    benchmark.extra_info["live_timers"] = live
    benchmark.extra_info["rounds_per_call"] = ROUNDS
    benchmark(heap.hold, ROUNDS, SPREAD_NS)
    assert len(heap) == live
    ns = benchmark.stats.stats.mean / ROUNDS * 1e9
    benchmark.extra_info["ns_per_timer"] = round(ns, 1)
