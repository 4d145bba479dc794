"""The quota store of ``elbasy --workers N``: every account's clocks in shared memory.

The supervisor makes one :class:`~elbasy._shm.ShmTable` before it forks
(``ShmTable(capacity)``; its size is fixed: ``bytes_per_bucket`` bytes per
bucket of capacity), and each worker wraps it in a :class:`ShmStore` with
the slot the supervisor gave it (0..31; a restarted worker reuses its dead
predecessor's slot after the supervisor called ``table.release_slot(slot)``).

The arithmetic is :class:`elbasy.quota.LocalStore`'s, in C
(ext/c/elbasy_shm.h): on the same inputs both give the same results
(tests/test_quota.py runs its store tests on both). What only a shared table
has:

* it is full at its capacity: a new bucket then takes the place of the least
  recently used idle one (one whose state is a fresh bucket's: nothing
  queued, nothing booked in a live window, its clock and any block in the
  past, so nothing is lost; counted in ``evictions`` and logged). When no
  bucket is idle, :meth:`reserve` raises :class:`~elbasy.quota.StoreFull`.
  A server's view or a 429 for a bucket that finds no room is dropped
  (logged): pacing goes on from what was sent;
* the line moves across workers: a place given back or a refund in one
  worker wakes every other worker's eventfd (:meth:`fileno`), and
  :meth:`moved` names the buckets (their key strings) that moved, or
  :data:`~elbasy.quota.EVERY_LINE` when more moved than the table's ring
  remembers;
* facts (learned hints) live in the table too, so every worker holds the
  same idea of an account.

A worker's window bookings outlive it (they expire with their windows);
its queued units are taken out of every bucket by ``release_slot``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from elbasy._shm import LATER, SHED, Account, ShmTable, key_hash
from elbasy.limits import BUCKET, Limit, ServerView
from elbasy.quota import (
    EVERY_LINE,
    LevelSeen,
    Reservation,
    Safety,
    Shed,
    _per_limit,
    derived,
    view_entries,
)

log = logging.getLogger("elbasy.shm")

__all__ = ["ShmStore", "ShmTable"]

#: keys (and account tuples) a worker remembers; cleared when it reaches this
_REMEMBER = 100_000
#: a reservation this close to a time counts as at it (quota._EPS)
_EPS = 1e-9


class ShmStore:
    """One worker's view of the shared quota table (the QuotaStore interface)."""

    recheck = 0.0  # other workers' refunds arrive through the moved ring

    def __init__(self, table: ShmTable, slot: int = 0, safety: Safety | None = None) -> None:
        self.table = table
        self.slot = slot
        self.safety = safety or Safety()
        self._fd = table.attach(slot)
        self._seq = table.moved_seq  # the moved ring, read up to here
        # per (keys, limits) object pair: the objects (kept, so ids stay theirs) and the account
        self._by_id: dict[tuple[int, int], tuple[object, object, Account]] = {}
        self._accounts: dict[tuple[tuple[str, ...], tuple[Limit, ...]], Account] = {}
        self._names: dict[int, str] = {}  # bucket hash -> its key, for moved()
        self.evictions = 0  # idle buckets this worker evicted for new ones
        self.dropped = 0  # server views (or 429s) with no room in the table

    # ------------------------------------------------------------------ accounts

    def _account(self, keys: Sequence[str], limits: Sequence[Limit]) -> Account:
        """The C account of these keys and limits (made once per pair of objects)."""
        ident = (id(keys), id(limits))
        got = self._by_id.get(ident)
        if got is not None and got[0] is keys and got[1] is limits:
            return got[2]
        value = (tuple(keys), tuple(limits))
        acct = self._accounts.get(value)
        if acct is None:
            if len(value[0]) != len(value[1]):
                raise ValueError(f"{len(value[0])} keys for {len(value[1])} limits")
            if len(self._accounts) >= _REMEMBER:
                self._accounts.clear()
                self._names.clear()
            hashes = []
            params = []
            for key, limit in zip(*value, strict=True):
                h = key_hash(f"{key}\x1f{limit.name}".encode())
                self._names[h] = key
                hashes.append(h)
                interval, room, quota, period, guard = derived(limit, self.safety)
                span = limit.sub_buckets if limit.kind == "rolling" else 1
                params.append(
                    (limit.kind, span, interval, room, quota, period, guard, limit.capacity)
                )
            acct = self._accounts[value] = Account(tuple(hashes), tuple(params))
        if len(self._by_id) >= _REMEMBER:
            self._by_id.clear()
        self._by_id[ident] = (keys, limits, acct)
        return acct

    def _evicted(self, n: int) -> None:
        before = self.evictions
        self.evictions += n
        if before == 0 or before // 1000 != self.evictions // 1000:
            log.info(
                "quota table full (%d buckets): evicted idle buckets for new ones "
                "(%d so far by this worker)",
                self.table.capacity,
                self.evictions,
            )

    # ------------------------------------------------------------------ the interface

    def reserve(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        cost: float | Sequence[float],
        now: float,
        max_wait: float,
    ) -> Reservation | Shed:
        """LocalStore.reserve, across every worker; StoreFull when the table is."""
        costs = _per_limit(cost, limits)
        if not limits:
            if max_wait < -_EPS:
                return Shed(0.0, "")
            return Reservation(tuple(keys), tuple(limits), costs, now, (), ())
        acct = self._account(keys, limits)
        code, depart, which, slots, positions, evicted = self.table.reserve(
            self.slot, acct, costs, now, max_wait
        )
        if evicted:
            self._evicted(evicted)
        if code == SHED:
            return Shed(depart - now, limits[which].name)
        return Reservation(tuple(keys), tuple(limits), costs, depart, slots, positions)

    def earliest(self, r: Reservation, now: float) -> float:
        if r.sent or not r.limits:
            return now
        acct = self._account(r.keys, r.limits)
        return self.table.earliest(acct, r.costs, r.slots, r.positions, now)

    def confirm(self, r: Reservation, now: float) -> float | None:
        if r.sent:
            return None
        if r.limits:
            acct = self._account(r.keys, r.limits)
            code, got = self.table.confirm(self.slot, acct, r.costs, r.slots, r.positions, now)
            if code == LATER:
                assert isinstance(got, float)
                return got
            assert isinstance(got, tuple)
            if got != r.slots:
                r.slots = got
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
        if not limits:
            return
        entries = [
            (k, value, None if reset is None else now + reset)
            for k, value, reset in view_entries(limits, views, self.safety)
        ]
        if seen is not None:
            for k, value, _ in entries:
                if value is not None and (ours := self._level(keys[k], limits[k], now)) is not None:
                    seen(k, value, ours)
        if entries:
            dropped = self.table.observe(self._account(keys, limits), entries, now)
            if dropped:
                self.dropped += dropped
                log.warning("quota table full: %d server view(s) dropped", dropped)

    def _level(self, key: str, limit: Limit, now: float) -> float | None:
        """A bucket's level in the table at ``now``, in units; None for a window."""
        if limit.kind != BUCKET:
            return None
        rec = self.table.peek(key_hash(f"{key}\x1f{limit.name}".encode()))
        if rec is None or not rec.get("interval"):  # gone, or a window's record
            return None
        sent, interval, flying = (float(rec[k]) for k in ("sent", "interval", "flying"))  # type: ignore[arg-type]
        return max(0.0, sent - now) / interval + flying

    def throttled(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        now: float,
        retry_after: float | None,
    ) -> float:
        until = now + (retry_after if retry_after and retry_after > 0 else 0.0)
        if limits:
            dropped = self.table.throttled(self._account(keys, limits), now, until)
            if dropped:
                self.dropped += dropped
                log.warning("quota table full: a 429 not recorded on %d bucket(s)", dropped)
        return until

    def give_back(self, r: Reservation, now: float) -> bool:
        if r.sent or r.returned:
            return False
        if r.limits:
            acct = self._account(r.keys, r.limits)
            self.table.give_back(self.slot, acct, r.costs, r.slots, now)
        r.returned = True
        return True

    def landed(self, r: Reservation, now: float) -> None:
        if not r.sent or r.landed:
            return
        r.landed = True
        if r.limits:
            self.table.landed(self.slot, self._account(r.keys, r.limits), r.slots, now)

    def settle(self, r: Reservation, actual: float | Sequence[float], now: float) -> None:
        if not r.sent or not r.limits:
            return
        self.landed(r, now)  # a refund comes with its answer: it has landed
        actuals = _per_limit(actual, r.limits)
        refunds = tuple(
            r.slots[k] - min(max(actuals[k], 0.0), r.slots[k]) if limit.kind == BUCKET else 0.0
            for k, limit in enumerate(r.limits)
        )
        if any(x > 0 for x in refunds):
            self.table.settle(self.slot, self._account(r.keys, r.limits), refunds, now)

    # ------------------------------------------------------------------ facts, the line

    def fact(self, name: str) -> tuple[float, float] | None:
        """A learned fact every worker shares, or None (LocalStore.fact)."""
        return self.table.fact(key_hash(name.encode()))

    def put_fact(self, name: str, a: float, b: float) -> bool:
        """Keep a fact for every worker; True when it changed (LocalStore.put_fact)."""
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError("a fact is two finite numbers")
        return self.table.put_fact(key_hash(name.encode()), a, b)

    @property
    def facts_generation(self) -> int:
        """Moves whenever any worker changes a fact."""
        return self.table.facts_generation

    def fileno(self) -> int:
        """Readable when another worker moved a bucket: then call :meth:`moved`."""
        return self._fd

    def moved(self) -> list[str]:
        """The bucket keys other workers moved since the last call (each once), or
        ``[EVERY_LINE]`` when more moved than the table remembers: re-check every line."""
        self.table.drain(self.slot)
        self._seq, hashes = self.table.moved(self.slot, self._seq)
        if hashes is None:
            return [EVERY_LINE]
        out: dict[str, None] = {}
        for h in hashes:
            key = self._names.get(h)
            if key is not None:
                out[key] = None
        return list(out)

    # ------------------------------------------------------------------ housekeeping

    def buckets(self) -> int:
        """Buckets the table holds (every worker's)."""
        return self.table.used

    def stats(self) -> dict[str, int | str]:
        """For /healthz: the table's fill and what made room or was lost."""
        t = self.table
        return {
            "store": "shm",
            "buckets": t.used,
            "capacity": t.capacity,
            "bytes_per_bucket": t.bytes_per_bucket,
            "evictions": t.evictions,
            "dropped": t.dropped,
            "recovered": t.recovered,
            "workers_attached": bin(t.attached).count("1"),
        }
