"""Pacing: when each request to a covered API may leave, and what its answer teaches.

The :class:`Pacer` sits between the proxy policy (``elbasy.policy``) and the
two engines it drives: the rules (which API, which quota account, which
limits, what a response says) and the quota store (reservations on each
account's clocks). Per request, in order:

1. ``admit``     the rule match and a place in its account's line: a
                 departure time, or an immediate 429 from elbasy when its
                 estimate is beyond the max wait;
2. ``priced``    for GraphQL, the query's cost once its body has been read;
3. ``departing`` at the departure: confirmed against what was actually sent
                 (and what the server said since), or a later time;
4. ``answered``  the response head: the server's view merged, a 429 (or a
                 THROTTLED body) pushes the account past Retry-After and may
                 send an idempotent request again;
5. ``abandoned`` the client left while queued: its place goes back; or it
                 was sent and its exchange ended with no answer: it lands.

In flight. A request that left takes its cost from its account's buckets
but is not counted as restoring until its answer comes (``landed``): a
server counts a request when it arrives, and a bucket that is full then
restored nothing for it while it travelled (a new upstream connection,
the server's own queue: 1.5 s seen for a burst's first requests on a
loaded machine, against a headroom of 5 points at 100/s).

The line. The requests waiting on one account (one tuple of bucket keys)
stand in arrival order, and only the first one has a real departure: the
moment the store says the bucket holds its cost. When it leaves (sent, or
its client gone) the next one becomes first and is woken through
:attr:`Pacer.wake`, at once if the bucket already holds it; when an answer
refunds points, the first one is woken earlier. Nobody overtakes, and a
change costs O(1), not a pass over the line. The others wait on a fallback
timer (:data:`NOT_FIRST_WAIT`) that only matters if a wake-up were lost.

Times: the quota works on the wall clock (windows are aligned to the epoch,
as the APIs count them); the loop's timers run on the monotonic clock. Both
clocks are read here, through the callables handed in, and converted at
this one seam.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from elbasy.limits import BUCKET, Limit, ServerView
from elbasy.metrics import WorkerMetrics
from elbasy.protocol.http1 import IDEMPOTENT_METHODS
from elbasy.quota import (
    CONFIRM,
    EVERY_LINE,
    LATER,
    RESERVE,
    LateAnswer,
    Later,
    LevelSeen,
    LocalStore,
    PipedQuotaStore,
    QuotaStore,
    Reservation,
    Shed,
    StoreFull,
)
from elbasy.rules import Match, Rule, RuleSet
from elbasy.verdicts import NOW

log = logging.getLogger("elbasy.pacing")
DEBUG = logging.DEBUG

#: the request header that lowers (or raises) the max wait for one request
MAX_WAIT_HEADER = b"x-elbasy-max-wait"
#: request headers elbasy reads and never sends on
OWN_HEADERS = (MAX_WAIT_HEADER,)
#: how long a paced request may wait at most, whatever it asks
MAX_WAIT_CEILING = 3600.0
#: response bytes a rule that reads bodies (GraphQL cost) gets to see
BODY_FEEDBACK_BYTES = 256 * 1024

#: how long a request that is not first in its line waits before it asks again
#: (it is woken as soon as it is first; this is the net under that)
NOT_FIRST_WAIT = MAX_WAIT_CEILING

#: the pacer's hook to move a held request: ``wake(waiter, monotonic time)``
Wake = Callable[[object, float], None]

#: how long a client is told to wait when the quota table has no room for its account
STORE_FULL_RETRY = 1.0


def plan_fact(key: str, limit: str) -> str:
    """The store's name for what a server said of one bucket: (capacity, rate or 0)."""
    return f"plan|{key}|{limit}"


def limit_headers(
    rule: Rule, headers: list[tuple[bytes, bytes]], cache: dict[str, frozenset[bytes]]
) -> dict[str, str]:
    """A response's rate-limit headers: those the rule reads, Retry-After, and any
    ``*RateLimit*`` or ``*Rate-Limit*`` one (names lower-cased)."""
    names = cache.get(rule.id)
    if names is None:
        names = cache[rule.id] = _headers_read(rule)
    out: dict[str, str] = {}
    for name, value in headers:
        n = name.lower()
        if n in names or b"ratelimit" in n or b"rate-limit" in n:
            out[n.decode("latin-1")] = value.decode("latin-1")
    return out


def _headers_read(rule: Rule) -> frozenset[bytes]:
    """The response headers a rule reads its view and its refusals from, and Retry-After."""
    names = {b"retry-after"}
    readers = [r for f in rule.feedback for r in f.readers.values()]
    readers += rule.throttle.retry_after
    readers += [d.reader for d in rule.tier_detect]
    markers = [*rule.throttle.markers, *(r.only_if for r in readers if r.only_if)]
    names.update(f.limit_header for f in rule.feedback if f.limit_header)
    names.update(r.header for r in readers if r.header)
    names.update(m.header for m in markers if m.header)
    return frozenset(n.lower() for n in names)


def _no_clock() -> float:
    return 0.0


def _no_wake(waiter: object, when: float) -> None:
    """Until a loop is wired in (tests of the pacer alone): nothing to wake."""


class BadMaxWait(ValueError):
    """The client's X-Elbasy-Max-Wait is not a number of seconds."""


@dataclass(slots=True)
class Paced:
    """One request's pacing state, kept on its ticket."""

    match: Match
    method: str
    max_wait: float
    arrived: float  # monotonic
    reservation: Reservation | None = None
    sent_at: float = 0.0  # monotonic; 0 until it left
    head_at: float = 0.0  # monotonic: when its answer's head came; 0 until then
    due: float = 0.0  # monotonic: the departure it was last given (0: at once)
    retried: bool = False
    response: tuple[int, list[tuple[bytes, bytes]]] | None = None  # status, headers
    # its line: the account's keys while it waits in one, and what wake() is
    # called with (the loop's handle of the held request)
    line: tuple[str, ...] | None = None
    waiter: object = None
    gone: bool = False  # left its line from the middle; dropped when it reaches the front
    actual: float | None = None  # what the server said it cost (GraphQL), once answered
    # a piped store (Redis): the step whose answer it waits for (RESERVE,
    # CONFIRM) or "", and what came of it
    pending: str = ""
    left: bool = False  # its client left while an answer was on its way
    ask_again: bool = False  # its line moved while its confirm was on its way
    refused: Verdict | None = None  # its reservation's answer was a shed
    # sent again after the server's refusal: the server's block (wall time)
    # its new reservation's departure waits for
    blocked_until: float = 0.0
    # sent on the shared store (Redis) and unanswered when it failed: its units
    # as the local share counts them, landed with it when its answer comes
    carried: Reservation | None = None

    def waited(self) -> float:
        return max(0.0, self.sent_at - self.arrived) if self.sent_at else 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the proxy should do with a paced request now."""

    depart: float = NOW  # hold until (monotonic); NOW: at once
    shed_after: float = 0.0  # > 0: answer 429 with this Retry-After instead
    limit: str = ""  # the limit that shed it
    full: bool = False  # the quota table has no room for its account: answer 503


def tightest(views: list[ServerView]) -> tuple[float, float | None] | None:
    """(remaining, capacity) of the limit a server's views leave least of (by
    fraction when the capacity is known): what the status page shows of an
    account. None when no view says what is left."""
    best: tuple[float, float, float | None] | None = None
    for v in views:
        remaining = v.remaining
        if remaining is None and v.used is not None and v.capacity:
            remaining = v.capacity - v.used
        if remaining is None:
            continue
        share = remaining / v.capacity if v.capacity else remaining
        if best is None or share < best[0]:
            best = (share, remaining, v.capacity)
    return None if best is None else (best[1], best[2])


class Pacer:
    """Rules and quota for one worker. Plain Python; the clocks are handed in."""

    def __init__(
        self,
        rules: RuleSet,
        store: QuotaStore,
        *,
        wall: Callable[[], float],
        mono: Callable[[], float],
        max_wait: float = 30.0,
        retry_idempotent: bool = False,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.rules = rules
        self.store = store
        # what the pacer and the policy count, in the worker's metrics slot
        # (elbasy.metrics); a private one for a pacer of its own (tests)
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        # a store across a network (Redis) answers the steps that decide a
        # departure later, through its fd: held requests wait for them
        self.piped: PipedQuotaStore | None = store if getattr(store, "piped", False) else None  # type: ignore[assignment]
        # what the rules learn (tiers, query shapes' costs) is kept where the
        # quota is: shared by every worker of a shared store
        rules.facts = store
        # A store that can fall back from a shared store to a local share
        # (elbasy.fleet_store): the requests in flight on the shared store, by
        # id, whose units the local share must hold if it fails (carry)
        self._flying: dict[int, Paced] = {}
        self._carries = callable(getattr(store, "carry", None))
        if self._carries:
            store.on_fall_back = self._carry_flying  # type: ignore[attr-defined]
        self.max_wait = max_wait
        self.retry_idempotent = retry_idempotent
        self.wall = wall
        self.mono = mono
        # What servers reported of a limit's numbers (Etsy's day, GraphQL's
        # bucket) lives in the store, shared with every worker. Per account
        # keys, cached here: (the rule's limits, the same with what the server
        # told), valid while the store's facts do not change.
        self._told_limits: dict[tuple[str, ...], tuple[tuple[Limit, ...], tuple[Limit, ...]]] = {}
        self._facts_seen = -1
        # per rule: the response headers it reads (named in a 429's warning)
        self._rule_headers: dict[str, frozenset[bytes]] = {}
        # the last plan this worker stored per (key, limit): a repeated header
        # costs no store write
        self._told: dict[tuple[str, str], tuple[float, float]] = {}
        # the requests waiting on each account, first in line at the left, and
        # the lines each bucket key is part of (an account's buckets may be
        # shared with other accounts' lines: an app-wide limit)
        self._lines: dict[tuple[str, ...], deque[Paced]] = {}
        self._lines_of: dict[str, set[tuple[str, ...]]] = {}
        #: moves a held request to a new departure; the loop wires its own in
        self.wake: Wake = _no_wake
        self._lateness = [0.0] * 10_000  # the most recent departures' lateness, seconds
        self._late_n = 0
        self.counters: Counter[str] = Counter(
            dict.fromkeys(
                (
                    "paced",
                    "shed",
                    "server_throttled",
                    "resource_throttled",
                    "retried",
                    "returned",
                    "woken_early",
                    "store_full",
                    "landed_unanswered",
                ),
                0,
            )
        )

    @classmethod
    def unpaced(cls) -> Pacer:
        """A pacer whose rules cover no host: every request goes at once, unpaced.
        Its clocks are never read."""
        return cls(RuleSet([]), LocalStore(), wall=_no_clock, mono=_no_clock)

    # ------------------------------------------------------------------ clocks

    def _to_mono(self, wall_time: float) -> float:
        return self.mono() + (wall_time - self.wall())

    # ------------------------------------------------------------------ 1. admit

    def match(
        self, host: str, method: str, target: str, headers: list[tuple[bytes, bytes]]
    ) -> Match | None:
        """The rule match of a request, or None when no rule covers it."""
        return self.rules.match(host, method, target, headers)

    def start(self, match: Match, method: str, headers: list[tuple[bytes, bytes]]) -> Paced:
        """A paced request arrives: its state, with the max wait it asked for."""
        max_wait = self.max_wait
        for name, value in headers:
            if name.lower() == MAX_WAIT_HEADER:
                try:
                    max_wait = float(value)
                except ValueError:
                    raise BadMaxWait(
                        f"X-Elbasy-Max-Wait must be a number of seconds, got {value!r}"
                    ) from None
                if not (max_wait >= 0 and math.isfinite(max_wait)):
                    raise BadMaxWait(f"X-Elbasy-Max-Wait must be >= 0, got {value!r}")
                max_wait = min(max_wait, MAX_WAIT_CEILING)
        self.counters["paced"] += 1
        return Paced(match, method, max_wait, self.mono())

    def limits(self, match: Match) -> tuple[Limit, ...]:
        """The match's limits, with the numbers its server reported in their place.

        The same tuple for every request of an account until a worker learns
        something new: a queued request keeps it, and there may be 100,000.
        """
        generation = self.store.facts_generation
        if generation != self._facts_seen:
            self._told_limits.clear()  # a fact changed somewhere (rare): start over
            self._facts_seen = generation
        known = self._told_limits.get(match.keys)
        if known is not None and known[0] is match.limits:
            return known[1]
        out = []
        for key, limit in zip(match.keys, match.limits, strict=True):
            told = self.store.fact(plan_fact(key, limit.name))
            if told is not None:
                capacity, rate = told
                limit = replace(limit, capacity=capacity, rate=rate or limit.rate)
            out.append(limit)
        limits = tuple(out)
        if len(self._told_limits) >= 100_000:
            self._told_limits.clear()
        self._told_limits[match.keys] = (match.limits, limits)
        return limits

    def _learn(self, match: Match, views: list[ServerView], rates: dict[str, float]) -> None:
        """Keep a limit's capacity (and a bucket's rate) as the server states them."""
        for key, limit in zip(match.keys, match.limits, strict=True):
            view = next((v for v in views if v.limit == limit.name), None)
            if view is None or not view.capacity:
                continue
            rate = rates.get(limit.name) if limit.kind == BUCKET else None
            told = (float(view.capacity), float(rate or 0.0))
            if self._told.get((key, limit.name)) == told:
                continue
            if len(self._told) >= 100_000:
                self._told.clear()
            self._told[(key, limit.name)] = told
            self.store.put_fact(plan_fact(key, limit.name), *told)

    def admit(self, paced: Paced, waiter: object = None) -> Verdict:
        """Give the request its place in its account's line: when it may leave, or shed it.

        ``waiter`` is what :attr:`wake` is called with when its departure moves.
        """
        m = paced.match
        wall_now = self.wall()
        if not any(m.costs):
            return Verdict()  # not paced (a query the server refuses unrun): never waits
        try:
            if self.piped is not None:
                limits = self.limits(m)
                got = self.piped.reserve_later(
                    paced, m.keys, limits, m.costs, wall_now, paced.max_wait
                )
                if got is LATER:
                    # it takes its place in its line now; the answer says when it goes
                    paced.waiter = waiter
                    paced.pending = RESERVE
                    self._open_line(m.keys).append(paced)
                    paced.line = m.keys
                    return Verdict(depart=self._net())
                assert not isinstance(got, Later)
                r = got
            else:
                r = self.store.reserve(m.keys, self.limits(m), m.costs, wall_now, paced.max_wait)
        except StoreFull as e:
            return self._no_room(m, e)
        if isinstance(r, Shed):
            return self._shed(m, paced, r)
        paced.reservation = r
        paced.waiter = waiter
        line = self._lines.get(m.keys)
        if line:
            # others wait already: it goes behind them, woken when it is first
            line.append(paced)
            paced.line = m.keys
            if log.isEnabledFor(DEBUG):
                self._debug_reserved(paced, r, len(line) - 1)
            return Verdict(depart=self.mono() + NOT_FIRST_WAIT)
        later = self.store.confirm(r, wall_now)
        if log.isEnabledFor(DEBUG):
            self._debug_reserved(paced, r, 0, 0.0 if later is None else later - wall_now)
        if later is None:
            self._sent(paced)
            return Verdict()
        self._open_line(m.keys).append(paced)
        paced.line = m.keys
        paced.due = self._head_due(paced, later)
        return Verdict(depart=paced.due)

    def _no_room(self, m: Match, e: StoreFull) -> Verdict:
        self.counters["store_full"] += 1
        log.warning("no room for %s in the quota table: %s", m.label, e)
        return Verdict(shed_after=STORE_FULL_RETRY, full=True)

    def _shed(self, m: Match, paced: Paced, r: Shed) -> Verdict:
        self.counters["shed"] += 1
        log.info(
            "shed a request for %s: %s has no room for %.1f s (max wait %.1f s)",
            m.label,
            r.limit,
            r.retry_after,
            paced.max_wait,
        )
        return Verdict(shed_after=r.retry_after, limit=r.limit)

    def priced(self, paced: Paced, body: bytes, waiter: object = None) -> Verdict:
        """The request body is here (GraphQL): price it by its query, then admit it."""
        paced.match = self.rules.cost_for(paced.match, body)
        return self.admit(paced, waiter)

    # ------------------------------------------------------------------ 3. departure

    def departing(self, paced: Paced) -> float | Verdict:
        """At the departure time: NOW to send now, or a later (monotonic) time;
        with a piped store, a shed Verdict when its reservation's answer was one."""
        if self.piped is not None and (paced.pending or paced.refused is not None):
            if paced.pending:
                # the net timer of a step whose answer is overdue: the store answers
                # it (and every other in flight) from its fallback now
                self._deliver(self.piped.late(self.wall()))
            if paced.refused is not None:
                return paced.refused
            if paced.pending:
                return self._net()  # not overdue yet
        r = paced.reservation
        if r is None or r.sent:
            return NOW
        line = self._lines.get(paced.line) if paced.line is not None else None
        if line and line[0] is not paced:
            # not first yet (the net under a lost wake-up): nudge the first, wait on
            self._wake_first(line)
            return self.mono() + NOT_FIRST_WAIT
        return self._confirm(paced)

    def _confirm(self, paced: Paced) -> float:
        """The first in its line asks to leave: NOW, a later time, or (piped) the
        net timer while the store's answer is on its way."""
        r = paced.reservation
        assert r is not None
        wall_now = self.wall()
        if self.piped is not None:
            got = self.piped.confirm_later(paced, r, wall_now)
            if got is LATER:
                paced.pending = CONFIRM
                return self._net()
            assert not isinstance(got, Later)
            later = got
        else:
            later = self.store.confirm(r, wall_now)
        if later is not None:
            paced.due = self._head_due(paced, later)
            if log.isEnabledFor(DEBUG):
                self._debug_waits_again(paced, later - wall_now)
            return paced.due
        self._sent(paced)
        return NOW

    # ------------------------------------------------------------------ answers that came later

    def _net(self) -> float:
        """How long a held request waits for a piped store's answer before it
        asks the store to answer from its fallback (monotonic)."""
        assert self.piped is not None
        return self.mono() + self.piped.timeout

    def _deliver(self, answers: list[LateAnswer]) -> None:
        """A piped store's answers: each request they were for takes its next step."""
        for token, kind, got in answers:
            paced = token
            assert isinstance(paced, Paced)
            paced.pending = ""
            if kind == RESERVE:
                self._reserved(paced, got)
            elif kind == CONFIRM:
                self._confirmed(paced, got)

    def _reserved(self, paced: Paced, got: object) -> None:
        m = paced.match
        if paced.left:
            if isinstance(got, Reservation):
                paced.reservation = got
                self._give_back(got)
                self._buckets_moved(got.keys)
            return
        if isinstance(got, StoreFull):
            refused: Verdict | None = self._no_room(m, got)
        elif isinstance(got, Shed):
            refused = self._shed(m, paced, got)
        elif paced.blocked_until:
            # the new place of a request sent again after the server's refusal:
            # it goes once the server's block is over
            assert isinstance(got, Reservation)
            self._placed_again(paced, got)
            until, paced.blocked_until = paced.blocked_until, 0.0
            if until > self.wall():
                paced.due = self._to_mono(until)
                self.wake(paced.waiter, paced.due)
            else:
                self.wake(paced.waiter, self._confirm(paced))
            return
        else:
            assert isinstance(got, Reservation)
            refused = None
            paced.reservation = got
            if log.isEnabledFor(DEBUG):
                line = self._lines.get(paced.line) if paced.line is not None else None
                self._debug_reserved(paced, got, line.index(paced) if line else 0)
        waiter = paced.waiter
        if refused is not None:
            paced.refused = refused
            self._leave_line(paced)  # the next one is woken if it was first
            self.wake(waiter, NOW)
            return
        line = self._lines.get(paced.line) if paced.line is not None else None
        if line and line[0] is paced:
            self.wake(waiter, self._confirm(paced))
        else:
            self.wake(waiter, self.mono() + NOT_FIRST_WAIT)

    def _confirmed(self, paced: Paced, later: object) -> None:
        r = paced.reservation
        assert r is not None and (later is None or isinstance(later, float))
        if paced.left:
            if r.sent:
                self.counters["landed_unanswered"] += 1
                self.store.landed(r, self.wall())
            else:
                self._give_back(r)
                self._buckets_moved(r.keys)
            return
        waiter = paced.waiter
        if later is None:
            self._sent(paced)
            self.wake(waiter, NOW)
        elif paced.ask_again:
            # its line moved while the confirm was on its way: it asks again now
            paced.ask_again = False
            paced.due = self.mono()
            self.wake(waiter, NOW)
        else:
            paced.due = self._head_due(paced, later)
            if log.isEnabledFor(DEBUG):
                self._debug_waits_again(paced, later - self.wall())
            self.wake(waiter, paced.due)

    def _sent(self, paced: Paced) -> None:
        """It leaves now: out of its line, and the next one is woken."""
        paced.sent_at = self.mono()
        if self._carries:
            self._flying[id(paced)] = paced
        if log.isEnabledFor(DEBUG):
            m = paced.match
            log.debug(
                "departs for %s after %.1f ms",
                m.label,
                paced.waited() * 1000,
                extra={
                    "rule": m.rule.id,
                    "account": m.account,
                    "cost": paced.reservation.cost if paced.reservation else m.cost,
                    "wait_ms": round(paced.waited() * 1000, 3),
                    "retried": paced.retried,
                },
            )
        if paced.due:
            # how late the loop's timer let it go: the scheduler's own precision
            self._lateness[self._late_n % len(self._lateness)] = paced.sent_at - paced.due
            self._late_n += 1
        self._leave_line(paced)

    # ------------------------------------------------------------------ the line

    def _open_line(self, keys: tuple[str, ...]) -> deque[Paced]:
        """The line of an account (made empty if it has none)."""
        line = self._lines.get(keys)
        if line is None:
            line = self._lines[keys] = deque()
            for key in keys:
                self._lines_of.setdefault(key, set()).add(keys)
        return line

    def _close_line(self, keys: tuple[str, ...]) -> None:
        """An account's line is empty: forget it."""
        del self._lines[keys]
        for key in keys:
            lines = self._lines_of.get(key)
            if lines is not None:
                lines.discard(keys)
                if not lines:
                    del self._lines_of[key]

    def _leave_line(self, paced: Paced) -> None:
        """Take a request out of its line (sent, or its client left)."""
        key = paced.line
        paced.line = None
        paced.waiter = None
        if key is None:
            return
        line = self._lines.get(key)
        if not line:
            return
        if line[0] is paced:
            line.popleft()
            self._wake_first(line, key)
        else:
            paced.gone = True  # dropped when it reaches the front: O(1) now

    def _wake_first(self, line: deque[Paced], key: tuple[str, ...] | None = None) -> None:
        """Whoever is first in ``line`` now leaves as soon as the bucket holds it."""
        while line and line[0].gone:
            line.popleft()
        if not line:
            if key is not None:
                self._close_line(key)
            return
        first = line[0]
        if first.pending:
            return  # its answer is on its way: that decides
        if self.piped is not None:
            # its departure asks to leave (one round trip: the confirm answers
            # a later time when the bucket does not hold it yet)
            first.due = self.mono()
            self.wake(first.waiter, NOW)
            return
        first.due = self._earliest(first)
        self.wake(first.waiter, first.due)

    def _earliest(self, first: Paced) -> float:
        """When the first in its line may leave (monotonic): the store's word, or now."""
        r = first.reservation
        assert r is not None
        wall_now = self.wall()
        t = self.store.earliest(r, wall_now)
        return self._head_due(first, t) if t > wall_now else self.mono()

    def _head_due(self, head: Paced, wall_time: float) -> float:
        """A line's head's departure (monotonic) for the store's earliest time.

        A store whose other users' refunds are not announced here (Redis, for
        another machine's) says how often a head should ask again
        (``recheck``), for the accounts whose answers give points back (a rule
        that reads the cost from the body: GraphQL): the head goes when the
        account has room, not at a time planned before another machine's
        refund. Other accounts' lines move only when a client leaves, and
        asking for them would cost a round trip per head every ``recheck``.
        """
        due = self._to_mono(wall_time)
        if self.store.recheck and head.match.body_needed:
            due = min(due, self.mono() + self.store.recheck)
        return due

    def _buckets_moved(self, keys: tuple[str, ...] | list[str]) -> None:
        """Room came back on these bucket keys (a refund, a place given back, here
        or in another worker): every line using one of them may move up."""
        lines: set[tuple[str, ...]] = set()
        for key in keys:
            lines.update(self._lines_of.get(key, ()))
        for line in lines:
            self._line_moved(line)

    def quota_moved(self) -> None:
        """The store's fd became readable: answers came (a piped store), or
        other workers gave room back."""
        if self.piped is not None:
            self._deliver(self.piped.answers(self.wall()))
        keys = self.store.moved()
        if not keys:
            return
        if EVERY_LINE in keys:
            for line in list(self._lines):
                self._line_moved(line)
        else:
            self._buckets_moved(keys)

    def _line_moved(self, keys: tuple[str, ...]) -> None:
        """A refund (or more room) on ``keys``: the first in line goes sooner if it can."""
        line = self._lines.get(keys)
        if not line or line[0].gone:
            return
        first = line[0]
        if first.pending:
            # its answer is on its way and may be older than this move
            first.ask_again = True
            return
        if self.piped is not None:
            self.counters["woken_early"] += 1
            first.due = self.mono()
            self.wake(first.waiter, NOW)
            return
        due = self._earliest(first)
        if due < first.due - 1e-6:
            first.due = due
            self.counters["woken_early"] += 1
            self.wake(first.waiter, due)

    def lateness(self) -> dict[str, float]:
        """Held requests' departure after their scheduled time: p50 and p99 in ms (recent)."""
        n = min(self._late_n, len(self._lateness))
        if not n:
            return {"departures_timed": 0}
        late = sorted(self._lateness[:n])
        return {
            "departures_timed": self._late_n,
            "late_ms_p50": round(late[n // 2] * 1000, 3),
            "late_ms_p99": round(late[min(n - 1, (n * 99) // 100)] * 1000, 3),
        }

    # ------------------------------------------------------------------ 4. the answer

    def answered(
        self,
        paced: Paced,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        waiter: object = None,
    ) -> float:
        """Learn from a response; return a monotonic time to send it again, or NOW (not again).

        Called with the head (``body`` None) and, for rules that read bodies,
        once more with the body at the end. ``waiter`` is what :attr:`wake` is
        called with if it is sent again and its departure moves.
        """
        m = paced.match
        report = self.rules.read_response(m, status, headers, body)
        self.rules.learn(m, report)
        wall_now = self.wall()
        seen_at = self._view_time(paced, wall_now)
        r = paced.reservation
        if self._carries:
            self._flying.pop(id(paced), None)
        if r is not None and r.sent and not r.landed:
            # the server has counted it: its units restore from here on
            self.store.landed(r, seen_at)
        if paced.carried is not None:
            self.store.landed(paced.carried, seen_at)  # and where the local share held them
            paced.carried = None
        views = list(report.views)
        # The refund first, then the server's view: the view already holds this
        # request's refund, so taking the view first and refunding after would
        # give the same points back twice whenever the view is the more
        # pessimistic clock (outside traffic), and miss outside traffic when
        # it is not.
        refunded = False
        if report.actual_cost is not None:
            paced.actual = report.actual_cost
        if r is not None and report.actual_cost is not None:
            actual = report.actual_cost
            actuals = tuple(
                actual if not m.counting or m.counting[k] is None else c
                for k, c in enumerate(r.costs)
            )
            self.store.settle(r, actuals, wall_now)
            refunded = any(a < c for a, c in zip(actuals, r.costs, strict=True))
            if refunded and log.isEnabledFor(DEBUG):
                log.debug(
                    "refund for %s: reserved %g, cost %g",
                    m.label,
                    r.cost,
                    actual,
                    extra={
                        "rule": m.rule.id,
                        "account": m.account,
                        "cost": r.cost,
                        "actual_cost": actual,
                        "refund": r.cost - actual,
                    },
                )
        if views:
            self._learn(m, views, {v.limit: v.rate for v in views if v.rate})
            self.store.observe(m.keys, self.limits(m), views, seen_at, self._drift(m))
            told = tightest(views)
            if told is not None:
                self.metrics.reported(m.rule.id, m.account, *told, wall_now)
        if not report.throttled:
            if refunded:
                self._buckets_moved(m.keys)
            return NOW
        if body is None and paced.match.body_needed:
            # the rule reads this answer's body too, and only the body tells a
            # refusal of the account's bucket from one of a resource (Shopify's
            # THROTTLED against a 429 without it): one refusal, decided then
            return NOW
        if report.resource_throttle:
            # a limit on one resource (Shopify's new variants a day), not the
            # account's bucket: the client hears it; pacing cannot help
            self.counters["resource_throttled"] += 1
            log.warning(
                "a resource limit refused a request for %s (%s)",
                m.label,
                status,
                extra=self._refusal(m, status, headers, report.retry_after),
            )
            return NOW
        self.counters["server_throttled"] += 1
        self.metrics.throttled(m.rule.id, "429" if status == 429 else "THROTTLED")
        until = self.store.throttled(m.keys, self.limits(m), wall_now, report.retry_after)
        log.warning(
            "the server refused a request for %s (%s%s); holding the account until %.1f s from now",
            m.label,
            status,
            f", Retry-After {report.retry_after:g}" if report.retry_after is not None else "",
            until - wall_now,
            extra=self._refusal(m, status, headers, report.retry_after),
        )
        if (
            self.retry_idempotent
            and not paced.retried
            and body is None
            and paced.method in IDEMPOTENT_METHODS
            and m.retry_safe
        ):
            return self._send_again(paced, until, wall_now, waiter)
        return NOW

    def _send_again(self, paced: Paced, until: float, wall_now: float, waiter: object) -> float:
        """A refused request that is safe to send again takes a new place at the
        head of its line, to leave once the server's block (``until``, wall
        time) is over: its departure (monotonic), or NOW when there is no place
        (the client hears the refusal). With a piped store (Redis) the place is
        asked for without waiting: the request is held on the net timer and
        :meth:`_reserved` places it when the answer comes."""
        m = paced.match
        try:
            if self.piped is not None:
                got = self.piped.reserve_later(
                    paced, m.keys, self.limits(m), m.costs, wall_now, MAX_WAIT_CEILING
                )
                if got is LATER:
                    paced.pending = RESERVE
                    self._hold_again(paced, until, waiter)
                    return self._net()
                assert not isinstance(got, Later)
                again = got
            else:
                again = self.store.reserve(
                    m.keys, self.limits(m), m.costs, wall_now, MAX_WAIT_CEILING
                )
        except StoreFull:
            return NOW  # no place to hold it again: the client hears the refusal
        if not isinstance(again, Reservation):
            return NOW
        self._hold_again(paced, until, waiter)
        self._placed_again(paced, again)
        paced.due = self._to_mono(max(self.store.earliest(again, wall_now), until))
        return paced.due

    def _hold_again(self, paced: Paced, until: float, waiter: object) -> None:
        """It came before everyone waiting now: it goes first in its line again."""
        paced.retried = True
        paced.blocked_until = until
        paced.head_at = 0.0
        paced.waiter = waiter
        self._open_line(paced.match.keys).appendleft(paced)
        paced.line = paced.match.keys
        paced.gone = False

    def _placed_again(self, paced: Paced, again: Reservation) -> None:
        """The new place of a request sent again: at the head of every worker's
        line, as it came before everyone waiting now (a position of 0 has no
        units ahead of it: units ahead = position - units out of the queue,
        never above 0)."""
        again.positions = (0.0,) * len(again.positions)
        paced.reservation = again
        self.counters["retried"] += 1

    def _drift(self, m: Match) -> LevelSeen:
        """What the store says of each bucket the server reported: how far the
        server's level is from the store's, as a fraction of the bucket
        (/metrics: elbasy_quota_drift_ratio). Outside traffic, or another app
        on the account, shows here first."""
        limits, rule, account, metrics = self.limits(m), m.rule.id, m.account, self.metrics

        def seen(k: int, server: float, ours: float) -> None:
            metrics.drift(rule, account, (server - ours) / limits[k].capacity)

        return seen

    def _refusal(
        self,
        m: Match,
        status: int,
        headers: list[tuple[bytes, bytes]],
        retry_after: float | None,
    ) -> dict[str, object]:
        """The fields of the warning for a server's refusal: its rule, account and status,
        the wait it asked for, and the rate-limit headers it sent."""
        return {
            "rule": m.rule.id,
            "account": m.account,
            "status": status,
            "retry_after": retry_after,
            "headers": limit_headers(m.rule, headers, self._rule_headers),
        }

    def _debug_reserved(
        self, paced: Paced, r: Reservation, ahead: int, wait: float | None = None
    ) -> None:
        """The debug line of a reservation: ``wait``, seconds until it may leave
        (None: not first in its line, so not known yet)."""
        m = paced.match
        log.debug(
            "reserved %g for %s, %d ahead in line",
            r.cost,
            m.label,
            ahead,
            extra={
                "rule": m.rule.id,
                "account": m.account,
                "cost": r.cost,
                "ahead": ahead,
                "wait_ms": None if wait is None else round(max(0.0, wait) * 1000, 3),
            },
        )

    def _debug_waits_again(self, paced: Paced, wait: float) -> None:
        """The debug line of a confirmation the bucket did not hold yet."""
        m = paced.match
        log.debug(
            "confirm for %s waits again, %.1f ms",
            m.label,
            max(0.0, wait) * 1000,
            extra={
                "rule": m.rule.id,
                "account": m.account,
                "cost": paced.reservation.cost if paced.reservation else m.cost,
                "wait_ms": round(max(0.0, wait) * 1000, 3),
            },
        )

    def _view_time(self, paced: Paced, wall_now: float) -> float:
        """When the numbers in this answer were the server's (wall clock): when
        its head came.

        A server reports its bucket as it stood once it had counted the
        request (Shopify's GraphQL: after the refund, at the end of the
        query), and the answer then took the way back. Dated at the head's
        arrival, the view is late by that way back, so elbasy counts a little
        less restored than the server has: pessimistic by rate × the way
        back, never optimistic. Dated at the departure, a server that kept
        the request in its queue would have restored that much less than
        elbasy counted (seen: 85 points short on a Plus shop after a burst
        from four workers); dated half an estimated round trip earlier, the
        estimate itself runs high while a burst queues every request (seen:
        7 points short).
        """
        mono_now = self.mono()
        if not paced.head_at:
            paced.head_at = mono_now
        return wall_now - (mono_now - paced.head_at)

    def wants_body(self, paced: Paced) -> int:
        """Bytes of the response body the rule reads (GraphQL cost), or 0."""
        return BODY_FEEDBACK_BYTES if paced.match.body_needed else 0

    # ------------------------------------------------------------------ 5. leaving

    def _carry_flying(self) -> None:
        """The shared store failed: every request this worker sent on it and has
        no answer for yet has its units counted in the local share too
        (FleetStore.carry), so the share does not grant them again while they
        are on their way."""
        now = self.wall()
        for paced in self._flying.values():
            r = paced.reservation
            if r is not None and paced.carried is None:
                paced.carried = self.store.carry(r, now)  # type: ignore[attr-defined]

    def abandoned(self, paced: Paced) -> None:
        """The client went away before its request left: its place goes back,
        and the line behind it moves up (the first one woken if it was first).

        Also the end of every exchange: one that was sent and got no answer
        (the upstream or the client went away mid-way) lands now, as the
        server may have counted it.
        """
        if self._carries:
            self._flying.pop(id(paced), None)
            if paced.carried is not None:
                # sent, never answered: it lands, as the server may have counted it
                self.store.landed(paced.carried, self.wall())
                paced.carried = None
        if paced.pending in (RESERVE, CONFIRM):
            # the answer on its way decides what is given back or landed
            paced.left = True
            self._leave_line(paced)
            return
        paced.left = True
        r = paced.reservation
        if r is None:
            return
        if r.sent:
            if not r.landed:
                self.counters["landed_unanswered"] += 1
                self.store.landed(r, self.wall())
            return
        # its place goes back first: whoever is woken next sees the room it left
        self._give_back(r)
        self._leave_line(paced)
        # its units left the queue: lines that share a bucket with it move up
        self._buckets_moved(r.keys)

    def _give_back(self, r: Reservation) -> None:
        """A place nobody takes goes back to the store."""
        if self.store.give_back(r, self.wall()):
            self.counters["returned"] += 1

    def waiting(self) -> int:
        """Requests in lines right now (first ones included)."""
        return sum(len(line) for line in self._lines.values())
