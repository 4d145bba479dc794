"""Name resolution that never blocks the loop.

getaddrinfo runs on a few worker threads; each answer is queued and the
loop is woken through an eventfd it polls. IP literals and fresh cache hits
answer at once. Answers are lists of (family, address, port) for the loop to
try in order; failures are a one-line reason string for the 502.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from elbasy.config import ConnectTo, route
from elbasy.metrics import WorkerMetrics

Address = tuple[int, str, int]
Answer = list[Address] | str


class Resolver:
    def __init__(
        self,
        clock: Any,
        connect_to: tuple[ConnectTo, ...] = (),
        ttl: float = 30.0,
        negative_ttl: float = 5.0,
        threads: int = 4,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._clock = clock
        self._metrics = metrics if metrics is not None else WorkerMetrics()
        self._connect_to = connect_to
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._cache: dict[tuple[str, int], tuple[float, Answer]] = {}
        self._done: deque[tuple[Any, Answer]] = deque()
        self._pending: dict[tuple[str, int], list[Any]] = {}
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="elbasy-dns")

    def fileno(self) -> int:
        return self._efd

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        os.close(self._efd)

    def lookup(self, host: str, port: int, token: Any) -> Answer | None:
        """An answer now, or None and the answer later through completed()."""
        if self._connect_to:
            host, port = route(self._connect_to, host, port)
        key = (host, port)
        hit = self._cache.get(key)
        self._metrics.count("dns_lookups")
        if hit is not None and hit[0] > self._clock():
            self._metrics.count("dns_cache_hits")
            return hit[1]
        literal = _literal(host, port)
        if literal is not None:
            self._cache[key] = (float("inf"), literal)
            return literal
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.append(token)
            return None
        self._pending[key] = [token]
        self._pool.submit(self._resolve, key)
        return None

    def completed(self) -> list[tuple[Any, Answer]]:
        """Answers that arrived since the last call (loop thread only)."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        out: list[tuple[Any, Answer]] = []
        while self._done:
            key, answer = self._done.popleft()
            ttl = self._ttl if isinstance(answer, list) else self._negative_ttl
            self._cache[key] = (self._clock() + ttl, answer)
            if len(self._cache) > 10000:
                self._cache.clear()  # crude, and rare: a proxy talks to few hosts
            for token in self._pending.pop(key, []):
                out.append((token, answer))
        return out

    def _resolve(self, key: tuple[str, int]) -> None:
        host, port = key
        answer: Answer
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            seen: list[Address] = []
            for family, _, _, _, sockaddr in infos:
                entry = (int(family), str(sockaddr[0]), port)
                if entry not in seen:
                    seen.append(entry)
            answer = seen or f"no address for {host}"
        except socket.gaierror as exc:
            answer = f"DNS lookup for {host} failed: {exc.strerror}"
        except Exception as exc:  # the loop must hear back whatever happens
            answer = f"DNS lookup for {host} failed: {exc}"
        self._done.append((key, answer))
        os.eventfd_write(self._efd, 1)


def _literal(host: str, port: int) -> list[Address] | None:
    """The address itself when `host` is an IP literal (no lookup needed)."""
    host = host.strip("[]")
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, host)
        except OSError:
            continue
        return [(int(family), socket.inet_ntop(family, packed), port)]
    return None
