"""Plain HTTP forwarding (absolute-form) and origin-form requests to the proxy itself."""

from __future__ import annotations

import socket
import time

import origins
import pytest
from origins import Reader, read_response

HOP_BY_HOP = {
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


def _request(sock: socket.socket, reader: Reader, raw: bytes, method: str = "GET"):
    sock.sendall(raw)
    return read_response(reader, method)


def test_absolute_form_is_rewritten_to_origin_form(proxy, http_origin):
    p = proxy()
    hp = http_origin.hostport
    with p.connect() as s:
        resp = _request(
            s,
            Reader(s),
            f"GET http://{hp}/hello?q=1&x=a%20b HTTP/1.1\r\n"
            f"Host: {hp}\r\nUser-Agent: t\r\n\r\n".encode(),
        )
    assert resp.status == 200
    assert resp.body == b"hello from origin"
    [req] = http_origin.requests
    assert req.request_line == "GET /hello?q=1&x=a%20b HTTP/1.1"
    assert req.headers.get_all("Host") == [hp]
    assert req.headers.get("User-Agent") == "t"


def test_host_header_added_from_url_when_client_omits_it(proxy, http_origin):
    """An HTTP/1.0 client without Host: the origin must still get a Host naming the target."""
    p = proxy()
    hp = http_origin.hostport
    resp, _ = origins.send_and_read(p, f"GET http://{hp}/hello HTTP/1.0\r\n\r\n".encode())
    assert resp.status == 200
    assert resp.body == b"hello from origin"
    [req] = http_origin.requests
    assert req.target == "/hello"
    assert req.headers.get_all("Host") == [hp]


def test_connect_to_applies_to_forwarded_requests(proxy, http_origin):
    p = proxy("--connect-to", f"api.example.test:80:127.0.0.1:{http_origin.port}")
    with p.connect() as s:
        resp = _request(
            s,
            Reader(s),
            b"GET http://api.example.test/hello HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
        )
    assert resp.status == 200, resp
    assert resp.body == b"hello from origin"
    [req] = http_origin.requests
    assert req.request_line == "GET /hello HTTP/1.1"
    assert req.headers.get("Host") == "api.example.test"


def test_hop_by_hop_request_headers_are_stripped(proxy, http_origin):
    p = proxy()
    hp = http_origin.hostport
    raw = (
        f"GET http://{hp}/hello HTTP/1.1\r\n"
        f"Host: {hp}\r\n"
        "Connection: keep-alive, X-Private-Hop\r\n"
        "X-Private-Hop: must-not-leave\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Keep-Alive: timeout=5\r\n"
        "Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        "TE: trailers\r\n"
        "Trailer: X-Checksum\r\n"
        "Upgrade: h2c\r\n"
        "X-End-To-End: kept\r\n"
        "Accept: */*\r\n"
        "\r\n"
    ).encode()
    with p.connect() as s:
        resp = _request(s, Reader(s), raw)
    assert resp.status == 200
    [req] = http_origin.requests
    names = req.headers.names()
    leaked = (names & HOP_BY_HOP - {"connection"}) | (names & {"x-private-hop"})
    assert not leaked, f"hop-by-hop headers reached the origin: {leaked}; head={req.raw_head!r}"
    # a Connection header towards the origin may exist (e.g. keep-alive) but must not name
    # the client's private hop header
    for v in req.headers.get_all("Connection"):
        assert "x-private-hop" not in v.lower(), req.raw_head
    assert req.headers.get("X-End-To-End") == "kept"
    assert req.headers.get("Accept") == "*/*"
    assert b"dXNlcjpwYXNz" not in http_origin.all_raw()


def test_hop_by_hop_response_headers_are_stripped(proxy, http_origin):
    p = proxy()
    hp = http_origin.hostport
    with p.connect() as s:
        resp = _request(
            s, Reader(s), f"GET http://{hp}/hop HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode()
        )
    assert resp.status == 200
    assert resp.body == b"hop"
    assert "X-Resp-Hop" not in resp.headers, resp.raw_head
    assert resp.headers.get("Keep-Alive") is None or "timeout=30" not in resp.headers.get(
        "Keep-Alive", ""
    ), resp.raw_head
    assert resp.headers.get("X-Resp-End") == "kept"


def test_request_body_content_length(proxy, http_origin):
    p = proxy()
    hp = http_origin.hostport
    body = bytes(range(256)) * 40  # 10240 bytes, all byte values
    with p.connect() as s:
        resp = _request(
            s,
            Reader(s),
            f"POST http://{hp}/echo HTTP/1.1\r\nHost: {hp}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body,
        )
    assert resp.status == 200
    assert resp.body == body
    [req] = http_origin.requests
    assert req.body == body
    assert req.headers.get("Content-Length") == str(len(body))


def test_request_body_chunked(proxy, http_origin):
    p = proxy()
    hp = http_origin.hostport
    pieces = [b"first;", b"x" * 5000, b"", b"last"]
    chunked = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in pieces if c)
    chunked += b"0\r\n\r\n"
    with p.connect() as s:
        reader = Reader(s)
        s.sendall(
            f"POST http://{hp}/echo HTTP/1.1\r\nHost: {hp}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        # send the body in slices so the proxy must stream it
        for i in range(0, len(chunked), 700):
            s.sendall(chunked[i : i + 700])
            time.sleep(0.002)
        resp = read_response(reader)
    expected = b"".join(pieces)
    assert resp.status == 200
    assert resp.body == expected
    [req] = http_origin.requests
    assert req.body == expected
    # exactly one framing towards the origin
    assert ("Content-Length" in req.headers) != ("Transfer-Encoding" in req.headers), req.raw_head


def test_request_expect_100_continue(proxy, http_origin):
    p = proxy()
    hp = http_origin.hostport
    body = b"payload-after-100" * 100
    with p.connect(timeout=5) as s:
        reader = Reader(s)
        s.sendall(
            f"PUT http://{hp}/echo HTTP/1.1\r\nHost: {hp}\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        head = reader.read_head()  # a client waits for the 100 before sending its body
        assert head is not None and head.startswith(b"HTTP/1.1 100"), head
        s.sendall(body)
        resp = read_response(reader)
    assert resp.status == 200
    assert resp.body == body
    [req] = http_origin.requests
    assert req.body == body


@pytest.mark.parametrize(
    "path,method,status,body,framings",
    [
        ("/hello", "GET", 200, b"hello from origin", {"length"}),
        (
            "/chunked?n=7",
            "GET",
            200,
            b"".join(f"chunk-{i};".encode() for i in range(7)),
            {"chunked", "length"},
        ),
        (
            "/close",
            "GET",
            200,
            b"".join(f"close-delimited part {i}\n".encode() for i in range(4)),
            {"chunked", "close"},
        ),
        ("/head-test", "HEAD", 200, b"", {"none"}),
        ("/204", "GET", 204, b"", {"none"}),
        ("/304", "GET", 304, b"", {"none"}),
    ],
    ids=["content-length", "chunked", "close-delimited", "HEAD", "204", "304"],
)
def test_response_framing(proxy, http_origin, path, method, status, body, framings):
    """Each response arrives intact; if the connection is kept, the next request still works."""
    p = proxy()
    hp = http_origin.hostport
    with p.connect(timeout=5) as s:
        reader = Reader(s)
        resp = _request(
            s, reader, f"{method} http://{hp}{path} HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode(), method
        )
        assert resp.status == status
        assert resp.body == body
        assert resp.framing in framings, resp.raw_head
        if method == "HEAD":
            assert resp.headers.get("Content-Length") == "1234"
        if resp.framing != "close" and "close" not in (resp.headers.get("Connection") or ""):
            # the proxy must not be waiting for (or inventing) a body: next request on this conn
            nxt = _request(
                s, reader, f"GET http://{hp}/hello HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode()
            )
            assert nxt.status == 200
            assert nxt.body == b"hello from origin"
        else:
            assert path == "/close", f"proxy closed the client connection after {path}"


def test_client_keepalive_and_upstream_reuse(proxy, http_origin):
    p = proxy()
    hp = http_origin.hostport
    n = 6
    with p.connect(timeout=5) as s:
        reader = Reader(s)
        for i in range(n):
            resp = _request(
                s,
                reader,
                f"GET http://{hp}/echo?i={i} HTTP/1.1\r\nHost: {hp}\r\n"
                f"Content-Length: 2\r\n\r\n{i:02d}".encode(),
            )
            assert resp.status == 200
            assert resp.body == f"{i:02d}".encode()
    assert len(http_origin.requests) == n
    assert [r.target for r in http_origin.requests] == [f"/echo?i={i}" for i in range(n)]
    assert http_origin.connections < n, (
        f"origin saw {http_origin.connections} TCP connections for {n} keep-alive requests"
    )


def test_upstream_pool_reused_across_client_connections(proxy, http_origin):
    p = proxy()
    hp = http_origin.hostport
    n = 4
    for _ in range(n):
        with p.connect(timeout=5) as s:
            resp = _request(
                s, Reader(s), f"GET http://{hp}/hello HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode()
            )
            assert resp.status == 200
        time.sleep(0.05)
    assert len(http_origin.requests) == n
    assert http_origin.connections < n, (
        f"origin saw {http_origin.connections} connections for {n} sequential requests: "
        "no upstream pooling"
    )


def test_client_connection_close_is_honoured(proxy, http_origin):
    p = proxy()
    hp = http_origin.hostport
    with p.connect(timeout=5) as s:
        reader = Reader(s)
        resp = _request(
            s,
            reader,
            f"GET http://{hp}/hello HTTP/1.1\r\nHost: {hp}\r\nConnection: close\r\n\r\n".encode(),
        )
        assert resp.status == 200
        assert origins.closed_after(s, reader), "proxy kept the connection after Connection: close"


def test_large_forwarded_bodies_both_ways(proxy, http_origin):
    p = proxy()
    hp = http_origin.hostport
    n = 8 << 20
    with p.connect(timeout=20) as s:
        reader = Reader(s)
        s.sendall(
            f"POST http://{hp}/sha256 HTTP/1.1\r\nHost: {hp}\r\n"
            f"Content-Length: {n}\r\n\r\n".encode()
        )
        for piece in origins.pattern_chunks(n):
            s.sendall(piece)
        resp = read_response(reader)
        assert resp.status == 200
        assert resp.body.decode() == f"{origins.pattern_sha256(n)} {n}"
        resp = _request(
            s, reader, f"GET http://{hp}/download?n={n} HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode()
        )
        assert resp.status == 200
        import hashlib

        assert hashlib.sha256(resp.body).hexdigest() == origins.pattern_sha256(n)
    h = p.healthz()
    assert h["bytes_up"] >= n
    assert h["bytes_down"] >= n
    assert h["connections"]["requests_total"] >= 2


# -- origin-form: the proxy's own pages -------------------------------------------------------


HEALTHZ_SCHEMA = {
    "version": str,
    "uptime_seconds": (int, float),
    "pid": int,
    "worker": int,
    "connections.open": int,
    "connections.accepted": int,
    "connections.tunnels_open": int,
    "connections.tunnels_total": int,
    "connections.requests_total": int,
    "bytes_up": int,
    "bytes_down": int,
    "bytes_spliced": int,
    "bytes_copied": int,
    "counters.head_timeouts": int,
    "counters.idle_timeouts": int,
    "counters.bad_requests": int,
    "counters.accept_emfile": int,
    "counters.upstream_errors": int,
}


def _lookup(doc: dict, dotted: str) -> object:
    for part in dotted.split("."):
        doc = doc[part]
    return doc


def test_healthz_json(proxy):
    p = proxy()
    h = p.healthz()
    problems = []
    for key, typ in HEALTHZ_SCHEMA.items():
        try:
            value = _lookup(h, key)
        except (KeyError, TypeError):
            problems.append(f"missing {key}")
            continue
        if not isinstance(value, typ) or isinstance(value, bool):
            problems.append(f"{key} is {value!r}")
    assert not problems, f"/healthz does not match the contract: {problems}; got {h}"
    assert h["version"] == p.version
    assert h["pid"] == p.worker_pid
    assert h["uptime_seconds"] >= 0
    assert h["connections"]["open"] >= 1  # this very request
    assert h["connections"]["accepted"] >= 1
    assert h["counters"]["head_timeouts"] == 0
    assert h["counters"]["bad_requests"] == 0
    h2 = p.healthz()
    assert h2["connections"]["accepted"] == h["connections"]["accepted"] + 1
    assert h2["uptime_seconds"] >= h["uptime_seconds"]


def test_status_page(proxy):
    p = proxy()
    resp, _ = origins.send_and_read(
        p, b"GET / HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
    )
    assert resp.status == 200
    assert (resp.headers.get("Content-Type") or "").split(";")[0].strip() == "text/html"
    assert "elbasy" in resp.text
    assert "HTTPS_PROXY" in resp.text


def test_unknown_origin_form_path_is_404(proxy):
    p = proxy()
    resp, _ = origins.send_and_read(
        p, b"GET /nope HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
    )
    assert resp.status == 404


def test_origin_form_keepalive(proxy):
    p = proxy()
    with p.connect(timeout=5) as s:
        reader = Reader(s)
        for _ in range(3):
            resp = _request(s, reader, b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
            assert resp.status == 200
            assert resp.json()["version"] == p.version
