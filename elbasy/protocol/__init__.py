"""HTTP/1.1 as elbasy needs it: sans-IO, bytes in, plain values out."""

from elbasy.protocol.http1 import (
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
)

__all__ = [
    "RequestHead",
    "ResponseHead",
    "parse_request_head",
    "parse_response_head",
    "request_framing",
    "response_framing",
]
