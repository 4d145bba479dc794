"""Fuzz targets for elbasy's parsers: one function of bytes each, and seeds.

Each target raises only when elbasy is wrong: a parser's refusal of bad input
(:class:`elbasy.errors.RemoteProtocolError`) is the expected answer, anything
else is a finding, and so is a property that does not hold:

* ``heads``: the head-end scanner (``elbasy._framing.head_end``) agrees with
  the reference of ``tests/test_framing.py``, fed whole and in two pieces;
  a head llhttp accepts (``parse_request_head``, ``parse_response_head``)
  is read by elbasy's C scanner (``elbasy._heads.scan``) into the same
  header lines llhttp saw, and ``Head.without`` leaves a head that still
  parses and holds none of the lines it was asked to drop;
* ``chunked``: the chunk scanner (``elbasy._framing.Chunked``) agrees with
  the reference decoder written from the RFC 9112 grammar
  (``tests/test_framing.py``), fed whole and split where the input says;
* ``connect_target``: ``parse_authority`` refuses, or gives a host and a
  port in 1..65535 that parse again to themselves;
* ``hostglob``: ``glob_covers`` never lets a ``*`` cross a dot, ignores
  case, and every name covers itself;
* ``hello``: the ClientHello scanner of ``--transparent``
  (``elbasy._framing.hello_name``) decides once: a verdict on some bytes
  (a name, no name, or not a ClientHello) stays the same whatever follows,
  every prefix before it asks for more or says the same, and a name is
  1 to 255 printable bytes found in the input.

``tests/fuzz/run.py`` runs one under atheris (coverage-guided);
``tests/fuzz/test_fuzz.py`` runs each briefly in the suite.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import httptools  # noqa: E402
from origins import client_hello  # noqa: E402
from test_framing import BODIES, HEADS, fed_chunked, reference_chunked, reference_head_end  # noqa: E402

from elbasy._framing import head_end, hello_name  # noqa: E402
from elbasy.errors import RemoteProtocolError  # noqa: E402
from elbasy.hostglob import glob_covers  # noqa: E402
from elbasy.protocol.http1 import parse_request_head, parse_response_head  # noqa: E402
from elbasy.protocol.targets import parse_authority  # noqa: E402


class Finding(AssertionError):
    """A property of a parser that did not hold."""


def _check(ok: bool, what: str, data: object) -> None:
    if not ok:
        raise Finding(f"{what}: {data!r}")


# ---- heads ------------------------------------------------------------------------------


class _Lines:
    """llhttp's own view of the header lines (name, value), as its callbacks give them."""

    def __init__(self) -> None:
        self.lines: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:  # httptools joins the pieces
        self.lines.append((name, value))


def _llhttp_lines(head: bytes, request: bool) -> list[tuple[bytes, bytes]]:
    sink = _Lines()
    parser = (httptools.HttpRequestParser if request else httptools.HttpResponseParser)(sink)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    return sink.lines


def heads(data: bytes) -> None:
    end = head_end(data, 0)
    _check(end == reference_head_end(data), "head_end differs from the reference", data)
    if len(data) > 1:
        cut = data[0] % len(data)
        first = head_end(data[:cut], 0) if cut else -1
        again = first if first > 0 else head_end(data, cut)
        _check(again == end, "head_end fed in two pieces differs", data)
    if end <= 0:
        return
    head = data[:end]
    for request, parse in ((True, parse_request_head), (False, parse_response_head)):
        try:
            parsed = parse(head)
        except RemoteProtocolError:
            continue
        lines = parsed.lines
        seen = [(n, v.strip(b" \t")) for n, v in _llhttp_lines(head, request)]
        mine = [(n, v.strip(b" \t")) for n, v in lines.headers()]
        _check(mine == seen, f"scan's header lines differ from llhttp's ({mine} vs {seen})", head)
        _check(lines.count == len(seen), "scan's line count differs", head)
        if lines.options:
            rest = lines.without(lines.options)
            again = parse(rest)
            left = {n.lower() for n, _ in again.headers()}
            _check(not left & lines.options, "without() kept a line it was to drop", head)


# ---- chunked ----------------------------------------------------------------------------


def chunked(data: bytes) -> None:
    want = reference_chunked(data)
    _check(fed_chunked([data]) == want, "Chunked differs from the reference", data)
    if len(data) > 1:
        cut = data[-1] % len(data)
        got = fed_chunked([data[:cut], data[cut:]])
        _check(got == want, f"Chunked split at {cut} differs from the reference", data)


# ---- CONNECT targets --------------------------------------------------------------------


def connect_target(data: bytes) -> None:
    text = data.decode("latin-1")
    try:
        host, port = parse_authority(text)
    except RemoteProtocolError:
        return
    _check(0 < port < 65536, "a port out of range was let through", text)
    spelled = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    _check(parse_authority(spelled) == (host, port), "host:port does not parse to itself", text)
    _check(host == host.lower(), "the host is not lower-cased", text)


# ---- host globs -------------------------------------------------------------------------


def hostglob(data: bytes) -> None:
    glob, _, name = data.decode("latin-1").partition("\x00")
    covers = glob_covers(glob, name)
    if covers:
        g = glob.strip().lower().rstrip(".").strip("[]")
        n = name.strip().lower().rstrip(".").strip("[]")
        _check(g.count(".") == n.count("."), "a glob covered a name at another depth", data)
    _check(glob_covers(glob.upper(), name) == covers, "case changed the answer", data)
    _check(glob_covers(glob, name.upper()) == covers, "case changed the answer", data)
    plain = name.strip()
    if plain and not any(c in plain for c in "*?[]\\"):
        _check(glob_covers(plain, name), "a name does not cover itself", data)


# ---- the ClientHello scanner ------------------------------------------------------------


def _hello(data: bytes) -> object:
    try:
        return hello_name(data)
    except ValueError:
        return ValueError


def hello(data: bytes) -> None:
    whole = _hello(data)
    if isinstance(whole, bytes):
        _check(0 < len(whole) <= 255, "a server name of a bad length", data)
        _check(all(0x20 < b < 0x7F for b in whole), "a server name with a bad byte", data)
        _check(whole in data, "a server name not in the hello", data)
    if whole is not ...:
        _check(_hello(data + b"\x16\x03\x01\x00\x01x") == whole, "more bytes changed it", data)
    for cut in range(0, len(data), max(1, len(data) // 16)):
        got = _hello(data[:cut])
        _check(got is ... or got == whole, "a prefix decided otherwise", data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "heads": heads,
    "chunked": chunked,
    "connect_target": connect_target,
    "hostglob": hostglob,
    "hello": hello,
}

SEEDS: dict[str, list[bytes]] = {
    "heads": [
        *HEADS,
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nProxy-Authorization: Basic eDp5\r\n\r\n",
        b"POST / HTTP/1.0\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        # findings: CR and LF before the start line
        b"\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcG\n",
        b"\r\r\nHTTP/1.1 200 OK\r\noding: unked\r\nConnection:~ cloe\r\n\r\n",
        # finding: a request line with no version, which llhttp reads as HTTP/0.9
        b"CONNECT a:\r\n\r\nHTTP/1.1\r3\r\nProxy-Authorization: Basi ecDp5\r\n\r\n",
    ],
    "chunked": list(BODIES),
    "connect_target": [
        b"api.github.com:443",
        b"[::1]:8443",
        b"127.0.0.1:1",
        b"a..b:443",
        b"host:065535",
        b"[::ffff:10.0.0.1]:443",
        b"x:0",
        b"a:0\xb3",  # finding: a Unicode digit the port's isdigit() let through
    ],
    "hostglob": [
        b"*.myshopify.com\x00shop.myshopify.com",
        b"*.myshopify.com\x00n1.deep.myshopify.com",
        b"shop.*.example.com\x00shop.eu.example.com",
        b"*\x00localhost",
        b"[::1]\x00[::1]",
        b"A.B.\x00a.b",
    ],
    "hello": [client_hello("api.github.com"), client_hello(None), b"\x16\x03\x01\x00\x05\x01"],
}
