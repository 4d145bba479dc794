"""The loop's timer heap (ext/c/elbasy_timers.h, through elbasy._timers).

The loop's deadlines all go through this heap; its order is checked here
against the standard library's heapq on random work, without sockets.
"""

from __future__ import annotations

import heapq
import random

import pytest

from elbasy._timers import TimerHeap


def test_pops_in_time_order_with_mixed_pushes_and_pops() -> None:
    rng = random.Random(7)
    heap = TimerHeap(capacity=4)  # grows many times over
    ref: list[int] = []
    for _ in range(20_000):
        if ref and rng.random() < 0.45:
            when, fd, serial = heap.pop()
            assert when == heapq.heappop(ref)
            assert fd == when % 1000 and serial == when * 3
        else:
            when = rng.randrange(0, 50_000)  # many equal times
            heap.push(when, when % 1000, when * 3)
            heapq.heappush(ref, when)
        assert len(heap) == len(ref)
        assert heap.first() == (ref[0] if ref else None)
    drained = [heap.pop()[0] for _ in range(len(heap))]
    assert drained == sorted(ref)
    assert heap.first() is None


def test_empty_heap_says_so() -> None:
    heap = TimerHeap()
    with pytest.raises(IndexError):
        heap.pop()
    with pytest.raises(ValueError):
        heap.hold(10, 1_000)


def test_hold_keeps_the_size_and_moves_time_forward() -> None:
    heap = TimerHeap()
    for i in range(1_000):
        heap.push(i * 1_000, i, i)
    last = heap.hold(50_000, 1_000_000)
    assert len(heap) == 1_000
    # every entry taken was the earliest: the heap's first is never before the last taken
    first = heap.first()
    assert first is not None and first >= last > 1_000_000
    taken = [heap.pop() for _ in range(1_000)]
    assert [t[0] for t in taken] == sorted(t[0] for t in taken)
    assert sorted(t[1] for t in taken) == list(range(1_000))  # fds carried along
