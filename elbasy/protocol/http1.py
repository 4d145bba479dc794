"""Sans-IO HTTP/1.1 heads, parsed by llhttp (through httptools).

The data plane finds where a head ends and hands over the whole head as
bytes; `parse_request_head` and `parse_response_head` (elbasy._heads, one
call in C each) turn it into a head with its values read, or raise
`RemoteProtocolError` with the status the client should get; the framing
(RFC 9112 §6.3) and the cuts of the head as it leaves are that head's
methods. No sockets, no clock: the tests feed
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

def request_framing(req: RequestHead) -> tuple[int, int]:
    """(body framing, length) of a request (RFC 9112 §6.3): ``req.framing()``."""
    return req.framing()


def response_framing(resp: ResponseHead, request_method: str) -> tuple[int, int]:
    """(body framing, length) of a response to `request_method`."""
    return resp.framing(request_method)


def upstream_keeps_alive(resp: ResponseHead) -> bool:
    """Whether the upstream connection may carry another request."""
    return resp.keep_alive
