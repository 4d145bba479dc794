"""The quota store of a fleet that keeps pacing while its Redis is down.

``--quota-store redis://...`` builds one :class:`FleetStore` per worker: a
:class:`~elbasy.quota.QuotaStore` that sends every step to the shared store
(:class:`~elbasy.redis_store.RedisStore`) and, when that store fails (Redis
unreachable, or slower than its timeout, ``--quota-redis-timeout``), answers
from a **local share** instead: a store in which every limit has ``share``
of its capacity and rate. ``--quota-store redis://`` gives every worker of a
machine one :class:`~elbasy.shm.ShmStore` on a table the supervisor made
(the machine's share) and ``share`` = 1 / ``--quota-instances``; a
:class:`~elbasy.quota.LocalStore` per worker with 1 / (instances x workers)
works too. Either way the shares of every machine add up to the API's
limit, so elbasy never fails a request because Redis is down and the fleet
together stays within each limit (the one excess possible is at the switch
itself: see below).

The rules it keeps:

* **one bounded wait**: the step that meets the failure takes at most the
  Redis timeout (redis-py's socket timeout, no retries) and is then answered
  by the local share. Until the backoff has passed, no step asks Redis again,
  so every later step is answered at local speed;
* **a reservation stays on its store**: one made by the local share is
  marked (``Reservation.fallback``) and every later step on it (earliest,
  confirm, landed, give_back, settle) goes to that share, whatever Redis
  does meanwhile; one made on Redis goes to Redis while Redis answers. A
  Redis reservation that must still wait or depart while Redis is down moves
  to the local share (a fresh place there, so its units are counted where it
  departs); a step owed to Redis that cannot be sent (landed, give_back,
  settle) is dropped and counted: its units stay in Redis until they are
  restored or expire there, which only ever makes the fleet slower, never
  faster;
* **the local share learns all along**: every server report (observe, 429)
  also goes to the local share, scaled by ``share`` (the server counts the
  whole fleet, the share is this worker's part), and learned facts (plans)
  are kept there as well; so when Redis fails the share starts from the
  account's current level and plan, not from an empty bucket. A fact Redis
  no longer has (it restarted empty) is put back from there when read;
* **reconnect with backoff**: ``backoff`` seconds after a failure (doubling
  up to ``backoff_max``), the next step PINGs Redis (bounded by the same
  timeout); on an answer every step goes to Redis again, but new
  reservations stay on the local share ``relearn`` seconds more (1 s): a
  restarted Redis starts empty, and in that time it re-learns each busy
  account's level from the servers' headers (every report reaches it), so
  it does not grant an empty bucket's burst against a full one.
  Reservations still in the local share finish there;
* **told once**: one warning when it falls back and one info line when it
  recovers, per episode; ``stats()`` counts both (``/healthz``).

At the switch itself, a worker's requests sent on Redis and not answered yet
are counted as sent in its local share (:meth:`FleetStore.carry`, told by
the pacer through ``on_fall_back``), so the share does not grant their units
again. What stays possible is an excess of at most one share per worker that
switched, from other machines' grants (and this machine's other workers'
until they switch too): counted apart until the servers' headers reach every
share, which the share's headroom and the scaled reports keep small.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from elbasy.limits import Limit, ServerView
from elbasy.quota import LevelSeen, LocalStore, QuotaStore, Reservation, Shed

__all__ = ["BACKOFF", "BACKOFF_MAX", "RELEARN", "FleetStore", "Pingable"]

log = logging.getLogger("elbasy.quota")

#: seconds before the first reconnect attempt after a failure (doubling each miss)
BACKOFF = 0.5
#: the longest wait between two reconnect attempts
BACKOFF_MAX = 10.0
#: after a recovery, seconds new reservations stay on the local share while
#: every server report reaches Redis too: a Redis that restarted empty learns
#: each busy account's level from the headers before it grants anything
RELEARN = 1.0
#: limit tuples whose scaled copies are kept; cleared when it reaches this
_REMEMBER = 100_000


class Pingable(QuotaStore, Protocol):
    """A shared store that can be asked whether it answers (RedisStore)."""

    def ping(self) -> None: ...

    def close(self) -> None: ...


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    # every Redis error (unreachable, timeout, loading, read-only replica, OOM):
    # none of them may fail a request; OSError for a socket the client did not wrap
    return (redis.exceptions.RedisError, OSError)


def _nothing() -> None:
    """FleetStore.on_fall_back until a pacer is wired in."""


def _nothing_after(shared: Pingable) -> None:
    """FleetStore.after_attempt until an owner sets one."""


#: QuotaStore.recheck while the shared store is not made (RedisStore.recheck)
_RECHECK_UNMADE = 0.5


class _Probe(threading.Thread):
    """One reconnect attempt, run here (``run``) or on a thread (``start``)."""

    def __init__(self, attempt: Callable[[], Pingable | None]) -> None:
        super().__init__(name="elbasy-redis-probe", daemon=True)
        self._attempt = attempt
        self.made: Pingable | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.made = self._attempt()
        except BaseException as exc:  # noqa: BLE001 - told to the store, which decides
            self.error = exc


class FleetStore:
    """A shared store with a local share to fall back on (the module docstring).

    ``shared`` is the shared store, or a function that makes it (called again
    at each reconnect attempt while it raises: a worker started while Redis
    is down starts on its local share). ``local`` is the fallback, an empty
    store whose limits this class scales by ``share`` (0 < share <= 1).
    """

    def __init__(
        self,
        shared: Pingable | Callable[[], Pingable],
        local: QuotaStore | None = None,
        *,
        share: float = 1.0,
        errors: tuple[type[BaseException], ...] | None = None,
        backoff: float = BACKOFF,
        backoff_max: float = BACKOFF_MAX,
        relearn: float = RELEARN,
        mono: Callable[[], float] = time.monotonic,
        name: str = "Redis",
    ) -> None:
        if not (0 < share <= 1):
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        if not (0 < backoff <= backoff_max and math.isfinite(backoff_max)):
            raise ValueError("backoff must be > 0 and at most backoff_max (finite)")
        self.local: QuotaStore = local if local is not None else LocalStore()
        self.share = float(share)
        self.errors = errors if errors is not None else _redis_errors()
        self.backoff = backoff
        self.backoff_max = backoff_max
        if not (relearn >= 0 and math.isfinite(relearn)):
            raise ValueError("relearn must be a finite number of seconds >= 0")
        self.relearn = relearn
        self._recheck: float | None = None  # set: overrides the shared store's
        self._relearn_until = -math.inf
        self.name = name
        self._mono = mono
        self._scaled_limits: dict[tuple[Limit, ...], tuple[Limit, ...]] = {}
        self._wait = backoff  # the backoff after the next failed attempt
        self._retry_at = -math.inf
        self._down_since = 0.0
        self.down = False
        # facts_generation: moves whenever the answering store's moves, or it changes
        self._generation = 0
        self._gen_seen: tuple[bool, int] | None = None
        self.fallbacks = 0  # times it fell back to the local share
        self.recoveries = 0  # times the shared store answered again
        self.local_steps = 0  # steps the local share answered instead
        self.moved_to_local = 0  # shared reservations that had to depart locally
        self.carried = 0  # shared reservations in flight whose units the local share held
        self.dropped = 0  # steps owed to the shared store it could not be sent
        self.attempts = 0  # reconnect attempts
        self.last_error = ""
        self.shared: Pingable | None = None
        self._make: Callable[[], Pingable] | None = None
        #: reconnect attempts run on a thread, never in a step (elbasy.piped_store)
        self.probe_aside = False
        #: called with the shared store after each reconnect attempt it answered,
        #: where the attempt runs (its thread when probe_aside): what its owner
        #: must find before using it again (elbasy.piped_store: addresses). An
        #: error it raises fails the attempt.
        self.after_attempt: Callable[[Pingable], None] = _nothing_after
        #: called when it falls back: the pacer has the local share count the
        #: units of its requests in flight on the shared store (carry)
        self.on_fall_back: Callable[[], None] = _nothing
        self._probe: _Probe | None = None
        if callable(shared) and not hasattr(shared, "reserve"):
            self._make = shared
            try:
                self.shared = shared()
            except self.errors as exc:
                self._fail(exc)
        else:
            self.shared = shared  # type: ignore[assignment]

    # ------------------------------------------------------------------ which store

    def _fail(self, exc: BaseException) -> None:
        """The shared store failed: fall back (once told), or back off further."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        now = self._mono()
        if not self.down:
            self.down = True
            self.fallbacks += 1
            self._down_since = now
            self._wait = self.backoff
            log.warning(
                "quota store %s unreachable (%s): each account now gets a local share of "
                "%.4g of its capacity and rate until it answers again",
                self.name,
                self.last_error,
                self.share,
            )
            self.on_fall_back()
        else:
            log.debug("quota store %s still unreachable: %s", self.name, self.last_error)
        self._retry_at = now + self._wait
        self._wait = min(self._wait * 2, self.backoff_max)

    def _up(self) -> Pingable | None:
        """The shared store if it may be asked now, else None (asks it again lazily,
        once the backoff has passed: one bounded PING or connect, on a thread of
        its own when ``probe_aside``, answered at a later call)."""
        if not self.down:
            return self.shared
        probe = self._probe
        if probe is None:
            if self._mono() < self._retry_at:
                return None
            self.attempts += 1
            probe = _Probe(self._attempt)
            if self.probe_aside:
                self._probe = probe
                probe.start()
                return None
            probe.run()
        elif probe.is_alive():
            return None
        self._probe = None
        if probe.error is not None:
            if not isinstance(probe.error, self.errors):
                raise probe.error  # not Redis failing: a fault of ours, not to be hidden
            self._fail(probe.error)
            return None
        if probe.made is not None:
            self.shared = probe.made
        self.down = False
        self.recoveries += 1
        self._relearn_until = self._mono() + self.relearn
        log.info(
            "quota store %s answers again after %.1f s: new reservations are shared again",
            self.name,
            self._mono() - self._down_since,
        )
        return self.shared

    def shared_now(self, *, new: bool = False) -> Pingable | None:
        """The shared store when a step may go to it now, or None: the local
        share answers. ``new``: for a new reservation, which stays on the local
        share while a recovered store relearns (the module docstring)."""
        store = self._up()
        if store is not None and new and self._mono() < self._relearn_until:
            return None
        return store

    def fail(self, exc: BaseException) -> None:
        """A step on the shared store failed elsewhere (elbasy.piped_store's own
        socket): fall back as if one of this class's calls had."""
        self._fail(exc)

    def _attempt(self) -> Pingable | None:
        """One reconnect attempt: the store made (None: the one there answered PING)."""
        if self.shared is None:
            assert self._make is not None
            made = self._make()
            self.after_attempt(made)
            return made
        self.shared.ping()
        self.after_attempt(self.shared)
        return None

    def _scaled(self, limits: Sequence[Limit]) -> tuple[Limit, ...]:
        """The limits of the local share: ``share`` of each capacity and rate."""
        value = tuple(limits)
        if self.share == 1.0:
            return value
        got = self._scaled_limits.get(value)
        if got is None:
            if len(self._scaled_limits) >= _REMEMBER:
                self._scaled_limits.clear()
            got = self._scaled_limits[value] = tuple(
                dataclasses.replace(
                    limit, capacity=limit.capacity * self.share, rate=limit.rate * self.share
                )
                for limit in value
            )
        return got

    def _scaled_views(self, views: Sequence[ServerView]) -> list[ServerView]:
        if self.share == 1.0:
            return list(views)
        s = self.share
        return [
            dataclasses.replace(
                v,
                used=None if v.used is None else v.used * s,
                remaining=None if v.remaining is None else v.remaining * s,
                capacity=None if v.capacity is None else v.capacity * s,
                rate=None if v.rate is None else v.rate * s,
            )
            for v in views
        ]

    def _local_reserve(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        cost: float | Sequence[float],
        now: float,
        max_wait: float,
    ) -> Reservation | Shed:
        self.local_steps += 1
        got = self.local.reserve(keys, self._scaled(limits), cost, now, max_wait)
        if isinstance(got, Reservation):
            got.fallback = True
        return got

    def carry(self, r: Reservation, now: float) -> Reservation | None:
        """A shared reservation sent and not answered when the shared store
        failed: its units are out (the server counts them when it answers),
        but the local share never granted them and would grant them again. The
        local share counts them as sent too, a reservation of its own that its
        owner lands when the answer comes, as it lands ``r``. None: nothing to
        carry, or the share has no room for them by its count (it counts them
        already, from the servers' reports: nothing is held twice)."""
        if r.fallback or r.landed or not r.limits:
            return None
        held = self._local_reserve(r.keys, r.limits, r.costs, now, math.inf)
        if not isinstance(held, Reservation):
            return None
        if self.local.confirm(held, now) is not None:
            self.local.give_back(held, now)
            return None
        self.carried += 1
        return held

    def _move(self, r: Reservation, now: float) -> float | None:
        """A shared reservation that must wait or depart while the shared store
        is down takes a fresh place in the local share (r becomes that one's).
        None when it moved; else when to ask again (no window had room)."""
        fresh = self._local_reserve(r.keys, r.limits, r.costs, now, math.inf)
        if isinstance(fresh, Shed):
            return now + max(fresh.retry_after, 0.0)
        self.moved_to_local += 1  # its place in the shared line stays until it expires there
        r.limits, r.slots, r.positions = fresh.limits, fresh.slots, fresh.positions
        r.depart, r.fallback = fresh.depart, True
        return None

    # ------------------------------------------------------------------ the interface

    def reserve(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        cost: float | Sequence[float],
        now: float,
        max_wait: float,
    ) -> Reservation | Shed:
        store = self.shared_now(new=True)
        if store is not None:
            try:
                return store.reserve(keys, limits, cost, now, max_wait)
            except self.errors as exc:
                self._fail(exc)
        return self._local_reserve(keys, limits, cost, now, max_wait)

    def earliest(self, r: Reservation, now: float) -> float:
        if r.fallback or r.sent:
            return self.local.earliest(r, now)
        store = self._up()
        if store is not None:
            try:
                return store.earliest(r, now)
            except self.errors as exc:
                self._fail(exc)
        later = self._move(r, now)
        return later if later is not None else self.local.earliest(r, now)

    def confirm(self, r: Reservation, now: float) -> float | None:
        if r.sent:
            return None
        if r.fallback:
            self.local_steps += 1
            return self.local.confirm(r, now)
        store = self._up()
        if store is not None:
            try:
                return store.confirm(r, now)
            except self.errors as exc:
                self._fail(exc)
        later = self._move(r, now)
        if later is not None:
            return later
        self.local_steps += 1
        return self.local.confirm(r, now)

    def _owed(self, r: Reservation, step: Callable[[QuotaStore], Any]) -> bool:
        """Send a step on a shared reservation to the shared store; False when it
        could not be (the step is dropped: see the module docstring)."""
        store = self._up()
        if store is not None:
            try:
                step(store)
                return True
            except self.errors as exc:
                self._fail(exc)
        self.dropped += 1
        return False

    def landed(self, r: Reservation, now: float) -> None:
        if r.fallback:
            self.local.landed(r, now)
        elif r.sent and not r.landed and not self._owed(r, lambda s: s.landed(r, now)):
            r.landed = True

    def give_back(self, r: Reservation, now: float) -> bool:
        if r.fallback:
            return self.local.give_back(r, now)
        if r.sent or r.returned:
            return False
        got: list[bool] = []
        if not self._owed(r, lambda s: got.append(s.give_back(r, now))):
            r.returned = True
            return True
        return got[0]

    def settle(self, r: Reservation, actual: float | Sequence[float], now: float) -> None:
        if r.fallback:
            self.local.settle(r, actual, now)
        elif r.sent and r.limits and not self._owed(r, lambda s: s.settle(r, actual, now)):
            r.landed = True

    def observe_local(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        views: Sequence[ServerView],
        now: float,
    ) -> None:
        """The local share learns every report (scaled), so it is current when needed."""
        self.local.observe(keys, self._scaled(limits), self._scaled_views(views), now)

    def throttled_local(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        now: float,
        retry_after: float | None,
    ) -> float:
        """The local share hears a refusal too (the server's block holds for all)."""
        return self.local.throttled(keys, self._scaled(limits), now, retry_after)

    def observe(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        views: Sequence[ServerView],
        now: float,
        seen: LevelSeen | None = None,
    ) -> None:
        self.observe_local(keys, limits, views, now)
        store = self._up()
        if store is not None:
            try:
                store.observe(keys, limits, views, now, seen)
            except self.errors as exc:
                self._fail(exc)

    def throttled(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        now: float,
        retry_after: float | None,
    ) -> float:
        until = self.throttled_local(keys, limits, now, retry_after)
        store = self._up()
        if store is not None:
            try:
                return store.throttled(keys, limits, now, retry_after)
            except self.errors as exc:
                self._fail(exc)
        return until

    # ------------------------------------------------------------------ facts

    def fact(self, name: str) -> tuple[float, float] | None:
        store = self._up()
        if store is not None:
            try:
                got = store.fact(name)
            except self.errors as exc:
                self._fail(exc)
            else:
                if got is not None:
                    self.local.put_fact(name, *got)  # kept for a fall back
                    return got
                kept = self.local.fact(name)
                if kept is not None:
                    # Redis lost it (restarted empty): what this worker learned
                    # is shared again (a pacer tells a fact only when it changes)
                    try:
                        store.put_fact(name, *kept)
                    except self.errors as exc:
                        self._fail(exc)
                return kept
        return self.local.fact(name)

    def put_fact(self, name: str, a: float, b: float) -> bool:
        changed = self.local.put_fact(name, a, b)
        store = self._up()
        if store is not None:
            try:
                return store.put_fact(name, a, b)
            except self.errors as exc:
                self._fail(exc)
        return changed

    @property
    def facts_generation(self) -> int:
        """Moves when the answering store's counter moves, or another store answers."""
        store = self._up()
        seen: tuple[bool, int] | None = None
        if store is not None:
            try:
                seen = (True, store.facts_generation)
            except self.errors as exc:
                self._fail(exc)
        if seen is None:
            seen = (False, self.local.facts_generation)
        if seen != self._gen_seen:
            self._gen_seen = seen
            self._generation += 1
        return self._generation

    # ------------------------------------------------------------------ the line, housekeeping

    @property
    def recheck(self) -> float:
        """The shared store's (QuotaStore.recheck); while it is not made yet (a worker
        started with Redis down) nothing announces other machines' refunds: the
        same net as Redis's own."""
        if self._recheck is not None:
            return self._recheck
        if self.shared is None:
            return _RECHECK_UNMADE
        return float(getattr(self.shared, "recheck", 0.0))

    @recheck.setter
    def recheck(self, seconds: float) -> None:
        self._recheck = seconds

    def fileno(self) -> int:
        """The local share's fd to wait on when it has one (a table shared by the
        machine's workers wakes them when one gives units back; the shared
        store is made to signal it too), else the shared store's."""
        fd = self.local.fileno()
        if fd < 0 and self.shared is not None:
            fd = self.shared.fileno()
        return fd

    def moved(self) -> list[str]:
        out = self.local.moved()  # always read: its fd must not stay readable
        if not self.down and self.shared is not None:
            try:
                more = self.shared.moved()
            except self.errors as exc:
                self._fail(exc)
            else:
                if more:
                    out = list(dict.fromkeys([*out, *more]))
        return out

    def stats(self) -> dict[str, int | str]:
        """For /healthz: the shared store's, and what the fall back did."""
        out: dict[str, int | str] = (
            dict(self.shared.stats()) if self.shared is not None else {"store": "redis"}
        )
        out.update(
            {
                "fallback": "local" if self.down else "no",
                "local_share": f"{self.share:.6g}",
                "fallbacks": self.fallbacks,
                "recoveries": self.recoveries,
                "local_steps": self.local_steps,
                "moved_to_local": self.moved_to_local,
                "carried": self.carried,
                "dropped_steps": self.dropped,
                "reconnect_attempts": self.attempts,
            }
        )
        if self.last_error:
            out["last_error"] = self.last_error[:200]
        return out

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
