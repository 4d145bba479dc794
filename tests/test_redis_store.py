"""RedisStore beyond the contract suite (tests/test_quota.py runs that on it too):
what only a store on a real Redis server has. Every test here talks to the
session's redis-server (tests/redis_server.py); none is skipped without one.

* the scripts reload after ``SCRIPT FLUSH`` (NOSCRIPT) and the step still counts once;
* several instances (connections, threads, processes) share one account's
  quota exactly: the admitted count is the limit, never one more;
* the server's clock (TIME): callers whose clocks disagree by seconds share
  the same quota, and each is answered in its own clock;
* records expire once idle; facts are shared; URLs and passwords are read
  as documented; one account's keys carry one hash tag.
"""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import redis
from redis.crc import key_slot

from elbasy.limits import BUCKET, ROLLING, WINDOW, Limit
from elbasy.quota import LocalStore, Reservation, Safety, ServerView, Shed
from elbasy.redis_store import PASSWORD_ENV, RedisStore, account_tag, connect

EXACT = Safety(margin=0.0, headroom=0.0, jitter=0.0, guard=0.0)
SHOPIFY = Limit("shopify-rest", BUCKET, capacity=40, rate=2)
#: a bucket that leaks about nothing during a test: what is admitted is its capacity
SLOW = Limit("slow", BUCKET, capacity=40, rate=1e-6)
#: a window longer than any test run (aligned to the epoch: one boundary in 11 days)
LONG_WINDOW = Limit("long", WINDOW, capacity=25, window=1e6)


def test_scripts_reload_after_script_flush_and_the_step_counts_once(redis_url: str) -> None:
    store, local = RedisStore(redis_url, EXACT, clock="caller"), LocalStore(EXACT)
    try:
        for i in range(45):
            store.client.script_flush()  # every call meets NOSCRIPT
            got = store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)
            want = local.reserve(["a"], [SHOPIFY], 1, 0.0, 60)
            assert isinstance(got, Reservation) and isinstance(want, Reservation)
            assert (got.depart, got.slots) == (want.depart, want.slots)
            assert got.positions == want.positions
            if i % 2:
                store.client.script_flush()
            assert store.confirm(got, got.depart) is local.confirm(want, want.depart) is None
            if i % 3:
                store.client.script_flush()
            store.landed(got, got.depart)  # answered at once
            local.landed(want, want.depart)
        assert store.reloads >= 45 + 22
        # the facts' script too
        store.client.script_flush()
        assert store.put_fact("plan|x", 40, 2) is True and store.fact("plan|x") == (40.0, 2.0)
    finally:
        store.close()


def _hammer(url: str, n: int, out: list[int] | None = None, q: object = None) -> int:
    """n attempts at one account with no wait allowed: how many were admitted."""
    store = RedisStore(url, EXACT)  # the server's clock, as in production
    admitted = 0
    try:
        for _ in range(n):
            now = time.time()
            r = store.reserve(["rule|acct|shop1"], [SLOW], 1, now, 0.0)
            if isinstance(r, Reservation):
                assert store.confirm(r, now) is None
                admitted += 1
            r2 = store.reserve(["rule|win|shop1"], [LONG_WINDOW], 1, now, 0.0)
            if isinstance(r2, Reservation):
                assert store.confirm(r2, now) is None
                admitted += 1000
    finally:
        store.close()
    if out is not None:
        out.append(admitted)
    if q is not None:
        q.put(admitted)  # type: ignore[attr-defined]
    return admitted


def test_threads_on_separate_connections_share_quota_exactly(redis_url: str) -> None:
    out: list[int] = []
    threads = [threading.Thread(target=_hammer, args=(redis_url, 60, out)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 6
    total = sum(out)
    # exactly the bucket's 40 and the window's 25 across all six, never one more
    assert total % 1000 == 40 and total // 1000 == 25, out
    assert sum(1 for x in out if x) > 1  # more than one connection got some


def test_processes_share_quota_exactly(redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(redis_url, 60, None, q)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    total = sum(got)
    assert total % 1000 == 40 and total // 1000 == 25, got


def test_skewed_callers_share_quota_on_the_servers_clock(redis_url: str) -> None:
    """Two machines 2 s apart (and one 1e6 s off) take from one bucket: the
    admitted count is the bucket's, and each is answered in its own clock."""
    stores = [RedisStore(redis_url, EXACT) for _ in range(3)]
    skews = [0.0, 2.0, -1e6]
    try:
        admitted = [0, 0, 0]
        for i in range(90):
            k = i % 3
            now = time.time() + skews[k]
            r = stores[k].reserve(["rule|acct|shop1"], [SHOPIFY], 1, now, 60)
            assert isinstance(r, Reservation)
            wait = r.depart - now
            if wait <= 1e-6:
                assert stores[k].confirm(r, now) is None
                admitted[k] += 1
            else:
                # queued behind the full bucket: about one leak interval per place
                # (measured from the server's now, a moment after this caller's)
                assert 0 < wait < 60
                assert stores[k].give_back(r, now)
        assert sum(admitted) == 40 and min(admitted) > 0, admitted
        # the next one of the far-off caller is told a time in its own clock
        now = time.time() + skews[2]
        r = stores[2].reserve(["rule|acct|shop1"], [SHOPIFY], 1, now, 60)
        assert isinstance(r, Reservation) and 0.0 < r.depart - now <= 0.5 + 0.05
        shed = stores[1].reserve(["rule|acct|shop1"], [SHOPIFY], 1, now, 0.0)
        assert isinstance(shed, Shed) and 0.5 < shed.retry_after <= 1.05
        # throttled answers in the caller's clock too
        assert stores[2].throttled(["rule|acct|shop1"], [SHOPIFY], now, 3.0) == now + 3.0
    finally:
        for s in stores:
            s.close()


def test_records_expire_once_idle_and_then_act_fresh(redis_url: str) -> None:
    fast = Limit("fast", BUCKET, capacity=2, rate=100)
    store = RedisStore(redis_url, EXACT, idle_grace=0.05, queued_grace=30)
    try:
        now = time.time()
        r = store.reserve(["rule|fast|shop1"], [fast], 1, now, 1)
        assert isinstance(r, Reservation)
        key = store.key_of("rule|fast|shop1", "fast")
        # a unit queued: kept the queued grace longer
        assert 30_000 < store.client.pttl(key) <= 30_000 + 1_000
        assert store.confirm(r, now) is None
        # sent, no answer yet: in flight, kept the queued grace longer too
        assert 30_000 < store.client.pttl(key) <= 30_000 + 1_000
        store.landed(r, now)
        # answered: full again 10 ms after now, then the grace
        assert 0 < store.client.pttl(key) <= 60 + 10 + 5
        deadline = time.monotonic() + 5
        while store.client.exists(key) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not store.client.exists(key)
        # a window's record lives while a window holds counts
        w = Limit("w", WINDOW, capacity=5, window=1)
        r = store.reserve(["rule|w|shop1"], [w], 1, time.time(), 1)
        assert isinstance(r, Reservation)
        assert store.client.pttl(store.key_of("rule|w|shop1", "w")) <= 1000 + 50 + 50
    finally:
        store.close()


def test_throttled_and_observe_keep_the_record_while_blocked(redis_url: str) -> None:
    store = RedisStore(redis_url, EXACT, clock="caller", idle_grace=1.0)
    try:
        store.throttled(["a"], [SHOPIFY], 0.0, 100.0)
        # blocked for 100 s, the bucket full for 20 s: kept 100 s and the grace
        assert 100_000 < store.client.pttl(store.key_of("a", "shopify-rest")) <= 101_000
        view = ServerView("shopify-rest", remaining=0, reset_after=500.0)
        store.observe(["a"], [SHOPIFY], [view], 0.0)
        assert 500_000 < store.client.pttl(store.key_of("a", "shopify-rest")) <= 501_000
        rec = store.peek("a", "shopify-rest")
        assert rec is not None and rec[1] == 500.0  # blocked
    finally:
        store.close()


def test_facts_are_shared_between_instances(redis_url: str) -> None:
    a = RedisStore(redis_url, EXACT, facts_refresh=0.0)
    b = RedisStore(redis_url, EXACT, facts_refresh=0.0)
    try:
        assert b.fact("tier|acme") is None  # cached as missing ...
        gb = b.facts_generation
        assert a.put_fact("tier|acme", 2, 0) is True
        assert b.facts_generation != gb  # ... until the counter moved
        assert b.fact("tier|acme") == (2.0, 0.0)
        assert b.put_fact("tier|acme", 2, 0) is False  # the same value: nothing moves
        with pytest.raises(ValueError, match="finite"):
            a.put_fact("tier|acme", float("nan"), 0)
    finally:
        a.close()
        b.close()


def test_one_accounts_keys_share_one_cluster_slot() -> None:
    store = RedisStore.__new__(RedisStore)  # key_of needs no server
    store.prefix, store.tag_of = "elbasy:", account_tag
    qps = store.key_of("etsy-v3|qps|key123", "qps")
    qpd = store.key_of("etsy-v3|qpd|key123", "qpd")
    assert key_slot(qps.encode()) == key_slot(qpd.encode())
    sp = [store.key_of(f"sp|{op}|seller9|eu|{op}", op) for op in ("getOrders", "getItems")]
    assert key_slot(sp[0].encode()) == key_slot(sp[1].encode())
    others = {key_slot(store.key_of(f"etsy-v3|qps|key{i}", "qps").encode()) for i in range(50)}
    assert len(others) > 40  # accounts spread over the cluster


def test_urls_and_passwords(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("http://127.0.0.1:6379", "127.0.0.1:6379", "shm"):
        with pytest.raises(ValueError, match="redis://"):
            connect(bad)
    with pytest.raises(ValueError, match="timeout"):
        connect(redis_url, timeout=0)
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    client = connect("redis://127.0.0.1:1/0")
    assert client.connection_pool.connection_kwargs["password"] == "from-env"
    client = connect("rediss://:in-url@127.0.0.1:1/3")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["password"] == "in-url" and kwargs["db"] == 3
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    # a server that is not there fails within the timeout, loudly
    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        RedisStore("redis://127.0.0.1:1/0", timeout=0.2)
    assert time.monotonic() - started < 2


def test_rolling_and_multi_limit_records_round_trip(redis_url: str) -> None:
    """A rolling limit's record (13 windows) and a per-limit cost tuple survive the wire."""
    qpd = Limit("etsy-qpd", ROLLING, capacity=30, window=86400, sub_buckets=12)
    store = RedisStore(redis_url, EXACT, clock="caller")
    try:
        r = store.reserve(["k", "k"], [SHOPIFY, qpd], [1.0, 7.5], 1000.25, 60)
        assert isinstance(r, Reservation) and r.costs == (1.0, 7.5)
        assert r.slots == (1.0, float(int(1000.25 // 7200)))
        assert store.confirm(r, 1000.25) is None
        rec = store.peek("k", "etsy-qpd")
        assert rec is not None and len(rec) == 3 + 13 * 4
        assert rec[3 + 4 * 0 : 3 + 4 * 0 + 4] == (0.0, 7.5, 7.5, 0.0)  # window 0
    finally:
        store.close()


# --------------------------------------------------------------------------- --quota-store redis://


def test_the_setting_takes_a_redis_url_as_given() -> None:
    from elbasy.config import build_config
    from elbasy.settings import ConfigError

    url = "redis://:PassWord@Host.example:6380/2"
    assert build_config(quota_store=url).quota_store == url  # a password keeps its case
    assert build_config(quota_store="SHM").quota_store == "shm"
    for bad in ("http://x:1", "redis://", "memcached"):
        with pytest.raises(ConfigError, match=r"redis://\.\.\."):
            build_config(quota_store=bad)


def test_the_proxy_runs_on_a_redis_store(proxy, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    p = proxy("--quota-store", redis_url, "--workers", "2")
    quota = p.healthz()["quota"]
    assert quota["store"] == "redis" and quota["clock"] == "server", quota
    assert p.lines_with("no worker waits for it", 1), p.stderr


def test_an_unreachable_redis_at_start_starts_on_the_share_without_its_password(  # type: ignore[no-untyped-def]
    proxy,
) -> None:
    """Redis down when elbasy starts: it starts on the machine's share (a proxy
    that refused to start would fail every request it carries), says so once
    with the URL's password hidden, and /healthz shows the fall back."""
    from redis_server import free_port

    url = f"redis://:secret123@127.0.0.1:{free_port()}/0"
    p = proxy("--quota-store", url)
    quota = p.healthz()["quota"]
    assert quota["store"] == "redis" and quota["fallback"] == "local", quota
    assert p.lines_with("cannot reach Redis at redis://:***@127.0.0.1", 1), p.stderr
    assert "secret123" not in p.stderr and "Traceback" not in p.stderr


def test_a_bad_redis_url_fails_at_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys
    from pathlib import Path

    url = "redis+sentinel://:secret123@127.0.0.1:notaport/svc"
    proc = subprocess.run(
        [sys.executable, "-m", "elbasy", "--listen", "127.0.0.1:0", "--quota-store", url],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(Path(__file__).resolve().parent.parent),
        env={**os.environ, "XDG_DATA_HOME": str(tmp_path)},
    )
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "bad Redis Sentinel URL" in errors[0], proc.stderr
    assert "secret123" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_refund_or_a_place_given_back_on_one_machine_wakes_the_others(redis_url: str) -> None:
    """Two stores of one fleet (one prefix): what one gives back or refunds reaches
    the other's fd and moved() within moments; a store never hears itself."""
    import select

    a, b = RedisStore(redis_url, EXACT), RedisStore(redis_url, EXACT)
    try:
        time.sleep(0.3)  # both listeners subscribed
        now = time.time()
        r = a.reserve(["rule|x|shop1"], [SHOPIFY], 1, now, 60)
        assert isinstance(r, Reservation) and a.give_back(r, now)
        assert select.select([b.fileno()], [], [], 5.0)[0]
        assert b.moved() == ["rule|x|shop1"]
        gql = Limit("points", BUCKET, capacity=1000, rate=50, unit="points")
        q = b.reserve(["rule|g|shop2"], [gql], 300, now, 60)
        assert isinstance(q, Reservation) and b.confirm(q, now) is None
        b.settle(q, 10, now)  # 290 points back
        assert select.select([a.fileno()], [], [], 5.0)[0]
        assert a.moved() == ["rule|g|shop2"]
        assert not select.select([b.fileno()], [], [], 0.3)[0] and b.moved() == []
    finally:
        a.close()
        b.close()
