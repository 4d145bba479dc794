"""The quota arithmetic with an injected clock: no sockets, no sleeps.

Where docs/api-limits.md part 4 has worked vectors, the store with every safety
setting at zero must give exactly the departures the mock server accepts.

A contract suite: every store test runs on each store (the ``store`` fixture,
and ``make_store`` for other safety settings), the process-local LocalStore,
the shared-memory ShmStore and the RedisStore (on a real redis-server), which
must give the same results on the same inputs;
``test_stores_agree_on_random_steps`` checks that step by step.
"""

from __future__ import annotations

import json
import math
import random
import select
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis_server import free_port

from elbasy._shm import ShmTable
from elbasy.fleet_store import FleetStore
from elbasy.limits import BUCKET, ROLLING, WINDOW, Limit
from elbasy.pacing import Pacer
from elbasy.piped_store import PipedStore
from elbasy.quota import (
    LATER,
    LocalStore,
    QuotaStore,
    Reservation,
    Safety,
    ServerView,
    Shed,
    StoreFull,
)
from elbasy.redis_store import RedisStore
from elbasy.rules import RuleSet
from elbasy.shm import ShmStore

EXACT = Safety(margin=0.0, headroom=0.0, jitter=0.0, guard=0.0)
SHOPIFY = Limit("shopify-rest", BUCKET, capacity=40, rate=2)
PLUS = Limit("shopify-rest", BUCKET, capacity=400, rate=20)
ETSY_QPS = Limit("etsy-qps", WINDOW, capacity=10, window=1)
ETSY_QPD = Limit("etsy-qpd", ROLLING, capacity=30, window=86400, sub_buckets=12)


MakeStore = Callable[[Safety], QuotaStore]


class AnswersAwaited:
    """The contract's blocking steps over a PipedStore: each ``*_later`` step
    is sent and its answer waited for on the store's fd, as the loop waits
    for it (one step at a time here); every other step is the store's own."""

    piped = False  # a pacer on it takes it for a blocking store

    def __init__(self, piped: PipedStore) -> None:
        self.store = piped

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _awaited(self, token: object, got: object, now: float) -> Any:
        if got is not LATER:
            return got
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            select.select([self.store.fileno()], [], [], 0.5)
            for t, _kind, result in self.store.answers(now):
                assert t is token, "one step in flight at a time here"
                return result
        raise AssertionError("no answer from the piped store within 5 s")

    def reserve(self, keys: Any, limits: Any, cost: Any, now: float, max_wait: float) -> Any:
        token = object()
        got = self.store.reserve_later(token, keys, limits, cost, now, max_wait)
        return self._awaited(token, got, now)

    def confirm(self, r: Reservation, now: float) -> Any:
        token = object()
        return self._awaited(token, self.store.confirm_later(token, r, now), now)

    def earliest(self, r: Reservation, now: float) -> Any:
        token = object()
        return self._awaited(token, self.store.earliest_later(token, r, now), now)


@pytest.fixture(params=["local", "shm", "redis", "fleet", "fleet-down", "fleet-shm-down", "piped"])
def make_store(request: pytest.FixtureRequest) -> Iterator[MakeStore]:
    """A maker of stores of one kind: LocalStore, ShmStore on a fresh table, or
    RedisStore on the session's real redis-server (an empty database; each
    store made has its own key prefix, so two are as independent as two
    LocalStores). RedisStore takes the tests' explicit times (clock="caller").
    ``fleet``: a FleetStore on such a RedisStore (Redis answering: every step is
    Redis'); ``fleet-down``: a FleetStore whose Redis nobody listens on, so its
    local share (the whole quota: one instance, one worker) answers every step;
    ``fleet-shm-down``: the same with the share in a shared-memory table (a
    machine's workers' share); ``piped``: a PipedStore over a ``fleet`` one,
    every step on its own socket (the loop's way), each answer awaited."""
    tables: list[ShmTable] = []
    redis_stores: list[RedisStore] = []
    url = (
        request.getfixturevalue("redis_url") if request.param in ("redis", "fleet", "piped") else ""
    )
    fleets: list[FleetStore] = []

    def make(safety: Safety) -> QuotaStore:
        if request.param == "local":
            return LocalStore(safety)
        if request.param == "redis":
            prefix = f"elbasy-test:{len(redis_stores)}:"
            redis_stores.append(RedisStore(url, safety, clock="caller", prefix=prefix))
            return redis_stores[-1]
        if request.param.startswith("fleet") or request.param == "piped":
            prefix = f"elbasy-test-fleet:{len(fleets)}:"
            where = url or f"redis://127.0.0.1:{free_port()}/0"
            local: QuotaStore = LocalStore(safety)
            if request.param == "fleet-shm-down":
                tables.append(ShmTable(4096))
                local = ShmStore(tables[-1], 0, safety)
            fleets.append(
                FleetStore(
                    lambda: RedisStore(where, safety, clock="caller", prefix=prefix, timeout=0.25),
                    local,
                    backoff=3600.0,
                    backoff_max=3600.0,
                )
            )
            assert fleets[-1].down is request.param.endswith("down")
            if request.param == "piped":
                return AnswersAwaited(PipedStore(fleets[-1], timeout=2.0))  # type: ignore[return-value]
            return fleets[-1]
        tables.append(ShmTable(4096))
        return ShmStore(tables[-1], 0, safety)

    yield make
    for fs in fleets:
        fs.close()
    for table in tables:
        table.close()
    for rs in redis_stores:
        rs.close()


@pytest.fixture
def store(make_store: MakeStore) -> QuotaStore:
    """A store with every safety setting at zero, of each kind in turn."""
    return make_store(EXACT)


def go(store: QuotaStore, r: Reservation | Shed) -> Reservation:
    """Confirm a reservation at its departure (it must be clear to go), and land it
    there: the server counts it as it leaves (an answer at once)."""
    assert isinstance(r, Reservation), r
    assert store.confirm(r, r.depart) is None
    store.landed(r, r.depart)
    return r


class ShopifyMock:
    """Part 4.1's bucket, to check departures against (continuous leak, pass/fail)."""

    def __init__(self, c: float, r: float) -> None:
        self.c, self.r, self.level, self.t = c, r, 0.0, 0.0

    def arrive(self, now: float) -> bool:
        self.level = max(0.0, self.level - self.r * (now - self.t))
        self.t = now
        if self.level + 1 > self.c + 1e-9:
            return False
        self.level += 1
        return True


# --------------------------------------------------------------------------- buckets


def test_forty_at_once_then_one_per_half_second(store: QuotaStore) -> None:
    departs = [go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)).depart for _ in range(43)]
    assert departs[:40] == [0.0] * 40  # the bucket's 40 marbles, at once
    assert departs[40:] == pytest.approx([0.5, 1.0, 1.5])  # then its leak rate


def test_departures_never_overfill_the_mocks_bucket(make_store: MakeStore) -> None:
    rnd = random.Random(7)
    store, mock = make_store(EXACT), ShopifyMock(40, 2)
    now, departs = 0.0, []
    for _ in range(500):
        now += rnd.expovariate(4.0)  # demand twice the rate
        r = store.reserve(["a"], [SHOPIFY], 1, now, 1e9)
        departs.append(go(store, r).depart)
    assert departs == sorted(departs)  # FIFO
    assert all(mock.arrive(t) for t in departs)  # zero 429s
    # and no slack: the last departure is when the bucket allows it
    assert departs[-1] == pytest.approx(departs[0] + (500 - 40) / 2, abs=1.0)


def test_safety_keeps_headroom_and_runs_below_the_rate(make_store: MakeStore) -> None:
    store = make_store(Safety(margin=0.02, headroom=1, jitter=0.05))
    departs = [go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 600)).depart for _ in range(60)]
    assert departs[:39] == [0.0] * 39  # one marble kept free
    assert departs[39] == pytest.approx(1 / (2 * 0.98))
    plus = [go(store, store.reserve(["p"], [PLUS], 1, 0.0, 600)).depart for _ in range(400)]
    # 20/s with 50 ms of jitter: one marble is enough
    assert plus.count(0.0) == 399


def test_plan_learned_mid_way_changes_the_interval(store: QuotaStore) -> None:
    for _ in range(40):
        go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 60))
    r = store.reserve(["a"], [PLUS], 1, 0.0, 60)  # the header said /400
    assert isinstance(r, Reservation) and r.depart == 0.0


def test_server_view_pushes_the_sent_clock_and_confirm_waits_again(store: QuotaStore) -> None:
    """Outside traffic reported by the server makes a queued request wait at departure."""
    r = store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)
    assert isinstance(r, Reservation) and r.depart == 0.0
    # before it leaves, a response says the bucket is full (another app filled it)
    store.observe(["a"], [SHOPIFY], [ServerView("shopify-rest", used=40, capacity=40)], 0.0)
    again = store.confirm(r, 0.0)
    assert again == pytest.approx(0.5)  # one marble leaks in half a second
    assert store.confirm(r, again) is None
    # new arrivals queue behind what the server reported
    r2 = store.reserve(["a"], [SHOPIFY], 1, 0.5, 60)
    assert isinstance(r2, Reservation) and r2.depart == pytest.approx(1.0)


def test_server_view_is_merged_pessimistically(store: QuotaStore) -> None:
    for _ in range(30):
        go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 60))
    # a stale, lower report does not make room
    store.observe(["a"], [SHOPIFY], [ServerView("shopify-rest", used=10)], 0.0)
    departs = [go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)).depart for _ in range(11)]
    assert departs[:10] == [0.0] * 10 and departs[10] == pytest.approx(0.5)


def test_docs_example_level_39_then_ten_seconds(make_store: MakeStore) -> None:
    """39/40, ten seconds later 19/40: the next request goes at once (and reads 20/40)."""
    store, mock = make_store(EXACT), ShopifyMock(40, 2)
    for _ in range(39):
        assert mock.arrive(go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)).depart)
    r = go(store, store.reserve(["a"], [SHOPIFY], 1, 10.0, 60))
    assert r.depart == 10.0 and mock.arrive(10.0)
    assert mock.level == pytest.approx(20)
    # from level 20 at t=10 exactly 20 more fit at once, then the leak rate
    departs = [go(store, store.reserve(["a"], [SHOPIFY], 1, 10.0, 60)).depart for _ in range(21)]
    assert departs[:20] == [10.0] * 20 and departs[20] == pytest.approx(10.5)


def test_throttled_holds_past_retry_after_and_marks_the_bucket_full(store: QuotaStore) -> None:
    until = store.throttled(["a"], [SHOPIFY], 5.0, 2.0)
    assert until == 7.0
    r = store.reserve(["a"], [SHOPIFY], 1, 5.0, 60)
    assert isinstance(r, Reservation)
    # full at 5.0: a marble is free at 5.5, but Retry-After says not before 7.0
    assert r.depart == pytest.approx(7.0)


def test_max_wait_sheds_with_an_honest_retry_after(store: QuotaStore) -> None:
    for _ in range(40):
        go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 60))
    shed = store.reserve(["a"], [SHOPIFY], 1, 0.0, 0.25)
    assert isinstance(shed, Shed)
    assert shed.retry_after == pytest.approx(0.5) and shed.limit == "shopify-rest"
    # a shed request took nothing: the next one still departs at 0.5
    r = store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)
    assert isinstance(r, Reservation) and r.depart == pytest.approx(0.5)


def test_a_place_given_back_moves_everyone_behind_it(store: QuotaStore) -> None:
    """Whoever leaves the line, first, middle or last, is as if it had never come."""
    for _ in range(40):
        go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 60))
    r1 = store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)  # would leave at 0.5
    r2 = store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)  # at 1.0, behind r1
    r3 = store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)  # at 1.5
    assert isinstance(r1, Reservation) and isinstance(r2, Reservation)
    assert isinstance(r3, Reservation) and r3.depart == pytest.approx(1.5)
    assert store.give_back(r1, 0.1) is True  # first in line, and others stand behind it
    assert store.give_back(r1, 0.1) is False  # only once
    # r2 is first now: it leaves when the bucket holds one marble, at 0.5
    assert store.earliest(r2, 0.1) == pytest.approx(0.5)
    assert store.give_back(r3, 0.1) is True  # the last one
    r4 = store.reserve(["a"], [SHOPIFY], 1, 0.1, 60)
    # one still waits (r2): the newcomer's estimate is 1.0, as if r1 and r3 never came
    assert isinstance(r4, Reservation) and r4.depart == pytest.approx(1.0)
    assert store.confirm(r2, 0.5) is None
    assert store.earliest(r4, 0.5) == pytest.approx(1.0)


def test_thirty_places_given_back_cost_the_next_request_nothing(store: QuotaStore) -> None:
    """30 held requests whose clients leave: the next departs as if they never came."""
    for _ in range(40):
        go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 60))
    held = [store.reserve(["a"], [SHOPIFY], 1, 0.0, 60) for _ in range(30)]
    for r in held:
        assert isinstance(r, Reservation)
        assert store.give_back(r, 0.2)
    r = store.reserve(["a"], [SHOPIFY], 1, 0.2, 60)
    assert isinstance(r, Reservation) and r.depart == pytest.approx(0.5)
    assert store.earliest(r, 0.2) == pytest.approx(0.5)


def test_graphql_refund_gives_the_points_back(store: QuotaStore) -> None:
    gql = Limit("shopify-gql", BUCKET, capacity=1000, rate=50, unit="points")
    r = go(store, store.reserve(["a"], [gql], 800, 0.0, 60))
    r2 = store.reserve(["a"], [gql], 800, 0.0, 60)  # queued: 600 must leak first
    assert isinstance(r2, Reservation) and r2.depart == pytest.approx(12.0)
    store.settle(r, 200, 1.0)  # the first query cost 200, not 800
    # the refund reaches the line: at 1 s the bucket holds 200 - 50 = 150, so the
    # 800 waiting fit now, not at 12 s
    assert store.earliest(r2, 1.0) == pytest.approx(1.0)
    # a newcomer stands behind r2: 150 + 800 queued at 1 s, 100 more fit at 2 s
    r3 = store.reserve(["a"], [gql], 100, 1.0, 60)
    assert isinstance(r3, Reservation) and r3.depart == pytest.approx(2.0)
    assert store.confirm(r2, 1.0) is None
    assert store.earliest(r3, 1.0) == pytest.approx(2.0)


def test_a_refund_before_the_request_left_changes_nothing(store: QuotaStore) -> None:
    gql = Limit("shopify-gql", BUCKET, capacity=1000, rate=50, unit="points")
    go(store, store.reserve(["a"], [gql], 800, 0.0, 60))
    r = store.reserve(["a"], [gql], 800, 0.0, 60)
    assert isinstance(r, Reservation)
    store.settle(r, 0, 1.0)  # not sent: nothing of it is in the bucket
    assert store.earliest(r, 1.0) == pytest.approx(12.0)


def test_per_limit_costs(store: QuotaStore) -> None:
    """A limit that counts requests takes its own cost; a refund leaves it alone."""
    points = Limit("points", BUCKET, capacity=100, rate=10, unit="points")
    calls = Limit("calls", BUCKET, capacity=3, rate=1)
    for _ in range(3):
        r = go(store, store.reserve(["a", "b"], [points, calls], [20, 1], 0.0, 60))
    store.settle(r, 5, 0.0)  # 15 points back, the call stays counted
    nxt = store.reserve(["a", "b"], [points, calls], [20, 1], 0.0, 60)
    assert isinstance(nxt, Reservation) and nxt.depart == pytest.approx(1.0)  # calls bound it
    with pytest.raises(ValueError):
        store.reserve(["a", "b"], [points, calls], [20], 0.0, 60)


# --------------------------------------------------------------------------- Etsy's windows


def test_etsy_vectors_qps_then_qpd(store: QuotaStore) -> None:
    """docs/api-limits.md 4.2, vectors 1-4 (qps=10, qpd=30, 12 sub-buckets of 2 h)."""
    limits = [ETSY_QPS, ETSY_QPD]
    keys = ["k", "k"]

    def departs(n: int, now: float) -> list[float]:
        return [go(store, store.reserve(keys, limits, 1, now, 1e6)).depart for _ in range(n)]

    # 1. eleven at 100.2: ten now, the eleventh at the next second
    assert departs(11, 100.2) == [100.2] * 10 + [101.0]
    # 2. at 101.0 nine more fit beside the one booked there
    assert departs(9, 101.0) == [101.0] * 9
    # 3. at 102.0 ten more: the day's 30 are used
    assert departs(10, 102.0) == [102.0] * 10
    # the next one waits for bucket 0 (100.2-102.x) to leave the window: 12 x 7200 s
    r = store.reserve(keys, limits, 1, 103.0, 1e6)
    assert isinstance(r, Reservation) and r.depart == 86400.0
    shed = store.reserve(keys, limits, 1, 103.0, 30)
    assert isinstance(shed, Shed) and shed.limit == "etsy-qpd"
    assert shed.retry_after == pytest.approx(86400.0 - 103.0)


def test_window_guard_keeps_departures_off_the_boundary(make_store: MakeStore) -> None:
    store = make_store(Safety(margin=0.0, headroom=0, jitter=0, guard=0.02))
    r = store.reserve(["k"], [ETSY_QPS], 1, 100.99, 60)
    assert isinstance(r, Reservation) and r.depart == 101.0


def test_window_server_view_counts_outside_traffic(store: QuotaStore) -> None:
    go(store, store.reserve(["k"], [ETSY_QPS], 1, 5.1, 60))
    # the server says 3 remain this second: 6 came from elsewhere
    store.observe(["k"], [ETSY_QPS], [ServerView("etsy-qps", remaining=3, capacity=10)], 5.2)
    departs = [go(store, store.reserve(["k"], [ETSY_QPS], 1, 5.2, 60)).depart for _ in range(4)]
    assert departs == [5.2, 5.2, 5.2, 6.0]


def test_rolling_give_back_frees_the_day(store: QuotaStore) -> None:
    rs = [store.reserve(["k"], [ETSY_QPD], 1, 0.0, 1e6) for _ in range(30)]
    assert all(isinstance(r, Reservation) and r.depart == 0.0 for r in rs)
    assert store.give_back(rs[-1], 0.0) is True  # type: ignore[arg-type]
    r = store.reserve(["k"], [ETSY_QPD], 1, 0.0, 1e6)
    assert isinstance(r, Reservation) and r.depart == 0.0


def test_all_or_none_across_limits(store: QuotaStore) -> None:
    """A request blocked by one limit takes nothing from the others."""
    for _ in range(30):
        go(store, store.reserve(["k"], [ETSY_QPD], 1, 0.0, 1e6))
    shed = store.reserve(["k", "k"], [ETSY_QPS, ETSY_QPD], 1, 0.0, 10)
    assert isinstance(shed, Shed)
    r = store.reserve(["k"], [ETSY_QPS], 1, 0.0, 10)
    assert isinstance(r, Reservation) and r.depart == 0.0  # the second's 10 are untouched


def test_accounts_are_independent(store: QuotaStore) -> None:
    for _ in range(40):
        go(store, store.reserve(["shop1|app"], [SHOPIFY], 1, 0.0, 60))
    r = store.reserve(["shop2|app"], [SHOPIFY], 1, 0.0, 60)
    assert isinstance(r, Reservation) and r.depart == 0.0


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="rate"):
        Limit("x", BUCKET, capacity=10)
    with pytest.raises(ValueError, match="window"):
        Limit("x", WINDOW, capacity=10)
    with pytest.raises(ValueError, match="margin"):
        Safety(margin=1.0)


def test_a_rounded_up_count_costs_nothing_and_overfills_nothing(make_store: MakeStore) -> None:
    """Shopify's count is its continuous level rounded up: one unit of headroom absorbs it."""
    store, mock = make_store(Safety(margin=0.0, headroom=1, jitter=0)), ShopifyMock(40, 2)
    # another app put 10.3 marbles' worth in; a response shows ceil(level) = 11 after ours
    mock.level = 10.3
    r = go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 60))
    assert mock.arrive(0.0)
    store.observe(["a"], [SHOPIFY], [ServerView("shopify-rest", used=math.ceil(mock.level))], 0.0)
    departs = [go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)).depart for _ in range(40)]
    assert all(mock.arrive(t) for t in departs)  # never a 429
    # and the bucket was used to the last whole marble the headroom allows
    assert departs.count(0.0) == 28
    assert r.sent


# --------------------------------------------------------------------------- the pacer's order


def test_graphql_refund_already_in_the_servers_view_is_not_given_back_twice(
    make_store: MakeStore,
) -> None:
    """Shopify refunds (requested - actual) before it reports currentlyAvailable, so the
    view holds the refund: the pacer gives it back once, and outside traffic in the view
    still counts."""
    now = {"t": 1_800_000_000.0}
    store = make_store(EXACT)
    store.recheck = 0.0  # the departure the arithmetic gives, not a head's next look
    pacer = Pacer(RuleSet.builtin(), store, wall=lambda: now["t"], mono=lambda: now["t"])
    headers = [(b"X-Shopify-Access-Token", b"tok")]
    body = b'{"query": "{ products(first: 250) { edges { node { id } } } }"}'

    def answer(requested: int, actual: int, available: int) -> bytes:
        status = {"maximumAvailable": 2000.0, "currentlyAvailable": available, "restoreRate": 100.0}
        cost = {
            "requestedQueryCost": requested,
            "actualQueryCost": actual,
            "throttleStatus": status,
        }
        return json.dumps({"data": {}, "extensions": {"cost": cost}}).encode()

    def query(requested: int, actual: int, available: int) -> None:
        m = pacer.match("acme.myshopify.com", "POST", "/admin/api/2024-10/graphql.json", headers)
        assert m is not None
        paced = pacer.start(m, "POST", headers)
        v = pacer.priced(paced, body)
        assert v.depart == 0.0 and not v.shed_after  # left at once
        pacer.answered(paced, 200, [], answer(requested, actual, available))

    query(251, 101, 1849)  # learns the shape's cost (251) and the standard plan
    # the second costs 251 reserved, 101 actual; the server saw 600 points of other
    # traffic too: 2000 - 150 - 150 - 600 = 1100 left, the refund of 150 included
    query(251, 101, 1100)
    # 1100 available: a third query of 251 leaves now, and a fourth of 251 ...
    m = pacer.match("acme.myshopify.com", "POST", "/admin/api/2024-10/graphql.json", headers)
    assert m is not None
    departs = []
    for _ in range(5):
        paced = pacer.start(m, "POST", headers)
        departs.append(pacer.priced(paced, body).depart)
    # 1100 points hold four queries of 251 (1004) beside the 2 points of headroom;
    # the fifth waits for 251 - 96 = 155 points at 100/s (99/s with the margin):
    # had the refund been given twice it would have fit at once
    assert departs[:4] == [0.0] * 4
    assert departs[4] - now["t"] == pytest.approx((251 + 2 - (1100 - 4 * 251)) / 99, abs=0.05)


def test_units_in_flight_take_room_and_restore_only_once_they_land(store: QuotaStore) -> None:
    """A burst leaves into a full bucket at 0 and reaches the server late (a new
    connection each): the server counts it when it arrives, so nothing of it
    restores before its answer. Counted as restoring from 0, four more would
    go at 1.5 s into a server that has just counted 40 (four 429s)."""
    burst = []
    for _ in range(40):
        r = store.reserve(["acct"], [SHOPIFY], 1, 0.0, 60)
        assert isinstance(r, Reservation) and store.confirm(r, 0.0) is None
        burst.append(r)
    late = store.reserve(["acct"], [SHOPIFY], 1, 1.5, 60)
    assert isinstance(late, Reservation)
    assert late.depart == pytest.approx(2.0)  # as if the 40 had all landed at 1.5 s
    assert store.confirm(late, 1.5) == pytest.approx(2.0)
    # their answers come at 1.6 s: they restore from there, so the server
    # that counted them at 1.5 s has room for one more by 2.0 s, elbasy by 2.1 s
    for r in burst:
        store.landed(r, 1.6)
        store.landed(r, 1.6)  # twice is once
    assert store.confirm(late, 2.0) == pytest.approx(2.1)
    assert store.confirm(late, 2.1) is None


def test_a_view_counts_what_flies_as_part_of_the_servers_count(store: QuotaStore) -> None:
    """Ten in flight, and the server reports 10/40: nothing more is taken (the view
    has them), and when they land the clock is where the ten put it, not twice."""
    flying = []
    for _ in range(10):
        r = store.reserve(["acct"], [SHOPIFY], 1, 0.0, 60)
        assert isinstance(r, Reservation) and store.confirm(r, 0.0) is None
        flying.append(r)
    store.observe(["acct"], [SHOPIFY], [ServerView("shopify-rest", used=10.0)], 0.0)
    for r in flying:
        store.landed(r, 0.0)
    nxt = store.reserve(["acct"], [SHOPIFY], 31, 0.0, 60)
    assert isinstance(nxt, Reservation) and nxt.depart == pytest.approx(0.5)  # 10 + 31 = 41


# --------------------------------------------------------------------------- new in the contract


def test_a_later_arrival_heading_its_line_stands_behind_the_earlier_ones(
    store: QuotaStore,
) -> None:
    """Positions: a reservation asked for while others before it still wait stands
    behind their units (two workers' lines on one bucket)."""
    for _ in range(40):
        go(store, store.reserve(["a"], [SHOPIFY], 1, 0.0, 60))
    r1 = store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)
    r2 = store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)
    assert isinstance(r1, Reservation) and isinstance(r2, Reservation)
    assert r1.positions == (40.0,) and r2.positions == (41.0,)
    assert store.earliest(r1, 0.0) == pytest.approx(0.5)
    assert store.earliest(r2, 0.0) == pytest.approx(1.0)  # behind r1, not at 0.5 beside it
    assert store.confirm(r2, 0.5) == pytest.approx(1.0)
    assert store.give_back(r1, 0.5)
    assert store.earliest(r2, 0.5) == pytest.approx(0.5)  # r1 left: r2 heads the bucket


def test_a_window_books_at_most_window_slots_ahead(store: QuotaStore) -> None:
    """Thirteen windows of ten: the 131st request has no place and is shed, its
    Retry-After the first window not looked at."""
    departs = [
        go(store, store.reserve(["k"], [ETSY_QPS], 1, 100.0, 1e6)).depart for _ in range(130)
    ]
    assert departs[-1] == 112.0 and departs.count(112.0) == 10
    shed = store.reserve(["k"], [ETSY_QPS], 1, 100.0, 1e6)
    assert isinstance(shed, Shed) and shed.limit == "etsy-qps"
    assert shed.retry_after == pytest.approx(13.0)
    # a second later the first window is gone and its place is free again
    r = store.reserve(["k"], [ETSY_QPS], 1, 101.0, 1e6)
    assert isinstance(r, Reservation) and r.depart == 113.0


def test_facts_are_kept_and_counted(store: QuotaStore) -> None:
    assert store.fact("plan|shop1") is None
    g = store.facts_generation
    assert store.put_fact("plan|shop1", 400, 20) is True
    assert store.fact("plan|shop1") == (400.0, 20.0)
    assert store.facts_generation > g
    g = store.facts_generation
    assert store.put_fact("plan|shop1", 400, 20) is False  # the same: nothing moves
    assert store.facts_generation == g
    assert store.put_fact("plan|shop1", 40, 2) is True
    assert store.fact("plan|shop1") == (40.0, 2.0) and store.facts_generation > g


def test_own_moves_are_not_reported(store: QuotaStore) -> None:
    r = store.reserve(["a"], [SHOPIFY], 1, 0.0, 60)
    assert isinstance(r, Reservation) and store.give_back(r, 0.0)
    assert store.moved() == []


ACCOUNTS: list[tuple[list[str], list[Limit]]] = [
    (["s1"], [SHOPIFY]),
    (["s2"], [Limit("gql", BUCKET, capacity=1000, rate=50, unit="points")]),
    (["e1", "e1"], [ETSY_QPS, ETSY_QPD]),
    (["w1"], [Limit("gh", WINDOW, capacity=5, window=3)]),
    (["m1", "m2"], [Limit("calls", BUCKET, capacity=3, rate=1), SHOPIFY]),
]


def _result(x: object, positions: bool = True) -> object:
    """What a store step returned, with the store's own identity left out.

    ``positions`` False: a bucket evicted idle and made again counts its
    positions from 0 (only differences between positions in one line matter).
    """
    if isinstance(x, Reservation):
        return ("R", x.depart, x.slots, x.positions if positions else (), x.costs)
    if isinstance(x, Shed):
        return ("S", x.retry_after, x.limit)
    return x


@pytest.mark.parametrize(
    ("seed", "capacity", "shops"), [(1, 64, 1), (2, 64, 1), (3, 160, 40), (4, 120, 40)]
)
def test_stores_agree_on_random_steps(seed: int, capacity: int, shops: int) -> None:
    """The same 3,000 random steps on LocalStore and ShmStore: the same results.

    With more shops than the table holds, ShmStore evicts idle buckets (which
    changes nothing) and refuses a reservation with StoreFull when none is
    idle (which must change nothing either: LocalStore then skips the step).
    A step that finds no room and loses an update (a server's view, say) ends
    the comparison there.
    """
    table = ShmTable(capacity)
    safety = Safety(margin=0.01, headroom=2, jitter=0.05, guard=0.02)
    try:
        steps, kinds = _agree(
            random.Random(seed), LocalStore(safety), ShmStore(table, 0, safety), shops, table
        )
        evictions = table.evictions
    finally:
        table.close()
    assert steps > 1500 and kinds["Reservation"] > 300 and kinds["Shed"] > 30, (steps, kinds)
    if shops > 1:
        assert evictions > 0


@pytest.mark.parametrize(("seed", "shops"), [(1, 1), (2, 1), (3, 40)])
def test_redis_store_agrees_on_random_steps(redis_url: str, seed: int, shops: int) -> None:
    """The same 3,000 random steps on LocalStore and RedisStore: the same results,
    positions included (Redis has no table to fill: nothing is evicted)."""
    safety = Safety(margin=0.01, headroom=2, jitter=0.05, guard=0.02)
    other = RedisStore(redis_url, safety, clock="caller")
    try:
        steps, kinds = _agree(random.Random(seed), LocalStore(safety), other, shops, None)
    finally:
        other.close()
    assert steps == 3000 and kinds["Reservation"] > 300 and kinds["Shed"] > 30, (steps, kinds)


def _agree(
    rnd: random.Random,
    local: LocalStore,
    other: QuotaStore,
    shops: int,
    table: ShmTable | None,
) -> tuple[int, Counter[str]]:
    """Random steps on both stores, each result compared; (steps made, kinds of result).

    ``table``: the shared-memory store's, whose lost updates end the run and
    whose eviction makes positions incomparable; None for a store that has none.
    """
    stores: list[QuotaStore] = [local, other]
    exact = shops == 1 or table is None
    held: list[list[Reservation]] = []  # one reservation per store
    kinds: Counter[str] = Counter()
    now = 1_000.0
    steps = 0
    for steps in range(1, 3001):  # noqa: B007 - counted for the check below
        if table is not None and table.dropped:
            break
        now += rnd.choice([0.0, 0.0, 0.01, 0.1, 0.37, 1.0, 5.0])
        op = rnd.random()
        keys, limits = rnd.choice(ACCOUNTS)
        shop = rnd.randrange(shops)
        keys = [f"{k}|{shop}" for k in keys]
        if op < 0.4 or not held:
            cost = rnd.choice([1.0, 1.0, 2.0, 7.5, 300.0])
            wait = rnd.choice([0.0, 1.0, 30.0, 1e6])
            try:
                got_other = other.reserve(keys, limits, cost, now, wait)
            except StoreFull:
                kinds["full"] += 1
                continue
            got_local = local.reserve(keys, limits, cost, now, wait)
            assert _result(got_local, exact) == _result(got_other, exact)
            kinds[type(got_other).__name__] += 1
            if isinstance(got_other, Reservation):
                held.append([got_local, got_other])  # type: ignore[list-item]
            continue
        pair = rnd.choice(held)
        keys, limits = list(pair[0].keys), list(pair[0].limits)
        if op < 0.62:
            at = max(now, min(pair[0].depart, now + 2.0))
            res = [s.confirm(r, at) for s, r in zip(stores, pair, strict=True)]
            assert res[0] == res[1] and pair[0].slots == pair[1].slots
        elif op < 0.70:
            for s, r in zip(stores, pair, strict=True):
                s.landed(r, now)  # its answer came (nothing if not sent)
        elif op < 0.77:
            res = [s.earliest(r, now) for s, r in zip(stores, pair, strict=True)]
            assert res[0] == res[1]
        elif op < 0.85:
            res = [s.give_back(r, now) for s, r in zip(stores, pair, strict=True)]
            assert res[0] == res[1]
            held.remove(pair)
        elif op < 0.92:
            actual = rnd.choice([0.0, 1.0, 50.0])
            for s, r in zip(stores, pair, strict=True):
                s.settle(r, actual, now)
        elif op < 0.97:
            views = [
                ServerView(
                    limit.name,
                    used=rnd.choice([None, 0.0, 3.0, 39.0]),
                    remaining=rnd.choice([None, 0.0, 5.0]),
                    reset_after=rnd.choice([None, 1.5]),
                )
                for limit in limits
            ]
            for s in stores:
                s.observe(keys, limits, views, now)
        else:
            retry = rnd.choice([None, 0.0, 2.0])
            res = [s.throttled(keys, limits, now, retry) for s in stores]
            assert res[0] == res[1]
        while len(held) > 60:  # the oldest exchanges end: sent ones land
            old = held.pop(0)
            assert local.give_back(old[0], now) == other.give_back(old[1], now)
            local.landed(old[0], now)
            other.landed(old[1], now)
    return steps, kinds
