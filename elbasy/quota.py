"""Quota: reservations on each account's clocks, confirmed at departure.

The arithmetic of docs/design.md §3, as plain Python over a clock passed in (seconds
on one time base; tests inject it). One call is one atomic step over every
limit of an account, so a shared-memory or Redis store can implement the same
:class:`QuotaStore` interface with one CAS or one Lua script.

Each bucket (one limit of one account, named by its key: the rule, the limit
and the account parts in the limit's scope) keeps two views:

* the **sent clock** — what has actually left, merged (pessimistically and
  monotonically) with what the server says it has counted, so traffic
  elbasy never saw is accounted for;
* the **queue** — the units of every request given a place in line and not
  sent yet. A newcomer stands behind all of them (the reservation clock is
  the sent clock plus the queue); one that leaves the line, sent or given
  back, takes exactly its units out.

A request takes a place in line (its estimate stands behind everything
queued: what the max wait is checked against), waits for its turn, and at
departure is confirmed against the sent clock; if the server's view moved
in the meantime it waits again, keeping its turn. The order of each line
is the pacer's (``elbasy.pacing``): only its head asks :meth:`LocalStore.earliest`,
so the line moves as soon as the bucket holds the head's cost, whatever
was planned at arrival; a refund or a place given back moves it at once.
Three kinds of limit:

``bucket``  GCRA: a leaky (or token) bucket of ``capacity`` restored at
            ``rate`` per second is one number, the theoretical arrival time
            (the sent clock); the level at time t is ``(sent - t) * rate``.
``window``  fixed windows aligned to the epoch (Etsy's second): a count per
            window. A request never departs in the last ``guard`` seconds of
            a window, where the server could count it in the next one.
``rolling`` a window of ``sub_buckets`` fixed sub-windows (Etsy's day of
            twelve two-hour blocks): a count per sub-window.

Safety: a bucket keeps ``headroom`` units free (two by default, more when
``jitter`` seconds of its rate are more: one absorbs the server's rounding,
the other outside traffic that arrives between two of its answers) and runs
at ``1 - margin`` of its rate. Windows count exactly and use the guard above.

Arrival order across workers. A bucket also counts the units ever queued
(``enq``) and ever out of the queue, sent or given back (``deq``); a
reservation keeps its position (``enq`` before its own units). When it heads
its line it stands behind the units still ahead of it,
``max(0, min(pos - deq, queued - own))``: nothing in one process (the head of
a line has everything before it gone), and the ones of other workers that
came first when several workers share the bucket (``elbasy.shm``).

Bounds every store keeps (so the shared-memory store gives the same results
on the same inputs): a window limit holds the counts of at most
:data:`WINDOW_SLOTS` windows (or sub-windows) at once, a window ``j`` in
place ``j mod WINDOW_SLOTS``. A booking whose window cannot take a place (one
:data:`WINDOW_SLOTS` windows apart still counts) is skipped, and a search
that visits :data:`WINDOW_SLOTS` windows without finding room sheds the
request (Retry-After: the first window it did not look at).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from elbasy.limits import BUCKET, ROLLING, WINDOW, Limit, ServerView

#: how many rounds a multi-limit reservation may take to agree on one time
_ROUNDS = 32
#: a reservation this close to a time counts as at it (float noise)
_EPS = 1e-9
#: windows (or sub-windows) a window limit counts at once: Etsy's day of twelve
#: two-hour blocks and one booking a day ahead; a fixed window of 1 s can book
#: 12 s ahead. The shared-memory table holds exactly this many (ext/c/elbasy_shm.h).
WINDOW_SLOTS = 13
#: facts (learned hints: plans per bucket, tiers per account, GraphQL shape
#: costs) one process keeps, least recently used dropped first
FACTS = 200_000


class StoreFull(RuntimeError):
    """The store has no room for a new bucket: every one it holds is in use.

    Only a fixed-capacity store raises it (``elbasy.shm``); the policy answers 503.
    """


@dataclass(frozen=True, slots=True)
class Safety:
    """How far below the server's limits elbasy aims (see the module docstring)."""

    margin: float = 0.01  # fraction of a bucket's rate left unused
    headroom: float = 2.0  # units a bucket always keeps free
    jitter: float = 0.05  # seconds of network jitter a bucket's headroom absorbs
    guard: float = 0.02  # seconds at the end of a fixed window no request departs in

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1:
            raise ValueError("margin must be in [0, 1)")
        if self.headroom < 0 or self.jitter < 0 or self.guard < 0:
            raise ValueError("headroom, jitter and guard must be >= 0")


@dataclass(slots=True)
class Reservation:
    """A request's place in line on every limit of its account."""

    keys: tuple[str, ...]  # the bucket key of each limit
    limits: tuple[Limit, ...]
    costs: tuple[float, ...]  # per limit: the units it takes there
    depart: float  # when it would leave behind everything queued (the caller's clock)
    # per limit: bucket: the units it queued; window/rolling: the slot index it booked
    # (a tuple: a queued request is kept by the hundred thousand, and rebuilt
    # only when a window booking moves)
    slots: tuple[float, ...] = ()
    # per limit: bucket: its place in line (the units queued before it); else 0
    positions: tuple[float, ...] = ()
    sent: bool = False
    landed: bool = False  # sent, and its answer came (or its exchange ended)
    returned: bool = False  # its place was given back (the client left)
    # made by a fleet store's local share (elbasy.fleet_store) while its shared
    # store was unreachable: every later step on it goes to that share
    fallback: bool = False

    @property
    def cost(self) -> float:
        """What it takes on its first limit (on every limit, for most rules)."""
        return self.costs[0] if self.costs else 0.0


@dataclass(frozen=True, slots=True)
class Shed:
    """No departure within the wait allowed: try again after ``retry_after`` seconds."""

    retry_after: float
    limit: str  # the limit that is furthest out


class Facts(Protocol):
    """What servers taught elbasy, by name, as two numbers: a bucket's plan
    (capacity, rate), an account's tier, a GraphQL shape's cost. Every store
    keeps them (shared where the store is), so workers agree."""

    def fact(self, name: str) -> tuple[float, float] | None: ...

    def put_fact(self, name: str, a: float, b: float) -> bool: ...

    @property
    def facts_generation(self) -> int: ...


class LocalFacts:
    """Facts in this process's memory: a bounded LRU (see :data:`FACTS`)."""

    def __init__(self) -> None:
        self._facts: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.facts_generation = 0  # moves whenever a fact changes

    def fact(self, name: str) -> tuple[float, float] | None:
        got = self._facts.get(name)
        if got is not None:
            self._facts.move_to_end(name)
        return got

    def put_fact(self, name: str, a: float, b: float) -> bool:
        value = (float(a), float(b))
        if self._facts.get(name) == value:
            self._facts.move_to_end(name)
            return False
        self._facts[name] = value
        self._facts.move_to_end(name)
        if len(self._facts) > FACTS:
            self._facts.popitem(last=False)
        self.facts_generation += 1
        return True


class QuotaStore(Facts, Protocol):
    """Where accounts' clocks live: one process, shared memory, or Redis."""

    def reserve(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        cost: float | Sequence[float],
        now: float,
        max_wait: float,
    ) -> Reservation | Shed: ...

    def earliest(self, r: Reservation, now: float) -> float: ...

    def confirm(self, r: Reservation, now: float) -> float | None: ...

    def observe(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        views: Sequence[ServerView],
        now: float,
        seen: LevelSeen | None = None,
    ) -> None: ...

    def throttled(
        self, keys: Sequence[str], limits: Sequence[Limit], now: float, retry_after: float | None
    ) -> float: ...

    def landed(self, r: Reservation, now: float) -> None: ...

    def give_back(self, r: Reservation, now: float) -> bool: ...

    def settle(self, r: Reservation, actual: float | Sequence[float], now: float) -> None: ...

    def fileno(self) -> int: ...

    def moved(self) -> list[str]: ...

    #: seconds between a waiting line's head asking again, for a store that
    #: cannot announce other users' refunds (moved); 0: it announces them
    recheck: float

    def stats(self) -> dict[str, int | str]: ...


#: what :meth:`QuotaStore.moved` returns when it lost track: re-check every line
EVERY_LINE = "*"


class Later:
    """What a store that answers later (:class:`PipedQuotaStore`) returns for a
    step it sent: the answer comes from its ``answers``."""

    def __repr__(self) -> str:
        return "LATER"


LATER = Later()

#: the steps whose answer a :class:`PipedQuotaStore` may give later, as it names them
RESERVE, CONFIRM, EARLIEST = "reserve", "confirm", "earliest"

#: one answer that came later: (the caller's token, the step, its result),
#: the result as the blocking step returns it, or a StoreFull for a reserve
LateAnswer = tuple[object, str, object]

#: What ``observe`` tells of each bucket a server's view named: (limit index,
#: the server's level, the store's level just before the view merged), both in
#: units. The pacer turns it into /metrics' drift. A store across a network
#: tells it when the step's answer comes back; when it cannot reach its
#: shared copy it tells nothing (a local share is not what the server counts).
LevelSeen = Callable[[int, float, float], None]


class PipedQuotaStore(QuotaStore, Protocol):
    """A store whose server is across a network (Redis): the three steps whose
    answer decides a departure are sent and answered later, so the loop never
    waits on them (elbasy.piped_store). Its fd is readable when answers came;
    its other steps never wait for an answer."""

    #: True: the pacer uses the ``*_later`` steps
    piped: bool
    #: seconds an answer may take before the store answers from elsewhere
    timeout: float

    def reserve_later(
        self,
        token: object,
        keys: Sequence[str],
        limits: Sequence[Limit],
        cost: float | Sequence[float],
        now: float,
        max_wait: float,
    ) -> Reservation | Shed | Later: ...

    def confirm_later(self, token: object, r: Reservation, now: float) -> float | None | Later: ...

    def earliest_later(self, token: object, r: Reservation, now: float) -> float | Later: ...

    def answers(self, now: float) -> list[LateAnswer]:
        """The answers that came (call when the fd is readable). Never blocks."""

    def late(self, now: float) -> list[LateAnswer]:
        """Called when an answer is overdue: past the timeout, every step still
        unanswered is answered from elsewhere (the fallback), here."""


# --------------------------------------------------------------------------- per-limit state


class _State:
    """The clocks of one (account, limit)."""

    __slots__ = (
        "queued",
        "flying",
        "sent",
        "interval",
        "blocked",
        "enq",
        "deq",
        "reserved",
        "departed",
        "extra",
    )

    def __init__(self) -> None:
        self.queued = 0.0  # bucket: units in line, not sent yet
        # bucket: units sent whose answer has not come. They take room and do
        # not restore: a server counts a request when it arrives, and a bucket
        # that is full then has restored nothing for it while it travelled
        self.flying = 0.0
        self.enq = 0.0  # bucket: units ever queued
        self.deq = 0.0  # bucket: units ever out of the queue (sent or given back)
        self.sent = 0.0  # bucket: sent clock (with the server's view)
        self.interval = 0.0  # bucket: seconds per unit the clocks were kept in
        self.blocked = 0.0  # nothing departs before this (after a 429)
        # window/rolling, per slot index: units booked (sent or not), units that
        # left, and units the server counted beyond ours (outside traffic)
        self.reserved: dict[int, float] = {}
        self.departed: dict[int, float] = {}
        self.extra: dict[int, float] = {}

    def booked(self) -> dict[int, float]:
        """Per slot: what a new reservation must fit beside (booked + outside)."""
        return _add(self.reserved, self.extra)

    def seen(self) -> dict[int, float]:
        """Per slot: what the server has counted or will (sent + outside)."""
        return _add(self.departed, self.extra)


def _add(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    if not b:
        return a
    out = dict(a)
    for j, v in b.items():
        out[j] = out.get(j, 0.0) + v
    return out


def _take(counts: dict[int, float], i: int, units: float) -> None:
    left = counts.get(i, 0.0) - units
    if left > _EPS:
        counts[i] = left
    else:
        counts.pop(i, None)


def _period(limit: Limit) -> float:
    """Length of one counting slot: the window, or one rolling sub-window."""
    return limit.window / (limit.sub_buckets if limit.kind == ROLLING else 1)


def _total(counts: dict[int, float], lo: int, hi: int) -> float:
    """Counts of slots lo..hi added left to right (as the C store adds them: not
    with the compensated sum() of newer Pythons)."""
    total = 0.0
    for j in range(lo, hi + 1):
        total += counts.get(j, 0.0)
    return total


def _span(limit: Limit) -> int:
    """Slots one window sums: the sub-windows of a rolling limit, else 1."""
    return limit.sub_buckets if limit.kind == ROLLING else 1


def _claim(st: _State, limit: Limit, s: int, now: float) -> bool:
    """May window ``s`` hold counts (its place ``s mod WINDOW_SLOTS`` is its own or
    free)? When it may, whatever else had the place (gone, or empty) is dropped."""
    if not _claimable(st, limit, s, now):
        return False
    for counts in (st.reserved, st.departed, st.extra):
        for j in [j for j in counts if j != s and (j - s) % WINDOW_SLOTS == 0]:
            del counts[j]
    return True


def _claimable(st: _State, limit: Limit, s: int, now: float) -> bool:
    """Could window ``s`` hold counts now (see :func:`_claim`)? Changes nothing."""
    oldest = math.floor(now / _period(limit) + _EPS) - _span(limit) + 1
    for counts in (st.reserved, st.departed, st.extra):
        for j in counts:
            if (
                j != s
                and (j - s) % WINDOW_SLOTS == 0
                and j >= oldest
                and (
                    st.reserved.get(j, 0.0) > 0
                    or st.departed.get(j, 0.0) > 0
                    or st.extra.get(j, 0.0) > 0
                )
            ):
                return False
    return True


def _ahead(st: _State, units: float, pos: float) -> float:
    """Units still queued before a reservation at ``pos`` (never more than are queued)."""
    return max(0.0, min(pos - st.deq, st.queued - units))


def derived(limit: Limit, safety: Safety) -> tuple[float, float, float, float, float]:
    """What a store's arithmetic uses of a limit: (interval, room, quota, period, guard).

    The one place these numbers are made, for every store.
    """
    if limit.kind == BUCKET:
        interval = 1.0 / (limit.rate * (1.0 - safety.margin))
        headroom = max(safety.headroom, math.ceil(limit.rate * safety.jitter - _EPS))
        return interval, max(1.0, limit.capacity - headroom), limit.capacity, 0.0, 0.0
    period = _period(limit)
    guard = safety.guard if limit.kind == WINDOW and safety.guard < period else 0.0
    return 0.0, 0.0, limit.capacity, period, guard


#: the per-limit cost tuples made so far: a queued request keeps one, and most
#: share a handful of values (1 for every REST request), so they are made once
_COSTS: dict[tuple[float, ...], tuple[float, ...]] = {}


def _per_limit(cost: float | Sequence[float], limits: Sequence[Limit]) -> tuple[float, ...]:
    """One cost for every limit, or one per limit (checked); the same tuple each time."""
    if isinstance(cost, int | float):
        costs: tuple[float, ...] = (float(cost),) * len(limits)
    else:
        costs = tuple(float(c) for c in cost)
        if len(costs) != len(limits):
            raise ValueError(f"{len(costs)} costs for {len(limits)} limits")
    known = _COSTS.get(costs)
    if known is None:
        if len(_COSTS) >= 4096:
            _COSTS.clear()
        known = _COSTS[costs] = costs
    return known


def view_entries(
    limits: Sequence[Limit], views: Sequence[ServerView], safety: Safety
) -> list[tuple[int, float | None, float | None]]:
    """What the server's views say of an account's limits, as every store's
    ``observe`` takes it: (limit index, value, reset after) per view of one.

    value: a bucket's level in units, a window's count used, None when the
    view has neither. A server counts whole requests, its continuous level
    rounded up (Shopify shows 1/40 after the first call), so a bucket's level
    is over one less than it says; the unit of headroom kept free covers
    exactly that, and nothing is lost to rounding each time outside traffic
    makes the view move the clock. reset after: seconds nothing departs (the
    limit is spent and the server says when it resets), else None.
    """
    index = {limit.name: k for k, limit in enumerate(limits)}
    entries: list[tuple[int, float | None, float | None]] = []
    for view in views:
        k = index.get(view.limit)
        if k is None:
            continue
        limit = limits[k]
        capacity = view.capacity if view.capacity else limit.capacity
        used = view.used
        if used is None and view.remaining is not None:
            used = capacity - view.remaining
        value: float | None = None
        if used is not None:
            used = max(0.0, used)
            if limit.kind == BUCKET:
                value = max(0.0, used - min(1.0, safety.headroom))
            else:
                value = float(used)
        reset: float | None = None
        if view.remaining is not None and view.remaining <= 0 and view.reset_after:
            reset = float(view.reset_after)
        entries.append((k, value, reset))
    return entries


class LocalStore:
    """Every account's clocks in this process's memory (one worker)."""

    recheck = 0.0  # nobody else moves its lines

    def __init__(self, safety: Safety | None = None) -> None:
        self.safety = safety or Safety()
        self._states: dict[tuple[str, str], _State] = {}
        self._facts = LocalFacts()

    # ------------------------------------------------------------------ arithmetic

    def _state(self, bucket: str, limit: Limit, now: float) -> _State:
        key = (bucket, limit.name)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _State()
        if limit.kind == BUCKET:
            interval = self._interval(limit)
            if st.interval != interval:
                # a plan learned (or changed): the bucket keeps its level in units
                if st.interval:
                    scale = interval / st.interval
                    st.sent = now + max(0.0, st.sent - now) * scale
                st.interval = interval
        return st

    def _interval(self, limit: Limit) -> float:
        """Seconds one unit occupies a bucket, at the rate elbasy aims for."""
        return 1.0 / (limit.rate * (1.0 - self.safety.margin))

    def _room(self, limit: Limit) -> float:
        """Units of a bucket elbasy lets itself fill."""
        headroom = max(self.safety.headroom, math.ceil(limit.rate * self.safety.jitter - _EPS))
        return max(1.0, limit.capacity - headroom)

    def _quota(self, limit: Limit) -> float:
        """Units per window (or rolling window) elbasy lets itself use: all of them.

        Window counts are exact (no rate to drift against), and the guard at a
        window's end keeps departures and the server's count in one window.
        """
        return limit.capacity

    def _bucket_earliest(self, limit: Limit, clock: float, cost: float, t: float) -> float:
        """Earliest time >= t a bucket whose clock reads ``clock`` takes ``cost`` units."""
        interval = self._interval(limit)
        cost = min(cost, self._room(limit))
        return max(t, clock + (cost - self._room(limit)) * interval)

    def _window_earliest(
        self, st: _State, limit: Limit, cost: float, t: float, now: float, counts: dict[int, float]
    ) -> tuple[float, bool]:
        """Earliest time >= t when ``cost`` more units fit (window or rolling): (time, found).

        For a rolling limit the units must fit in every rolling window that
        will hold their slot, so bookings further ahead count too. At most
        :data:`WINDOW_SLOTS` windows are visited; found is False when none
        took the units, and the time is the first window not visited.
        """
        period = _period(limit)
        room = self._quota(limit) - min(cost, self._quota(limit))
        span = _span(limit)
        guard = self.safety.guard if limit.kind == WINDOW and self.safety.guard < period else 0.0
        last = max(counts, default=0)
        for _ in range(WINDOW_SLOTS):
            i = math.floor(t / period + _EPS)
            if guard and t > (i + 1) * period - guard:
                t = (i + 1) * period
                continue
            ends = range(i, max(i, min(last, i + span - 1)) + 1)
            if _claimable(st, limit, i, now) and all(
                _total(counts, k - span + 1, k) <= room + _EPS for k in ends
            ):
                return t, True
            t = (i + 1) * period
        return t, False

    def _in_line(self, st: _State, now: float) -> float:
        """A bucket's reservation clock: the sent clock with what flies and the
        queue behind it."""
        return max(st.sent, now) + (st.flying + st.queued) * st.interval

    def _earliest(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        costs: Sequence[float],
        now: float,
        behind: Reservation | None,
    ) -> tuple[float, str, bool]:
        """The earliest time every limit takes its cost: (time, limit that set it, found).

        ``behind`` None: after everything already in line (a newcomer's
        estimate); else for that reservation at the head of its line: on what
        has been sent, and the units still ahead of its position. found is
        False when a window limit has no place for it (the time is then when
        to ask again).
        """
        t = now
        which = limits[0].name if limits else ""
        for _ in range(_ROUNDS):
            moved = False
            for k, (key, limit, cost) in enumerate(zip(keys, limits, costs, strict=True)):
                st = self._state(key, limit, now)
                start = max(t, st.blocked)
                if limit.kind == BUCKET:
                    if behind is None:
                        clock = self._in_line(st, now)
                    elif behind.positions:
                        ahead = _ahead(st, behind.slots[k], behind.positions[k])
                        clock = max(st.sent, now) + (st.flying + ahead) * st.interval
                    else:
                        clock = max(st.sent, now) + st.flying * st.interval
                    e = self._bucket_earliest(limit, clock, cost, start)
                else:
                    counts = st.booked() if behind is None else st.seen()
                    e, found = self._window_earliest(st, limit, cost, start, now, counts)
                    if not found:
                        return e, limit.name, False
                if e > t + _EPS:
                    t, which, moved = e, limit.name, True
            if not moved:
                return t, which, True
        return t, which, True  # pragma: no cover - limits that never agree

    # ------------------------------------------------------------------ the interface

    def reserve(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        cost: float | Sequence[float],
        now: float,
        max_wait: float,
    ) -> Reservation | Shed:
        """Give a request its place in line on every limit, or none at all.

        ``cost``: the units it takes, on every limit or one per limit. Its
        ``depart`` is when it would leave behind everything queued, the
        estimate the max wait is checked against; when it really may leave
        is :meth:`earliest` once it heads its line, made so by :meth:`confirm`.
        """
        costs = _per_limit(cost, limits)
        depart, which, found = self._earliest(keys, limits, costs, now, None)
        if not found or depart - now > max_wait + _EPS:
            return Shed(depart - now, which)
        slots: list[float] = []
        positions: list[float] = []
        for key, limit, c in zip(keys, limits, costs, strict=True):
            st = self._state(key, limit, now)
            if limit.kind == BUCKET:
                units = min(c, self._room(limit))
                positions.append(st.enq)
                st.enq += units
                st.queued += units
                slots.append(units)
            else:
                i = math.floor(depart / _period(limit) + _EPS)
                if _claim(st, limit, i, now):
                    st.reserved[i] = st.reserved.get(i, 0.0) + c
                slots.append(float(i))
                positions.append(0.0)
        return Reservation(
            tuple(keys), tuple(limits), costs, depart, tuple(slots), tuple(positions)
        )

    def earliest(self, r: Reservation, now: float) -> float:
        """When a request heading its line may leave: as soon as what has been
        sent (and what the server reported) leaves room for it; ``now`` at once."""
        if r.sent:
            return now
        return self._earliest(r.keys, r.limits, r.costs, now, r)[0]

    def confirm(self, r: Reservation, now: float) -> float | None:
        """At departure: None to send now, or the later time the server's view asks for.

        Checked against the sent clock; a request that must wait again keeps
        its place and is asked again at the returned time.
        """
        if r.sent:
            return None
        t = self.earliest(r, now)
        if t > now + _EPS:
            return t
        for k, limit in enumerate(r.limits):
            st = self._state(r.keys[k], limit, now)
            c = r.costs[k]
            if limit.kind == BUCKET:
                units = r.slots[k]
                st.queued = max(0.0, st.queued - units)
                st.deq += units
                st.flying += units  # restoring once it lands (landed)
            else:
                i = math.floor(now / _period(limit) + _EPS)
                if not _claim(st, limit, i, now):
                    continue  # cannot happen: earliest() found it a place
                st.departed[i] = st.departed.get(i, 0.0) + c
                booked = int(r.slots[k])
                if booked != i:
                    # it leaves in another slot than booked (a line that moved,
                    # a second wait): the booking moves along
                    _take(st.reserved, booked, c)
                    st.reserved[i] = st.reserved.get(i, 0.0) + c
                    r.slots = r.slots[:k] + (float(i),) + r.slots[k + 1 :]
        r.sent = True
        return None

    def observe(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        views: Sequence[ServerView],
        now: float,
        seen: LevelSeen | None = None,
    ) -> None:
        """Merge what the server reports (after a response arrived at ``now``).

        Pessimistic and monotone: a clock only moves forward, so traffic
        elbasy did not send (another app, a script) counts from here on.
        """
        for k, value, reset in view_entries(limits, views, self.safety):
            limit = limits[k]
            st = self._state(keys[k], limit, now)
            if value is not None:
                if limit.kind == BUCKET:
                    interval = self._interval(limit)
                    if seen is not None:
                        seen(k, value, max(0.0, st.sent - now) / interval + st.flying)
                    # the level the server reports, as this bucket's clock;
                    # what flies is in the server's count, or soon will be
                    clock = now + (value - st.flying) * interval
                    if clock > st.sent:
                        st.sent = clock
                else:
                    # outside traffic: what the server counted beyond what left from here
                    i = math.floor(now / _period(limit) + _EPS)
                    ours = _total(st.seen(), i - _span(limit) + 1, i)
                    if value > ours + _EPS and _claim(st, limit, i, now):
                        st.extra[i] = st.extra.get(i, 0.0) + (value - ours)
            if reset is not None:
                st.blocked = max(st.blocked, now + reset)

    def throttled(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        now: float,
        retry_after: float | None,
    ) -> float:
        """The server refused (429 or a body marker): hold the account past its word.

        ``Retry-After`` is taken as approximate: every limit is treated as
        full now, and nothing departs before ``retry_after`` has passed.
        Returns the earliest time a request may depart again.
        """
        until = now + (retry_after if retry_after and retry_after > 0 else 0.0)
        for key, limit in zip(keys, limits, strict=True):
            st = self._state(key, limit, now)
            st.blocked = max(st.blocked, until)
            if limit.kind == BUCKET:
                full = now + max(0.0, limit.capacity - st.flying) * self._interval(limit)
                st.sent = max(st.sent, full)
            elif limit.kind == WINDOW:
                i = math.floor(now / _period(limit) + _EPS)
                seen = st.seen().get(i, 0.0)
                if seen < limit.capacity and _claim(st, limit, i, now):
                    st.extra[i] = st.extra.get(i, 0.0) + (limit.capacity - seen)
        return until

    def landed(self, r: Reservation, now: float) -> None:
        """A sent request's answer came (or its exchange ended without one): the
        server has counted it, so its units restore from ``now`` on.

        Until then they take room without restoring: counted from its
        departure instead, a request that waited for a connection, or in
        the server's own queue, while the server's bucket was full would
        have had that time of restoring counted for it, and elbasy would be
        optimistic by the rate times that time.
        """
        if not r.sent or r.landed:
            return
        r.landed = True
        for k, limit in enumerate(r.limits):
            if limit.kind != BUCKET:
                continue
            st = self._state(r.keys[k], limit, now)
            units = r.slots[k]
            st.flying = max(0.0, st.flying - units)
            st.sent = max(st.sent, now) + units * self._interval(limit)

    def give_back(self, r: Reservation, now: float) -> bool:
        """A request that never left: its place in line is returned whole.

        Its units leave the queue (and its window slot), so everything behind
        it and every newcomer stand where they would had it never come. False
        if there was nothing to give back (it was sent, or given back).
        """
        if r.sent or r.returned:
            return False
        for k, limit in enumerate(r.limits):
            st = self._state(r.keys[k], limit, now)
            if limit.kind == BUCKET:
                st.queued = max(0.0, st.queued - r.slots[k])
                st.deq += r.slots[k]
            else:
                _take(st.reserved, int(r.slots[k]), r.costs[k])
        r.returned = True
        return True

    def settle(self, r: Reservation, actual: float | Sequence[float], now: float) -> None:
        """A request cost less than reserved (GraphQL's refund): hand the difference back.

        ``actual``: what it really cost, on every limit or one per limit (a
        limit that counts requests is given its own cost: nothing back). The
        sent clock moves back by the refund (never before now): the server has
        the points again, and the first in line can use them at once.
        """
        if not r.sent:
            return
        self.landed(r, now)  # a refund comes with its answer: it has landed
        actuals = _per_limit(actual, r.limits)
        for k, limit in enumerate(r.limits):
            if limit.kind != BUCKET:
                continue
            refund = r.slots[k] - min(max(actuals[k], 0.0), r.slots[k])
            if refund <= 0:
                continue
            st = self._state(r.keys[k], limit, now)
            st.sent = max(now, st.sent - refund * self._interval(limit))

    # ------------------------------------------------------------------ facts, the line

    def fact(self, name: str) -> tuple[float, float] | None:
        """A learned fact (a plan's capacity and rate, a query shape's cost), or None."""
        return self._facts.fact(name)

    def put_fact(self, name: str, a: float, b: float) -> bool:
        """Keep a fact; True when it changed what was kept (and the generation moved)."""
        return self._facts.put_fact(name, a, b)

    @property
    def facts_generation(self) -> int:
        return self._facts.facts_generation

    def fileno(self) -> int:
        """No other worker moves this store's lines: nothing to wait on."""
        return -1

    def moved(self) -> list[str]:
        """Buckets other workers moved: none, in one process."""
        return []

    # ------------------------------------------------------------------ housekeeping

    def buckets(self) -> int:
        """How many (bucket key, limit) states are kept."""
        return len(self._states)

    def stats(self) -> dict[str, int | str]:
        """For /healthz: what this store holds."""
        return {"store": "local", "buckets": len(self._states)}
