"""The pacer on a PipedStore: held requests wait for Redis's answers on the loop.

A real redis-server answers on a real socket; the loop is played by
:class:`LoopWithoutSockets` (its timers on a clock the test moves, its
wake-ups, its call to ``departing`` when a held request's time comes, and
``quota_moved`` when the store's fd is readable), so what the pacer does
with an answer that comes later is seen step by step. The whole proxy on
this store is tested under load in tests/test_pacing.py.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis_server import RedisServer

from elbasy.fleet_store import FleetStore
from elbasy.pacing import NOT_FIRST_WAIT, Paced, Pacer, Verdict
from elbasy.piped_store import PipedStore
from elbasy.quota import LocalStore, Safety
from elbasy.redis_store import RedisStore
from elbasy.rules import RuleSet
from elbasy.verdicts import NOW

EXACT = Safety(margin=0.0, headroom=0.0, jitter=0.0, guard=0.0)
START = 1_800_000_000.0
TIMEOUT = 0.25
PATH = "/admin/api/2024-10/products.json"
#: Shopify's refusal of a REST call: the bucket full, a second to wait
REFUSAL = [(b"Retry-After", b"2.0"), (b"X-Shopify-Shop-Api-Call-Limit", b"40/40")]


class LoopWithoutSockets:
    """What the loop does around the pacer, on a clock the test moves."""

    def __init__(self, pacer: Pacer, store: PipedStore, clock: dict[str, float]) -> None:
        self.pacer, self.store, self.clock = pacer, store, clock
        self.held: dict[int, tuple[Paced, float]] = {}  # waiter -> (paced, its timer)
        self.sent: list[int] = []  # waiters in the order they left
        self.refused: dict[int, Verdict] = {}
        self.left_at: list[tuple[int, float]] = []  # (waiter, clock) as each left
        self.throttle: set[int] = set()  # waiters the API answers 429 once
        self.answering = 0.0  # real seconds the pacer took over the last 429
        self.before_refusal: Callable[[], None] = lambda: None
        # answers held back: sent requests stay on their way until answer_all()
        self.hold_answers = False
        self.on_the_way: list[Paced] = []
        pacer.wake = self.wake

    def wake(self, waiter: object, when: float) -> None:
        assert isinstance(waiter, int)
        if waiter in self.held:
            paced, _ = self.held[waiter]
            self.held[waiter] = (paced, when if when != NOW else self.clock["t"])

    def arrive(self, waiter: int, shop: str, max_wait: str | None = None) -> Paced:
        headers = [(b"X-Shopify-Access-Token", b"tok")]
        if max_wait is not None:
            headers.append((b"X-Elbasy-Max-Wait", max_wait.encode()))
        m = self.pacer.match(f"{shop}.myshopify.com", "GET", PATH, headers)
        assert m is not None
        paced = self.pacer.start(m, "GET", headers)
        v = self.pacer.admit(paced, waiter)
        assert not v.shed_after, v
        if v.depart == NOW:
            self._left(waiter, paced)
        else:
            self.held[waiter] = (paced, v.depart)
        return paced

    def _left(self, waiter: int, paced: Paced) -> None:
        """Sent; the API's answer comes at once: no rate headers (it landed),
        or for a waiter in ``throttle`` a 429 with Retry-After 2 once, after
        which the pacer may hold it to send again."""
        self.sent.append(waiter)
        self.left_at.append((waiter, self.clock["t"]))
        if self.hold_answers:
            self.on_the_way.append(paced)
            return
        if waiter not in self.throttle:
            self.pacer.answered(paced, 200, [], None)
            return
        self.throttle.discard(waiter)
        self.before_refusal()
        started = time.monotonic()
        again = self.pacer.answered(paced, 429, REFUSAL, None, waiter)
        self.answering = time.monotonic() - started
        if again != NOW:
            self.held[waiter] = (paced, again)

    def answers(self, wait: float = 0.0) -> int:
        """Deliver what came on the store's fd (waiting up to ``wait`` s for it)."""
        ready, _, _ = select.select([self.store.fileno()], [], [], wait)
        if ready:
            self.pacer.quota_moved()
        return len(ready)

    def due(self) -> None:
        """Every held request whose timer is at or before now: departing."""
        for waiter, (paced, when) in sorted(self.held.items(), key=lambda kv: kv[1][1]):
            if when > self.clock["t"] or waiter not in self.held:
                continue
            got = self.pacer.departing(paced)
            if isinstance(got, Verdict):
                del self.held[waiter]
                self.refused[waiter] = got
            elif got == NOW:
                del self.held[waiter]
                self._left(waiter, paced)
            else:
                self.held[waiter] = (paced, got)

    def run(self, until: Callable[[], bool], seconds: float = 10.0) -> None:
        """Turns of the loop until ``until()``: answers first, then timers; the
        clock moves to the next timer only when no answer is on its way."""
        deadline = time.monotonic() + 5.0
        while not until():
            assert time.monotonic() < deadline, (self.held, self.store.stats())
            waiting = bool(self.store.stats()["in_flight"])
            # an answer on its way that does not come in 0.5 s real time:
            # the loop's timers fire meanwhile (its net timer among them)
            stalled = not self.answers(0.5 if waiting else 0.0) and waiting
            self.due()
            waiting = waiting or bool(self.store.stats()["in_flight"])
            if until() or (waiting and not stalled) or not self.held:
                continue
            nxt = min(when for _, when in self.held.values())
            if nxt > self.clock["t"]:
                assert nxt - START <= seconds, f"a timer {nxt - START:.1f} s out"
                self.clock["t"] = nxt


@pytest.fixture
def clock() -> dict[str, float]:
    return {"t": START}


def piped_pacer(
    url: str, clock: dict[str, float], backoff: float = 3600.0, retry: bool = False
) -> tuple[Pacer, PipedStore]:
    fleet = FleetStore(
        lambda: RedisStore(url, EXACT, clock="caller", timeout=TIMEOUT),
        LocalStore(EXACT),
        backoff=backoff,
        backoff_max=backoff,
    )
    store = PipedStore(fleet, timeout=TIMEOUT)
    pacer = Pacer(
        RuleSet.builtin(),
        store,
        wall=lambda: clock["t"],
        mono=lambda: clock["t"],
        retry_idempotent=retry,
    )
    return pacer, store


@pytest.fixture
def stoppable(
    clock: dict[str, float],
) -> Iterator[Callable[..., tuple[RedisServer, LoopWithoutSockets]]]:
    """A Redis of the test's own, which it may stop (SIGSTOP), and a pacer on a
    PipedStore over it (``piped_pacer``'s options); let go at the end,
    stopped or not."""
    made: list[tuple[RedisServer, PipedStore]] = []

    def make(**options: Any) -> tuple[RedisServer, LoopWithoutSockets]:
        server = RedisServer()
        pacer, store = piped_pacer(server.url, clock, **options)
        made.append((server, store))
        return server, LoopWithoutSockets(pacer, store, clock)

    yield make
    for server, store in made:
        os.kill(server.proc.pid, signal.SIGCONT)
        store.close()
        server.stop()


@pytest.fixture
def piped(redis_url: str, clock: dict[str, float]) -> Iterator[LoopWithoutSockets]:
    pacer, store = piped_pacer(redis_url, clock)
    try:
        yield LoopWithoutSockets(pacer, store, clock)
    finally:
        store.close()


def test_a_held_request_waits_for_its_answers_on_the_loop(
    piped: LoopWithoutSockets, clock: dict[str, float]
) -> None:
    """The reservation is sent and the request held on its net timer; the
    answers come through the store's fd, and then it leaves at once."""
    paced = piped.arrive(1, "acme")
    assert paced.pending == "reserve" and piped.held[1][1] == START + TIMEOUT
    assert piped.store.stats()["in_flight"] == 1
    piped.run(lambda: piped.sent == [1])
    assert paced.reservation is not None and paced.reservation.sent
    assert clock["t"] == START  # no timer had to fire: the answers moved it
    stats = piped.store.stats()
    # reserve and confirm, answered; landed, only told
    assert stats["steps_sent"] == 3 and stats["late_answers"] == 0, stats


def test_concurrent_reservations_share_a_write(piped: LoopWithoutSockets) -> None:
    """Forty accounts' requests in one turn: the first step is written at once,
    the other 39 in one write when its answer comes (pipelined), and so on."""
    for k in range(40):
        piped.arrive(k, f"shop{k}")
    piped.run(lambda: len(piped.sent) == 40)
    stats = piped.store.stats()
    assert stats["steps_sent"] == 120, stats  # reserve, confirm, landed
    assert int(stats["writes"]) <= 8, stats


def test_the_line_keeps_its_order_and_the_bucket_its_rate(
    piped: LoopWithoutSockets, clock: dict[str, float]
) -> None:
    """45 requests on one 40-unit bucket at 2/s: 40 go at once, then one every
    0.5 s, in the order they came, each departure decided by Redis's answer."""
    for k in range(45):
        piped.arrive(k, "acme")
    piped.run(lambda: len(piped.sent) == 40)
    assert clock["t"] == START and sorted(piped.sent) == piped.sent
    piped.run(lambda: len(piped.sent) == 45)
    assert piped.sent == list(range(45))
    assert clock["t"] == pytest.approx(START + 2.5, abs=1e-6)


def test_a_shed_that_comes_later_answers_at_the_departure(piped: LoopWithoutSockets) -> None:
    """A request that may not wait, on a full bucket: its reservation's answer
    is a shed, and its departure gives elbasy's 429 instead of sending it."""
    for k in range(40):
        piped.arrive(k, "acme")
    piped.run(lambda: len(piped.sent) == 40)
    piped.arrive(99, "acme", max_wait="0")
    piped.run(lambda: 99 in piped.refused)
    assert piped.refused[99].shed_after > 0 and piped.refused[99].limit == "shopify-rest"
    assert piped.pacer.counters["shed"] == 1


def test_a_client_that_leaves_before_its_answer_gives_its_place_back(
    piped: LoopWithoutSockets, clock: dict[str, float]
) -> None:
    """The client is gone before Redis answered its reservation: when the
    answer comes its place goes back, so the next one leaves when it would
    have, 0.5 s after the full bucket, not 1 s."""
    for k in range(40):
        piped.arrive(k, "acme")
    piped.run(lambda: len(piped.sent) == 40)
    gone = piped.arrive(40, "acme")
    assert gone.pending == "reserve"
    del piped.held[40]
    piped.pacer.abandoned(gone)
    piped.arrive(41, "acme")
    piped.run(lambda: 41 in piped.sent)
    assert piped.pacer.counters["returned"] == 1
    assert clock["t"] == pytest.approx(START + 0.5, abs=1e-6)
    assert 40 not in piped.sent


def test_a_redis_that_stops_answering_is_left_within_the_timeout(
    clock: dict[str, float], stoppable: Callable[..., tuple[RedisServer, LoopWithoutSockets]]
) -> None:
    """Redis stopped (SIGSTOP: its socket accepts, nobody answers): the held
    request's net timer finds its answer overdue, the local share answers it
    and every later step, and nothing waited longer than the timeout."""
    server, loop = stoppable()
    store = loop.store
    loop.arrive(1, "acme")
    loop.run(lambda: loop.sent == [1])
    os.kill(server.proc.pid, signal.SIGSTOP)
    started = time.monotonic()
    loop.arrive(2, "acme")
    loop.run(lambda: 2 in loop.sent)
    assert time.monotonic() - started < 2.0
    assert clock["t"] == pytest.approx(START + TIMEOUT, abs=1e-6)  # its net timer
    stats = store.stats()
    assert stats["fallback"] == "local" and stats["late_answers"] == 1, stats
    loop.arrive(3, "acme")  # answered now, by the local share
    assert loop.sent == [1, 2, 3]


def test_a_stopped_redis_is_probed_aside_and_shared_again(
    clock: dict[str, float], stoppable: Callable[..., tuple[RedisServer, LoopWithoutSockets]]
) -> None:
    """While Redis is stopped, its reconnect attempts (a PING that cannot be
    answered) run on a thread: every step is answered at local speed, probe
    or no probe. Once it answers again, new reservations go to Redis."""
    server, loop = stoppable(backoff=0.2)
    store = loop.store
    loop.arrive(1, "acme")
    loop.run(lambda: loop.sent == [1])
    os.kill(server.proc.pid, signal.SIGSTOP)
    loop.arrive(2, "acme")
    loop.run(lambda: 2 in loop.sent)
    assert store.fleet.down
    slowest = 0.0
    for k in range(3, 43):  # 0.8 s: probes are due every 0.2 s meanwhile
        time.sleep(0.02)
        started = time.monotonic()
        loop.arrive(k, f"shop{k}")
        slowest = max(slowest, time.monotonic() - started)
    assert store.fleet.attempts >= 2 and store.fleet.down
    assert slowest < TIMEOUT / 2, slowest
    assert len(loop.sent) == 42  # every one answered at once, by the local share
    os.kill(server.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10.0
    k = 100
    while store.fleet.down:
        assert time.monotonic() < deadline, store.stats()
        time.sleep(0.05)
        loop.arrive(k, f"shop{k}")
        k += 1
    time.sleep(store.fleet.relearn + 0.1)  # new reservations stay local while it relearns
    paced = loop.arrive(k + 1, "fresh")
    assert paced.pending == "reserve"  # sent to Redis, answered later
    loop.run(lambda: k + 1 in loop.sent)
    assert store.stats()["recoveries"] == 1


def test_the_net_timer_of_a_line_head_is_a_fallback_only(
    piped: LoopWithoutSockets, clock: dict[str, float]
) -> None:
    """A request not first in its line waits on the long net (it is woken when
    it is first); the one first waits for Redis's answer, never the long net."""
    for k in range(42):
        piped.arrive(k, "acme")
    piped.run(lambda: len(piped.sent) == 40 and not piped.store.stats()["in_flight"])
    (_, first), (_, second) = piped.held[40], piped.held[41]
    assert first == pytest.approx(START + 0.5, abs=1e-6)
    assert second == START + NOT_FIRST_WAIT


def test_facts_are_read_over_the_pipe(redis_url: str, clock: dict[str, float]) -> None:
    """A fact another machine put in Redis: the first look answers this
    machine's own word (none) without waiting, the read goes over the pipe,
    and when its answer comes the fact is there and the generation moved."""
    other = RedisStore(redis_url, EXACT, clock="caller")
    pacer, store = piped_pacer(redis_url, clock)
    try:
        other.put_fact("plan|k|shopify-rest", 400.0, 20.0)
        before = store.facts_generation
        assert store.fact("plan|k|shopify-rest") is None  # not read yet
        deadline = time.monotonic() + 5.0
        while store.fact("plan|k|shopify-rest") is None:
            assert time.monotonic() < deadline, store.stats()
            select.select([store.fileno()], [], [], 0.5)
            assert store.answers(clock["t"]) == []  # reads are no steps' answers
        assert store.fact("plan|k|shopify-rest") == (400.0, 20.0)
        assert store.facts_generation != before
        stats = store.stats()
        assert int(stats["facts_read"]) >= 2 and stats["steps_sent"] == 0, stats
        # the machine's share keeps it too, for a fall back
        assert store.fleet.local.fact("plan|k|shopify-rest") == (400.0, 20.0)
    finally:
        store.close()
        other.close()


def test_a_429_sent_again_asks_for_its_new_place_without_waiting(
    redis_url: str, clock: dict[str, float]
) -> None:
    """The API refuses one request (Retry-After 2): its new place is asked of
    Redis over the pipe and the request held on its net timer meanwhile; when
    the answer comes it stands first in its line, leaves when the server's
    block is over, and before the one that waited behind it."""
    pacer, store = piped_pacer(redis_url, clock, retry=True)
    piped = LoopWithoutSockets(pacer, store, clock)
    piped.throttle.add(39)  # the bucket's last place: the API had counted another call
    for k in range(41):
        piped.arrive(k, "acme")
    piped.run(lambda: piped.sent.count(39) == 2 and 40 in piped.sent)
    assert piped.pacer.counters["retried"] == 1
    assert piped.sent[-2:] == [39, 40]
    again = [t for w, t in piped.left_at if w == 39][1]
    assert again == pytest.approx(START + 2.0, abs=1e-6)  # Retry-After, from the refusal
    assert store.stats()["late_answers"] == 0  # Redis answered it: no fall back
    store.close()


def test_a_429_sent_again_while_redis_is_stopped_does_not_block(
    clock: dict[str, float], stoppable: Callable[..., tuple[RedisServer, LoopWithoutSockets]]
) -> None:
    """Redis stops while the request is on its way, and the API refuses it:
    the pacer hears the 429 and asks for the request's new place without
    waiting for Redis (well under the timeout); the net timer hands it to the
    local share, and it leaves once the server's block is over."""
    server, loop = stoppable(retry=True)
    pacer, store = loop.pacer, loop.store
    loop.arrive(1, "acme")
    loop.run(lambda: loop.sent == [1])
    loop.throttle.add(2)
    loop.before_refusal = lambda: os.kill(server.proc.pid, signal.SIGSTOP)
    loop.arrive(2, "acme")
    loop.run(lambda: loop.sent.count(2) == 2)
    assert loop.answering < TIMEOUT / 5, loop.answering
    assert pacer.counters["retried"] == 1
    refused_at, again_at = [t for w, t in loop.left_at if w == 2]
    assert again_at - refused_at == pytest.approx(2.0, abs=1e-6)
    assert store.stats()["fallback"] == "local"


def test_requests_on_their_way_when_redis_fails_keep_their_units_in_the_local_share(
    clock: dict[str, float], stoppable: Callable[..., tuple[RedisServer, LoopWithoutSockets]]
) -> None:
    """40 requests on a 40-unit bucket, granted by Redis, still on their way
    (no answer yet) when Redis stops: the local share that takes over counts
    their 40 units as sent, so the next request waits for their answers and
    the drip, instead of leaving at once as on an empty bucket (which the API
    would refuse). Their answers land them there as in Redis's count."""
    server, loop = stoppable()
    pacer, store = loop.pacer, loop.store
    loop.hold_answers = True
    for k in range(40):
        loop.arrive(k, "acme")
    loop.run(lambda: len(loop.sent) == 40)
    os.kill(server.proc.pid, signal.SIGSTOP)
    nxt = loop.arrive(40, "acme")  # asked of Redis: its net timer, then the local share
    loop.run(lambda: clock["t"] >= START + 1.0 or 40 in loop.sent)
    assert 40 not in loop.sent, "it left on an empty share, ahead of the 40 on their way"
    stats = store.stats()
    assert stats["fallback"] == "local" and stats["carried"] == 40, stats
    assert not nxt.pending
    answered_at = clock["t"]
    limit = [(b"X-Shopify-Shop-Api-Call-Limit", b"40/40")]
    for paced in loop.on_the_way:
        pacer.answered(paced, 200, limit, None)
        assert paced.carried is None
    loop.run(lambda: 40 in loop.sent)
    # the 40 restore from their answers: one unit 0.5 s later at 2/s
    assert loop.left_at[-1] == (40, pytest.approx(answered_at + 0.5, abs=1e-6))


def test_a_fact_redis_lost_is_put_back_over_the_pipe(
    redis_url: str, clock: dict[str, float]
) -> None:
    """Redis restarts empty (FLUSHALL here) after this machine learned a plan:
    the next read of the fact finds it gone, and the machine's word is sent
    back over the pipe like any fact, never a blocking write."""
    import redis

    pacer, store = piped_pacer(redis_url, clock)
    other = RedisStore(redis_url, EXACT, clock="caller", facts_refresh=0.0)
    flusher = redis.Redis.from_url(redis_url)
    name = "plan|k|shopify-rest"
    try:
        store.put_fact(name, 400.0, 20.0)
        deadline = time.monotonic() + 5.0
        while other.fact(name) is None:
            assert time.monotonic() < deadline, store.stats()
            select.select([store.fileno()], [], [], 0.1)
            store.answers(clock["t"])
        flusher.flushall()
        assert other.fact(name) is None
        sent = store.stats()["steps_sent"]
        deadline = time.monotonic() + 5.0
        while other.fact(name) is None:
            assert time.monotonic() < deadline, store.stats()
            store.facts_generation  # noqa: B018 - asks for the counter when due
            assert store.fact(name) == (400.0, 20.0)  # the machine's word meanwhile
            select.select([store.fileno()], [], [], 0.1)
            store.answers(clock["t"])
        assert other.fact(name) == (400.0, 20.0)
        assert store.stats()["steps_sent"] > sent  # put back by a step on the pipe
    finally:
        flusher.close()
        other.close()
        store.close()


def test_a_redis_named_by_a_host_name_is_looked_up_before_the_loop_needs_it(
    clock: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``redis://localhost:PORT``: the name is looked up while the worker
    starts (and again by each reconnect attempt, on its thread), so making
    the pipe in the loop does not wait on the resolver: here any lookup after
    the start fails the test."""
    server = RedisServer()
    pacer, store = piped_pacer(f"redis://localhost:{server.port}/0", clock)
    loop = LoopWithoutSockets(pacer, store, clock)
    try:

        def resolver_on_the_loop(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"a lookup on the loop: {args}")

        monkeypatch.setattr(socket, "getaddrinfo", resolver_on_the_loop)
        loop.arrive(1, "acme")
        loop.run(lambda: loop.sent == [1])
        stats = store.stats()
        assert stats["pipes"] == 1 and stats["fallbacks"] == 0, stats
        assert stats["late_answers"] == 0, stats
    finally:
        monkeypatch.undo()
        store.close()
        server.stop()
