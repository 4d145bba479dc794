"""Sans-IO HTTP/1.1 heads, parsed by llhttp (through httptools).

The data plane finds where a head ends and hands over the whole head as
bytes; these functions turn it into plain values or raise
`RemoteProtocolError` with the status the client should get. No sockets, no
clock: the tests feed bytes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools

from elbasy.errors import RemoteProtocolError
from elbasy.protocol.headers import Headers, connection_tokens
from elbasy.verdicts import BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    version: str  # "1.0" or "1.1"
    headers: Headers
    keep_alive: bool


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    status_line: bytes
    version: str
    headers: Headers
    keep_alive: bool


class _Collector:
    """Receives llhttp's callbacks for one head."""

    __slots__ = ("url", "headers", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: Headers = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a complete request head (request line to blank line)."""
    sink = _Collector()
    parser = httptools.HttpRequestParser(sink)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # CONNECT or Upgrade: the head is complete, what follows is not HTTP
    except httptools.HttpParserError as exc:
        raise RemoteProtocolError(f"malformed request head: {exc}") from None
    if not sink.complete:
        raise RemoteProtocolError("malformed request head: incomplete")
    try:
        target = sink.url.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("request target is not ASCII") from None
    return RequestHead(
        method=parser.get_method().decode("ascii"),
        target=target,
        version=parser.get_http_version(),
        headers=sink.headers,
        keep_alive=_keep_alive(parser.get_http_version(), sink.headers),
    )


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse a complete response head from an upstream."""
    sink = _Collector()
    parser = httptools.HttpResponseParser(sink)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        raise RemoteProtocolError(f"malformed response head: {exc}", 502) from None
    if not sink.complete:
        raise RemoteProtocolError("malformed response head: incomplete", 502)
    line_end = head.find(b"\r\n")
    if line_end < 0:
        line_end = head.find(b"\n")
    return ResponseHead(
        status=parser.get_status_code(),
        status_line=head[:line_end],
        version=parser.get_http_version(),
        headers=sink.headers,
        keep_alive=_keep_alive(parser.get_http_version(), sink.headers),
    )


def _keep_alive(version: str, headers: Headers) -> bool:
    """HTTP/1.1 persists unless told to close; HTTP/1.0 only when asked to."""
    tokens = connection_tokens(headers)
    if version == "1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens and b"close" not in tokens


def _content_length(headers: Headers, status: int) -> int | None:
    values = {v.strip() for n, v in headers if n.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1:
        raise RemoteProtocolError("conflicting Content-Length values", status)
    text = values.pop()
    if not text.isdigit():
        raise RemoteProtocolError("bad Content-Length", status)
    return int(text)


def _is_chunked(headers: Headers, status: int) -> bool | None:
    """None without Transfer-Encoding; True when chunked is the final coding."""
    codings = [
        c.strip().lower()
        for n, v in headers
        if n.lower() == b"transfer-encoding"
        for c in v.split(b",")
        if c.strip()
    ]
    if not codings:
        return None
    return codings[-1] == b"chunked"


def request_framing(req: RequestHead) -> tuple[int, int]:
    """(body framing, length) of a request (RFC 9112 §6.3)."""
    chunked = _is_chunked(req.headers, 400)
    length = _content_length(req.headers, 400)
    if chunked is not None:
        if length is not None:
            raise RemoteProtocolError("both Transfer-Encoding and Content-Length")
        if not chunked:
            raise RemoteProtocolError("request Transfer-Encoding must end in chunked")
        return BODY_CHUNKED, 0
    if length is None or length == 0:
        return BODY_NONE, 0
    return BODY_LENGTH, length


def response_framing(resp: ResponseHead, request_method: str) -> tuple[int, int]:
    """(body framing, length) of a response to `request_method`."""
    status = resp.status
    if request_method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return BODY_NONE, 0
    chunked = _is_chunked(resp.headers, 502)
    if chunked is not None:
        return (BODY_CHUNKED, 0) if chunked else (BODY_CLOSE, 0)
    length = _content_length(resp.headers, 502)
    if length is None:
        return BODY_CLOSE, 0
    if length == 0:
        return BODY_NONE, 0
    return BODY_LENGTH, length


def upstream_keeps_alive(resp: ResponseHead) -> bool:
    """Whether the upstream connection may carry another request."""
    if b"close" in connection_tokens(resp.headers):
        return False
    return resp.keep_alive
