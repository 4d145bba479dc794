"""Name resolution that never blocks the loop, and the address guard.

Each lookup runs getaddrinfo on a daemon thread of its own; its answer is
queued and the loop is woken through an eventfd it polls. IP literals and
fresh cache hits answer at once. Answers are lists of (family, address,
port) for the loop to try in order, exactly the addresses it will dial: the
guard (:mod:`elbasy.destinations`) has already dropped the internal ones
and elbasy's own. A failure is a one-line reason string (:class:`Failure`,
whose ``status`` the loop answers with: 502 when the name did not resolve,
403 when no allowed address is left).

A slow name cannot starve the others:

* one lookup per name at a time (the cache and the lookups are keyed by
  name, not by name and port), and at most ``per_domain`` at a time under
  one parent domain (``a.slow.example`` and ``b.slow.example``); the others
  wait their turn;
* a lookup still running ``timeout`` seconds after it began answers
  failure to everyone waiting for it and gives its place under its domain
  back; its thread finishes in the background (getaddrinfo cannot be
  cancelled). At most ``threads`` lookup threads are alive, those past
  their deadline included: a name that finds none free waits, and fails
  once it has waited ``timeout``;
* ``close()`` never waits for a lookup.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from elbasy.config import ConnectTo
from elbasy.destinations import Destinations
from elbasy.metrics import WorkerMetrics

Address = tuple[int, str, int]


class Failure(str):
    """A lookup that gives the loop nothing to dial: why, and the status to answer."""

    status = 502


class TimedOut(Failure):
    """The lookup (or its wait for a place) outlasted the deadline."""


class Denied(Failure):
    """Every address the name resolved to is one elbasy may not dial."""

    status = 403


Answer = list[Address] | str
#: what a name resolves to: (family, address) pairs, or why it did not
Found = list[tuple[int, str]] | Failure
GetAddrInfo = Callable[..., list[tuple[Any, ...]]]


def _parent(name: str) -> str:
    """The domain a name's lookups are limited under: the name less its first label."""
    head, dot, rest = name.partition(".")
    return rest if dot and "." in rest else name


class Resolver:
    def __init__(
        self,
        clock: Any,
        connect_to: tuple[ConnectTo, ...] = (),
        ttl: float = 30.0,
        negative_ttl: float = 5.0,
        threads: int = 64,
        metrics: WorkerMetrics | None = None,
        *,
        destinations: Destinations | None = None,
        timeout: float = 5.0,
        per_domain: int = 4,
        getaddrinfo: GetAddrInfo = socket.getaddrinfo,
    ) -> None:
        """``getaddrinfo``: the lookup itself (socket.getaddrinfo; another
        resolver's function of the same signature). ``destinations``: the
        address guard; None: every address may be dialed."""
        self._clock = clock
        self._metrics = metrics if metrics is not None else WorkerMetrics()
        self._connect_to = connect_to
        self._guard = destinations
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._timeout = timeout
        self._threads = threads
        self._per_domain = per_domain
        self._getaddrinfo = getaddrinfo
        self._cache: dict[str, tuple[float, Found]] = {}
        # name -> the (token, port, internal_ok) of each request waiting for it
        self._pending: dict[str, list[tuple[Any, int, bool]]] = {}
        self._queued: deque[tuple[str, float]] = deque()  # names waiting for a place, since
        self._running: dict[str, float] = {}  # name -> when its lookup began
        self._domains: dict[str, int] = {}  # parent domain -> lookups running under it
        self._lock = threading.Lock()
        self._done: deque[tuple[str, Found]] = deque()  # filled by the lookup threads
        self._alive = 0  # lookup threads not yet returned (past their deadline included)
        self._closed = False
        self._wake = threading.Condition(self._lock)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._watch = threading.Thread(target=self._watchdog, name="elbasy-dns", daemon=True)
        self._watch.start()

    def fileno(self) -> int:
        return self._efd

    def close(self) -> None:
        """Stop at once: lookups still running are abandoned (their threads are daemons)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
        os.close(self._efd)

    # ---- the loop's side ---------------------------------------------------------------

    def lookup(self, host: str, port: int, token: Any) -> Answer | None:
        """An answer now, or None and the answer later through completed()."""
        internal_ok = self._guard is None or self._guard.may_be_internal(host)
        for rule in self._connect_to:
            target = rule.match(host, port)
            if target is not None:
                host, port = target
                internal_ok = internal_ok or bool(rule.addr)  # the operator's address
                break
        name = host.strip("[]").lower()
        self._metrics.count("dns_lookups")
        literal = _literal(name)
        if literal is not None:
            return self._answer(name, literal, port, internal_ok)
        hit = self._cache.get(name)
        if hit is not None and hit[0] > self._clock():
            self._metrics.count("dns_cache_hits")
            return self._answer(name, hit[1], port, internal_ok)
        waiting = self._pending.get(name)
        if waiting is not None:
            waiting.append((token, port, internal_ok))
            return None
        self._pending[name] = [(token, port, internal_ok)]
        with self._lock:
            self._queued.append((name, self._clock()))
            self._start_queued()
        return None

    def completed(self) -> list[tuple[Any, Answer]]:
        """Answers that arrived since the last call (loop thread only)."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        out: list[tuple[Any, Answer]] = []
        while self._done:
            name, found = self._done.popleft()
            if isinstance(found, TimedOut):
                self._metrics.count("dns_timeouts")  # counted here: the loop's thread
            waiting = self._pending.pop(name, None)
            ttl = self._ttl if isinstance(found, list) else self._negative_ttl
            if len(self._cache) >= 10000:
                self._cache.clear()  # crude, and rare: a proxy talks to few hosts
            self._cache[name] = (self._clock() + ttl, found)
            for token, port, internal_ok in waiting or ():
                out.append((token, self._answer(name, found, port, internal_ok)))
        return out

    def _answer(self, name: str, found: Found, port: int, internal_ok: bool) -> Answer:
        """What the loop dials for ``name:port``: the allowed addresses, or why none."""
        if isinstance(found, Failure):
            return found
        if self._guard is None:
            return [(family, addr, port) for family, addr in found]
        allowed: list[Address] = []
        refused: list[str] = []
        for family, addr in found:
            why = self._guard.address_refusal(addr, port, internal_ok)
            if why is None:
                allowed.append((family, addr, port))
            else:
                refused.append(why)
        if allowed:
            return allowed
        self._metrics.count("dns_denied")
        return Denied(f"{name}: " + "; ".join(refused))

    # ---- the threads' side -------------------------------------------------------------

    def _start_queued(self) -> None:
        """Begin the queued lookups there is room for (the lock held)."""
        kept: deque[tuple[str, float]] = deque()
        while self._queued and self._alive < self._threads:
            name, since = self._queued.popleft()
            domain = _parent(name)
            if self._domains.get(domain, 0) >= self._per_domain:
                kept.append((name, since))
                continue
            self._domains[domain] = self._domains.get(domain, 0) + 1
            self._running[name] = self._clock()
            self._alive += 1
            threading.Thread(
                target=self._resolve, args=(name,), name="elbasy-dns-lookup", daemon=True
            ).start()
        self._queued.extendleft(reversed(kept))
        if self._running or self._queued:
            self._wake.notify_all()  # the watchdog minds their deadlines

    def _finish(self, name: str, found: Found) -> None:
        """``name`` is answered (the lock held): its place goes to the next one."""
        if self._running.pop(name, None) is not None:
            domain = _parent(name)
            left = self._domains.get(domain, 1) - 1
            if left:
                self._domains[domain] = left
            else:
                self._domains.pop(domain, None)
        self._done.append((name, found))
        if not self._closed:
            os.eventfd_write(self._efd, 1)

    def _resolve(self, name: str) -> None:
        found: Found
        try:
            infos = self._getaddrinfo(name, None, type=socket.SOCK_STREAM)
            seen: list[tuple[int, str]] = []
            for family, _, _, _, sockaddr in infos:
                entry = (int(family), str(sockaddr[0]))
                if entry not in seen:
                    seen.append(entry)
            found = seen or Failure(f"no address for {name}")
        except socket.gaierror as exc:
            found = Failure(f"DNS lookup for {name} failed: {exc.strerror}")
        except Exception as exc:  # the loop must hear back whatever happens
            found = Failure(f"DNS lookup for {name} failed: {exc}")
        with self._lock:
            self._alive -= 1
            if self._closed:
                return
            if name in self._running:
                self._finish(name, found)
            elif isinstance(found, list):
                # late: its waiters were told it timed out; the next request finds it
                self._done.append((name, found))
                os.eventfd_write(self._efd, 1)
            self._start_queued()

    def _watchdog(self) -> None:
        """Answer failure for every lookup past its deadline, and for names that
        waited for a place that long."""
        with self._lock:
            while not self._closed:
                now = self._clock()
                wait = self._timeout
                for name, began in list(self._running.items()):
                    left = began + self._timeout - now
                    if left <= 0:
                        self._finish(name, TimedOut(f"DNS lookup for {name} timed out"))
                    else:
                        wait = min(wait, left)
                while self._queued and self._queued[0][1] + self._timeout <= now:
                    name, _ = self._queued.popleft()
                    self._finish(name, TimedOut(f"DNS lookup for {name} found no free place"))
                if self._queued:
                    wait = min(wait, max(0.0, self._queued[0][1] + self._timeout - now))
                self._start_queued()
                if not self._running and not self._queued:
                    wait = 3600.0
                self._wake.wait(wait)


def _literal(host: str) -> list[tuple[int, str]] | None:
    """The address itself when ``host`` is an IP literal in its standard form
    (no lookup needed). Other spellings (``2130706433``, ``0x7f.1``) go to
    getaddrinfo, whose answer the guard checks like any other."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, host)
        except OSError:
            continue
        return [(int(family), socket.inet_ntop(family, packed))]
    return None
