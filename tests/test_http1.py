"""The sans-IO head parsing and framing: bytes in, values out, no sockets."""

from __future__ import annotations

import re

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elbasy._heads import scan
from elbasy.errors import RemoteProtocolError
from elbasy.protocol.headers import HOP_BY_HOP, named_in_connection
from elbasy.protocol.http1 import (
    MAX_CONNECTION_OPTIONS,
    MAX_HEADER_LINES,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
    upstream_keeps_alive,
)
from elbasy.protocol.targets import parse_authority
from elbasy.verdicts import BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE


def test_absolute_form_request() -> None:
    req = parse_request_head(
        b"GET http://example.com:8080/a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-A: 1\r\n\r\n"
    )
    assert req.method == "GET"
    assert req.target == "http://example.com:8080/a?b=1"
    assert req.version == "1.1"
    assert req.headers() == [(b"Host", b"example.com"), (b"X-A", b"1")]
    assert req.keep_alive
    assert request_framing(req) == (BODY_NONE, 0)


def test_connect_head_is_complete_even_though_llhttp_calls_it_an_upgrade() -> None:
    req = parse_request_head(b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert req.method == "CONNECT"
    assert parse_authority(req.target) == ("api.example.com", 443)


@pytest.mark.parametrize(
    "target",
    [
        "example.com",
        "example.com:",
        ":443",
        "example.com:0",
        "example.com:70000",
        "a b:1",
        "[::1:443",
        "exa$mple.com:443",
        "example.com:44x3",
        "[fe80::1%eth0]:443",
        "[::%\xc6]:3",  # the fuzz run's: a zone Python keeps as written, upper case and all
    ],
)
def test_bad_connect_targets(target: str) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        parse_authority(target)
    assert err.value.status_hint == 400


def test_ipv6_connect_target() -> None:
    assert parse_authority("[::1]:8443") == ("::1", 8443)


@pytest.mark.parametrize(
    "head",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_malformed_heads_are_the_clients_fault(head: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        req = parse_request_head(head)
        request_framing(req)
    assert err.value.status_hint == 400


def test_request_framings() -> None:
    cl = parse_request_head(b"POST http://a/ HTTP/1.1\r\nContent-Length: 12\r\n\r\n")
    assert request_framing(cl) == (BODY_LENGTH, 12)
    ch = parse_request_head(b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert request_framing(ch) == (BODY_CHUNKED, 0)
    with pytest.raises(RemoteProtocolError):
        gz = parse_request_head(b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")
        request_framing(gz)


@pytest.mark.parametrize(
    "codings", [b"identity, chunked", b"gzip, chunked", b"chunked,identity", b"deflate,chunked"]
)
def test_only_chunked_exactly_frames_a_request(codings: bytes) -> None:
    """RFC 9112 §6.1/§6.3: elbasy relays chunked framing only, so nothing else is
    accepted as if it were (llhttp itself refuses some of the others)."""
    head = b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: " + codings + b"\r\n\r\n"
    with pytest.raises(RemoteProtocolError) as err:
        request_framing(parse_request_head(head))
    assert err.value.status_hint == 400
    assert "Transfer-Encoding" in str(err.value)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_a_response_framed_otherwise_is_a_bad_gateway(head: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        response_framing(parse_response_head(head), "GET")
    assert err.value.status_hint == 502


def _with_lines(start: bytes, lines: int, connection: int = 0) -> bytes:
    named = b", ".join(b"x-n%d" % i for i in range(connection))
    head = start + (b"Connection: " + named + b"\r\n" if connection else b"")
    return head + b"".join(b"X-L%d: v\r\n" % i for i in range(lines)) + b"\r\n"


def test_header_lines_and_connection_options_are_capped() -> None:
    req = b"GET http://a/ HTTP/1.1\r\n"
    resp = b"HTTP/1.1 200 OK\r\n"
    assert parse_request_head(_with_lines(req, MAX_HEADER_LINES)).lines.count == MAX_HEADER_LINES
    parse_response_head(_with_lines(resp, MAX_HEADER_LINES - 1, MAX_CONNECTION_OPTIONS))
    for parse, start, status in (
        (parse_request_head, req, 431),
        (parse_response_head, resp, 502),
    ):
        with pytest.raises(RemoteProtocolError, match="header lines") as err:
            parse(_with_lines(start, MAX_HEADER_LINES + 1))
        assert err.value.status_hint == status
    for parse, start, status in (
        (parse_request_head, req, 400),
        (parse_response_head, resp, 502),
    ):
        with pytest.raises(RemoteProtocolError, match="Connection names") as err:
            parse(_with_lines(start, 0, MAX_CONNECTION_OPTIONS + 1))
        assert err.value.status_hint == status
    with pytest.raises(RemoteProtocolError) as err:
        parse_request_head(_with_lines(b"CONNECT a:443 HTTP/1.1\r\n", MAX_HEADER_LINES + 1))
    assert err.value.status_hint == 431


def test_thousands_of_named_lines_are_all_dropped() -> None:
    """Past the caps (a set lookup per line, not a scan of the names): each named line goes."""
    names = [b"X-H%d" % i for i in range(3000)]
    head = b"GET / HTTP/1.1\r\n" + b"".join(
        n + b": v\r\nKeep-%d: k\r\n" % i for i, n in enumerate(names)
    )
    lines = scan(head + b"\r\n")
    out = lines.without(frozenset(n.lower() for n in names))
    assert (
        out
        == b"GET / HTTP/1.1\r\n" + b"".join(b"Keep-%d: k\r\n" % i for i in range(3000)) + b"\r\n"
    )


def test_conflicting_content_lengths() -> None:
    with pytest.raises(RemoteProtocolError):
        req = parse_request_head(
            b"POST http://a/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        )
        request_framing(req)


@pytest.mark.parametrize(
    ("head", "method", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "GET", (BODY_LENGTH, 5)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD", (BODY_NONE, 0)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", (BODY_CHUNKED, 0)),
        (b"HTTP/1.1 200 OK\r\n\r\n", "GET", (BODY_CLOSE, 0)),
        (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", (BODY_NONE, 0)),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", "GET", (BODY_NONE, 0)),
        (b"HTTP/1.1 100 Continue\r\n\r\n", "POST", (BODY_NONE, 0)),
    ],
)
def test_response_framings(head: bytes, method: str, expected: tuple[int, int]) -> None:
    assert response_framing(parse_response_head(head), method) == expected


def test_upstream_keep_alive() -> None:
    ok = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert upstream_keeps_alive(ok)
    assert not upstream_keeps_alive(
        parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    )
    assert not upstream_keeps_alive(parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n"))


def test_bad_response_is_a_502() -> None:
    with pytest.raises(RemoteProtocolError) as err:
        parse_response_head(b"HTTP/1.1 abc\r\n\r\n")
    assert err.value.status_hint == 502


def test_hop_by_hop_and_connection_named_headers_are_stripped() -> None:
    head = (
        b"GET http://a/ HTTP/1.1\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: websocket\r\n"
        b"Accept: */*\r\nTransfer-Encoding: chunked\r\nHost: a\r\n\r\n"
    )
    req = parse_request_head(head)
    out = req.lines.without(named_in_connection(req.options), True)
    assert out == b"GET http://a/ HTTP/1.1\r\nAccept: */*\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert req.lines.host == b"a"
    assert HOP_BY_HOP == {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }


def test_hop_by_hop_lines_are_cut_from_the_raw_head() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"keep-alive: timeout=5\r\nX-Kept: a\r\nTE: trailers\r\nTex: kept\r\n\r\n"
    )
    resp = parse_response_head(head)
    out = resp.lines.without(named_in_connection(resp.options))
    assert out == b"HTTP/1.1 200 OK\r\nX-Kept: a\r\nTex: kept\r\n\r\n"
    assert parse_response_head(out).headers() == [(b"X-Kept", b"a"), (b"Tex", b"kept")]


# ---- one pass over the head, against the regexes and finds it replaced ----------------

_HEADER_LINE = re.compile(rb"\r\n([^:\r]+):[ \t]*([^\r]*)")
_HOST_LINE = re.compile(rb"\r\nhost:[ \t]*([^\r]*)", re.IGNORECASE)
_EXPECT_LINE = re.compile(rb"\r\nexpect:[ \t]*100-continue[ \t]*\r\n", re.IGNORECASE)


def _reference_drop(head: bytes, names: set[bytes]) -> bytes:
    """The lines of ``head`` whose lower-cased names are in ``names``, cut by finds
    over a lower-cased copy (the way elbasy did it before the one pass)."""
    low = head.lower()
    spans = []
    for name in names:
        key = b"\r\n" + name + b":"
        at = low.find(key)
        while at >= 0:
            end = low.find(b"\r\n", at + 2)
            spans.append((at, end))
            at = low.find(key, end)
    out, at = [], 0
    for start, end in sorted(spans):
        out.append(head[at:start])
        at = end
    return b"".join(out) + head[at:]


_names = st.sampled_from(
    [
        b"Host",
        b"HOST",
        b"Connection",
        b"connection",
        b"Keep-Alive",
        b"TE",
        b"Te",
        b"Trailer",
        b"Upgrade",
        b"Proxy-Connection",
        b"Proxy-Authorization",
        b"Expect",
        b"Via",
        b"X-A",
        b"X-Secret",
        b"Accept",
        b"Content-Length",
        b"Tex",
        b"Hostx",
        b"X-Elbasy-Max-Wait",
    ]
)
_values = st.sampled_from(
    [
        b"",
        b"a",
        b" a ",
        b"\ta\t",
        b"100-continue",
        b" 100-Continue ",
        b"100-continues",
        b"close",
        b"keep-alive, X-Secret",
        b"x-a, te",
        b"1.1 elbasy-0000",
        b"0",
        b"a b  ",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(_names, _values), max_size=8),
    st.sets(st.sampled_from([b"x-a", b"x-secret", b"expect", b"accept", b"via"])),
    st.booleans(),
)
def test_one_pass_matches_the_passes_it_replaced(
    pairs: list[tuple[bytes, bytes]], names: set[bytes], drop_host: bool
) -> None:
    head = b"GET http://a/ HTTP/1.1\r\n" + b"".join(n + b":" + v + b"\r\n" for n, v in pairs)
    head += b"\r\n"
    try:
        req = parse_request_head(head)
    except RemoteProtocolError:
        return  # llhttp's to refuse (two Content-Lengths, say): no scan follows
    lines = req.lines
    assert lines.headers() == [(m[1], m[2].rstrip(b" \t")) for m in _HEADER_LINE.finditer(head)]
    found = _HOST_LINE.search(head)
    assert lines.host == (found[1].rstrip(b" \t") if found else None)
    assert lines.expect_continue == bool(_EXPECT_LINE.search(head))
    assert lines.via == tuple(v for n, v in lines.headers() if n.lower() == b"via")
    drop = set(HOP_BY_HOP) | names | ({b"host"} if drop_host else set())
    assert lines.without(frozenset(names), drop_host) == _reference_drop(head, drop)
    start = b"GET / HTTP/1.1\r\nHost: b"
    assert lines.without(tuple(names), drop_host, start) == (
        start + _reference_drop(head, drop)[head.index(b"\r\n") :]
    )


# ---- found by the fuzz run (tests/fuzz)


@pytest.mark.parametrize("before", [b"\r\n", b"\n", b"\r\n\r\n", b"\r\r\n", b"\n\r"])
def test_empty_lines_before_the_start_line_are_left_out(before: bytes) -> None:
    """llhttp skips CR and LF before the start line; the scanner must start where it
    did: the request line was read as a header line and forwarded upstream."""
    req = parse_request_head(
        before + b"POST http://a/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n"
    )
    assert req.method == "POST" and req.target == "http://a/x"
    assert req.raw.startswith(b"POST http://a/x HTTP/1.1\r\n")
    assert req.headers() == [(b"Host", b"a"), (b"Content-Length", b"3")]
    assert req.lengths == (b"3",)
    resp = parse_response_head(before + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert resp.status == 200 and resp.status_line == b"HTTP/1.1 200 OK"
    assert resp.headers() == [(b"Transfer-Encoding", b"chunked")]


def test_a_connect_port_of_other_unicode_digits_is_refused() -> None:
    # str.isdigit() is true of "³": int() then raised a ValueError, not the refusal
    for target in ("a:0³", "a:٤٤٣", "a:４４３"):
        with pytest.raises(RemoteProtocolError):
            parse_authority(target)


class _Llhttp:
    """What llhttp itself reports of a start line, to check elbasy's reading of
    the validated bytes against."""

    def __init__(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url


_TARGET = st.text(alphabet="abcxyz0123456789/?=&%-._~:@!$'()*+,;", min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
    gap1=st.integers(1, 3),
    target=_TARGET,
    gap2=st.integers(1, 3),
    version=st.sampled_from(["1.0", "1.1"]),
)
def test_the_request_line_reads_as_llhttp_reads_it(
    method: str, gap1: int, target: str, gap2: int, version: str
) -> None:
    """Method, target and version come off the request line after llhttp accepts
    it (spaces between included, which llhttp allows): the same as its callbacks."""
    head = f"{method}{' ' * gap1}/{target}{' ' * gap2}HTTP/{version}\r\nHost: a\r\n\r\n"
    sink = _Llhttp()
    parser = httptools.HttpRequestParser(sink)
    parser.feed_data(head.encode())
    req = parse_request_head(head.encode())
    assert req.method == parser.get_method().decode() == method
    assert req.target == sink.url.decode() == "/" + target
    assert req.version == parser.get_http_version() == version


@settings(max_examples=200, deadline=None)
@given(
    status=st.integers(100, 999).filter(lambda s: s != 101),  # 101: the protocol changes
    version=st.sampled_from(["1.0", "1.1"]),
    reason=st.sampled_from(["", " ", " OK", " Too Many Requests"]),
)
def test_the_status_line_reads_as_llhttp_reads_it(status: int, version: str, reason: str) -> None:
    head = f"HTTP/{version} {status}{reason}\r\nContent-Length: 0\r\n\r\n".encode()
    parser = httptools.HttpResponseParser(_Llhttp())
    parser.feed_data(head)
    resp = parse_response_head(head)
    assert resp.status == parser.get_status_code() == status
    assert resp.version == parser.get_http_version() == version
    assert resp.status_line == head.split(b"\r\n")[0]


def test_a_version_llhttp_accepts_but_elbasy_does_not_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="unsupported HTTP version 2.0"):
        parse_request_head(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")


@pytest.mark.parametrize(
    "head",
    [
        # llhttp reads a request line with no version as HTTP/0.9 (found by the fuzz run)
        b"CONNECT a:\r\n\r\n",
        b"GET /x\r\nHost: a\r\n\r\n",
        b"GET /xHTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /x RTSP/1.0\r\nHost: a\r\n\r\n",  # llhttp takes RTSP too
    ],
)
def test_a_request_line_without_an_http_version_is_refused(head: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="no HTTP/1.x version") as err:
        parse_request_head(head)
    assert err.value.status_hint == 400


@pytest.mark.parametrize("line", [b"RTSP/1.0 200 OK", b"ICE/1.0 200 OK"])
def test_a_status_line_of_another_protocol_is_a_bad_gateway(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="no HTTP/1.x version") as err:
        parse_response_head(line + b"\r\nContent-Length: 0\r\n\r\n")
    assert err.value.status_hint == 502


def test_a_head_that_is_not_bytes_is_a_type_error() -> None:
    """None never reaches the C that reads a head's bytes."""
    for parse in (parse_request_head, parse_response_head, scan):
        with pytest.raises(TypeError):
            parse(None)  # type: ignore[arg-type]


# ---- one request parser kept from head to head ---------------------------------------

# Heads that leave llhttp in every state a head can: done and ready for the
# next (a bodiless GET that persists), waiting for a body (by length, by
# chunks), closed (Connection: close, HTTP/1.0), stopped (CONNECT, Upgrade),
# and refused (by llhttp, by elbasy's own checks after llhttp passed it).
_BEFORE = [
    b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"GET /a HTTP/1.0\r\nHost: h\r\n\r\n",
    b"GET /a HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost h\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /a HTTP/1.2\r\nHost: h\r\n\r\n",
    b"\r\n\r\nGET /a HTTP/1.1\r\nHost: h\r\n\r\n",
]
_AFTER = [
    *_BEFORE,
    b"GET /b?x=1 HTTP/1.1\r\nHost: other\r\nX-A: 1\r\n\r\n",
    b"DELETE /b HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    b"GET /b HTTP/1.1\r\nHost: h\r\nX: \x01\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n",
]


def _outcome(head: bytes) -> object:
    """All a parse tells: the head's values, or the refusal's status and text."""
    try:
        req = parse_request_head(head)
    except RemoteProtocolError as exc:
        return ("refused", exc.status_hint, str(exc))
    return (req.method, req.target, req.version, req.keep_alive, req.raw, req.headers())


def test_a_head_parses_the_same_whatever_head_came_before() -> None:
    """The parser kept after a bodiless head carries nothing into the next: each
    head gives what it gives after a CONNECT (which always leaves a new parser
    for the next head), whichever of every kind of head came just before."""
    connect = _BEFORE[6]
    for after in _AFTER:
        _outcome(connect)
        alone = _outcome(after)
        for before in _BEFORE:
            _outcome(before)
            assert _outcome(after) == alone, (before, after)
            # and twice over: a head after one like itself
            assert _outcome(after) == alone, (before, after)
