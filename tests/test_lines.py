"""The line of each account, driven without sockets on a fake clock.

Only the first request waiting on an account has a real departure; when
it leaves (sent, or its client gone) the next is woken through the pacer's
``wake`` hook, and a refund wakes the first one earlier. These tests play
the loop's part: they call ``departing`` when a woken request's time comes.
"""

from __future__ import annotations

import json
import logging

import pytest

from elbasy.pacing import NOT_FIRST_WAIT, Paced, Pacer
from elbasy.quota import LocalStore, Safety
from elbasy.rules import RuleSet
from elbasy.verdicts import NOW

EXACT = Safety(margin=0.0, headroom=0.0, jitter=0.0, guard=0.0)
REST = "/admin/api/2024-10/products.json"
GQL = "/admin/api/2024-10/graphql.json"
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class Harness:
    """A pacer on one clock (wall and monotonic alike), recording every wake-up."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(RuleSet.builtin(), LocalStore(EXACT), wall=self.clock, mono=self.clock)
        self.woken: list[tuple[str, float]] = []
        self.pacer.wake = lambda waiter, when: self.woken.append((str(waiter), when - T0))

    def rest(self, name: str, token: str = "tok") -> tuple[Paced, float]:
        headers = [(b"X-Shopify-Access-Token", token.encode())]
        m = self.pacer.match("acme.myshopify.com", "GET", REST, headers)
        assert m is not None
        paced = self.pacer.start(m, "GET", headers)
        v = self.pacer.admit(paced, name)
        assert not v.shed_after
        return paced, (v.depart - T0 if v.depart else 0.0)

    def at(self, seconds: float) -> None:
        self.clock.t = T0 + seconds


def fill(h: Harness, n: int = 40) -> None:
    """n requests that leave at once and are answered at once (their cost lands)."""
    for i in range(n):
        paced, depart = h.rest(f"fill{i}")
        assert depart == 0.0
        assert h.pacer.answered(paced, 200, [], None) == 0.0


def test_only_the_first_waits_on_a_real_departure() -> None:
    h = Harness()
    fill(h)
    first, d1 = h.rest("a")
    _, d2 = h.rest("b")
    _, d3 = h.rest("c")
    assert d1 == pytest.approx(0.5)  # one marble leaks in half a second
    assert d2 == d3 == pytest.approx(NOT_FIRST_WAIT)  # behind it: woken when first
    assert h.pacer.waiting() == 3
    h.at(0.5)
    assert h.pacer.departing(first) == NOW  # a leaves, and b is woken for its turn
    assert h.woken == [("b", pytest.approx(1.0))]


def test_the_line_moves_in_arrival_order_and_nobody_overtakes() -> None:
    h = Harness()
    fill(h)
    line = [h.rest(name)[0] for name in "abcde"]
    sent = []
    t = 0.5
    for paced, name in zip(line, "abcde", strict=True):
        h.at(t)
        # anyone not first who asks (a fallback timer) is told to wait on
        for other in line[line.index(paced) + 1 :]:
            assert h.pacer.departing(other) == pytest.approx(T0 + t + NOT_FIRST_WAIT)
        assert h.pacer.departing(paced) == NOW
        sent.append((name, t))
        t += 0.5
    assert [name for name, _ in sent] == list("abcde")
    assert h.pacer.waiting() == 0


def test_first_client_leaving_wakes_the_next_at_the_same_time() -> None:
    h = Harness()
    fill(h)
    a, _ = h.rest("a")
    h.rest("b")
    h.at(0.2)
    h.pacer.abandoned(a)
    # b takes a's place: it leaves when a would have
    assert h.woken == [("b", pytest.approx(0.5))]


def test_a_client_leaving_from_the_middle_wakes_nobody_and_is_skipped() -> None:
    h = Harness()
    fill(h)
    a, _ = h.rest("a")
    b, _ = h.rest("b")
    c, _ = h.rest("c")
    h.at(0.1)
    h.pacer.abandoned(b)
    assert h.woken == []
    h.at(0.5)
    assert h.pacer.departing(a) == NOW
    # b's marble went back with it: c leaves at 1.0, where b would have
    assert h.woken == [("c", pytest.approx(1.0))]
    assert h.pacer.waiting() == 1
    assert h.pacer.counters["returned"] == 1


def test_thirty_clients_leaving_cost_the_next_request_nothing() -> None:
    h = Harness()
    fill(h)
    held = [h.rest(f"held{i}")[0] for i in range(30)]
    h.at(0.3)
    for paced in held:
        h.pacer.abandoned(paced)
    assert h.pacer.waiting() == 0
    _, depart = h.rest("next")
    assert depart == pytest.approx(0.5)  # as if the thirty had never come


def _graphql_answer(requested: int, actual: int, available: float) -> bytes:
    status = {"maximumAvailable": 2000.0, "currentlyAvailable": available, "restoreRate": 100.0}
    cost = {"requestedQueryCost": requested, "actualQueryCost": actual, "throttleStatus": status}
    return json.dumps({"data": {}, "extensions": {"cost": cost}}).encode()


def test_a_refund_wakes_the_first_in_line_earlier() -> None:
    h = Harness()
    headers = [(b"X-Shopify-Access-Token", b"tok")]
    body = json.dumps({"query": "{ products(first: 250) { edges { node { id } } } }"}).encode()

    def query(name: str) -> tuple[Paced, float]:
        m = h.pacer.match("acme.myshopify.com", "POST", GQL, headers)
        assert m is not None
        paced = h.pacer.start(m, "POST", headers)
        v = h.pacer.priced(paced, body, name)
        return paced, (v.depart - T0 if v.depart else 0.0)

    first, _ = query("learn")
    h.pacer.answered(first, 200, [], _graphql_answer(752, 752, 2000 - 752))
    # the shape costs 752 requested: two fit in the bucket (with the first one's 752)
    sent = [query(f"q{i}") for i in range(2)]
    assert [d for _, d in sent] == [0.0, pytest.approx(752 * 3 / 100 - 2000 / 100)]
    waiting, due = sent[1]
    assert due > 0
    # the first two come back having cost 52 each: 1,400 points back
    h.at(0.1)
    h.pacer.answered(sent[0][0], 200, [], _graphql_answer(752, 52, 2000 - 752 - 52 + 10))
    assert h.woken and h.woken[-1][0] == "q1"
    assert h.woken[-1][1] < due
    assert h.pacer.counters["woken_early"] == 1


def test_a_servers_view_is_dated_at_its_answer() -> None:
    """A server that kept a request in its queue had restored less than elbasy
    would count from the departure: the view holds at the answer's head."""
    h = Harness()
    h.at(1.0)
    slow, _ = h.rest("slow")
    h.at(1.2)  # this one waited 200 ms at the server, which then said 40/40: full
    h.pacer.answered(slow, 200, [(b"X-Shopify-Shop-Api-Call-Limit", b"40/40")], None)
    _, depart = h.rest("next")
    # full at 1.2 s, and one marble leaks in 0.5 s; dated at the departure (1.0 s)
    # it would leave at 1.5 s, into a bucket still full
    assert depart == pytest.approx(1.2 + 0.5, abs=1e-5)


class QuietStore(LocalStore):
    """A store whose other users' refunds are not announced (as Redis's, across
    machines): a waiting head must ask again every ``recheck`` seconds."""

    recheck = 0.05


def test_a_head_asks_again_when_the_store_cannot_announce_refunds() -> None:
    """Redis does not announce another machine's refunds: a GraphQL line's head asks
    again every ``recheck``; a REST one (no refunds) keeps its planned departure."""
    h = Harness()
    h.pacer = Pacer(RuleSet.builtin(), QuietStore(EXACT), wall=h.clock, mono=h.clock)
    fill(h)
    _, d_rest = h.rest("a")
    assert d_rest == pytest.approx(0.5)  # REST: one marble leaks in half a second
    headers = [(b"X-Shopify-Access-Token", b"tok")]
    body = json.dumps({"query": "{ products(first: 250) { edges { node { id } } } }"}).encode()

    def query(name: str) -> tuple[Paced, float]:
        m = h.pacer.match("acme.myshopify.com", "POST", GQL, headers)
        assert m is not None
        paced = h.pacer.start(m, "POST", headers)
        v = h.pacer.priced(paced, body, name)
        return paced, (v.depart - T0 if v.depart else 0.0)

    first, _ = query("learn")
    h.pacer.answered(first, 200, [], _graphql_answer(752, 752, 2000 - 752))
    assert query("q0")[1] == 0.0  # 752 + 752 fit in 2000
    waiting, d = query("q1")
    assert d == pytest.approx(0.05)  # not 2.56 s: another machine may refund points
    h.at(0.05)
    assert h.pacer.departing(waiting) == pytest.approx(T0 + 0.1)  # still no room: again


def test_debug_lines_of_a_reservation_a_confirm_that_waits_again_and_a_departure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    fill(h)
    with caplog.at_level(logging.INFO, logger="elbasy.pacing"):
        a, _ = h.rest("a")
        h.at(0.2)
        h.pacer.departing(a)
    assert not caplog.records  # nothing at info level
    with caplog.at_level(logging.DEBUG, logger="elbasy.pacing"):
        b, due = h.rest("b")  # behind a: not first, its wait is not known yet
        h.at(0.3)  # a's timer came early: its confirm waits again
        assert h.pacer.departing(a) == pytest.approx(T0 + 0.5)
        h.at(0.5)
        assert h.pacer.departing(a) == NOW
    got = [(r.getMessage().split(" ")[0], r.__dict__) for r in caplog.records]
    assert [word for word, _ in got] == ["reserved", "confirm", "departs"]
    (_, reserved), (_, again), (_, departs) = got
    assert (reserved["rule"], reserved["ahead"], reserved["wait_ms"]) == (
        "shopify-admin-rest",
        1,
        None,
    )
    assert again["wait_ms"] == pytest.approx(200.0) and again["cost"] == 1
    assert departs["wait_ms"] == pytest.approx(500.0)
    assert reserved["account"] == again["account"] == departs["account"] == a.match.account
