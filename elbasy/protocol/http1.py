"""Sans-IO HTTP/1.1 heads, parsed by llhttp (through httptools).

The data plane finds where a head ends and hands over the whole head as
bytes; `parse_request_head` and `parse_response_head` (elbasy._heads, one
call in C each) turn it into a head with its values read, or raise
`RemoteProtocolError` with the status the client should get; the framing
functions here read those values. No sockets, no clock: the tests feed
bytes alone.
"""

from __future__ import annotations

from elbasy._heads import (
    MAX_CONNECTION_OPTIONS,
    MAX_HEADER_LINES,
    RequestHead,
    ResponseHead,
)
from elbasy._heads import parse_request as parse_request_head
from elbasy._heads import parse_response as parse_response_head
from elbasy.errors import RemoteProtocolError
from elbasy.verdicts import BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE

#: Methods whose effect is the same sent once or twice (RFC 9110 9.2.2): the
#: only ones elbasy ever sends again (a pooled connection that was closed as it
#: was reused; a 429 with --retry-idempotent)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

__all__ = [
    "IDEMPOTENT_METHODS",
    "MAX_CONNECTION_OPTIONS",
    "MAX_HEADER_LINES",
    "RequestHead",
    "ResponseHead",
    "parse_request_head",
    "parse_response_head",
    "request_framing",
    "response_framing",
    "upstream_keeps_alive",
]

_CHUNKED = (b"chunked",)


def _content_length(values: tuple[bytes, ...], status: int) -> int | None:
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
    length = _content_length(req.lengths, 400)
    codings = req.codings
    if codings:
        if length is not None:
            raise RemoteProtocolError("both Transfer-Encoding and Content-Length")
        if req.version == "1.0":
            # RFC 9112 §6.1: framing an HTTP/1.0 message by it is faulty
            raise RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        if codings != _CHUNKED:
            # RFC 9112 §6.1, §6.3: elbasy relays chunked framing only; any
            # other coding (identity is none, gzip would need decoding to
            # frame) could make two hops disagree on where the body ends
            raise RemoteProtocolError(
                "request Transfer-Encoding must be exactly chunked, not "
                + ", ".join(c.decode("latin-1") for c in codings)
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
    codings = resp.codings
    if codings:
        if codings != _CHUNKED:
            # elbasy strips TE, so no client asked for another coding; and a
            # framing elbasy does not read exactly is no framing to relay
            raise RemoteProtocolError(
                "response Transfer-Encoding must be exactly chunked, not "
                + ", ".join(c.decode("latin-1") for c in codings),
                502,
            )
        if resp.version == "1.0":
            # RFC 9112 §6.1: its framing is faulty
            raise RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 response", 502)
        return BODY_CHUNKED, 0
    length = _content_length(resp.lengths, 502)
    if length is None:
        return BODY_CLOSE, 0
    if length == 0:
        return BODY_NONE, 0
    return BODY_LENGTH, length


def upstream_keeps_alive(resp: ResponseHead) -> bool:
    """Whether the upstream connection may carry another request."""
    return resp.keep_alive
