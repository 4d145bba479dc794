"""The seam between the data plane (ext/loop/) and everything in Python.

The loop owns fds and the clock; what it asks of Python it asks through
three kinds of object, declared here as :class:`typing.Protocol`\\ s so the
seam is written down once and mypy checks both sides of it:

- :class:`PolicySeam`, the policy (`elbasy.policy.Policy`): the decisions,
  one call per request head (inside an interception or not), request body
  peek, departure, response head and captured response body, and one for
  every ending, with an `elbasy._loop.Ended` that says which (its kinds
  are in `elbasy.verdicts`);
- :class:`ResolverSeam`, name resolution (`elbasy.resolver.Resolver`);
- :class:`ServerTLSSeam` and :class:`ClientTLSSeam`, the TLS factories of
  interception (`elbasy.tls.ServerTLS`, `elbasy.tls.ClientTLS`).

The loop binds each method once when it is built (`Loop.__init__`): an
object without one of them is refused there with a TypeError naming what
is missing, not at the first request that needs it. The parameters are
positional-only because the loop passes them by position; an
implementation may name them as it likes.

A ``ticket`` is the policy's own handle for a request or tunnel (the
``ticket`` of the verdict it returned); the loop carries it and never
looks inside. Every method may raise: the loop catches the exception at
the call and counts it, once, in ``policy_errors``; where an answer was
owed it asks ``ended`` for the INTERNAL_ERROR page, and where ``ended``
itself raised (or gave no bytes) it sends one of the
`elbasy.pages.LoopPages` it was handed, so a failing policy still leaves
every client an answer and every fd closed. ``on_response`` is the one
exception: raising there is how the policy refuses an upstream's response
(a 502 through ``ended``), not a failure of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from elbasy.verdicts import Forward, Intercept, Reply, ResponsePlan, Reverse, Tunnel

if TYPE_CHECKING:
    from elbasy._loop import Ended

#: the policy's handle for one request or tunnel: opaque to the loop
Ticket = Any

#: what the resolver answers for a name: addresses (family, address, port) to
#: try in order (exactly those the loop dials), or a one-line reason it cannot
#: be reached, whose ``status`` attribute, if it has one, is the status the
#: loop answers with (elbasy.resolver.Failure: 502; Denied: 403), else 502
Answer = list[tuple[int, str, int]] | str


class PolicySeam(Protocol):
    """What the loop asks of the policy: six calls per request at most, and
    the quota store's wake-up.

    Every "when may this leave" is one hold-until value (`elbasy.verdicts.NOW`):
    a monotonic time in seconds, NOW for at once."""

    def on_request(
        self, head: bytes, client: str, site: Intercept | Reverse | None, /
    ) -> Reply | Tunnel | Intercept | Forward:
        """A whole request head from ``client`` (the peer's "address:port");
        ``site``: the interception the connection is in (its TLS session with
        the client, where only a Reply or a Forward may come back), the
        --reverse listener's Reverse that accepted it (the same), or None."""

    def on_body(self, ticket: Ticket, body: bytes, /) -> float | Reply:
        """The first ``Forward.peek`` bytes of the body: its hold-until (NOW:
        it leaves at once) or an answer instead."""

    def departing(self, ticket: Ticket, /) -> float | Reply:
        """A held request's time came: NOW confirms it leaves now, another
        hold-until moves it to that time (and asks again then), a Reply
        answers it instead (and the connection closes: its body is unread)."""

    def on_response(self, ticket: Ticket, head: bytes, /) -> ResponsePlan:
        """A whole response head from the upstream. Raising refuses the response
        (``Ended`` BAD_RESPONSE follows): the way to say it cannot be passed on."""

    def on_response_body(self, ticket: Ticket, body: bytes, /) -> None:
        """The first ``ResponsePlan.capture`` bytes of the response body."""

    def ended(self, ticket: Ticket | None, end: Ended, /) -> bytes | None:
        """The request or tunnel ended (``end.kind``: elbasy.verdicts lists the
        kinds). For the kinds that still owe the client an answer, the whole
        answer (head and body) the loop sends before closing; None otherwise.
        ``ticket`` is None before a head was dispatched (HEAD_TOO_LARGE, and
        an INTERNAL_ERROR or DRAINED that came first)."""

    def quota_moved(self) -> None:
        """The quota store's fd is readable: another worker gave room back.
        Not an ending of anything, so not folded into ``ended``: it belongs
        to no request, and the loop calls it from the store's fd alone."""


class ResolverSeam(Protocol):
    """Name resolution that never blocks the loop."""

    def fileno(self) -> int:
        """An fd the loop polls: readable when answers are waiting."""

    def lookup(self, host: str, port: int, token: Any, /) -> Answer | None:
        """An answer now, or None and ``(token, answer)`` later from completed()."""

    def completed(self) -> Iterable[tuple[Any, Answer]]:
        """The answers that arrived since the last call."""


class ServerTLSSeam(Protocol):
    """Interception's side facing the client: an SSL* that accepts as the host."""

    def new_ssl(self, fd: int, fallback_name: str, early: bytes, /) -> int:
        """An SSL* (as an address) accepting on ``fd``; ``early``: the
        ClientHello bytes that came with the CONNECT head."""

    def failure(self, ssl: int, /) -> Exception:
        """Why the handshake of ``ssl`` failed."""

    def new_ssl_over(self, outer: int, fallback_name: str, /) -> int:
        """An SSL* (as an address) that reads and writes through the TLS session
        ``outer``: a CONNECT intercepted inside a --listen-tls connection."""


class ClientTLSSeam(Protocol):
    """Interception's side facing the upstream: a verifying SSL* to the host."""

    def new_ssl(self, fd: int, host: str, /) -> int:
        """An SSL* (as an address) connecting on ``fd`` and verifying ``host``."""

    def failure(self, ssl: int, /) -> Exception:
        """Why the handshake of ``ssl`` failed."""
