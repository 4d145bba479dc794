"""Throughput of the quota decision alone (pytest-benchmark).

Not part of the test suite (``testpaths = ["tests"]``); run it as::

    python -m pytest bench/test_quota_bench.py --benchmark-only -q -p no:cacheprovider

(``--benchmark-enable`` too if the ini's ``--benchmark-disable`` is in the way.)
Each benchmark is one request's worth of work; reservations (or decisions)
per second are 1 / mean. The clock is simulated in (a)–(c) so an account
stays in a steady state however many rounds pytest-benchmark runs: it
advances by exactly one request's share of the account's pace, so every
reservation departs at once and is confirmed at its departure time, the
ordinary path of an account working at its limit. (d) runs on the real
clocks, as the server does.
"""

from __future__ import annotations

import time

import pytest

from elbasy.limits import Limit
from elbasy.pacing import Pacer
from elbasy.protocol.http1 import parse_request_head
from elbasy.quota import LocalStore, Reservation
from elbasy.rules import RuleSet

ACCOUNTS = 10_000
#: Shopify REST, standard plan: 40 requests, 2 restored per second
SHOPIFY = Limit("shopify-rest", "bucket", capacity=40, rate=2)
#: Etsy v3: 10 a second (fixed window), 10,000 a rolling day of 12 two-hour blocks
ETSY_QPS = Limit("etsy-qps", "window", capacity=10, window=1)
ETSY_QPD = Limit("etsy-qpd", "rolling", capacity=10_000, window=86_400, sub_buckets=12)

# keep every benchmark bounded: at most ~2 s of rounds each
BOUNDED = pytest.mark.benchmark(max_time=2.0, min_rounds=5, warmup=True, warmup_iterations=1000)


def _cycle(store: LocalStore, accounts: list[tuple[str, ...]], limits: tuple[Limit, ...], step):
    """A closure doing one reserve + confirm per call, round robin over ``accounts``."""
    state = {"i": 0, "now": 1_800_000_000.0}
    n = len(accounts)

    def one() -> None:
        i = state["i"]
        now = state["now"]
        r = store.reserve(accounts[i], limits, 1.0, now, 600.0)
        assert isinstance(r, Reservation)
        at = max(now, r.depart)
        assert store.confirm(r, at) is None
        store.landed(r, at)  # its answer at once
        state["i"] = (i + 1) % n
        state["now"] = now + step

    return one


@BOUNDED
def test_reserve_confirm_one_bucket(benchmark) -> None:
    """(a) One Shopify REST account: reserve + confirm, clock at the account's pace."""
    store = LocalStore()
    interval = 1.0 / (SHOPIFY.rate * (1 - store.safety.margin))
    one = _cycle(store, [("shopify-admin-rest|shopify-rest|shop|app",)], (SHOPIFY,), interval)
    benchmark(one)
    assert store.buckets() == 1


@BOUNDED
def test_reserve_confirm_10k_accounts(benchmark) -> None:
    """(b) 10,000 Shopify REST accounts round robin, each at its pace."""
    store = LocalStore()
    interval = 1.0 / (SHOPIFY.rate * (1 - store.safety.margin))
    keys = [(f"shopify-admin-rest|shopify-rest|shop{i}|app",) for i in range(ACCOUNTS)]
    one = _cycle(store, keys, (SHOPIFY,), interval / ACCOUNTS)
    for _ in range(ACCOUNTS):  # every account exists before the timing starts
        one()
    benchmark(one)
    assert store.buckets() == ACCOUNTS


@BOUNDED
def test_reserve_confirm_etsy_two_limits(benchmark) -> None:
    """(c) One Etsy account: the second's window and the rolling day in one reservation.

    The clock advances at the day's pace (10,000 a day): the account's
    sustained limit, so both limits are checked on every request and the
    rolling day's twelve blocks are all populated.
    """
    store = LocalStore()
    keys = [("etsy-v3|etsy-qps|app", "etsy-v3|etsy-qpd|app")]
    one = _cycle(store, keys, (ETSY_QPS, ETSY_QPD), ETSY_QPD.window / ETSY_QPD.capacity * 1.001)
    for _ in range(10_000):  # a full rolling day of history before the timing starts
        one()
    benchmark(one)


def _shopify_heads(n: int) -> list[tuple[str, list[tuple[bytes, bytes]]]]:
    """(host, headers) of n realistic Shopify REST request heads, one per shop."""
    out = []
    for i in range(n):
        host = f"shop-{i:05d}.myshopify.com"
        raw = (
            f"GET https://{host}/admin/api/2024-10/products.json?limit=250&fields=id,title"
            " HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "User-Agent: ShopifyAPI Library v14.0 | Ruby 3.3.0\r\n"
            "Accept: application/json\r\n"
            "Accept-Encoding: gzip, deflate\r\n"
            "Content-Type: application/json\r\n"
            f"X-Shopify-Access-Token: shpat_{i:032x}\r\n"
            "Connection: keep-alive\r\n\r\n"
        ).encode()
        out.append((host, parse_request_head(raw).headers()))
    return out


@BOUNDED
def test_decision_shopify_rest(benchmark) -> None:
    """(d) The whole per-request decision: RuleSet.match, Pacer.start, Pacer.admit.

    10,000 shops round robin on the real clocks (time.time, time.monotonic).
    Requests arrive faster than each shop's 2/s, so after the first seconds
    most are queued (a departure in the future) rather than sent at once;
    the max wait is the ceiling so none is shed.
    """
    pacer = Pacer(
        RuleSet.builtin(),
        LocalStore(),
        wall=time.time,
        mono=time.monotonic,
        max_wait=3600.0,
    )
    heads = _shopify_heads(ACCOUNTS)
    target = "/admin/api/2024-10/products.json?limit=250&fields=id,title"
    state = {"i": 0}

    def one() -> None:
        i = state["i"]
        host, headers = heads[i]
        m = pacer.match(host, "GET", target, headers)
        paced = pacer.start(m, "GET", headers)
        v = pacer.admit(paced)
        assert not v.shed_after
        state["i"] = (i + 1) % ACCOUNTS

    for _ in range(ACCOUNTS):
        one()
    benchmark(one)
    assert pacer.counters["shed"] == 0
