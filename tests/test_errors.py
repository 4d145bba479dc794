"""docs/design.md §7: what each kind of bad input or upstream fault gets."""

from __future__ import annotations

import socket
import time

import origins
import pytest
from origins import Reader, connect_tunnel, send_and_read

from elbasy.policy import UPSTREAM_FAILED


def _assert_error(resp: origins.Response, closed: bool, status: int) -> None:
    assert resp.status == status, f"expected {status}, got {resp.status}: {resp.raw_head!r}"
    assert closed, f"proxy did not close the connection after {status}"


def _one_line_reason(resp: origins.Response) -> str:
    ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
    assert ctype == "text/plain", resp.raw_head
    text = resp.body.decode("utf-8")
    assert text.strip(), "error reply has an empty body"
    assert len(text.strip().splitlines()) == 1, f"reason is not one line: {text!r}"
    return text.strip()


# -- malformed heads ---------------------------------------------------------------------------

MALFORMED = {
    "garbage-line": b"GARBAGE\r\n\r\n",
    "two-tokens": b"GET http://127.0.0.1:1/\r\n\r\n",
    "bad-version": b"GET http://127.0.0.1:1/ HTTP/x.y\r\nHost: a\r\n\r\n",
    "header-without-colon": b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n",
    "space-before-colon": b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost : a\r\n\r\n",
    "nul-in-header": b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
    "tls-client-hello": bytes.fromhex("160301020001000200000303") + b"\x00" * 50 + b"\r\n\r\n",
    "bad-content-length": b"POST http://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n"
    b"\r\n",
    "negative-content-length": b"POST http://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\n"
    b"Content-Length: -5\r\n\r\n",
    "conflicting-content-lengths": b"POST http://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\n"
    b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
    "unknown-transfer-encoding": b"POST http://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\n"
    b"Transfer-Encoding: gzip\r\n\r\n",
    "https-absolute-form": b"GET https://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_head_is_400_and_closed(module_proxy, name):
    resp, closed = send_and_read(module_proxy, MALFORMED[name])
    _assert_error(resp, closed, 400)


def test_bad_requests_are_counted(proxy):
    p = proxy()
    counters = p.healthz()["counters"]
    assert "bad_requests" in counters, f"/healthz counters lack bad_requests: {counters}"
    before = counters["bad_requests"]
    for data in (MALFORMED["garbage-line"], MALFORMED["header-without-colon"]):
        resp, closed = send_and_read(p, data)
        _assert_error(resp, closed, 400)
    assert p.healthz()["counters"]["bad_requests"] == before + 2


def test_cl_te_conflict_is_400_and_not_forwarded(proxy, http_origin):
    p = proxy()
    hp = http_origin.hostport
    resp, closed = send_and_read(
        p,
        f"POST http://{hp}/echo HTTP/1.1\r\nHost: {hp}\r\nContent-Length: 5\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode(),
    )
    _assert_error(resp, closed, 400)
    time.sleep(0.2)
    assert http_origin.requests == [], "a CL+TE request reached the origin (smuggling risk)"


@pytest.mark.parametrize(
    "body,garbage",
    [
        (b"zz\r\nhello\r\n0\r\n\r\n", b"zz"),  # size is not hex
        (b"5\r\nhelloXX\r\n0\r\n\r\n", b"XX"),  # chunk longer than its size line says
        (b"5\r\nhello\r\n-1\r\n\r\n", b"-1"),  # negative size
        (b"ffffffffffffffffffff\r\nhello\r\n", b"ffffffffffffffffffff"),  # overflow
    ],
    ids=["non-hex-size", "missing-crlf", "negative-size", "overflow-size"],
)
def test_bad_chunking_is_400_and_garbage_not_forwarded(proxy, http_origin, body, garbage):
    p = proxy()
    hp = http_origin.hostport
    with p.connect(timeout=5) as s:
        s.sendall(
            f"POST http://{hp}/echo HTTP/1.1\r\nHost: {hp}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
            + body
        )
        reader = Reader(s)
        try:
            resp = origins.read_response(reader)
        except (origins.ProtocolError, ConnectionResetError):
            resp = None  # closed without an answer: acceptable if nothing bad was forwarded
        if resp is not None:
            assert resp.status == 400, f"bad chunking answered {resp.status}: {resp.raw_head!r}"
            assert origins.closed_after(s, reader), "connection kept after bad chunking"
    time.sleep(0.3)
    assert garbage not in http_origin.all_raw(), (
        f"the origin received the malformed chunk bytes: {http_origin.all_raw()!r}"
    )
    assert not [r for r in http_origin.requests if r.complete], (
        "the origin received a complete request built from a malformed body"
    )


def test_bad_chunk_after_streaming_started(proxy, http_origin):
    """The body is already flowing to the origin when a malformed chunk arrives: the garbage
    must not be forwarded, the origin must not see a complete request, the client gets a 400
    or a closed connection (never a 2xx)."""
    p = proxy()
    hp = http_origin.hostport
    with p.connect(timeout=5) as s:
        s.sendall(
            f"POST http://{hp}/echo HTTP/1.1\r\nHost: {hp}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n6\r\ngood-1\r\n".encode()
        )
        deadline = time.monotonic() + 5
        while b"good-1" not in http_origin.all_raw() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b"good-1" in http_origin.all_raw(), "the proxy does not stream request bodies"
        s.sendall(b"q!\r\nEVIL\r\n0\r\n\r\n")
        reader = Reader(s)
        try:
            resp = origins.read_response(reader)
        except (origins.ProtocolError, ConnectionResetError):
            resp = None
        if resp is not None:
            assert resp.status == 400, resp.raw_head
    time.sleep(0.3)
    assert b"EVIL" not in http_origin.all_raw() and b"q!" not in http_origin.all_raw()
    assert not [r for r in http_origin.requests if r.complete]


def test_head_over_cap_is_431(proxy):
    p = proxy("--max-head-bytes", "4096")
    head = b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 6000 + b"\r\n\r\n"
    resp, closed = send_and_read(p, head)
    _assert_error(resp, closed, 431)


def test_head_over_cap_without_end_is_431(proxy):
    """The cap applies before the blank line ever arrives (no unbounded buffering)."""
    p = proxy("--max-head-bytes", "2048")
    with p.connect(timeout=5) as s:
        s.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\n")
        for _ in range(10):
            try:
                s.sendall(b"X-Filler: " + b"b" * 500 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
        reader = Reader(s)
        resp = origins.read_response(reader)
    assert resp.status == 431


def test_head_at_cap_boundary_is_accepted(proxy, http_origin):
    p = proxy("--max-head-bytes", "4096")
    hp = http_origin.hostport
    head = f"GET http://{hp}/hello HTTP/1.1\r\nHost: {hp}\r\nX-Pad: ".encode()
    head += b"p" * (3000 - len(head)) + b"\r\n\r\n"
    resp, _ = send_and_read(p, head)
    assert resp.status == 200


def test_default_head_cap_is_64k(proxy):
    p = proxy()
    head = b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    resp, closed = send_and_read(p, head)
    _assert_error(resp, closed, 431)


# -- CONNECT target -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "example.com",
        ":443",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:99999",
        "example.com:https",
        "/path",
        "http://example.com:443/",
        "exa mple.com:443",
        "[::1",
        "example.com:443:1",
    ],
)
def test_connect_bad_target_is_400(module_proxy, target):
    s, resp, reader = connect_tunnel(module_proxy, target)
    with s:
        assert resp.status == 400, f"CONNECT {target!r}: {resp.raw_head!r}"
        assert origins.closed_after(s, reader)


# -- upstream failures ---------------------------------------------------------------------------


def _logged(p, text: str) -> None:
    """``text`` shows in elbasy's log within 5 s (its detail of a failure)."""
    deadline = time.monotonic() + 5
    while text not in p.stderr:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{p.stderr[-2000:]}"
        time.sleep(0.05)


def test_connect_dns_failure_is_502_with_reason(proxy):
    p = proxy()
    s, resp, reader = connect_tunnel(p, "no-such-host.invalid:443")
    with s:
        assert resp.status == 502, resp.raw_head
        reason = _one_line_reason(resp)
        assert origins.closed_after(s, reader)
    # the client is told the one wording of every upstream failure; the log says which
    assert reason == UPSTREAM_FAILED
    _logged(p, "DNS lookup for no-such-host.invalid failed")


def test_upstream_errors_are_counted(proxy, refused_port):
    p = proxy()
    counters = p.healthz()["counters"]
    assert "upstream_errors" in counters, f"/healthz counters lack upstream_errors: {counters}"
    before = counters["upstream_errors"]
    s, resp, _ = connect_tunnel(p, "no-such-host.invalid:443")
    s.close()
    assert resp.status == 502
    resp, _ = send_and_read(
        p, f"GET http://127.0.0.1:{refused_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert resp.status == 502
    assert p.healthz()["counters"]["upstream_errors"] == before + 2


def test_forward_dns_failure_is_502(proxy):
    p = proxy()
    resp, closed = send_and_read(
        p, b"GET http://no-such-host.invalid/x HTTP/1.1\r\nHost: no-such-host.invalid\r\n\r\n"
    )
    assert resp.status == 502
    _one_line_reason(resp)


def test_connect_refused_is_502(proxy, refused_port):
    p = proxy()
    s, resp, reader = connect_tunnel(p, f"127.0.0.1:{refused_port}")
    with s:
        assert resp.status == 502, resp.raw_head
        reason = _one_line_reason(resp)
        assert origins.closed_after(s, reader)
    assert reason == UPSTREAM_FAILED  # no port-scan oracle in the answer
    _logged(p, "Connection refused")


def test_forward_refused_is_502(proxy, refused_port):
    p = proxy()
    resp, closed = send_and_read(
        p, f"GET http://127.0.0.1:{refused_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert resp.status == 502
    assert _one_line_reason(resp) == UPSTREAM_FAILED
    _logged(p, "Connection refused")


def test_a_generated_502_has_its_reason_phrase_and_logs_the_bytes_it_sent(proxy, refused_port):
    p = proxy()
    target = f"http://127.0.0.1:{refused_port}/gone"
    resp, _ = send_and_read(p, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert resp.raw_head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), resp.raw_head
    sent = len(resp.raw_head) + len(resp.body)
    _logged(p, f"GET 127.0.0.1:{refused_port}/gone 502 ")
    (line,) = [ln for ln in p.stderr_lines if f"127.0.0.1:{refused_port}/gone 502 " in ln]
    assert f" down={sent} " in line, (sent, line)


def test_proxy_survives_error_storm_and_still_serves(proxy, http_origin, refused_port):
    p = proxy()
    for data in MALFORMED.values():
        send_and_read(p, data)
    s, resp, _ = connect_tunnel(p, f"127.0.0.1:{refused_port}")
    s.close()
    hp = http_origin.hostport
    resp, _ = send_and_read(p, f"GET http://{hp}/hello HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode())
    assert resp.status == 200
    assert p.alive()


def test_early_close_before_head_complete(proxy):
    p = proxy()
    base = p.healthz()["connections"]["open"]
    for i in range(20):
        s = p.connect()
        s.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHo")
        if i % 2:
            origins.reset_close(s)
        else:
            s.close()
    h = p.wait_open_connections(base)
    assert h["connections"]["open"] == base


def test_upstream_closes_without_response_is_502(proxy, raw_origin):
    def handler(sock: socket.socket, origin: origins.RawOrigin) -> None:
        sock.recv(65536)
        origin.event("got")

    origin = raw_origin(handler)
    p = proxy()
    hp = origin.hostport
    resp, _ = send_and_read(p, f"GET http://{hp}/ HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode())
    assert resp.status == 502


def test_upstream_garbage_response_is_502(proxy, raw_origin):
    def handler(sock: socket.socket, origin: origins.RawOrigin) -> None:
        sock.recv(65536)
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")

    origin = raw_origin(handler)
    p = proxy()
    hp = origin.hostport
    resp, _ = send_and_read(p, f"GET http://{hp}/ HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode())
    assert resp.status == 502
