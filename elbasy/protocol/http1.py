"""Sans-IO HTTP/1.1 heads, parsed by llhttp (through httptools).

The data plane finds where a head ends and hands over the whole head as
bytes; these functions turn it into plain values or raise
`RemoteProtocolError` with the status the client should get. No sockets, no
clock: the tests feed bytes alone.
"""

from __future__ import annotations

from typing import NamedTuple

import httptools

from elbasy._heads import Head, scan
from elbasy.errors import RemoteProtocolError
from elbasy.protocol.headers import Headers
from elbasy.verdicts import BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE

#: Methods whose effect is the same sent once or twice (RFC 9110 9.2.2): the
#: only ones elbasy ever sends again (a pooled connection that was closed as it
#: was reused; a 429 with --retry-idempotent)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

#: Header lines a head may carry (a request beyond: 431; a response: 502).
#: Real clients and APIs send a few dozen; the cap keeps the work a head
#: costs bounded by more than its bytes.
MAX_HEADER_LINES = 256

#: Distinct Connection options a head may carry (beyond: 400 or 502). A
#: real one names one to three ("close", "keep-alive", "upgrade").
MAX_CONNECTION_OPTIONS = 32


class Framing(NamedTuple):
    """What the headers say about the message body and the connection."""

    connection: frozenset[bytes]  # lower-cased Connection options
    content_lengths: tuple[bytes, ...]
    codings: tuple[bytes, ...]  # Transfer-Encoding codings, lower-cased, in order
    hop_by_hop: bool  # a hop-by-hop header was present


class RequestHead(NamedTuple):
    method: str
    target: str
    version: str  # "1.0" or "1.1"
    lines: Head  # the head as received, request line to blank line, read once
    keep_alive: bool
    framing: Framing

    @property
    def raw(self) -> bytes:
        return self.lines.raw

    def headers(self) -> Headers:
        return self.lines.headers()


class ResponseHead(NamedTuple):
    status: int
    version: str
    lines: Head
    keep_alive: bool
    framing: Framing

    @property
    def raw(self) -> bytes:
        return self.lines.raw

    @property
    def status_line(self) -> bytes:
        return self.lines.raw[: self.lines.line_end]

    def headers(self) -> Headers:
        return self.lines.headers()


_NO_FRAMING = Framing(frozenset(), (), (), False)

_Parser = httptools.HttpRequestParser | httptools.HttpResponseParser


class _Validator:
    """llhttp's callbacks: only the URL and the end of the head.

    llhttp checks the whole head (request line, header syntax, framing
    conflicts, CRLF line ends, no folded lines) in C; leaving out on_header
    keeps it from calling Python per header. What elbasy needs from the
    headers is then read off the validated bytes by elbasy._heads, also in C,
    in one pass.
    """

    __slots__ = ("url", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.complete = True


def _framing(lines: Head, what: str, status: int) -> Framing:
    """What a scanned head's headers say about framing, once the head is
    within the caps on header lines and Connection options."""
    if lines.count > MAX_HEADER_LINES:
        raise RemoteProtocolError(
            f"{what} head has {lines.count} header lines (at most {MAX_HEADER_LINES})",
            431 if status == 400 else status,
        )
    if len(lines.options) > MAX_CONNECTION_OPTIONS:
        raise RemoteProtocolError(
            f"{what} head's Connection names {len(lines.options)} options"
            f" (at most {MAX_CONNECTION_OPTIONS})",
            status,
        )
    return Framing(lines.options, lines.lengths, lines.codings, lines.hop)


_CHUNKED = (b"chunked",)


def _validate(parser: _Parser, sink: _Validator, head: bytes, what: str, status: int) -> None:
    """Let llhttp check a whole head; its complaint becomes the peer's fault."""
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # CONNECT or Upgrade: the head is complete, what follows is not HTTP
    except httptools.HttpParserError as exc:
        raise RemoteProtocolError(f"malformed {what} head: {exc}", status) from None
    if not sink.complete:
        raise RemoteProtocolError(f"malformed {what} head: incomplete", status)


def _after_empty_lines(head: bytes) -> bytes:
    """The head less the CR and LF bytes before its first line.

    RFC 9112 §2.2: a recipient SHOULD ignore at least one empty line before
    the request line (a client's stray CRLF after a body). llhttp, which
    validates the head, skips every CR and LF there; elbasy's scanner has to
    start where llhttp did, or it takes the empty line for the start line and
    the real one for a header line (which was forwarded upstream as a header:
    found by the fuzz run, tests/fuzz).
    """
    return head.lstrip(b"\r\n")


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a complete request head (request line to blank line); empty lines
    before the request line are left out (the head's ``raw`` starts after them)."""
    head = _after_empty_lines(head)
    sink = _Validator()
    parser = httptools.HttpRequestParser(sink)
    _validate(parser, sink, head, "request", 400)
    try:
        target = sink.url.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("request target is not ASCII") from None
    version = parser.get_http_version()
    if version not in ("1.0", "1.1"):
        raise RemoteProtocolError(f"unsupported HTTP version {version}")
    method = parser.get_method().decode("ascii")
    lines = scan(head)
    if method == "CONNECT":
        # llhttp checked the headers; a tunnel needs none of them (yet)
        if lines.count > MAX_HEADER_LINES:
            _framing(lines, "request", 400)
        return RequestHead(method, target, version, lines, False, _NO_FRAMING)
    framing = _framing(lines, "request", 400)
    keep_alive = _keep_alive(version, framing.connection)
    return RequestHead(method, target, version, lines, keep_alive, framing)


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse a complete response head from an upstream (empty lines before its
    status line left out, as for a request)."""
    head = _after_empty_lines(head)
    sink = _Validator()
    parser = httptools.HttpResponseParser(sink)
    _validate(parser, sink, head, "response", 502)
    lines = scan(head)
    framing = _framing(lines, "response", 502)
    version = parser.get_http_version()
    keep_alive = _keep_alive(version, framing.connection)
    return ResponseHead(parser.get_status_code(), version, lines, keep_alive, framing)


def _keep_alive(version: str, connection: frozenset[bytes]) -> bool:
    """HTTP/1.1 persists unless told to close; HTTP/1.0 only when asked to."""
    if version == "1.1":
        return b"close" not in connection
    return b"keep-alive" in connection and b"close" not in connection


def _content_length(framing: Framing, status: int) -> int | None:
    values = framing.content_lengths
    if not values:
        return None
    text = values[0]
    if len(values) > 1 and any(value != text for value in values):
        raise RemoteProtocolError("conflicting Content-Length values", status)
    if not text.isdigit():
        raise RemoteProtocolError("bad Content-Length", status)
    return int(text)


def request_framing(req: RequestHead) -> tuple[int, int]:
    """(body framing, length) of a request (RFC 9112 §6.3)."""
    f = req.framing
    length = _content_length(f, 400)
    if f.codings:
        if length is not None:
            raise RemoteProtocolError("both Transfer-Encoding and Content-Length")
        if req.version == "1.0":
            # RFC 9112 §6.1: framing an HTTP/1.0 message by it is faulty
            raise RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        if f.codings != _CHUNKED:
            # RFC 9112 §6.1, §6.3: elbasy relays chunked framing only; any
            # other coding (identity is none, gzip would need decoding to
            # frame) could make two hops disagree on where the body ends
            raise RemoteProtocolError(
                "request Transfer-Encoding must be exactly chunked, not "
                + ", ".join(c.decode("latin-1") for c in f.codings)
            )
        return BODY_CHUNKED, 0
    if length is None or length == 0:
        return BODY_NONE, 0
    return BODY_LENGTH, length


def response_framing(resp: ResponseHead, request_method: str) -> tuple[int, int]:
    """(body framing, length) of a response to `request_method`."""
    status = resp.status
    if request_method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return BODY_NONE, 0
    f = resp.framing
    if f.codings:
        if f.codings != _CHUNKED:
            # elbasy strips TE, so no client asked for another coding; and a
            # framing elbasy does not read exactly is no framing to relay
            raise RemoteProtocolError(
                "response Transfer-Encoding must be exactly chunked, not "
                + ", ".join(c.decode("latin-1") for c in f.codings),
                502,
            )
        if resp.version == "1.0":
            # RFC 9112 §6.1: its framing is faulty
            raise RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 response", 502)
        return BODY_CHUNKED, 0
    length = _content_length(f, 502)
    if length is None:
        return BODY_CLOSE, 0
    if length == 0:
        return BODY_NONE, 0
    return BODY_LENGTH, length


def upstream_keeps_alive(resp: ResponseHead) -> bool:
    """Whether the upstream connection may carry another request."""
    return resp.keep_alive
