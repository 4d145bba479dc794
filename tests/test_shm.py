"""The shared-memory quota store across real processes (os.fork).

What one process cannot show: several workers on one table never admit more
than the limits allow, a worker killed inside a step leaves every account as
it was, a dead worker's queued units are released, facts and moved buckets
reach the other workers. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from elbasy import quota
from elbasy._shm import MOVED_RING, WINDOW_SLOTS, ShmTable, key_hash
from elbasy.limits import BUCKET, WINDOW, Limit
from elbasy.quota import EVERY_LINE, Reservation, Safety, Shed, StoreFull
from elbasy.shm import ShmStore

EXACT = Safety(margin=0.0, headroom=0.0, jitter=0.0, guard=0.0)
FAST = Limit("fast", BUCKET, capacity=20, rate=100)
PER_SECOND = Limit("qps", WINDOW, capacity=30, window=0.25)
SHOPIFY = Limit("shopify-rest", BUCKET, capacity=40, rate=2)
CALLS = Limit("calls", BUCKET, capacity=10, rate=1)
GQL = Limit("gql", BUCKET, capacity=1000, rate=50, unit="points")


@pytest.fixture
def table() -> Iterator[ShmTable]:
    t = ShmTable(1024)
    yield t
    t.close()


def fork(child: Callable[[], None]) -> int:
    """Run ``child`` in a forked process; its pid. It exits 0, or 1 on an exception."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 30.0) -> int:
    """The child's wait status, within ``timeout`` seconds (killed after it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish in {timeout} s")


def bucket(table: ShmTable, key: str, limit: Limit) -> dict[str, object] | None:
    return table.peek(key_hash(f"{key}\x1f{limit.name}".encode()))


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


# --------------------------------------------------------------------------- many workers


def _hammer(table: ShmTable, slot: int, out: Path, seconds: float) -> None:
    """Reserve and confirm one request at a time on a shared and an own account,
    on each of a bucket and a window limit, for ``seconds``; write the departures."""
    store = ShmStore(table, slot, EXACT)
    accounts = {
        "shared-bucket": (["shared"], [FAST]),
        "own-bucket": ([f"own{slot}"], [FAST]),
        "shared-window": (["shared"], [PER_SECOND]),
    }
    sent: dict[str, list[float]] = {name: [] for name in accounts}
    deadline = time.time() + seconds
    for _ in range(1_000_000):
        if time.time() >= deadline:
            break
        for name, (keys, limits) in accounts.items():
            r = store.reserve(keys, limits, 1, time.time(), 0.05)
            if isinstance(r, Shed):
                continue
            for _ in range(1000):
                t = time.time()
                later = store.confirm(r, t)
                if later is None:
                    store.landed(r, t)  # counted as it leaves (an answer at once)
                    sent[name].append(t)
                    break
                time.sleep(min(max(later - t, 0.0), 0.005))
            else:
                store.give_back(r, time.time())
    out.write_text(json.dumps(sent))


def test_four_workers_never_admit_more_than_the_limits(table: ShmTable, tmp_path: Path) -> None:
    """4 processes on one bucket (20, 100/s), their own buckets and one window
    (30 per 250 ms): in every span of time the departures the store allowed
    fit the limits' arithmetic exactly."""
    seconds = 1.5
    pids = [
        fork(lambda s=slot: _hammer(table, s, tmp_path / f"{s}.json", seconds)) for slot in range(4)
    ]
    assert all(wait(pid) == 0 for pid in pids)
    sent: dict[str, list[float]] = {}
    for slot in range(4):
        for name, times in json.loads((tmp_path / f"{slot}.json").read_text()).items():
            sent.setdefault(name if name.startswith("shared") else f"{name}{slot}", []).extend(
                times
            )

    def bucket_fits(times: list[float], limit: Limit) -> None:
        times = sorted(times)
        n = len(times)
        assert n >= limit.capacity  # the burst at least
        # GCRA: any k departures within a span d fit k <= capacity + d * rate
        for i in range(n):
            for j in range(i + int(limit.capacity), n):
                assert j - i + 1 <= limit.capacity + (times[j] - times[i]) * limit.rate + 1e-6, (
                    i,
                    j,
                )
        # and the whole run used no more than it allowed
        assert n <= limit.capacity + (times[-1] - times[0]) * limit.rate + 1e-6

    bucket_fits(sent["shared-bucket"], FAST)
    for slot in range(4):
        bucket_fits(sent[f"own-bucket{slot}"], FAST)
    windows = Counter(int(t // PER_SECOND.window + 1e-9) for t in sent["shared-window"])
    assert max(windows.values()) <= PER_SECOND.capacity
    assert sum(windows.values()) >= PER_SECOND.capacity
    # every line is empty again and every unit queued left the queue
    state = bucket(table, "shared", FAST)
    assert state is not None and state["queued"] == 0 and state["enq"] == state["deq"]
    assert table.recovered == 0


# --------------------------------------------------------------------------- death inside a step


def _two_limits(store: ShmStore, now: float) -> Reservation:
    r = store.reserve(["acct", "acct"], [SHOPIFY, CALLS], 1, now, 600)
    assert isinstance(r, Reservation)
    return r


@pytest.mark.parametrize("step", ["reserve", "confirm", "landed", "give_back"])
def test_a_worker_killed_inside_a_step_leaves_the_account_as_it_was(
    table: ShmTable, step: str
) -> None:
    """The child dies by SIGKILL after updating the first of the account's two
    buckets, holding the lock: the parent's next step undoes the half-step and
    goes on."""
    parent = ShmStore(table, 0, EXACT)
    for _ in range(12):  # some history: sent and answered, one in flight, two queued
        r = _two_limits(parent, 0.0)
        parent.confirm(r, r.depart)
        parent.landed(r, r.depart)
    flying = _two_limits(parent, 0.0)
    assert parent.confirm(flying, flying.depart) is None
    queued = [_two_limits(parent, 0.0) for _ in range(2)]
    before = (bucket(table, "acct", SHOPIFY), bucket(table, "acct", CALLS))
    assert before[0] is not None and before[0]["queued"] == 2

    def child() -> None:
        store = ShmStore(table, 1, EXACT)
        table.test_die_inside(1)  # after the first bucket's update
        if step == "reserve":
            _two_limits(store, 0.0)
        elif step == "confirm":
            store.confirm(queued[0], 20.0)
        elif step == "landed":
            store.landed(flying, 20.0)
        else:
            store.give_back(queued[1], 0.0)

    status = wait(fork(child))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    after = (bucket(table, "acct", SHOPIFY), bucket(table, "acct", CALLS))
    assert after == before
    assert table.recovered == 1  # the parent's peek found the owner dead and undid its step
    # and the other process goes on from there
    assert parent.confirm(queued[0], 20.0) is None
    state = bucket(table, "acct", CALLS)
    assert state is not None and state["queued"] == 1 and state["deq"] == 14
    assert state["flying"] == 2


def test_a_worker_killed_inside_put_fact_leaves_the_facts_as_they_were(table: ShmTable) -> None:
    parent = ShmStore(table, 0, EXACT)
    assert parent.put_fact("plan|shop", 40, 2)

    def child() -> None:
        table.test_die_inside(1)
        ShmStore(table, 1, EXACT).put_fact("plan|shop", 400, 20)

    status = wait(fork(child))
    assert os.WIFSIGNALED(status)
    assert parent.fact("plan|shop") == (40.0, 2.0)
    assert table.recovered == 1


# --------------------------------------------------------------------------- eviction


def test_the_least_recently_used_idle_bucket_is_evicted_never_one_in_use() -> None:
    table = ShmTable(4)
    try:
        store = ShmStore(table, 0, EXACT)
        for name in "abcd":  # four buckets, used in this order, all idle by t=100
            go = store.reserve([name], [SHOPIFY], 1, 0.0, 60)
            assert isinstance(go, Reservation) and store.confirm(go, 0.0) is None
            store.landed(go, 0.0)
        busy = store.reserve(["b"], [SHOPIFY], 50, 100.0, 600)  # b is in use from now
        assert isinstance(busy, Reservation)
        e = store.reserve(["e"], [SHOPIFY], 1, 100.0, 60)  # a is the oldest idle one
        assert isinstance(e, Reservation)
        assert table.evictions == 1 and store.evictions == 1
        assert bucket(table, "a", SHOPIFY) is None and bucket(table, "b", SHOPIFY) is not None
        f = store.reserve(["f"], [SHOPIFY], 1, 100.0, 60)  # b is in use: c goes
        assert isinstance(f, Reservation)
        assert bucket(table, "c", SHOPIFY) is None and bucket(table, "b", SHOPIFY) is not None
        assert table.evictions == 2
        # b, e and f are queued, d is idle: g takes d's place, then h finds none
        assert isinstance(store.reserve(["g"], [SHOPIFY], 50, 100.0, 600), Reservation)
        assert bucket(table, "d", SHOPIFY) is None
        before = [bucket(table, k, SHOPIFY) for k in "befg"]
        with pytest.raises(StoreFull):
            store.reserve(["b", "h"], [SHOPIFY, CALLS], 1, 100.0, 60)
        assert [bucket(table, k, SHOPIFY) for k in "befg"] == before  # nothing changed
        assert table.used == 4 and table.evictions == 3
        # a bucket whose line empties is idle again once its clock passes
        assert store.give_back(busy, 100.0)
        assert isinstance(store.reserve(["h"], [CALLS], 1, 200.0, 60), Reservation)
        assert table.evictions == 4
    finally:
        table.close()


def test_the_table_is_small_per_bucket() -> None:
    table = ShmTable(100_000)
    try:
        assert table.bytes_per_bucket <= 640
        assert table.size < 100_000 * 640 + 1_000_000
        assert WINDOW_SLOTS == quota.WINDOW_SLOTS
    finally:
        table.close()


# --------------------------------------------------------------------------- a dead worker


def test_release_slot_takes_a_dead_workers_queue_out(table: ShmTable) -> None:
    parent = ShmStore(table, 0, EXACT)
    for _ in range(40):
        r = parent.reserve(["a"], [SHOPIFY], 1, 0.0, 60)
        assert isinstance(r, Reservation) and parent.confirm(r, 0.0) is None

    def child() -> None:  # five requests queued, then the worker dies without a word
        store = ShmStore(table, 3, EXACT)
        for _ in range(5):
            assert isinstance(store.reserve(["a"], [SHOPIFY], 1, 0.0, 60), Reservation)

    assert wait(fork(child)) == 0
    state = bucket(table, "a", SHOPIFY)
    assert state is not None and state["queued"] == 5
    assert state["per_slot"][3] == 5  # type: ignore[index]
    r = parent.reserve(["a"], [SHOPIFY], 1, 0.0, 60)
    assert isinstance(r, Reservation) and r.depart == pytest.approx(3.0)  # behind the dead five
    assert parent.give_back(r, 0.0)
    parent.moved()
    assert table.release_slot(3) == 1
    state = bucket(table, "a", SHOPIFY)
    assert state is not None and state["queued"] == 0 and state["deq"] == state["enq"]
    r = parent.reserve(["a"], [SHOPIFY], 1, 0.0, 60)
    assert isinstance(r, Reservation) and r.depart == pytest.approx(0.5)
    # and the live worker is told its line moved
    assert readable(parent.fileno(), 1.0) and parent.moved() == ["a"]


def test_release_slot_lands_a_dead_workers_requests_in_flight(table: ShmTable) -> None:
    """A worker dies with requests sent and unanswered: the server may have counted
    them, so they land at the release (restoring from then), never vanish."""

    def child() -> None:  # three sent at t=0, then the worker dies before their answers
        store = ShmStore(table, 2, EXACT)
        for _ in range(3):
            r = store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)
            assert isinstance(r, Reservation) and store.confirm(r, 0.0) is None

    assert wait(fork(child)) == 0
    state = bucket(table, "a", SHOPIFY)
    assert state is not None and state["flying"] == 3
    assert state["flying_per_slot"][2] == 3  # type: ignore[index]
    assert table.release_slot(2, 10.0) == 1
    state = bucket(table, "a", SHOPIFY)
    assert state is not None and state["flying"] == 0
    assert state["sent"] == pytest.approx(10.0 + 3 / SHOPIFY.rate)  # landed at 10 s


# --------------------------------------------------------------------------- facts, moved lines


def test_facts_are_shared_across_workers(table: ShmTable) -> None:
    parent = ShmStore(table, 0, EXACT)
    g = parent.facts_generation
    r, w = os.pipe()

    def child() -> None:
        store = ShmStore(table, 1, EXACT)
        assert store.put_fact("plan|shop1", 400, 20)
        os.write(w, b"x")
        # and it sees what the parent learns
        deadline = time.time() + 10
        while time.time() < deadline and store.fact("tier|shop1") is None:
            time.sleep(0.005)
        assert store.fact("tier|shop1") == (2.0, 0.0)

    pid = fork(child)
    assert readable(r, 10)
    assert parent.fact("plan|shop1") == (400.0, 20.0)
    assert parent.facts_generation > g
    assert parent.put_fact("tier|shop1", 2, 0)
    assert wait(pid) == 0
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("how", ["give_back", "refund"])
def test_a_line_moved_in_one_worker_wakes_the_others(table: ShmTable, how: str) -> None:
    parent = ShmStore(table, 0, EXACT)
    # the parent has a line on the account (so it knows the key)
    first = parent.reserve(["shop"], [GQL], 800, 0.0, 60)
    assert isinstance(first, Reservation) and parent.confirm(first, 0.0) is None
    parent.landed(first, 0.0)  # answered at once
    waiting = parent.reserve(["shop"], [GQL], 800, 0.0, 60)
    assert isinstance(waiting, Reservation) and waiting.depart == pytest.approx(12.0)
    assert parent.moved() == [] and not readable(parent.fileno(), 0.0)

    def child() -> None:
        store = ShmStore(table, 1, EXACT)
        if how == "give_back":
            r = store.reserve(["shop"], [GQL], 100, 0.0, 60)
            assert isinstance(r, Reservation) and store.give_back(r, 0.0)
        else:  # a query reserved at 300 that cost 10
            r = store.reserve(["other"], [GQL], 300, 0.0, 60)
            assert isinstance(r, Reservation) and store.confirm(r, 0.0) is None
            store.settle(r, 10, 0.0)
            r = store.reserve(["shop"], [GQL], 1, 0.0, 60)
            assert isinstance(r, Reservation) and store.confirm(r, r.depart) is None
            store.settle(r, 0, r.depart)

    assert wait(fork(child)) == 0
    assert readable(parent.fileno(), 2.0)
    assert parent.moved() == ["shop"]  # "other" is not a line of the parent's
    assert not readable(parent.fileno(), 0.0) and parent.moved() == []


def test_more_moves_than_the_ring_holds_say_every_line(table: ShmTable) -> None:
    parent = ShmStore(table, 0, EXACT)
    parent.reserve(["shop"], [GQL], 1, 0.0, 60)

    def child() -> None:
        store = ShmStore(table, 1, EXACT)
        for _ in range(MOVED_RING + 1):
            r = store.reserve(["shop"], [GQL], 1, 0.0, 60)
            assert isinstance(r, Reservation) and store.give_back(r, 0.0)

    assert wait(fork(child)) == 0
    assert readable(parent.fileno(), 1.0)
    assert parent.moved() == [EVERY_LINE]
    assert parent.moved() == []


def test_local_store_has_no_other_workers() -> None:
    store = quota.LocalStore()
    assert store.fileno() == -1 and store.moved() == []
