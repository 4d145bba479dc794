"""CONNECT tunnels: bulk transfer both ways, half-close, resets on either side."""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
import time

import origins
from origins import Reader, connect_tunnel

MiB = 1 << 20
BIG = 64 * MiB


def _tunnel_https(
    p, origin, ctx: ssl.SSLContext, host: str = "127.0.0.1"
) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection("127.0.0.1", p.port, context=ctx, timeout=30)
    conn.set_tunnel(host, origin.port)
    return conn


def test_connect_established_reply(proxy, tls_origin):
    p = proxy()
    s, resp, reader = connect_tunnel(p, tls_origin.hostport)
    with s:
        assert resp.status == 200, resp
        assert resp.version == "HTTP/1.1"
        assert not reader.buf, "proxy sent bytes after the 200 before the origin spoke"
    h = p.healthz()
    assert h["connections"]["tunnels_total"] == 1


def test_64mib_download_and_upload_through_tunnel(proxy, tls_origin, client_ssl_ctx):
    p = proxy()
    before = p.healthz()
    expected = origins.pattern_sha256(BIG)
    conn = _tunnel_https(p, tls_origin, client_ssl_ctx)
    try:
        conn.request("GET", f"/download?n={BIG}")
        resp = conn.getresponse()
        assert resp.status == 200
        h = hashlib.sha256()
        got = 0
        while chunk := resp.read(MiB):
            h.update(chunk)
            got += len(chunk)
        assert got == BIG
        assert h.hexdigest() == expected, "download corrupted in the tunnel"

        conn.request(
            "POST",
            "/sha256",
            body=origins.pattern_chunks(BIG),
            headers={"Content-Length": str(BIG)},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read().decode() == f"{expected} {BIG}", "upload corrupted in the tunnel"
    finally:
        conn.close()
    # both requests went over one tunnel, one TLS session to the origin
    assert tls_origin.connections == 1
    p.wait_open_connections(1)
    after = p.healthz()
    assert after["connections"]["tunnels_total"] == before["connections"]["tunnels_total"] + 1
    assert after["bytes_spliced"] >= BIG, (
        f"bytes_spliced={after['bytes_spliced']}: splice(2) did not carry the 64 MiB tunnel"
    )
    assert after["bytes_up"] - before["bytes_up"] >= BIG
    assert after["bytes_down"] - before["bytes_down"] >= BIG


def test_tunnel_to_name_resolved_by_proxy(proxy, tls_origin, client_ssl_ctx):
    """CONNECT localhost:port: the proxy resolves the name (and must reach the 127.0.0.1 origin)."""
    p = proxy()
    conn = _tunnel_https(p, tls_origin, client_ssl_ctx, host="localhost")
    try:
        conn.request("GET", "/hello")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read() == b"hello from origin"
    finally:
        conn.close()


def test_connect_to_routes_tunnel(proxy, tls_origin, client_ssl_ctx):
    p = proxy("--connect-to", f"*.elbasy.test:443:127.0.0.1:{tls_origin.port}")
    s, resp, reader = connect_tunnel(p, "api.elbasy.test:443")
    with s:
        assert resp.status == 200, resp
        # the cert is for localhost: verify against that name, the bytes went to our origin
        tls = client_ssl_ctx.wrap_socket(s, server_hostname="localhost")
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: api.elbasy.test\r\nConnection: close\r\n\r\n")
        r = origins.read_response(Reader(tls))
        assert r.status == 200 and r.body == b"hello from origin"
    [req] = tls_origin.requests
    assert req.headers.get("Host") == "api.elbasy.test"


def test_half_close_through_tunnel(proxy, raw_origin):
    """Client sends, shuts down its write side, and still receives the whole reply."""
    origin = raw_origin(origins.handler_read_to_eof_then_reply)
    p = proxy()
    payload = b"".join(origins.pattern_chunks(3 * MiB))
    s, resp, reader = connect_tunnel(p, origin.hostport)
    with s:
        assert resp.status == 200
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        reply = reader.read_to_eof()
    assert origin.wait_event("eof") == len(payload), "origin did not see the client's EOF"
    expected = f"got {len(payload)} bytes sha256={hashlib.sha256(payload).hexdigest()}\n"
    assert reply == expected.encode() + b"tail" * 1000


def test_half_close_from_origin_side(proxy, raw_origin):
    """Origin sends its reply and shuts down writing; the client can still send afterwards."""

    def handler(sock: socket.socket, origin: origins.RawOrigin) -> None:
        sock.sendall(b"banner\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        origin.event("received", data)

    origin = raw_origin(handler)
    p = proxy()
    s, resp, reader = connect_tunnel(p, origin.hostport)
    with s:
        assert resp.status == 200
        s.settimeout(10)
        assert reader.read_to_eof() == b"banner\n"  # EOF from origin reached the client
        s.sendall(b"still talking after your FIN")  # our direction stays open
        s.shutdown(socket.SHUT_WR)
        assert origin.wait_event("received") == b"still talking after your FIN"


def _baseline_open(p) -> int:
    return p.healthz()["connections"]["open"]


def test_client_reset_mid_download(proxy, raw_origin):
    origin = raw_origin(origins.handler_stream_forever)
    p = proxy()
    base = _baseline_open(p)
    s, resp, reader = connect_tunnel(p, origin.hostport)
    assert resp.status == 200
    got = len(reader.buf)
    while got < 2 * MiB:
        got += len(s.recv(256 * 1024))
    origins.reset_close(s)
    ended = origin.wait_event("ended", timeout=5)
    assert ended
    assert p.alive()
    h = p.wait_open_connections(base)
    assert h["connections"]["open"] == base, h
    assert h["connections"]["tunnels_open"] == 0, h


def test_client_reset_mid_upload(proxy, raw_origin):
    origin = raw_origin(origins.handler_sink_forever)
    p = proxy()
    base = _baseline_open(p)
    s, resp, reader = connect_tunnel(p, origin.hostport)
    assert resp.status == 200
    for piece in origins.pattern_chunks(4 * MiB):
        s.sendall(piece)
    origins.reset_close(s)
    ended = origin.wait_event("ended", timeout=5)
    assert "after" in str(ended)
    assert p.alive()
    h = p.wait_open_connections(base)
    assert h["connections"]["open"] == base, h
    assert h["connections"]["tunnels_open"] == 0, h


def test_upstream_reset_mid_download(proxy, raw_origin):
    n = 1 * MiB
    origin = raw_origin(origins.handler_send_then_reset(n))
    p = proxy()
    base = _baseline_open(p)
    s, resp, reader = connect_tunnel(p, origin.hostport)
    assert resp.status == 200
    s.settimeout(10)
    got = len(reader.buf)
    ended_by = None
    t0 = time.monotonic()
    try:
        while True:
            data = s.recv(256 * 1024)
            if not data:
                ended_by = "EOF"
                break
            got += len(data)
    except ConnectionResetError:
        ended_by = "RST"
    except TimeoutError:
        ended_by = None
    finally:
        s.close()
    assert ended_by is not None, "client never saw the tunnel end after the origin reset"
    assert time.monotonic() - t0 < 5
    assert got <= n
    assert origin.wait_event("reset") == n
    assert p.alive()
    h = p.wait_open_connections(base)
    assert h["connections"]["open"] == base, h
    assert h["connections"]["tunnels_open"] == 0, h


def test_upstream_reset_mid_upload(proxy, raw_origin):
    origin = raw_origin(origins.handler_read_then_reset(1 * MiB))
    p = proxy()
    base = _baseline_open(p)
    s, resp, reader = connect_tunnel(p, origin.hostport)
    assert resp.status == 200
    s.settimeout(10)
    t0 = time.monotonic()
    ended_by = None
    try:
        for piece in origins.pattern_chunks(256 * MiB, chunk=64 * 1024):
            s.sendall(piece)
            if time.monotonic() - t0 > 10:
                break
        else:
            ended_by = "sent everything?"
    except (BrokenPipeError, ConnectionResetError) as e:
        ended_by = type(e).__name__
    except TimeoutError:
        ended_by = None
    if ended_by is None or ended_by == "sent everything?":
        # writes still blocked or succeeded: the read side must report the end
        try:
            data = s.recv(65536)
            ended_by = "EOF" if data == b"" else None
        except ConnectionResetError:
            ended_by = "RST"
        except TimeoutError:
            ended_by = None
    s.close()
    assert ended_by in ("BrokenPipeError", "ConnectionResetError", "EOF", "RST"), (
        f"client did not see the tunnel end after the origin reset ({ended_by})"
    )
    assert origin.wait_event("reset") >= 1 * MiB
    assert p.alive()
    h = p.wait_open_connections(base)
    assert h["connections"]["open"] == base, h
    assert h["connections"]["tunnels_open"] == 0, h


def test_tunnel_to_plain_http_origin_keeps_bytes_exact(proxy, http_origin):
    """A tunnel is a byte pipe: pipelined requests pass unchanged and in order."""
    p = proxy()
    s, resp, reader = connect_tunnel(p, http_origin.hostport)
    with s:
        assert resp.status == 200
        s.sendall(
            b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /chunked?n=2 HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        r1 = origins.read_response(reader)
        r2 = origins.read_response(reader)
        r3 = origins.read_response(reader)
    assert (r1.body, r2.body, r3.body) == (b"hello from origin", b"abc", b"chunk-0;chunk-1;")
    assert r3.framing == "chunked"  # not re-framed: the proxy does not parse tunnel bytes
    assert [r.request_line for r in http_origin.requests] == [
        "GET /hello HTTP/1.1",
        "POST /echo HTTP/1.1",
        "GET /chunked?n=2 HTTP/1.1",
    ]


def test_tunnel_small_exchanges_many(proxy, raw_origin):
    """Many small back-and-forth messages over one tunnel (latency path, no coalescing bugs)."""

    def echo(sock: socket.socket, origin: origins.RawOrigin) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := sock.recv(65536):
            sock.sendall(data)

    origin = raw_origin(echo)
    p = proxy()
    s, resp, reader = connect_tunnel(p, origin.hostport)
    with s:
        assert resp.status == 200
        s.settimeout(5)
        t0 = time.monotonic()
        for i in range(200):
            msg = f"ping {i}\n".encode()
            s.sendall(msg)
            assert reader.read_exact(len(msg)) == msg
        elapsed = time.monotonic() - t0
    # 200 round trips on loopback: anything near 40 ms each means Nagle/delayed-ACK stalls
    assert elapsed < 4, f"200 round trips took {elapsed:.2f}s"
