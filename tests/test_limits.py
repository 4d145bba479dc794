"""Resource limits: running out of file descriptors, and thousands of deadlines at once.

The fd tests start elbasy themselves, with RLIMIT_NOFILE lowered (soft and hard, since elbasy
lifts soft to hard at start) in the child before exec.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import resource
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import origins
import pytest
from conftest import Proxy
from origins import Reader, connect_tunnel

REPO = Path(__file__).resolve().parent.parent
STARTUP = re.compile(r"^elbasy \S+ listening on 127\.0\.0\.1:(\d+)\s*$")
PARTIAL_HEAD = b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nX-Slow: "
NOFILE = 64


class LimitedProxy(Proxy):
    """`python -m elbasy` on 127.0.0.1:0 with RLIMIT_NOFILE set to ``nofile`` (soft and hard)."""

    def __init__(self, nofile: int, *args: str) -> None:
        super().__init__(list(args), nofile=nofile)

    @property
    def lines(self) -> list[str]:
        return self.stderr_lines

    def healthz(self, attempts: int = 1) -> dict:
        """GET /healthz; retried while the proxy sheds connections for want of fds."""
        for i in range(attempts):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/healthz", headers={"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read()
                assert resp.status == 200, (resp.status, body)
                return json.loads(body)
            except (OSError, http.client.HTTPException):
                if i == attempts - 1:
                    raise
                time.sleep(0.2)
            finally:
                conn.close()
        raise AssertionError("unreachable")

    def wait_fds(self, target: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            n = self.fd_count()
            if n == target or time.monotonic() > deadline:
                return n
            time.sleep(0.05)


def at_rest(p: Proxy) -> int:
    """The fds elbasy holds at rest: the same count twice, 0.3 s apart (just
    after start, or after a /healthz, one may still be on its way out)."""
    count = p.fd_count()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = p.fd_count()
        if now == count:
            break
        count = now
    return count


@pytest.fixture
def limited() -> Iterator:
    started: list[LimitedProxy] = []

    def start(nofile: int, *args: str) -> LimitedProxy:
        p = LimitedProxy(nofile, *args)
        started.append(p)
        return p

    yield start
    for p in started:
        was_alive = p.alive()
        code = p.stop()
        assert was_alive, f"elbasy died with {p.proc.returncode}:\n{''.join(p.lines[-30:])}"
        assert code == 0, f"exit code after SIGTERM: {code}\n{''.join(p.lines[-30:])}"


@pytest.fixture
def many_fds() -> Iterator[int]:
    """Lift this test process's soft RLIMIT_NOFILE to the hard limit for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _idle_client(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(PARTIAL_HEAD)  # TCP_DEFER_ACCEPT hands it to elbasy; the head never ends
    return s


def _readable(s: socket.socket, timeout: float) -> bool:
    poller = select.poll()  # not select(): the fds of the 2,000-connection test exceed 1023
    poller.register(s, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(int(timeout * 1000)))


def _closed_by_peer(s: socket.socket) -> bool:
    """Non-blocking: has the proxy closed this connection (EOF or reset)?"""
    if not _readable(s, 0):
        return False
    try:
        return s.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _wait_closed(s: socket.socket, timeout: float) -> bool:
    return _readable(s, timeout) and _closed_by_peer(s)


def test_out_of_fds_sheds_clients_without_spinning_and_recovers(limited, http_origin):
    p = limited(NOFILE, "--head-timeout", "60", "--keepalive-timeout", "1")
    h0 = p.healthz()
    assert h0["counters"]["accept_emfile"] == 0
    baseline = at_rest(p)
    free = NOFILE - baseline
    assert free > 10, f"elbasy already holds {baseline} fds at start; the limit {NOFILE} is too low"

    # 1. fill every free fd with an idle client, then ten more
    idle: list[socket.socket] = []
    try:
        for _ in range(free + 10):
            idle.append(_idle_client(p.port))
        assert p.wait_fds(NOFILE) == NOFILE, f"elbasy holds {p.fd_count()} fds, limit {NOFILE}"
        deadline = time.monotonic() + 5
        while True:
            shed = [s for s in idle if _closed_by_peer(s)]
            if len(shed) >= 10 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(shed) >= 10, f"only {len(shed)} of the clients over the limit were closed"
        assert p.alive()
        for s in shed:
            idle.remove(s)
            s.close()

        # 2. out of fds for 2 s, with a new client every 0.1 s: each is shed, no busy loop
        cpu0 = p.cpu_seconds()
        t0 = time.monotonic()
        extra_shed = 0
        while time.monotonic() - t0 < 2.0:
            with _idle_client(p.port) as s:
                extra_shed += _wait_closed(s, 2.0)
            time.sleep(0.1)
        cpu = p.cpu_seconds() - cpu0
        assert extra_shed >= 10, f"only {extra_shed} clients shed while out of fds"
        assert cpu < 0.5, f"elbasy used {cpu:.2f} s of CPU in 2 s out of fds: a busy loop"
        assert p.alive()
        assert p.fd_count() == NOFILE

        # 3. one fd free: a CONNECT gets its client socket but none for the upstream
        idle.pop().close()
        assert p.wait_fds(NOFILE - 1) == NOFILE - 1
        s, resp, reader = connect_tunnel(p, http_origin.hostport, timeout=5)
        with s:
            assert resp.status == 503, resp
            assert b"out of sockets" in resp.body, resp.body
        assert not http_origin.requests and http_origin.connections == 0
        assert p.alive()

        # 4. /healthz once a few fds are free again
        for s in idle[:3]:
            s.close()
        del idle[:3]
        h = p.healthz(attempts=20)
        assert h["counters"]["accept_emfile"] >= 20, h["counters"]
    finally:
        for s in idle:
            s.close()

    # 5. everything closed: back to the baseline, and a forwarded request works
    assert p.wait_fds(baseline) == baseline, f"{p.fd_count()} fds held, baseline {baseline}"
    h = p.healthz(attempts=5)
    assert h["connections"]["open"] == 1, h["connections"]  # this /healthz request
    with p.connect(5) as s:
        s.sendall(
            f"GET {http_origin.base}/hello HTTP/1.1\r\nHost: {http_origin.hostport}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        resp = origins.read_response(Reader(s), "GET")
    assert resp.status == 200 and resp.body == b"hello from origin", resp
    # the pooled upstream connection goes after --keepalive-timeout 1
    assert p.wait_fds(baseline, timeout=5) == baseline, f"{p.fd_count()} fds, baseline {baseline}"


def test_connect_without_fd_for_upstream_is_503_and_counted(limited, http_origin):
    """The same 503 from a cold start, and the proxy serves the tunnel once an fd is free."""
    p = limited(NOFILE, "--head-timeout", "60")
    baseline = p.fd_count()
    idle: list[socket.socket] = []
    try:
        for _ in range(NOFILE - baseline):
            idle.append(_idle_client(p.port))
        assert p.wait_fds(NOFILE) == NOFILE
        idle.pop().close()
        assert p.wait_fds(NOFILE - 1) == NOFILE - 1
        s, resp, reader = connect_tunnel(p, http_origin.hostport, timeout=5)
        with s:
            assert resp.status == 503, resp
            assert resp.headers.get("Content-Type", "").startswith("text/plain"), resp.headers
            s.settimeout(3)
            assert reader.read_to_eof() == b"", "503 must close the connection"
        # two fds free: the tunnel works
        idle.pop().close()
        assert p.wait_fds(NOFILE - 2) == NOFILE - 2
        s, resp, reader = connect_tunnel(p, http_origin.hostport, timeout=5)
        with s:
            assert resp.status == 200, resp
            s.sendall(f"GET /hello HTTP/1.1\r\nHost: {http_origin.hostport}\r\n\r\n".encode())
            r = origins.read_response(reader, "GET")
            assert r.status == 200 and r.body == b"hello from origin", r
    finally:
        for s in idle:
            s.close()
    assert p.wait_fds(baseline) == baseline, f"{p.fd_count()} fds held, baseline {baseline}"


# long enough that opening the connections (well under a second here) never
# races their deadline on a slow machine
HEAD_TIMEOUT = 6


def test_two_thousand_head_deadlines(proxy, many_fds):
    n = 2000
    if many_fds < n + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {many_fds} is too low for {n} connections")
    p = proxy("--head-timeout", str(HEAD_TIMEOUT))
    h0 = p.healthz()
    fds0 = at_rest(p)
    socks: list[socket.socket] = []
    try:
        t_first = time.monotonic()
        for _ in range(n):
            try:
                socks.append(_idle_client(p.port))
            except OSError as e:  # pragma: no cover - diagnostic
                if e.errno == errno.EMFILE:
                    pytest.fail(f"the test ran out of fds after {len(socks)} connections")
                raise
        t_last = time.monotonic()
        assert t_last - t_first < HEAD_TIMEOUT - 1.5, (
            f"opening {n} connections took {t_last - t_first:.1f} s"
        )
        h = p.wait_open_connections(n + 1, timeout=2)
        assert h["connections"]["open"] == n + 1, h["connections"]
        assert h["counters"]["timers"] >= n, h["counters"]
        assert p.fd_count() >= fds0 + n

        # waiting on 2,000 deadlines costs (next to) nothing
        cpu0 = p.cpu_seconds()
        time.sleep(max(0.0, t_first + HEAD_TIMEOUT - 1.5 - time.monotonic()))
        assert p.cpu_seconds() - cpu0 < 0.3
        assert p.healthz()["counters"]["head_timeouts"] == h0["counters"]["head_timeouts"]

        # all closed by the proxy within a few seconds of the deadline
        limit = t_last + HEAD_TIMEOUT + 3
        still_open = 0
        for s in socks:
            if not _wait_closed(s, max(0.0, limit - time.monotonic())):
                still_open += 1
        assert still_open == 0, f"{still_open} of {n} connections outlived their head deadline"
    finally:
        for s in socks:
            s.close()
    h = p.wait_open_connections(1, timeout=3)
    assert h["connections"]["open"] == 1, h["connections"]
    assert h["counters"]["head_timeouts"] - h0["counters"]["head_timeouts"] == n, h["counters"]
    assert h["counters"]["timers"] < 50, h["counters"]
    deadline = time.monotonic() + 5
    while p.fd_count() > fds0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert p.fd_count() == fds0


def test_connection_limits_answer_503_at_once_and_count(proxy, http_origin) -> None:
    """--max-client-connections: the connection past it from one address gets
    elbasy's 503 at accept, the others go on; a place freed is taken again."""
    p = proxy("--max-client-connections", "3")
    hp = http_origin.hostport
    held = [p.connect() for _ in range(3)]
    for s in held:
        s.sendall(b"GET http://" + hp.encode() + b"/hello HTTP/1.1\r\n")  # half a head
    time.sleep(0.2)  # accepted (the listener defers accept until bytes come)
    extra = p.connect()
    with extra:
        extra.sendall(f"GET http://{hp}/hello HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode())
        resp = origins.read_response(origins.Reader(extra))
        assert resp.status == 503 and resp.headers.get("Retry-After") == "1"
        assert b"too many connections" in resp.body
    # the ones it held are served when their heads end
    for s in held:
        s.sendall(f"Host: {hp}\r\n\r\n".encode())
        assert origins.read_response(origins.Reader(s)).status == 200
        s.close()
    h = p.healthz()  # its own connection fits again
    assert h["counters"]["refused_busy"] == 1
    assert h["connections"]["open"] == 1


def test_the_global_connection_limit(proxy, http_origin) -> None:
    p = proxy("--max-connections", "2")
    hp = http_origin.hostport
    held = [p.connect() for _ in range(2)]
    for s in held:
        s.sendall(b"GET / HTTP/1.1\r\n")
    time.sleep(0.2)
    extra = p.connect()
    with extra:
        extra.sendall(f"GET http://{hp}/hello HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode())
        assert origins.read_response(origins.Reader(extra)).status == 503
    for s in held:
        s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            assert p.healthz()["counters"]["refused_busy"] >= 1
            break
        except (AssertionError, OSError, ValueError):
            time.sleep(0.05)
    else:
        raise AssertionError("the limit never let a connection in again")


def _held_and_refused(p, n: int, source: str = "127.0.0.1") -> tuple[list[socket.socket], int]:
    """Open ``n`` connections from ``source``, each with half a head (accepted, and
    then held open by elbasy); (the ones still open, how many were answered 503)."""
    kept, refused = [], 0
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", p.port), timeout=10, source_address=(source, 0))
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        kept.append(s)
    time.sleep(0.5)
    still = []
    for s in kept:
        s.settimeout(0.2)
        try:
            got = s.recv(4096)
        except TimeoutError:
            still.append(s)  # held: waiting for the rest of its head
            continue
        refused += got.startswith(b"HTTP/1.1 503")
        s.close()
    return still, refused


def test_the_limits_count_every_workers_connections(proxy) -> None:
    """With --workers 2 the kernel spreads one address's connections over both
    workers; the limits are the instance's all the same. A worker killed while it
    holds connections gives its share back once it is reaped."""
    p = proxy("--workers", "2", "--max-client-connections", "3", "--max-connections", "5")
    held, refused = _held_and_refused(p, 8)
    assert (len(held), refused) == (3, 5)
    other, refused = _held_and_refused(p, 4, "127.0.0.2")  # another address: its own 3...
    assert (len(other), refused) == (2, 2)  # ...but the instance holds 5 at most
    for s in held + other:
        s.close()
    time.sleep(0.5)
    again, refused = _held_and_refused(p, 4)
    assert (len(again), refused) == (3, 1)  # places freed are taken again
    # the worker holding most of them dies: its share goes with it
    pids = p.worker_pids()
    counts = {pid: sum(1 for fd in os.listdir(f"/proc/{pid}/fd")) for pid in pids}
    victim = max(counts, key=counts.__getitem__)
    os.kill(victim, signal.SIGKILL)
    for s in again:
        s.close()
    deadline = time.monotonic() + 10
    while (len(p.worker_pids()) < 2 or victim in p.worker_pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    after, refused = _held_and_refused(p, 4)
    assert (len(after), refused) == (3, 1)
    for s in after:
        s.close()
