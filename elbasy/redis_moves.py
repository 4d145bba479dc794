"""Other machines' refunds, heard through Redis pub/sub, without blocking the loop.

A refund (GraphQL's requested - actual) or a place given back on one
machine leaves room that the lines waiting on another machine could use at
once. Each :class:`~elbasy.redis_store.RedisStore` publishes the bucket
keys such a step moved on one channel (``<prefix>moved``), tagged with its
own id; every store listens on a thread of its own (a subscribed Redis
connection can do nothing else, and its blocking read must stay off the
loop), keeps what others moved in a queue and wakes the loop through an
eventfd: the same shape as :mod:`elbasy.resolver`. The eventfd never
changes, so the loop can watch it from the start, through reconnects.

Messages can be lost (Redis drops a subscriber that falls behind, or the
connection breaks): a line's head also asks again now and then
(``RedisStore.recheck``), so a lost message makes a departure late, never
early.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any

log = logging.getLogger("elbasy.redis")

#: how long the listener waits on the connection before it looks at its stop flag
_POLL = 0.2
#: reconnect backoff, doubling from the first to the last (seconds)
_BACKOFF = (0.25, 8.0)
#: keys kept for the loop at most; beyond it the loop is told to re-check every line
_MAX_QUEUED = 10_000


def encode(origin: str, keys: tuple[str, ...] | list[str]) -> bytes:
    """One message: who moved them, then the bucket keys, one per line."""
    return "\n".join((origin, *keys)).encode()


def decode(data: bytes) -> tuple[str, list[str]]:
    origin, *keys = data.decode("utf-8", "replace").split("\n")
    return origin, keys


class RedisMoves:
    """The keys other stores on ``channel`` moved, for the loop (fileno, take).

    ``wake_fd``: an eventfd the loop already watches (the machine's shared
    table's, which its workers' local shares use) to signal instead of one
    of its own, so one fd wakes the loop for both.
    """

    def __init__(
        self, client: Any, channel: str, origin: str, every_line: str, wake_fd: int = -1
    ) -> None:
        self._client = client
        self.channel = channel
        self.origin = origin
        self._every_line = every_line
        self._queue: deque[str] = deque()
        self._lost = False  # the queue overflowed or the connection broke: re-check all
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._owns_fd = wake_fd < 0
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if wake_fd < 0 else wake_fd
        self.messages = 0  # heard from others
        self.reconnects = 0
        self._thread = threading.Thread(target=self._listen, name="elbasy-redis-moves", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._efd

    def take(self) -> list[str]:
        """What others moved since the last call (the loop found the fd readable)."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        with self._lock:
            if self._lost:
                self._lost = False
                self._queue.clear()
                return [self._every_line]
            keys = list(self._queue)
            self._queue.clear()
        return keys

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2 * _POLL + 1)
        if self._owns_fd:
            os.close(self._efd)

    # ------------------------------------------------------------------ the thread

    def _listen(self) -> None:
        delay = _BACKOFF[0]
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                delay = _BACKOFF[0]
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=_POLL)
                    if message is not None and message.get("type") == "message":
                        self._heard(message["data"])
            except Exception as exc:  # noqa: BLE001 - a broken connection: back off, again
                if self._stop.is_set():
                    break
                self.reconnects += 1
                log.info("redis: the moves channel broke (%s); again in %.2f s", exc, delay)
                self._mark_lost()
                self._stop.wait(delay)
                delay = min(delay * 2, _BACKOFF[1])
            finally:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001, S110 - closing a broken connection
                    pass

    def _heard(self, data: bytes) -> None:
        origin, keys = decode(data)
        if origin == self.origin or not keys:
            return
        with self._lock:
            self.messages += 1
            if len(self._queue) + len(keys) > _MAX_QUEUED:
                self._lost = True
            else:
                self._queue.extend(keys)
        os.eventfd_write(self._efd, 1)

    def _mark_lost(self) -> None:
        with self._lock:
            self._lost = True
        os.eventfd_write(self._efd, 1)
