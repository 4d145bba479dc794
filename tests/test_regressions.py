"""Defects found in review of the data plane, each pinned by a test that failed before its fix."""

from __future__ import annotations

import socket
import threading
import time

import origins
from origins import send_and_read


def _listener() -> tuple[socket.socket, int]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    return ls, ls.getsockname()[1]


def _read_until_quiet(s: socket.socket, limit: float = 15.0) -> bytes:
    s.settimeout(2)
    data = b""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_a_flood_of_pipelined_requests_neither_crashes_nor_grows(proxy):
    """50,000 pipelined requests for elbasy's own pages, never read: once the
    owed answers pass a bound, elbasy stops reading (it used to recurse per
    request until the stack overflowed, and to buffer every answer)."""
    p = proxy()
    rss = lambda: int(  # noqa: E731
        next(ln for ln in open(f"/proc/{p.worker_pid}/status") if ln.startswith("VmRSS")).split()[1]
    )
    before = rss()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", p.port))
    s.settimeout(5)
    try:
        s.sendall(b"GET /nope HTTP/1.1\r\n\r\n" * 50_000)
    except TimeoutError:
        pass  # elbasy stopped reading: that is the point
    time.sleep(1)
    assert p.alive()
    assert rss() - before < 20_000, "KiB grown while answers piled up"
    # reading the answers lets elbasy go on; every one is a 404
    s.settimeout(10)
    got = b""
    while got.count(b"HTTP/1.1 404") < 50_000:
        chunk = s.recv(1 << 20)
        assert chunk, f"closed after {got.count(b'HTTP/1.1 404')} answers"
        got += chunk
    s.close()
    assert p.alive()


def test_connection_naming_content_length_does_not_unframe_the_body(proxy, http_origin):
    """`Connection: content-length` must not strip the header elbasy frames the
    body by, or the body would reach the upstream as a second request."""
    p = proxy()
    body = b"GET /admin-smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    head = (
        f"POST {http_origin.base}/echo HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    resp, _ = send_and_read(p, head + body, method="POST")
    assert resp.status == 200
    assert resp.body == body
    paths = [r.path for r in http_origin.requests]
    assert paths == ["/echo"], paths


def test_bare_lf_in_chunked_trailers_is_refused(proxy, http_origin):
    p = proxy()
    head = f"POST {http_origin.base}/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    smuggled = b"0\r\nX: a\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    resp, closed = send_and_read(p, head.encode() + smuggled, method="POST")
    assert resp.status == 400 and closed
    assert all(r.path != "/smuggled" for r in http_origin.requests)


def test_a_tunnel_waiting_on_a_stalled_reader_does_not_spin(proxy):
    """Client half-closes and never reads; the upstream sends a lot and then
    its FIN. The upstream socket reports HUP on every poll: elbasy must not
    wake for it while the data waits on the client, and the idle deadline
    must still close the tunnel."""
    ls, port = _listener()
    held: list[socket.socket] = []

    def upstream() -> None:
        c, _ = ls.accept()
        held.append(c)
        c.recv(10)  # the client's FIN, passed on
        c.sendall(b"y" * 4_000_000)
        c.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    p = proxy("--idle-timeout", "2")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", p.port))
    s.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    s.shutdown(socket.SHUT_WR)
    time.sleep(1)
    c0 = p.cpu_seconds()
    time.sleep(3)
    assert p.cpu_seconds() - c0 < 0.5
    assert p.wait_open_connections(1, timeout=5)["connections"]["tunnels_open"] == 0
    s.close()
    ls.close()
    for c in held:
        c.close()


def test_connect_pipelined_after_a_request_waits_for_its_response(proxy):
    ls, port = _listener()
    size = 4_000_000

    def upstream() -> None:
        for _ in range(2):
            c, _ = ls.accept()
            first = c.recv(65536)
            if first.startswith(b"GET"):
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"z" * size)
            else:
                c.sendall(b"TUNNEL-BYTES")
            threading.Timer(10, c.close).start()

    threading.Thread(target=upstream, daemon=True).start()
    p = proxy()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", p.port))
    s.sendall(
        f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: a\r\n\r\n"
        f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nhello".encode()
    )
    time.sleep(0.5)  # let elbasy get ahead of this slow reader
    data = _read_until_quiet(s)
    s.close()
    ls.close()
    _, _, rest = data.partition(b"\r\n\r\n")
    assert rest[:size] == b"z" * size
    assert rest[size:] == b"HTTP/1.1 200 Connection established\r\n\r\nTUNNEL-BYTES"


def test_a_client_that_half_closes_gets_the_whole_response(proxy, http_origin):
    p = proxy()
    n = 4_000_000
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", p.port))
    s.sendall(f"GET {http_origin.base}/download?n={n} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    s.shutdown(socket.SHUT_WR)
    time.sleep(0.5)
    resp = origins.read_response(origins.Reader(s))
    s.close()
    assert resp.status == 200 and len(resp.body) == n
