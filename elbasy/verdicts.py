"""What the policy plane tells the data plane to do.

The loop asks once per request head and once per response head; these small
immutable answers are all that crosses back. They are named tuples: built
once per request, they must be cheap to make (a frozen dataclass costs
several times more per instance). Body framings are plain ints so
the Cython side can switch on them without touching Python objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

#: "Hold until": when a request may leave, in seconds on the monotonic clock
#: (``time.monotonic``), the one spelling of it at the seam: ``Forward.depart``,
#: what ``on_body`` and ``departing`` return, ``ResponsePlan.retry_at`` and
#: ``Loop.wake``. NOW means no hold: it leaves at once, with no confirmation.
#: Any other time, a past one included, holds it on the loop's timer until
#: then, and the policy's ``departing`` confirms it (or moves it) then.
NOW = 0.0

BODY_NONE = 0  # no body follows the head
BODY_LENGTH = 1  # exactly `length` bytes follow
BODY_CHUNKED = 2  # chunked transfer coding, relayed byte for byte
BODY_CLOSE = 3  # the body runs until the upstream closes (responses only)


class Reply(NamedTuple):
    """Answer the client with these bytes; keep the connection unless `close`."""

    data: bytes
    close: bool


class Tunnel(NamedTuple):
    """Dial host:port, answer 200 and relay bytes both ways until both ends finish."""

    host: str
    port: int
    ticket: Any


class Intercept(NamedTuple):
    """Answer 200, accept TLS as `host` (leaf by SNI), then relay each HTTP message.

    Every request inside the session goes to the policy's ``on_request``
    with this verdict as its ``site``.
    """

    host: str
    port: int
    ticket: Any
    origin: str  # "https://host[:port]", the start of its requests' targets in the access log


class Reverse(NamedTuple):
    """The site of a ``--reverse`` listener: every request on it goes to one target.

    The loop hands it, as the ``site`` of ``on_request``, with every head read on
    a connection that listener accepted; the policy builds it once per listener.
    """

    host: str  # the target's (lower case; IPv6 without brackets)
    port: int
    tls: bool  # https: verified, SNI, ALPN http/1.1
    authority: bytes  # the Host the target gets (``openapi.etsy.com``)
    origin: str  # ``https://openapi.etsy.com``, for the access log
    listen: bytes  # the listener's address: X-Forwarded-Host when the client sends no Host


class Transparent(NamedTuple):
    """The site of a ``--transparent`` listener: its clients reach it by DNS, ``/etc/hosts``
    or a REDIRECT rule, never by a CONNECT.

    The loop hands it to ``on_hello`` with a TLS client's ClientHello, and as the
    ``site`` of ``on_request`` with every head of a plain HTTP client (routed by Host).
    """

    listen: tuple[str, int]  # the listener's address as bound
    port: int  # where a spliced TLS client goes when its name is all there is: 443


class TLSListener(NamedTuple):
    """The site of the ``--listen-tls`` listener: the proxy itself, reached over TLS.

    The loop makes each accepted connection's TLS session with ``new_ssl`` (the
    listener's certificate) and hands its heads to ``on_request`` as the plain
    proxy's (site None): CONNECTs are relayed through the session, intercepted
    hosts get a TLS session inside it.
    """

    listen: tuple[str, int]  # the listener's address as bound
    new_ssl: Callable[[int], int]  # a server SSL* (as an int) accepting on an fd


class Forward(NamedTuple):
    """Send `head` (then the request body, by framing) to host:port and relay the answer.

    ``tls``: the upstream speaks TLS (verified, SNI and ALPN http/1.1).
    ``depart``: hold the request until this time (see :data:`NOW`); NOW
    sends it at once. When a held one's time comes the loop asks the
    policy's ``departing`` once more before sending, a past time included
    (then at the loop's next turn): a held departure is never sent unconfirmed.
    ``peek``: first read up to this many bytes of the request body and hand
    them to the policy's ``on_body``, whose answer (a hold-until time, or a
    Reply) replaces ``depart``.
    """

    host: str
    port: int
    head: bytes
    body: int
    length: int
    retryable: bool  # idempotent and bodiless: safe to send again on a fresh connection
    ticket: Any
    tls: bool = False
    depart: float = NOW
    peek: int = 0  # show the policy this many request body bytes first (its ``on_body``)
    expect: bool = False  # with peek: the client waits for "100 Continue" before its body


#: A verdict from every one of its fields, in order, as one tuple:
#: ``built(Forward, (host, port, ...))``. The named tuples' own ``__new__``
#: is a Python function; going around it saves a frame on the two verdicts
#: every request makes (a Forward and a ResponsePlan). mypy checks nothing
#: here, so tests/test_seam.py checks each field of what the policy builds.
built: Callable[[type, tuple[Any, ...]], Any] = tuple.__new__


class ResponsePlan(NamedTuple):
    """How to relay one response head (and the body after it) to the client."""

    head: bytes
    status: int
    body: int
    length: int
    interim: bool  # a 1xx: relay it and keep reading for the final response
    keep_client: bool
    reuse_upstream: bool
    capture: int = 0  # show the policy up to this many body bytes at the end (``on_response_body``)
    # not NOW: this response is not relayed; the request is held until then
    # and sent again (see NOW)
    retry_at: float = NOW


# What ended: the ``kind`` of an ``elbasy._loop.Ended``, the value the loop
# hands the policy's ``ended`` once per ending (the loop makes it, so it is
# a compiled value: one per request costs no more than the call it rides on).
# The kinds marked "answer" still owe the client one, which the policy
# spells and returns (bytes); the others return None.
FINISHED = "finished"  # carried out: a tunnel closed, or an exchange's answer relayed (or cut)
ABANDONED = "abandoned"  # the client of a held request left before its departure
TLS_FAILED = "tls_failed"  # the TLS handshake with an intercepted client failed
FAILED = "failed"  # answer: the upstream could not be reached or did not answer
HEAD_TOO_LARGE = "head_too_large"  # answer: a request head past the loop's limit
BAD_BODY = "bad_body"  # answer: a malformed chunked request body
BAD_RESPONSE = "bad_response"  # answer: on_response raised; the response cannot be passed on
INTERNAL_ERROR = "internal_error"  # answer: another policy call raised, or a loop step did
DRAINED = "drained"  # answer: the worker's drain deadline came before the answer did
