"""Deadlines: head (slowloris), connect, upstream response, keep-alive idle, tunnel idle."""

from __future__ import annotations

import socket
import threading
import time

import origins
from origins import Reader, connect_tunnel, send_and_read


def _wait_closed(s: socket.socket, limit: float) -> float | None:
    """Seconds until the peer closes (EOF/RST), reading and discarding any reply; None if never."""
    t0 = time.monotonic()
    while True:
        left = limit - (time.monotonic() - t0)
        if left <= 0:
            return None
        s.settimeout(left)
        try:
            if s.recv(65536) == b"":
                return time.monotonic() - t0
        except ConnectionResetError:
            return time.monotonic() - t0
        except TimeoutError:
            return None


def test_connect_timeout_is_504(proxy, blackhole):
    p = proxy(
        "--connect-timeout", "1", "--connect-to", f"blackhole.test:443:127.0.0.1:{blackhole.port}"
    )
    t0 = time.monotonic()
    s, resp, reader = connect_tunnel(p, "blackhole.test:443", timeout=10)
    elapsed = time.monotonic() - t0
    with s:
        assert resp.status == 504, resp.raw_head
        assert origins.closed_after(s, reader)
    assert 0.8 <= elapsed <= 3.5, f"504 after {elapsed:.2f}s with --connect-timeout 1"


def test_forward_connect_timeout_is_504(proxy, blackhole):
    p = proxy("--connect-timeout", "1")
    t0 = time.monotonic()
    resp, closed = send_and_read(
        p, f"GET http://127.0.0.1:{blackhole.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    elapsed = time.monotonic() - t0
    assert resp.status == 504
    assert 0.8 <= elapsed <= 3.5, elapsed


def test_response_timeout_is_504(proxy, http_origin):
    p = proxy("--response-timeout", "1")
    hp = http_origin.hostport
    t0 = time.monotonic()
    resp, _ = send_and_read(p, f"GET http://{hp}/slow?s=4 HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode())
    elapsed = time.monotonic() - t0
    assert resp.status == 504, resp.raw_head
    assert 0.8 <= elapsed <= 3.0, f"504 after {elapsed:.2f}s with --response-timeout 1"
    # the proxy is fine afterwards and a fast request on a new connection works
    resp, _ = send_and_read(p, f"GET http://{hp}/hello HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode())
    assert resp.status == 200


def test_response_within_timeout_is_served(proxy, http_origin):
    p = proxy("--response-timeout", "2")
    hp = http_origin.hostport
    resp, _ = send_and_read(
        p, f"GET http://{hp}/slow?s=0.5 HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode()
    )
    assert resp.status == 200
    assert resp.body == b"slow"


def test_slowloris_closed_at_head_deadline_while_others_served(proxy, http_origin):
    p = proxy("--head-timeout", "2")
    before = p.healthz()["counters"]["head_timeouts"]
    hp = http_origin.hostport
    result: dict[str, object] = {}

    def slow_client() -> None:
        s = p.connect()
        t0 = time.monotonic()
        head = b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: slow\r\n\r\n"
        closed_at = None
        try:
            for b in head[:10]:  # never completes: 10 bytes in ~10 s at most
                try:
                    s.sendall(bytes([b]))
                except (BrokenPipeError, ConnectionResetError):
                    closed_at = time.monotonic() - t0
                    break
                waited = _wait_closed(s, 1.0)
                if waited is not None:
                    closed_at = time.monotonic() - t0
                    break
        finally:
            s.close()
        result["closed_at"] = closed_at

    t = threading.Thread(target=slow_client)
    t.start()
    time.sleep(0.5)
    # meanwhile, other clients are served promptly
    served = []
    for _ in range(3):
        t1 = time.monotonic()
        with p.connect(timeout=5) as s:
            s.sendall(f"GET http://{hp}/hello HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode())
            resp = origins.read_response(Reader(s))
        served.append((resp.status, time.monotonic() - t1))
        time.sleep(0.3)
    t.join(15)
    assert all(st == 200 for st, _ in served), served
    # a client stalled behind the slow one would wait out its 2 s head timeout
    assert all(dt < 1.5 for _, dt in served), f"other clients stalled: {served}"
    closed_at = result.get("closed_at")
    assert closed_at is not None, "slowloris client was never closed"
    assert 1.5 <= closed_at <= 4.0, f"closed after {closed_at:.2f}s with --head-timeout 2"
    assert p.healthz()["counters"]["head_timeouts"] == before + 1


def test_head_deadline_is_not_reset_by_each_byte(proxy):
    """The head deadline is absolute from accept: trickling bytes does not extend it."""
    p = proxy("--head-timeout", "1")
    with p.connect() as s:
        t0 = time.monotonic()
        s.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nX-Trickle: ")
        closed = None
        for _ in range(12):
            try:
                s.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed = time.monotonic() - t0
                break
            if _wait_closed(s, 0.3) is not None:
                closed = time.monotonic() - t0
                break
        assert closed is not None and 0.8 <= closed <= 2.5, closed


def test_keepalive_idle_client_connection_closed(proxy, http_origin):
    p = proxy("--keepalive-timeout", "1")
    hp = http_origin.hostport
    with p.connect() as s:
        reader = Reader(s)
        s.sendall(f"GET http://{hp}/hello HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode())
        assert origins.read_response(reader).status == 200
        waited = _wait_closed(s, 5)
    assert waited is not None, "idle keep-alive connection never closed"
    assert 0.5 <= waited <= 3.0, waited


def test_idle_tunnel_closed_and_counted(proxy, raw_origin):
    origin = raw_origin(origins.handler_sink_forever)
    p = proxy("--idle-timeout", "1")
    before = p.healthz()["counters"]["idle_timeouts"]
    s, resp, reader = connect_tunnel(p, origin.hostport)
    with s:
        assert resp.status == 200
        waited = _wait_closed(s, 5)
    assert waited is not None, "idle tunnel never closed"
    assert 0.5 <= waited <= 3.0, waited
    origin.wait_event("ended")  # the origin side of the tunnel was closed too
    assert p.healthz()["counters"]["idle_timeouts"] == before + 1


def test_active_tunnel_not_idle(proxy, raw_origin):
    def echo(sock: socket.socket, origin: origins.RawOrigin) -> None:
        while data := sock.recv(65536):
            sock.sendall(data)

    origin = raw_origin(echo)
    p = proxy("--idle-timeout", "1")
    s, resp, reader = connect_tunnel(p, origin.hostport)
    with s:
        assert resp.status == 200
        s.settimeout(2)
        for i in range(8):  # 2.4 s of traffic, a message every 0.3 s
            s.sendall(b"%d" % i)
            assert reader.read_exact(1) == b"%d" % i
            time.sleep(0.3)


def test_a_trickled_request_body_ends_at_the_exchange_deadline(proxy, raw_origin):
    """A byte of body every 0.2 s refreshes the per-byte deadline forever; the
    exchange's own deadline ends it (504, both connections closed)."""
    origin = raw_origin(origins.handler_sink_forever)
    p = proxy("--exchange-timeout", "1.5", "--response-timeout", "5")
    hp = f"127.0.0.1:{origin.port}"
    s = p.connect()
    with s:
        s.sendall(
            f"POST http://{hp}/ HTTP/1.1\r\nHost: {hp}\r\nContent-Length: 100\r\n\r\n".encode()
        )
        t0 = time.monotonic()
        reader = Reader(s)
        s.settimeout(0.2)
        head = None
        for _ in range(40):  # at most 8 s of trickle
            try:
                s.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                head = reader.read_head()
                break
            except TimeoutError:
                continue
        elapsed = time.monotonic() - t0
        assert head is not None and head.startswith(b"HTTP/1.1 504 "), head
        assert 1.2 <= elapsed <= 4.0, elapsed
    h = p.healthz()
    assert h["counters"]["exchange_timeouts"] == 1
    assert h["counters"]["response_timeouts"] == 0


def test_a_trickled_answer_is_closed_at_the_exchange_deadline(proxy, raw_origin):
    def trickle(sock: socket.socket, o: origins.RawOrigin) -> None:
        Reader(sock).read_head()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        try:
            for _ in range(40):
                sock.sendall(b"y")
                time.sleep(0.2)
        except OSError:
            o.event("closed")

    origin = raw_origin(trickle)
    p = proxy("--exchange-timeout", "1.5", "--response-timeout", "5")
    hp = f"127.0.0.1:{origin.port}"
    s = p.connect()
    with s:
        s.sendall(f"GET http://{hp}/ HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode())
        closed = _wait_closed(s, 8.0)
    assert closed is not None and 1.2 <= closed <= 4.0, closed
    origin.wait_event("closed", timeout=5)
    assert p.healthz()["counters"]["exchange_timeouts"] == 1
