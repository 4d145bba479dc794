"""What elbasy counts, kept where every worker of an instance can read it.

``/metrics`` (and ``/status.json``) must show the whole instance whichever
worker the scrape lands on, so nothing is counted in a worker's own heap.
The supervisor maps one :class:`MetricsMemory` (anonymous shared memory)
before the first fork; each worker writes only its own slot of it (the slot
the supervisor gave it, as for the quota table) and any worker reads them
all. One writer per slot needs no lock: a value is one aligned 8-byte store,
which a reader in another process sees whole.

A slot holds, in this order:

* a header: the worker's pid (0: never used) and when it started;
* the loop's counters (ext/c/elbasy_counters.h), which the Cython loop
  increments in place: a Loop is handed its slot's bytes;
* the policy's series: a table of keys (a family and its label values) and
  the values they own (a counter or gauge one, a histogram its buckets, sum
  and count), appended by the worker, never moved;
* the worker's busiest accounts by quota wait, each in an entry of its own
  updated in place (a sequence number per entry, odd while it is written,
  so a reader never takes half of one; the least waited gives its entry to
  a busier account when they are all taken);
* a ring of quota waits per :data:`HISTORY_STEP`-second interval (the status
  page's chart).

Counters of a worker that is gone stay in its slot and in every sum, so the
instance's totals only grow across restarts and reloads; its gauges (open
connections, requests held) are read from live workers only. A restarted
worker that takes the slot again carries on from its predecessor's values.

The clock is the caller's: every method that needs the time takes it.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from elbasy._loop import CLIENT_BUCKETS, LOOP_COUNTERS, LOOP_COUNTERS_SIZE, LOOP_GAUGES

__all__ = [
    "FAMILIES",
    "WAIT_BUCKETS",
    "InstanceView",
    "MetricsMemory",
    "WorkerMetrics",
]

#: the drift histogram's upper bounds: a fraction of the bucket
DRIFT_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
#: the quota wait histogram's upper bounds, seconds: log-spaced, 1 ms to 100 s
WAIT_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
)  # fmt: skip
#: the status page's wait chart: one point per this many seconds, this many points
HISTORY_STEP = 5.0
HISTORY_POINTS = 120
#: accounts a worker keeps in its slot (the busiest by wait)
ACCOUNTS_KEPT = 64
#: accounts a worker remembers (the least waited half goes when it is full)
ACCOUNTS_REMEMBERED = 10_000

_BUCKETS = len(WAIT_BUCKETS) + 1  # and +Inf

# ---- the layout of one slot (bytes) ---------------------------------------------
_HEADER = struct.Struct("<qdqqqq")  # pid, started, series, values used, accounts, (spare)
_HEADER_SIZE = 64
_LOOP_AT = _HEADER_SIZE
_LOOP_SIZE = 512
_KEY_SIZE = 88
_ENTRY = struct.Struct(f"<{_KEY_SIZE}sii")  # key, first value, values
_MAX_SERIES = 1024
_KEYS_AT = _LOOP_AT + _LOOP_SIZE
_MAX_VALUES = 8192
_VALUES_AT = _KEYS_AT + _MAX_SERIES * _ENTRY.size
# an account: its sequence number, its key (rule and account), then requests,
# wait total, queued, server remaining, server limit, reported at, the drift
# of that report, and the wait histogram
_ACCOUNT_KEY = 120
_ACCOUNT_FIELDS = 7
_ACCOUNT = struct.Struct(f"<q{_ACCOUNT_KEY}s{_ACCOUNT_FIELDS + _BUCKETS}d")
_ACCOUNTS_AT = _VALUES_AT + _MAX_VALUES * 8
# a history point: its interval number, then the wait histogram
_POINT_DOUBLES = 1 + _BUCKETS
_HISTORY_AT = _ACCOUNTS_AT + ACCOUNTS_KEPT * _ACCOUNT.size
# the worker's open connections by client address (a uint32 per bucket of the
# address's hash): --max-client-connections counts the whole instance's, every
# slot's bucket summed (elbasy._loop.CLIENT_BUCKETS, ext/loop/accept_head.pxi)
_CLIENTS_AT = _HISTORY_AT + HISTORY_POINTS * _POINT_DOUBLES * 8
_SLOT_END = _CLIENTS_AT + CLIENT_BUCKETS * 4
SLOT_SIZE = -(-_SLOT_END // mmap.PAGESIZE) * mmap.PAGESIZE

assert LOOP_COUNTERS_SIZE <= _LOOP_SIZE, "the loop's counters outgrew their place in a slot"
assert _VALUES_AT % 8 == 0 and _ACCOUNTS_AT % 8 == 0 and _HISTORY_AT % 8 == 0


# ---- what is counted ---------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One metric family as Prometheus shows it."""

    name: str  # without the elbasy_ prefix or a _total suffix
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # a histogram's upper bounds (and +Inf)


def _families(*fams: Family) -> dict[str, Family]:
    return {f.name: f for f in fams}


#: the policy's series (the loop's counters are mapped in LOOP_FAMILIES)
FAMILIES = _families(
    Family("requests", "counter", "Requests answered, by rule and status.", ("rule", "status")),
    Family(
        "upstream_throttled",
        "counter",
        "Refusals from a covered API (429, GraphQL THROTTLED): should stay at zero.",
        ("rule", "kind"),
    ),
    Family("requests_shed", "counter", "Requests elbasy answered 429 itself.", ("rule",)),
    Family("queue_depth", "gauge", "Requests held waiting for quota.", ("rule",)),
    Family(
        "quota_wait_seconds",
        "histogram",
        "How long requests waited for quota.",
        ("rule",),
        WAIT_BUCKETS,
    ),
    Family(
        "quota_drift_ratio",
        "histogram",
        "How far a server's report of a bucket was from elbasy's own count, "
        "as a fraction of the bucket (outside traffic shows here).",
        ("rule",),
        DRIFT_BUCKETS,
    ),
    Family("errors", "counter", "Requests and connections that failed, by kind.", ("kind",)),
    Family("dns_lookups", "counter", "Upstream names looked up (cache hits included)."),
    Family("dns_cache_hits", "counter", "Lookups answered from the resolver's cache."),
    Family(
        "dns_timeouts",
        "counter",
        "Names whose lookup (or its wait for a free place) outlasted --dns-timeout.",
    ),
    Family(
        "dns_denied",
        "counter",
        "Lookups whose every address is one elbasy may not dial (internal, or itself).",
    ),
    Family("tls_leaf_mints", "counter", "Leaf certificates minted for intercepted hosts."),
    Family(
        "tls_leaf_refusals",
        "counter",
        "TLS names refused a leaf: not an intercepted host, or new leaves over the rate.",
        ("reason",),
    ),
)

#: the loop's counters as Prometheus families: family -> ((labels, counter name), ...)
LOOP_FAMILIES: dict[str, tuple[Family, tuple[tuple[tuple[str, ...], str], ...]]] = {
    "connections_open": (
        Family("connections_open", "gauge", "Client connections open."),
        (((), "open"),),
    ),
    "connections": (
        Family("connections", "counter", "Client connections accepted."),
        (((), "accepted"),),
    ),
    "tunnels_open": (
        Family("tunnels_open", "gauge", "CONNECT tunnels open."),
        (((), "tunnels_open"),),
    ),
    "tunnels": (Family("tunnels", "counter", "CONNECT tunnels spliced."), (((), "tunnels_total"),)),
    "intercepts_open": (
        Family("intercepts_open", "gauge", "Intercepted TLS sessions open."),
        (((), "intercepts_open"),),
    ),
    "intercepts": (
        Family("intercepts", "counter", "Intercepted TLS sessions."),
        (((), "intercepts_total"),),
    ),
    "bytes": (
        Family("bytes", "counter", "Bytes carried (up: client to upstream).", ("direction",)),
        ((("up",), "bytes_up"), (("down",), "bytes_down")),
    ),
    "upstream_pool_idle": (
        Family("upstream_pool_idle", "gauge", "Idle upstream connections kept for reuse."),
        (((), "pool_idle"),),
    ),
    "upstream_reused": (
        Family("upstream_reused", "counter", "Requests sent on a pooled upstream connection."),
        (((), "pool_reused"),),
    ),
    "tls_handshakes": (
        Family(
            "tls_handshakes", "counter", "TLS handshakes, by side and result.", ("side", "result")
        ),
        (
            (("client", "ok"), "tls_accepted"),
            (("client", "failed"), "tls_accept_failures"),
            (("upstream", "ok"), "tls_upstream"),
            (("upstream", "failed"), "tls_upstream_failures"),
        ),
    ),
    "retries": (
        Family("retries", "counter", "Requests sent again (a stale pooled connection, a refusal)."),
        (((), "retries"),),
    ),
}

#: loop counters that are failures, shown in elbasy_errors_total{kind}
LOOP_ERRORS = (
    "head_timeouts",
    "idle_timeouts",
    "accept_emfile",
    "accept_errors",
    "connect_failures",
    "connect_timeouts",
    "response_timeouts",
    "exchange_timeouts",
    "refused_busy",
    "clients_refused",
    "bad_hellos",
    "client_aborts",
    "upstream_aborts",
    "policy_errors",
    "internal_errors",
)

_LOOP_INDEX = {name: i for i, name in enumerate(LOOP_COUNTERS)}
assert all(c in _LOOP_INDEX for _, series in LOOP_FAMILIES.values() for _, c in series)
assert all(c in _LOOP_INDEX for c in LOOP_ERRORS)


def _key(family: str, labels: Sequence[str]) -> bytes:
    return "\x1f".join((family, *labels)).encode("utf-8", "replace")[:_KEY_SIZE]


def _unkey(raw: bytes) -> tuple[str, tuple[str, ...]]:
    family, *labels = raw.rstrip(b"\0").decode("utf-8", "replace").split("\x1f")
    return family, tuple(labels)


def _width(family: str) -> int:
    """Values a series of this family owns."""
    fam = FAMILIES[family]
    return len(fam.buckets) + 2 if fam.kind == "histogram" else 1


# ---- the memory ----------------------------------------------------------------------


class MetricsMemory:
    """Every worker's metrics: one anonymous shared mapping of ``slots`` slots.

    Made before the workers fork, so each inherits it; ``slot(i)`` is what
    worker ``i`` writes, :class:`InstanceView` what any of them reads.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.map = mmap.mmap(-1, slots * SLOT_SIZE)  # MAP_SHARED | MAP_ANONYMOUS
        self.view = memoryview(self.map)

    def slot(self, i: int) -> memoryview:
        if not 0 <= i < self.slots:
            raise ValueError(f"metrics slot {i} is not in 0..{self.slots - 1}")
        return self.view[i * SLOT_SIZE : (i + 1) * SLOT_SIZE]

    def connections_of(self, slot: int) -> tuple[memoryview, int, int, int, int, int]:
        """What worker ``slot``'s Loop takes as ``instance_counts``: the whole
        mapping, the slots, their size, where the loop's counters and the client
        counts are in each, and its own slot (the connection limits count the
        instance's connections, every worker's)."""
        return (self.view, self.slots, SLOT_SIZE, _LOOP_AT, _CLIENTS_AT, slot)

    def forget_connections(self, slot: int) -> None:
        """A reaped worker's connections are gone: its open count and its client
        counts are zeroed, so the instance's limits no longer count them."""
        memory = self.slot(slot)
        memory[_CLIENTS_AT : _CLIENTS_AT + CLIENT_BUCKETS * 4] = bytes(CLIENT_BUCKETS * 4)
        at = _LOOP_AT + 8 * LOOP_COUNTERS.index("open")
        memory[at : at + 8] = bytes(8)


def _header(slot: memoryview) -> tuple[int, float, int, int, int, int]:
    pid, started, series, used, kept, spare = _HEADER.unpack_from(slot, 0)
    return pid, started, series, used, kept, spare


@dataclass
class _Account:
    rule: str
    account: str
    requests: float = 0.0
    wait_total: float = 0.0
    queued: float = 0.0
    server_remaining: float = float("nan")
    server_limit: float = float("nan")
    reported_at: float = float("nan")
    drift: float = float("nan")  # (server's level - the store's) / the bucket, at that report
    buckets: list[float] = field(default_factory=lambda: [0.0] * _BUCKETS)
    entry: int = -1  # its entry in the slot, or -1
    raw: bytes = b""  # its key as the entry holds it


class WorkerMetrics:
    """What one worker counts, written into its slot (plain Python; no I/O).

    ``memory``: the slot's bytes (``MetricsMemory.slot(i)``); None for one
    process without a supervisor (tests, embedding), which gets a private
    memory of one slot.
    """

    def __init__(
        self,
        instance: MetricsMemory | None = None,
        slot: int = 0,
        *,
        top_accounts: int = 10,
        pid: int | None = None,
        started: float = 0.0,
    ) -> None:
        self.instance = instance if instance is not None else MetricsMemory(slot + 1)
        self.top_accounts = top_accounts
        memory = self.instance.slot(slot)
        self.memory = memory
        self.loop_counters = memory[_LOOP_AT : _LOOP_AT + _LOOP_SIZE]  # handed to the Loop
        self._values = memory[_VALUES_AT : _VALUES_AT + _MAX_VALUES * 8].cast("d")
        self._history = memory[_HISTORY_AT:_SLOT_END].cast("d")
        _, _, series, used, kept, _ = _header(memory)
        self._series = series
        self._used = used
        self._index: dict[bytes, int] = {}  # key -> its first value
        self._fast: dict[tuple[str, tuple[str, ...]], int] = {}  # (family, labels) -> the same
        # (rule, status) -> its requests series' value: the one count every request makes
        self._requests: dict[tuple[str, int], int] = {}
        for i in range(series):  # a restarted worker carries on its predecessor's series
            raw, first, _ = _ENTRY.unpack_from(memory, _KEYS_AT + i * _ENTRY.size)
            self._index[raw.rstrip(b"\0")] = first
        self.dropped = 0  # series that found no room
        self._accounts: dict[tuple[str, str], _Account] = {}
        self._entries: list[_Account] = []  # the accounts in the slot, by entry
        for i in range(min(kept, ACCOUNTS_KEPT)):  # and its accounts
            row = _ACCOUNT.unpack_from(memory, _ACCOUNTS_AT + i * _ACCOUNT.size)
            rule, _, account = row[1].rstrip(b"\0").decode("utf-8", "replace").partition("\x1f")
            a = _Account(rule, account, row[2], row[3], 0.0, row[5], row[6], row[7], row[8])
            a.buckets = list(row[9:])
            a.entry = i
            self._accounts[(rule, account)] = a
            self._entries.append(a)
            self._write(a)
        _HEADER.pack_into(
            memory, 0, os.getpid() if pid is None else pid, started, series, used, kept, 0
        )

    def read(self) -> InstanceView:
        """Every worker's values, summed."""
        return InstanceView(self.instance)

    def scrape(self) -> tuple[bytes, bytes]:
        """``/metrics``: the instance's Prometheus text and its Content-Type."""
        return exposition(self.read(), self.top_accounts)

    # ---- series ------------------------------------------------------------------

    def _at(self, family: str, labels: tuple[str, ...]) -> int:
        at = self._fast.get((family, labels))
        if at is not None:
            return at
        key = _key(family, labels)
        at = self._index.get(key)
        if at is not None:
            self._fast[(family, labels)] = at
            return at
        width = _width(family)
        if self._series >= _MAX_SERIES or self._used + width > _MAX_VALUES:
            self.dropped += 1
            return -1
        at = self._used
        _ENTRY.pack_into(self.memory, _KEYS_AT + self._series * _ENTRY.size, key, at, width)
        self._used += width
        self._series += 1
        # the entry is written before the count that shows it
        struct.pack_into("<qq", self.memory, 16, self._series, self._used)
        self._index[key] = at
        self._fast[(family, labels)] = at
        return at

    def count(self, family: str, labels: tuple[str, ...] = (), amount: float = 1.0) -> None:
        at = self._at(family, labels)
        if at >= 0:
            self._values[at] += amount

    def add(self, family: str, labels: tuple[str, ...], amount: float) -> None:
        """Move a gauge by ``amount`` (+1 a request held, -1 it left)."""
        self.count(family, labels, amount)

    def local(self, family: str) -> dict[tuple[str, ...], float]:
        """This worker's values of a counter or gauge family, by labels."""
        out = {}
        for key, at in self._index.items():
            fam, labels = _unkey(key)
            if fam == family:
                out[labels] = self._values[at]
        return out

    # ---- what the policy and the pacer tell ------------------------------------------

    def finished(
        self,
        rule: str,
        status: int,
        account: str | None,
        wall: float,
        waited: float | None = None,
    ) -> None:
        """A request's answer went (or it ended without one: ``status`` says which);
        ``waited``: the seconds a paced request that left waited for its quota."""
        at = self._requests.get((rule, status))
        if at is None:
            at = self._at("requests", (rule, str(status)))
            if at >= 0:
                self._requests[(rule, status)] = at
        if at >= 0:
            self._values[at] += 1.0
        if account is not None:
            a = self._account(rule, account)
            a.requests += 1
            if waited is not None:
                self._wait(a, waited, wall)
            self._changed(a)

    def waited(self, rule: str, account: str, seconds: float, wall: float) -> None:
        """A paced request left after waiting ``seconds`` for its quota."""
        a = self._account(rule, account)
        self._wait(a, seconds, wall)
        self._changed(a)

    def _wait(self, a: _Account, seconds: float, wall: float) -> None:
        rule = a.rule
        b = bisect.bisect_left(WAIT_BUCKETS, seconds)
        at = self._at("quota_wait_seconds", (rule,))
        if at >= 0:
            self._values[at + b] += 1
            self._values[at + _BUCKETS] += seconds
        a.wait_total += seconds
        a.buckets[b] += 1
        h = self._history
        n = int(wall // HISTORY_STEP)
        p = (n % HISTORY_POINTS) * _POINT_DOUBLES
        if h[p] != n:
            h[p + 1 : p + _POINT_DOUBLES] = memoryview(bytes(8 * _BUCKETS)).cast("d")
            h[p] = n
        h[p + 1 + b] += 1

    def queued(self, rule: str, account: str, change: int, wall: float) -> None:
        """A request of this account joined (+1) or left (-1) the quota's line."""
        self.count("queue_depth", (rule,), change)
        a = self._account(rule, account)
        a.queued = max(0.0, a.queued + change)
        self._changed(a)

    def reported(
        self, rule: str, account: str, remaining: float | None, limit: float | None, wall: float
    ) -> None:
        """The server said how much of this account's quota is left."""
        if remaining is None:
            return
        a = self._account(rule, account)
        a.server_remaining = remaining
        a.server_limit = float("nan") if limit is None else limit
        a.reported_at = wall
        self._changed(a)

    def drift(self, rule: str, account: str, ratio: float) -> None:
        """A server's report of a bucket was ``ratio`` of it above elbasy's own
        count (below: negative): the histogram takes its size, the account its sign."""
        size = abs(ratio)
        at = self._at("quota_drift_ratio", (rule,))
        if at >= 0:
            self._values[at + bisect.bisect_left(DRIFT_BUCKETS, size)] += 1
            self._values[at + len(DRIFT_BUCKETS) + 1] += size
        a = self._account(rule, account)
        a.drift = ratio
        self._changed(a)

    def throttled(self, rule: str, kind: str) -> None:
        self.count("upstream_throttled", (rule, kind))

    def shed(self, rule: str) -> None:
        self.count("requests_shed", (rule,))

    def error(self, kind: str) -> None:
        self.count("errors", (kind,))

    # ---- busiest accounts ------------------------------------------------------------

    def _account(self, rule: str, account: str) -> _Account:
        a = self._accounts.get((rule, account))
        if a is None:
            if len(self._accounts) >= ACCOUNTS_REMEMBERED:
                self._forget()
            a = self._accounts[(rule, account)] = _Account(rule, account)
        return a

    def _forget(self) -> None:
        """Keep the busier half of the accounts (and every one with a request held)."""
        ranked = sorted(self._accounts.items(), key=lambda kv: kv[1].wait_total, reverse=True)
        keep = len(ranked) // 2
        self._accounts = {
            k: a for i, (k, a) in enumerate(ranked) if i < keep or a.queued or a.entry >= 0
        }

    def _changed(self, a: _Account) -> None:
        """Write an account's entry: its own, a free one, or the least waited one's
        when this account has waited longer (or has requests held and that one not)."""
        if a.entry < 0:
            if len(self._entries) < ACCOUNTS_KEPT:
                a.entry = len(self._entries)
                self._entries.append(a)
                self._write(a)
                struct.pack_into("<q", self.memory, 32, len(self._entries))
                return
            least = min(self._entries, key=_rank)
            if _rank(least) >= _rank(a):
                return
            a.entry, least.entry = least.entry, -1
            self._entries[a.entry] = a
        self._write(a)

    def _write(self, a: _Account) -> None:
        at = _ACCOUNTS_AT + a.entry * _ACCOUNT.size
        mem = self.memory
        seq = struct.unpack_from("<q", mem, at)[0] | 1  # odd: being written
        struct.pack_into("<q", mem, at, seq)
        _ACCOUNT.pack_into(
            mem,
            at,
            seq,
            a.raw or _account_key(a),
            a.requests,
            a.wait_total,
            a.queued,
            a.server_remaining,
            a.server_limit,
            a.reported_at,
            a.drift,
            *a.buckets,
        )
        struct.pack_into("<q", mem, at, seq + 1)  # even: whole


def _account_key(a: _Account) -> bytes:
    a.raw = f"{a.rule}\x1f{a.account}".encode("utf-8", "replace")[:_ACCOUNT_KEY]
    return a.raw


def _rank(a: _Account) -> tuple[bool, float]:
    return (a.queued > 0, a.wait_total)


# ---- reading the instance ------------------------------------------------------------


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a reaped worker's pid is gone; a zombie one (not reaped yet) still
    # answers: its /proc state tells
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@dataclass
class AccountView:
    rule: str
    account: str
    requests: float = 0.0
    wait_total: float = 0.0
    queued: float = 0.0
    server_remaining: float | None = None
    server_limit: float | None = None
    reported_at: float | None = None
    drift: float | None = None
    buckets: list[float] = field(default_factory=lambda: [0.0] * _BUCKETS)


class InstanceView:
    """One reading of every slot: the instance's sums (what a scrape shows)."""

    def __init__(self, memory: MetricsMemory) -> None:
        views = [memory.slot(i) for i in range(memory.slots)]
        self.workers = 0
        self.started = 0.0
        self.loop = dict.fromkeys(LOOP_COUNTERS, 0)
        self.series: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        self.accounts: dict[tuple[str, str], AccountView] = {}
        self.history: dict[int, list[float]] = {}
        gauges = set(LOOP_GAUGES)
        for slot in views:
            pid, started, series, _, _, _ = _header(slot)
            if pid == 0:
                continue
            alive = _alive(pid)
            if alive:
                self.workers += 1
                if started and (not self.started or started < self.started):
                    self.started = started
            counters = slot[_LOOP_AT : _LOOP_AT + LOOP_COUNTERS_SIZE].cast("Q")
            for i, name in enumerate(LOOP_COUNTERS):
                if alive or name not in gauges:
                    self.loop[name] += counters[i]
            values = slot[_VALUES_AT : _VALUES_AT + _MAX_VALUES * 8].cast("d")
            for i in range(series):
                raw, first, width = _ENTRY.unpack_from(slot, _KEYS_AT + i * _ENTRY.size)
                family, labels = _unkey(raw)
                fam = FAMILIES.get(family)
                if fam is None or (fam.kind == "gauge" and not alive):
                    continue
                total = self.series.setdefault((family, labels), [0.0] * width)
                for k in range(width):
                    total[k] += values[first + k]
            self._read_accounts(slot, alive)
            hist = slot[_HISTORY_AT:_SLOT_END].cast("d")
            for p in range(HISTORY_POINTS):
                n = int(hist[p * _POINT_DOUBLES])
                if n:
                    got = self.history.setdefault(n, [0.0] * _BUCKETS)
                    for k in range(_BUCKETS):
                        got[k] += hist[p * _POINT_DOUBLES + 1 + k]

    def _read_accounts(self, slot: memoryview, alive: bool) -> None:
        rows: list[tuple[Any, ...]] = []
        for i in range(min(_header(slot)[4], ACCOUNTS_KEPT)):
            at = _ACCOUNTS_AT + i * _ACCOUNT.size
            for _ in range(8):  # being written: read it again
                row = _ACCOUNT.unpack_from(slot, at)
                if row[0] % 2 == 0 and struct.unpack_from("<q", slot, at)[0] == row[0]:
                    rows.append(row[1:])
                    break
        for row in rows:
            rule, _, account = row[0].rstrip(b"\0").decode("utf-8", "replace").partition("\x1f")
            a = self.accounts.get((rule, account))
            if a is None:
                a = self.accounts[(rule, account)] = AccountView(rule, account)
            requests, wait_total, queued, remaining, limit, at, drift = row[1:8]
            a.requests += requests
            a.wait_total += wait_total
            if alive:
                a.queued += queued
            if at == at and (a.reported_at is None or at > a.reported_at):  # not NaN: reported
                a.reported_at = at
                a.server_remaining = remaining
                a.server_limit = None if limit != limit else limit
                a.drift = None if drift != drift else drift
            for k, v in enumerate(row[8:]):
                a.buckets[k] += v

    # ---- derived -------------------------------------------------------------------

    def family(self, name: str) -> Iterator[tuple[tuple[str, ...], list[float]]]:
        for (family, labels), values in sorted(self.series.items()):
            if family == name:
                yield labels, values

    def busiest(self, n: int) -> list[AccountView]:
        return sorted(self.accounts.values(), key=lambda a: (a.queued, a.wait_total), reverse=True)[
            :n
        ]


def quantile(q: float, buckets: Sequence[float]) -> float | None:
    """The ``q`` quantile of a wait histogram (counts per bucket, +Inf last), by
    linear interpolation inside its bucket, as Prometheus's histogram_quantile;
    None when it is empty."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i >= len(WAIT_BUCKETS):
                return WAIT_BUCKETS[-1]
            lo = WAIT_BUCKETS[i - 1] if i else 0.0
            hi = WAIT_BUCKETS[i]
            return lo + (hi - lo) * (rank - seen) / n
        seen += n
    return WAIT_BUCKETS[-1]


# ---- the text format ------------------------------------------------------------------


def exposition(view: InstanceView, top_accounts: int) -> tuple[bytes, bytes]:
    """``/metrics``: (the Prometheus text of this reading, its Content-Type)."""
    from prometheus_client import CollectorRegistry, exposition, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(view, top_accounts))
    # the text format every Prometheus reads (2.x included), as the library
    # writes it; a newer library's default type names a format older servers refuse
    content_type = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)
    return generate_latest(registry), content_type.encode()


class _Collector:
    def __init__(self, view: InstanceView, top_accounts: int) -> None:
        self.view = view
        self.top = top_accounts

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        v = self.view

        def metric(fam: Family, unit_labels: Sequence[str] = ()) -> Any:
            labels = list(unit_labels or fam.labels)
            name = "elbasy_" + fam.name
            if fam.kind == "counter":
                return CounterMetricFamily(name, fam.help, labels=labels)
            if fam.kind == "gauge":
                return GaugeMetricFamily(name, fam.help, labels=labels)
            return HistogramMetricFamily(name, fam.help, labels=labels)

        workers = GaugeMetricFamily("elbasy_workers", "Worker processes serving.")
        workers.add_metric([], v.workers)
        yield workers
        start = GaugeMetricFamily(
            "elbasy_start_time_seconds", "When the oldest live worker started (unix time)."
        )
        start.add_metric([], v.started)
        yield start
        for fam, series in LOOP_FAMILIES.values():
            m = metric(fam)
            for labels, counter in series:
                m.add_metric(list(labels), v.loop[counter])
            yield m
        for name, fam in FAMILIES.items():
            m = metric(fam)
            for labels, values in v.family(name):
                if fam.kind == "histogram":
                    cumulative, running = [], 0.0
                    for bound, n in zip((*fam.buckets, float("inf")), values, strict=False):
                        running += n
                        cumulative.append((_bound(bound), running))
                    m.add_metric(list(labels), cumulative, values[-1])
                else:
                    m.add_metric(list(labels), values[0])
            if name == "errors":
                for kind in LOOP_ERRORS:
                    m.add_metric([kind], v.loop[kind])
            yield m
        busiest = v.busiest(self.top)
        for attr, fam in (
            (
                "wait_total",
                Family(
                    "account_quota_wait_seconds",
                    "counter",
                    "Quota wait of the busiest accounts.",
                    ("rule", "account"),
                ),
            ),
            (
                "requests",
                Family(
                    "account_requests",
                    "counter",
                    "Requests of the busiest accounts.",
                    ("rule", "account"),
                ),
            ),
            (
                "queued",
                Family(
                    "account_queue_depth",
                    "gauge",
                    "Requests of the busiest accounts held for quota.",
                    ("rule", "account"),
                ),
            ),
        ):
            m = metric(fam)
            for a in busiest:
                m.add_metric([a.rule, a.account], getattr(a, attr))
            yield m
        drift = metric(
            Family(
                "account_quota_drift_ratio",
                "gauge",
                "At the busiest accounts' last server report: the server's level of the "
                "bucket above elbasy's count (below: negative), as a fraction of the bucket.",
                ("rule", "account"),
            )
        )
        for a in busiest:
            if a.drift is not None:
                drift.add_metric([a.rule, a.account], a.drift)
        yield drift


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(b)
