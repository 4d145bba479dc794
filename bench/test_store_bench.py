"""Reservations per second of each quota store: shm (elbasy._shm) against local.

Not part of the test suite (``testpaths = ["tests"]``); run it as::

    python -m pytest bench/test_store_bench.py -c bench/pytest.ini --benchmark-only \
        -q -p no:cacheprovider

One benchmark round is one request's quota work: ``reserve``, ``confirm`` and ``landed``
of one request, round robin over 10,000 accounts, on a one-limit account
(Shopify REST's bucket) and a two-limit one (a points bucket and a calls
bucket, as a GraphQL rule with a request count). As in
bench/test_quota_bench.py the clock is simulated, advancing by one
request's share of every account's pace, so each reservation departs at
once: the ordinary path of accounts working at their limits. The shm store
runs in one process here (no other worker contends for its lock); the
cost is the C step under the lock and the Python around it.

Measured 2026-12 on the 2-core development machine (shared, so +-20 %),
reservations per second (1 / mean): one limit, shm 181,000 and local 63,000;
two limits, shm 137,000 and local 45,000.
With ``landed`` in each round (2026-12-02, a busier machine: load average
about 4): one limit, shm 128,000 and local 40,000; two limits, shm 144,000
and local 27,000.
"""

from __future__ import annotations

import pytest

from elbasy._shm import ShmTable
from elbasy.limits import Limit
from elbasy.quota import LocalStore, QuotaStore, Reservation
from elbasy.shm import ShmStore

ACCOUNTS = 10_000
SHOPIFY = Limit("shopify-rest", "bucket", capacity=40, rate=2)
POINTS = Limit("points", "bucket", capacity=1000, rate=50, unit="points")
CALLS = Limit("calls", "bucket", capacity=40, rate=2)

BOUNDED = pytest.mark.benchmark(max_time=2.0, min_rounds=5, warmup=True, warmup_iterations=1000)


def _store(kind: str) -> QuotaStore:
    if kind == "local":
        return LocalStore()
    return ShmStore(ShmTable(4 * ACCOUNTS), 0)


def _cycle(store: QuotaStore, limits: tuple[Limit, ...], costs: tuple[float, ...]):
    accounts = [
        tuple(f"rule|{limit.name}|shop{i}|app" for limit in limits) for i in range(ACCOUNTS)
    ]
    # the slowest limit's pace, shared by every account
    step = max(c / limit.rate for c, limit in zip(costs, limits, strict=True)) / ACCOUNTS * 1.02
    state = {"i": 0, "now": 1_800_000_000.0}

    def one() -> None:
        i = state["i"]
        now = state["now"]
        r = store.reserve(accounts[i], limits, costs, now, 600.0)
        assert isinstance(r, Reservation)
        at = max(now, r.depart)
        assert store.confirm(r, at) is None
        store.landed(r, at)  # its answer at once
        state["i"] = (i + 1) % ACCOUNTS
        state["now"] = now + step

    for _ in range(ACCOUNTS):  # every account exists before the timing starts
        one()
    return one


@BOUNDED
@pytest.mark.parametrize("kind", ["local", "shm"])
def test_reserve_confirm_one_limit(benchmark, kind: str) -> None:
    """10,000 Shopify REST accounts: reserve + confirm of one request."""
    benchmark(_cycle(_store(kind), (SHOPIFY,), (1.0,)))


@BOUNDED
@pytest.mark.parametrize("kind", ["local", "shm"])
def test_reserve_confirm_two_limits(benchmark, kind: str) -> None:
    """10,000 accounts of a points bucket and a calls bucket: one request of 10 points."""
    benchmark(_cycle(_store(kind), (POINTS, CALLS), (10.0, 1.0)))
