"""FleetStore: the Redis quota store that keeps pacing while Redis is down.

Each test that kills or stops Redis starts its own ``redis-server``
(tests/redis_server.py), never the session's. What is checked:

* while Redis answers every step goes there (the session's Redis sees them);
* Redis killed (SIGKILL): the first step after it returns within the timeout
  plus a small margin, answered by the local share; later steps do not ask
  Redis until the backoff has passed; one warning;
* the local share admits no more than capacity x share per account;
* Redis stopped (SIGSTOP, a server that does not answer): the same bound,
  set by the timeout;
* Redis started again on the same port: after the backoff (and the relearning
  time) new reservations go to Redis again (one info line), local ones finish
  locally, and a learned fact the empty Redis lost is put back when read;
* a reservation stays on the store that made it; one stranded on Redis
  departs from the local share; steps owed to Redis are dropped and counted.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator

import pytest
from redis_server import RedisServer

from elbasy._shm import ShmTable
from elbasy.fleet_store import FleetStore
from elbasy.limits import BUCKET, WINDOW, Limit, ServerView
from elbasy.quota import LocalStore, Reservation, Safety, Shed
from elbasy.redis_store import RedisStore
from elbasy.shm import ShmStore

EXACT = Safety(margin=0.0, headroom=0.0, jitter=0.0, guard=0.0)
#: a bucket that leaks about nothing during a test: what is admitted is its capacity
SLOW = Limit("slow", BUCKET, capacity=40, rate=1e-6)
#: a window longer than any test run
LONG_WINDOW = Limit("long", WINDOW, capacity=24, window=1e6)
TIMEOUT = 0.25
#: what the first step after a failure may take beyond the timeout (a loaded CI box)
MARGIN = 0.15


def fleet(
    url: str, share: float = 0.25, backoff: float = 0.5, relearn: float = 0.0
) -> FleetStore:
    return FleetStore(
        lambda: RedisStore(url, EXACT, timeout=TIMEOUT),
        LocalStore(EXACT),
        share=share,
        backoff=backoff,
        backoff_max=2.0,
        relearn=relearn,
    )


def admitted(store: FleetStore, key: str, limit: Limit, now: float, tries: int = 100) -> int:
    """Reservations of cost 1 that depart at once (confirmed and sent), of ``tries``."""
    count = 0
    for _ in range(tries):
        r = store.reserve([key], [limit], 1, now, 0.0)
        if isinstance(r, Shed):
            continue
        if store.confirm(r, now) is None:
            count += 1
            store.landed(r, now)
    return count


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


def timed(fn, *args):  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    got = fn(*args)
    return got, time.monotonic() - t0


def test_steps_go_to_redis_while_it_answers(redis_url: str) -> None:
    store = fleet(redis_url, share=0.5)
    try:
        assert store.shared is not None
        key = f"up-{time.time_ns()}"
        # a wall clock: the server's TIME is the clock of Redis' records
        got = admitted(store, key, SLOW, time.time())
        assert got == 40  # the whole capacity: Redis, not the half share
        assert store.stats()["fallback"] == "no" and store.fallbacks == 0
        assert store.local_steps == 0 and store.shared.calls > 0
    finally:
        store.close()


def test_redis_killed_falls_back_within_the_bound_and_comes_back(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="elbasy.quota")
    store = fleet(own_redis.url, share=0.25, backoff=0.5, relearn=0.3)
    port = own_redis.port
    try:
        now = time.time()
        assert store.put_fact("plan|acct", 400, 20) is True
        before = store.reserve(["acct"], [SLOW], 1, now, 0.0)
        assert isinstance(before, Reservation) and not before.fallback
        assert store.confirm(before, now) is None

        os.kill(own_redis.proc.pid, signal.SIGKILL)
        own_redis.proc.wait(timeout=5)

        # the first step after the kill: answered by the local share within the bound
        r, took = timed(store.reserve, ["acct"], [SLOW], 1, now, 0.0)
        assert took < TIMEOUT + MARGIN, took
        assert isinstance(r, Reservation) and r.fallback
        assert store.down and store.fallbacks == 1
        assert store.confirm(r, now) is None
        store.landed(r, now)
        # a step owed to Redis for a reservation made there is dropped, not raised
        store.landed(before, now)
        assert before.landed and store.dropped == 1

        # the local share never admits more than capacity x share (40 x 0.25 = 10)
        t0 = time.monotonic()
        got = admitted(store, "acct", SLOW, now) + 1  # r above took one
        assert got == 10, got
        assert admitted(store, "other", SLOW, now) == 10  # per account
        assert admitted(store, "win", LONG_WINDOW, now) == 6  # 24 x 0.25
        # ...and answered locally: no step waited for Redis before the backoff
        assert time.monotonic() - t0 < TIMEOUT
        warnings = [m for m in caplog.records if m.levelno == logging.WARNING]
        assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()

        # Redis back on the same port: after the backoff, reservations are shared again
        revived = RedisServer(port=port)
        try:
            deadline = time.monotonic() + 15.0
            relearning = 0  # the share's answers after Redis answered again
            shared = store.reserve(["acct"], [SLOW], 1, now, 0.0)
            while isinstance(shared, Shed) or shared.fallback:
                if isinstance(shared, Reservation):
                    store.give_back(shared, now)
                relearning += store.recoveries  # the share's answer (full: shed)
                assert time.monotonic() < deadline, "no recovery within 15 s"
                time.sleep(0.05)
                shared = store.reserve(["acct"], [SLOW], 1, now, 0.0)
            assert isinstance(shared, Reservation) and not shared.fallback
            # for relearn seconds after the recovery reservations stayed local
            assert 2 <= relearning <= 8, relearning  # ~6 passes of 0.05 s in relearn
            assert store.recoveries == 1 and not store.down
            assert store.confirm(shared, now) is None
            # Redis was restarted empty: it re-learns; the full capacity is its again
            assert admitted(store, "acct", SLOW, now) == 39
            infos = [m for m in caplog.records if "answers again after" in m.getMessage()]
            assert len(infos) == 1 and infos[0].levelno == logging.INFO
            warnings = [m for m in caplog.records if m.levelno == logging.WARNING]
            assert len(warnings) == 1
            # the restarted Redis lost the learned plan: read, it is put back from the share
            assert store.shared is not None and store.shared.peek("acct", "slow") is not None
            assert store.fact("plan|acct") == (400.0, 20.0)
            other = RedisStore(revived.url, EXACT)  # another machine sees it too
            try:
                assert other.fact("plan|acct") == (400.0, 20.0)
            finally:
                other.close()
            stats = store.stats()
            assert (stats["fallbacks"], stats["recoveries"]) == (1, 1)
            assert stats["fallback"] == "no"
        finally:
            revived.stop()
    finally:
        store.close()


def test_redis_that_does_not_answer_falls_back_within_the_timeout(
    own_redis: RedisServer,
) -> None:
    store = fleet(own_redis.url, share=0.5, backoff=0.5)
    try:
        now = time.time()
        assert isinstance(store.reserve(["a"], [SLOW], 1, now, 0.0), Reservation)
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            r, took = timed(store.reserve, ["a"], [SLOW], 1, now, 0.0)
            assert isinstance(r, Reservation) and r.fallback
            assert TIMEOUT - 0.05 < took < TIMEOUT + MARGIN, took
            # the next steps do not wait: Redis is not asked before the backoff
            _, took = timed(admitted, store, "a", SLOW, now)
            assert took < TIMEOUT, took  # all of them in less than one wait on Redis
            # after the backoff one PING (bounded by the timeout) finds it still silent
            time.sleep(0.55)
            _, took = timed(store.reserve, ["a"], [SLOW], 1, now, 0.0)
            assert took < TIMEOUT + MARGIN and store.attempts == 1 and store.down
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
    finally:
        store.close()


def test_a_reservation_stranded_on_redis_departs_from_the_local_share(
    own_redis: RedisServer,
) -> None:
    store = fleet(own_redis.url, share=0.25)
    try:
        now = time.time()
        queued = [store.reserve(["b"], [SLOW], 1, now, 0.0) for _ in range(3)]
        assert all(isinstance(r, Reservation) and not r.fallback for r in queued)
        os.kill(own_redis.proc.pid, signal.SIGKILL)
        own_redis.proc.wait(timeout=5)
        first, second, third = (r for r in queued if isinstance(r, Reservation))
        # confirm: it takes a place in the local share and departs from there
        assert store.confirm(first, now) is None
        assert first.sent and first.fallback and store.moved_to_local == 1
        assert first.limits[0].capacity == 10  # the share's limit
        # earliest moves it too; then it is the local share's in every step
        assert store.earliest(second, now) == now and second.fallback
        assert store.give_back(second, now) is True
        # a shared reservation given back while Redis is down: dropped, counted
        assert store.give_back(third, now) is True and third.returned
        assert store.dropped == 1
        store.landed(first, now)
        # 10 in the share: first took one (and restored nothing: the bucket is slow)
        assert admitted(store, "b", SLOW, now) == 9
    finally:
        store.close()


def test_a_worker_started_while_redis_is_down_starts_on_its_share() -> None:
    server = RedisServer()
    url, port = server.url, server.port
    server.stop()
    store = fleet(url, share=0.5, backoff=0.5)
    try:
        assert store.shared is None and store.down and store.fallbacks == 1
        now = time.time()
        assert admitted(store, "c", SLOW, now) == 20
        revived = RedisServer(port=port)
        try:
            time.sleep(0.55)
            r = store.reserve(["c"], [SLOW], 1, now, 0.0)
            assert isinstance(r, Reservation) and not r.fallback
            assert store.shared is not None and store.recoveries == 1
        finally:
            revived.stop()
    finally:
        store.close()


def test_reports_reach_the_local_share_scaled(redis_url: str) -> None:
    """The share learns each server report while Redis answers: when Redis
    fails it starts from the account's level, not from an empty bucket."""
    store = fleet(redis_url, share=0.25)
    try:
        now = time.time()
        key = f"seen-{time.time_ns()}"
        # the server counted 32 of 40 (outside traffic): the share's part is 8 of 10
        store.observe([key], [SLOW], [ServerView("slow", used=32, capacity=40)], now)
        store.put_fact(f"plan|{key}", 40, 2)
        assert store.local.fact(f"plan|{key}") == (40.0, 2.0)
        store.down, store._retry_at = True, time.monotonic() + 60  # as after a failure
        assert admitted(store, key, SLOW, now) == 2
        assert store.fact(f"plan|{key}") == (40.0, 2.0)
    finally:
        store.down = False
        store.close()


def test_a_machines_workers_share_one_table_while_redis_is_down(own_redis: RedisServer) -> None:
    """--quota-store redis:// on a machine of four workers: their local shares
    are one shared-memory table (elbasy.supervisor.make_shared), so with two
    instances the machine keeps to half of each limit however its accounts'
    clients spread over its workers."""
    table = ShmTable(4096)
    workers = [
        FleetStore(
            lambda: RedisStore(own_redis.url, EXACT, timeout=TIMEOUT),
            ShmStore(table, slot, EXACT),
            share=0.5,  # two instances
            backoff=60.0,
            backoff_max=60.0,
        )
        for slot in range(4)
    ]
    try:
        now = time.time()
        os.kill(own_redis.proc.pid, signal.SIGKILL)
        own_redis.proc.wait(timeout=5)
        # the clients of one account spread over the four workers: 20 in all, not 80
        got = sum(admitted(w, "d", SLOW, now, tries=30) for w in workers)
        assert got == 20, got
        assert all(w.down and w.fallbacks == 1 for w in workers)
        # one worker's give-back wakes the others through the table's fd
        r = workers[0].reserve(["e"], [SLOW], 1, now, 60.0)
        assert isinstance(r, Reservation) and r.fallback
        assert workers[1].fileno() >= 0 and workers[1].fileno() == workers[1].local.fileno()
        behind = workers[1].reserve(["e"], [SLOW], 1, now, 60.0)  # waits in worker 1
        assert isinstance(behind, Reservation) and behind.fallback
        workers[1].moved()
        assert workers[0].give_back(r, now) is True
        assert workers[1].moved() == ["e"]
    finally:
        for w in workers:
            w.close()
        table.close()
