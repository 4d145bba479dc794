"""The policy and its pacer through whole conversations, with no sockets and a fake clock.

:class:`Loop` below plays the data plane's part the way ``ext/loop.pyx`` does
it: a head goes to the policy once, a request the policy holds waits for its
departure (or a wake-up from the pacer), is confirmed with ``departing``
when its time comes, and its response head, captured body and ending go
back to the policy. Each test is a script of heads and answers; time moves
only when the script says so, so a paced path, a refund, a retry or a shed
runs in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from elbasy._loop import Ended
from elbasy.pacing import Pacer
from elbasy.policy import Exchange, Policy
from elbasy.quota import LocalStore, QuotaStore, Safety
from elbasy.rules import RuleSet
from elbasy.shm import ShmStore, ShmTable, key_hash
from elbasy.verdicts import (
    ABANDONED,
    BAD_BODY,
    BAD_RESPONSE,
    DRAINED,
    FAILED,
    FINISHED,
    INTERNAL_ERROR,
    NOW,
    Forward,
    Intercept,
    Reply,
    ResponsePlan,
)

EXACT = Safety(margin=0.0, headroom=0.0, jitter=0.0, guard=0.0)
SITE = Intercept("acme.myshopify.com", 443, None, "https://acme.myshopify.com")
REST = "/admin/api/2024-10/products.json"
GQL = "/admin/api/2024-10/graphql.json"


@dataclass
class Held:
    ex: Exchange
    forward: Forward
    due: float


@dataclass
class Loop:
    """A data plane with no sockets: what ext/loop.pyx does with the policy's verdicts."""

    t: float = 1_800_000_000.0
    held: dict[int, Held] = field(default_factory=dict)
    sent: list[Exchange] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)
    store: QuotaStore | None = None  # LocalStore(EXACT) unless given

    def __post_init__(self) -> None:
        self.pacer = Pacer(
            RuleSet.builtin(),
            self.store if self.store is not None else LocalStore(EXACT),
            wall=lambda: self.t,
            mono=lambda: self.t,
            retry_idempotent=True,
        )
        self.pacer.wake = self.wake
        self.policy = Policy(lambda: {}, ("*.myshopify.com",), self.pacer)

    # -- the loop's side of the seam

    def wake(self, ticket: object, when: float) -> None:
        held = self.held.get(id(ticket))
        if held is not None:
            held.due = when

    def request(self, head: bytes, body: bytes = b"") -> Exchange | None:
        v = self.policy.on_request(head, "127.0.0.1:9", SITE)
        if isinstance(v, Reply):
            self.replies.append(v.data)
            return None
        assert isinstance(v, Forward)
        depart = v.depart
        if v.peek:
            got = self.policy.on_body(v.ticket, body[: v.peek])
            if isinstance(got, Reply):
                self.replies.append(got.data)
                return None
            depart = got
        self._hold_or_send(v.ticket, v, depart)
        return v.ticket

    def _hold_or_send(self, ex: Exchange, v: Forward, depart: float) -> None:
        if depart != NOW:
            self.held[id(ex)] = Held(ex, v, depart)
        else:
            self.sent.append(ex)

    def advance(self, seconds: float) -> list[Exchange]:
        """Let time pass, firing every departure that comes due (in time order)."""
        end = self.t + seconds
        gone: list[Exchange] = []
        while True:
            due = [h for h in self.held.values() if h.due <= end]
            if not due:
                break
            h = min(due, key=lambda h: h.due)
            self.t = max(self.t, h.due)
            again = self.policy.departing(h.ex)
            if again == NOW:
                del self.held[id(h.ex)]
                self.sent.append(h.ex)
                gone.append(h.ex)
            else:
                h.due = again
        self.t = end
        return gone

    def answer(self, ex: Exchange, head: bytes, body: bytes = b"") -> ResponsePlan:
        plan = self.policy.on_response(ex, head)
        if plan.retry_at != NOW:
            self.sent.remove(ex)
            self.held[id(ex)] = Held(ex, Forward("", 0, b"", 0, 0, False, ex, True), plan.retry_at)
            return plan
        if plan.capture:
            self.policy.on_response_body(ex, body[: plan.capture])
        self.policy.ended(ex, Ended(FINISHED, plan.status, 0, len(body), 1000))
        return plan

    def answer_all(self, head: bytes) -> None:
        """Every request sent and not answered yet gets ``head`` now."""
        for ex in list(self.sent):
            if not ex.paced or ex.paced.response is None:
                self.answer(ex, head)

    def leave(self, ex: Exchange) -> None:
        """The client of a held request goes away."""
        del self.held[id(ex)]
        self.policy.ended(ex, Ended(ABANDONED))


def rest(token: str = "tok") -> bytes:
    return (
        f"GET {REST} HTTP/1.1\r\nHost: acme.myshopify.com\r\n"
        f"X-Shopify-Access-Token: {token}\r\n\r\n"
    ).encode()


def graphql(query: str, token: str = "tok") -> tuple[bytes, bytes]:
    body = json.dumps({"query": query}).encode()
    head = (
        f"POST {GQL} HTTP/1.1\r\nHost: acme.myshopify.com\r\nX-Shopify-Access-Token: {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def ok(call_limit: str) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nX-Shopify-Shop-Api-Call-Limit: {call_limit}\r\n"
        "Content-Length: 2\r\n\r\n"
    ).encode()


def graphql_answer(requested: int, actual: int, available: float) -> tuple[bytes, bytes]:
    status = {"maximumAvailable": 2000.0, "currentlyAvailable": available, "restoreRate": 100.0}
    cost = {"requestedQueryCost": requested, "actualQueryCost": actual, "throttleStatus": status}
    body = json.dumps({"data": {}, "extensions": {"cost": cost}}).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    return head, body


def test_rest_forty_go_at_once_the_next_waits_its_half_second() -> None:
    loop = Loop()
    exs = [loop.request(rest()) for _ in range(42)]
    assert len(loop.sent) == 40 and len(loop.held) == 2
    for i, ex in enumerate(exs[:40]):
        assert ex is not None
        loop.answer(ex, ok(f"{i + 1}/40"))
    assert loop.advance(0.49) == []
    assert loop.advance(0.02) == [exs[40]]  # at 0.5 s
    assert loop.advance(0.5) == [exs[41]]  # the next one woken by the first's departure
    assert b"X-Elbasy-Wait: 0.500" in loop.answer(exs[40], ok("40/40")).head  # type: ignore[arg-type]


def test_a_client_leaving_while_held_moves_the_line() -> None:
    loop = Loop()
    exs = [loop.request(rest()) for _ in range(43)]
    loop.answer_all(ok("40/40"))  # the forty sent at once are answered at once
    loop.advance(0.1)
    first, second, third = exs[40], exs[41], exs[42]
    assert first is not None and third is not None
    loop.leave(first)
    # second takes first's turn at 0.5 s, third second's at 1.0 s
    assert loop.advance(0.4) == [second]
    assert loop.advance(0.5) == [third]
    assert loop.pacer.counters["returned"] == 1


def test_a_graphql_refund_sends_the_waiting_query_early() -> None:
    loop = Loop()
    query = (
        "{ products(first: 80) { edges { node { id"
        " variants(first: 8) { edges { node { id } } } } } } }"
    )
    head, body = graphql(query)
    exs = [loop.request(head, body) for _ in range(3)]
    # priced from its text at 882 points: two fit in 2,000, the third waits for 882 - 236
    assert len(loop.sent) == 2 and len(loop.held) == 1
    waiting = loop.held[id(exs[2])]
    assert waiting.due - loop.t == pytest.approx((3 * 882 - 2000) / 100)
    # the first comes back having cost 100: 782 points back, the third goes now
    assert exs[0] is not None
    loop.answer(exs[0], *graphql_answer(882, 100, 2000 - 882 - 100))
    assert loop.advance(0.0) == [exs[2]]
    assert loop.pacer.counters["woken_early"] == 1


def test_a_429_is_sent_again_after_its_retry_after_and_first_in_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger="elbasy")
    loop = Loop()
    exs = [loop.request(rest()) for _ in range(41)]
    refused = exs[0]
    assert refused is not None
    for ex in exs[1:40]:
        assert ex is not None
        loop.answer(ex, ok("40/40"))
    plan = loop.answer(
        refused,
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2.0\r\n"
        b"X-Shopify-Shop-Api-Call-Limit: 40/40\r\nContent-Length: 0\r\n\r\n",
    )
    # the bucket is taken as full: a marble is free in 0.5 s, but Retry-After says 2 s
    assert plan.retry_at - loop.t == pytest.approx(2.0)
    assert loop.pacer.counters["server_throttled"] == 1
    # the warning names the rule once, with the account
    (warning,) = [r.getMessage() for r in caplog.records if "refused a request" in r.getMessage()]
    assert warning.count("shopify-admin") == 1, warning
    assert "(429, Retry-After 2)" in warning
    # it goes first when its time comes, before the one that waited behind it
    gone = loop.advance(2.5)
    assert gone[:2] == [refused, exs[40]]


def test_a_request_beyond_the_max_wait_is_shed_and_costs_nothing() -> None:
    loop = Loop()
    for _ in range(40):
        loop.request(rest())
    head = rest().replace(b"\r\n\r\n", b"\r\nX-Elbasy-Max-Wait: 0.2\r\n\r\n")
    assert loop.request(head) is None
    # the standard reason phrase (http.HTTPStatus), not a made-up one
    assert loop.replies[-1].startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"X-Elbasy-Shed: 1" in loop.replies[-1]
    nxt = loop.request(rest())
    assert nxt is not None and loop.held[id(nxt)].due - loop.t == pytest.approx(0.5)


def test_a_full_quota_table_answers_503_until_a_bucket_is_idle_again() -> None:
    """A shared table of one bucket: while one account waits in it, a second
    account has no room (elbasy's 503 with Retry-After, nothing sent); once the
    first account's bucket has drained it is evicted for the second."""
    table = ShmTable(1)
    try:
        loop = Loop(store=ShmStore(table, 0, EXACT))
        for _ in range(41):  # 40 fill the bucket, the 41st waits in it
            loop.request(rest("a"))
        assert len(loop.sent) == 40 and len(loop.held) == 1
        loop.answer_all(ok("40/40"))
        assert loop.request(rest("b")) is None
        reply = loop.replies[-1]
        assert reply.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in reply
        assert loop.pacer.counters["store_full"] == 1
        assert len(loop.advance(1.0)) == 1  # a's last one leaves; its bucket is not idle yet
        loop.answer_all(ok("40/40"))
        assert loop.request(rest("b")) is None
        loop.advance(25.0)  # 40 marbles leak at 2/s: a's bucket is as good as new
        assert loop.request(rest("b")) is not None and loop.sent[-1].method == "GET"
        assert table.evictions == 1
    finally:
        table.close()


def test_a_graphql_429_read_at_its_head_and_its_body_is_one_refusal() -> None:
    loop = Loop()
    head, body = graphql("{ shop { name } }")
    ex = loop.request(head, body)
    assert ex is not None and loop.sent == [ex]
    refusal = json.dumps(
        {"errors": [{"message": "Throttled", "extensions": {"code": "THROTTLED"}}]}
    )
    loop.answer(
        ex,
        f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n"
        f"Content-Length: {len(refusal)}\r\n\r\n".encode(),
        refusal.encode(),
    )
    assert loop.pacer.counters["server_throttled"] == 1


@pytest.mark.parametrize(
    "end",
    [
        Ended(FINISHED, 0),  # the client or the upstream went away before an answer
        Ended(ABANDONED),  # the client left while it was on its way to an upstream
        Ended(FAILED, 504, reason="no answer within the response timeout"),
        Ended(BAD_BODY),
        Ended(BAD_RESPONSE, error=ValueError("not HTTP")),
        Ended(INTERNAL_ERROR, error=RuntimeError("a bug")),
        Ended(DRAINED, sent=True),
    ],
    ids=lambda e: e.kind,
)
def test_every_ending_of_a_sent_request_without_an_answer_lands_its_cost(end: Ended) -> None:
    """A request that left and got no answer may have been counted by the server:
    whichever way its exchange ends, its units land (restore from then on) and
    never stay in flight, where they would take room from the account forever."""
    table = ShmTable(16)
    try:
        loop = Loop(store=ShmStore(table, 0, EXACT))
        ex = loop.request(rest())
        assert ex is not None and loop.sent == [ex] and ex.paced is not None
        r = ex.paced.reservation
        assert r is not None and r.sent
        h = key_hash(f"{r.keys[0]}\x1f{r.limits[0].name}".encode())
        before = table.peek(h)
        assert before is not None and before["flying"] == 1
        loop.policy.ended(ex, end)
        after = table.peek(h)
        assert after is not None and after["flying"] == 0 and after["queued"] == 0
        assert loop.pacer.counters["landed_unanswered"] == 1
    finally:
        table.close()
