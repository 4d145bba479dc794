"""The non-blocking transports to Redis (elbasy/redis_pipe.py), on a real server.

Steps sent without waiting come back through the fd the loop would watch, in
the order sent, with the same answers as one blocking call at a time; a
batch costs one round trip; NOSCRIPT is answered by running the step once
(never twice); a lost connection answers every call in flight.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

import pytest
import redis

from elbasy.limits import BUCKET, Limit
from elbasy.quota import LocalStore, Reservation, Safety
from elbasy.redis_pipe import Reply, SocketPipe, ThreadPipe
from elbasy.redis_store import RedisStore, answer

EXACT = Safety(margin=0.0, headroom=0.0, jitter=0.0, guard=0.0)
SHOPIFY = Limit("shopify-rest", BUCKET, capacity=40, rate=2)

Pipe = SocketPipe | ThreadPipe


def _make(kind: str, url: str) -> Pipe:
    if kind == "socket":
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        return SocketPipe("127.0.0.1", port)
    return ThreadPipe(redis.Redis.from_url(url))


def _collect(pipe: Pipe, n: int, timeout: float = 10.0) -> list[tuple[object, Reply]]:
    """Answers until n came, waiting on the pipe's fd as the loop would."""
    got: list[tuple[object, Reply]] = []
    deadline = time.monotonic() + timeout
    pipe.flush()
    while len(got) < n and time.monotonic() < deadline:
        if pipe.wants_write():
            select.select([], [pipe.fileno()], [], 0.1)
            pipe.flush()
        ready, _, _ = select.select([pipe.fileno()], [], [], 0.1)
        if ready:
            got += pipe.completed()
    return got


def _reserve_many(
    kind: str, url: str, n: int, before: Callable[[RedisStore], None] | None = None
) -> tuple[list[tuple[object, Reply]], Pipe]:
    store = RedisStore(url, EXACT, clock="caller")
    if before:
        before(store)
    pipe = _make(kind, url)
    for i in range(n):
        name, keys, blob = store.request("reserve", ["a"], [SHOPIFY], 0.0, 1.0, 1e6)
        pipe.send(i, name, keys, blob)
    got = _collect(pipe, n)
    store.close()
    return got, pipe


def _local_departs(n: int) -> list[float]:
    local = LocalStore(EXACT)
    out = []
    for _ in range(n):
        r = local.reserve(["a"], [SHOPIFY], 1.0, 0.0, 1e6)
        assert isinstance(r, Reservation)
        out.append(r.depart)
    return out


@pytest.mark.parametrize("kind", ["socket", "thread"])
def test_a_batch_answers_in_order_as_one_call_at_a_time_would(redis_url: str, kind: str) -> None:
    got, pipe = _reserve_many(kind, redis_url, 200)
    try:
        assert [token for token, _ in got] == list(range(200))
        departs = []
        for _, reply in got:
            assert isinstance(reply, bytes), reply
            out = answer(reply)
            assert out[1] == 0  # a place
            departs.append(out[2])
        assert departs == _local_departs(200)
        if kind == "socket":
            assert pipe.round_trips == 1  # 200 steps, one write
        else:
            assert pipe.round_trips < 200  # what queued during a trip went together
    finally:
        pipe.close()


@pytest.mark.parametrize("kind", ["socket", "thread"])
def test_noscript_runs_each_step_once(redis_url: str, kind: str) -> None:
    got, pipe = _reserve_many(kind, redis_url, 60, before=lambda s: s.client.script_flush())
    try:
        assert pipe.reloads > 0
        assert sorted(t for t, _ in got) == list(range(60))
        departs = [answer(r)[2] for _, r in sorted(got, key=lambda x: x[0])]  # type: ignore[arg-type]
        assert departs == _local_departs(60)  # none counted twice
    finally:
        pipe.close()


def test_a_lost_connection_answers_every_call_in_flight(redis_url: str) -> None:
    store = RedisStore(redis_url, EXACT, clock="caller")
    pipe = SocketPipe("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        # the server accepts the pipe's connection on its next turn: wait for it
        deadline = time.monotonic() + 5
        while len(store.client.client_list()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.client.client_kill_filter(_type="normal", skipme=True) >= 1
        for i in range(5):
            pipe.send(i, *store.request("reserve", ["a"], [SHOPIFY], 0.0, 1.0, 60))
        got = _collect(pipe, 5, timeout=3)
        assert [t for t, _ in got] == list(range(5))
        assert all(isinstance(r, Exception) for _, r in got)
        with pytest.raises(ConnectionError):
            pipe.send(9, *store.request("reserve", ["a"], [SHOPIFY], 0.0, 1.0, 60))
    finally:
        pipe.close()
        store.close()


def test_making_a_pipe_never_waits_for_the_connect() -> None:
    """A Redis whose accept queue is full (its SYNs go unanswered, as a server
    that hangs would): the pipe is made at once, takes steps without blocking,
    and answers nothing until the connect is through."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        queued = []
        for _ in range(4):  # fill the backlog (0 means one, plus the SYN queue's slack)
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            queued.append(c)
        time.sleep(0.1)
        try:
            started = time.monotonic()
            pipe = SocketPipe("127.0.0.1", port, password="x", db=3)
            pipe.send(1, "reserve", ["{a}:k"], b"blob")
            pipe.flush()
            got = pipe.completed()
            took = time.monotonic() - started
            assert took < 0.5, took  # a connect that blocked on the full backlog: seconds
            assert got == [] and pipe.connecting and pipe.wants_write()
            pipe.close()
        finally:
            for c in queued:
                c.close()


def test_a_refused_auth_answers_every_step_behind_it(redis_url: str) -> None:
    """AUTH and SELECT go ahead of the first steps, pipelined; the test server
    has no password, so AUTH is refused and each step is answered with why."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    store = RedisStore(redis_url, EXACT, clock="caller")
    pipe = SocketPipe("127.0.0.1", port, password="wrong")
    try:
        for i in range(3):
            pipe.send(i, *store.request("reserve", ["a"], [SHOPIFY], 0.0, 1.0, 60))
        got = _collect(pipe, 3, timeout=5)
        assert [t for t, _ in got] == [0, 1, 2]
        assert all(isinstance(r, ConnectionError) for _, r in got), got
        assert "Redis refused AUTH" in str(got[0][1])
        assert pipe.closed is not None
    finally:
        pipe.close()
        store.close()


def test_a_refused_connect_is_an_error_at_once_or_an_answer_later() -> None:
    """A refused connect known by the time the pipe is made (loopback answers at
    once) is an error there, and its owner falls back as for any Redis that cannot
    be reached; one known later answers the steps sent meanwhile with why."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connects are refused
        try:
            pipe = SocketPipe("127.0.0.1", port)
        except ConnectionError as exc:
            assert "Connection refused" in str(exc)
            return
        pipe.send(7, "reserve", ["{a}:k"], b"blob")
        got = _collect(pipe, 1, timeout=5)
    assert [t for t, _ in got] == [7]
    assert "Connection refused" in str(got[0][1])
