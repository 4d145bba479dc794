"""The seam between the data plane (ext/loop/) and everything in Python.

The loop owns fds and the clock; what it asks of Python it asks through
three kinds of object, declared here as :class:`typing.Protocol`\\ s so the
seam is written down once and mypy checks both sides of it:

- :class:`PolicySeam`, the policy (`elbasy.policy.Policy`): the decisions,
  one call per request head, request body peek, departure, response head,
  captured response body and ending;
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
the call, counts it (``policy_errors``) and answers with one of the
`elbasy.pages.LoopPages` it was handed, so a failing policy still leaves
every client an answer and every fd closed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from elbasy.verdicts import Forward, Intercept, Reply, ResponsePlan, Tunnel

#: the policy's handle for one request or tunnel: opaque to the loop
Ticket = Any

#: what the resolver answers for a name: addresses (family, address, port) to
#: try in order, or a one-line reason it cannot be reached
Answer = list[tuple[int, str, int]] | str


class PolicySeam(Protocol):
    """What the loop asks of the policy. ``bytes`` results are whole answers
    (head and body) the loop sends to the client before closing."""

    # ---- heads and bodies ---------------------------------------------------------

    def on_request(self, head: bytes, client: str, /) -> Reply | Tunnel | Intercept | Forward:
        """A whole request head from ``client`` (the peer's "address:port")."""

    def on_intercepted(self, head: bytes, client: str, site: Intercept, /) -> Reply | Forward:
        """A whole request head inside an intercepted TLS session to ``site``."""

    def on_body(self, ticket: Ticket, body: bytes, /) -> float | Reply:
        """The first ``Forward.peek`` bytes of the body: a departure (monotonic
        seconds, 0 for now) or an answer instead."""

    def departing(self, ticket: Ticket, /) -> float | None:
        """A held request's time came: None confirms it leaves now, a float
        moves it to that (monotonic) time."""

    def on_response(self, ticket: Ticket, head: bytes, /) -> ResponsePlan:
        """A whole response head from the upstream."""

    def on_response_body(self, ticket: Ticket, body: bytes, /) -> None:
        """The first ``ResponsePlan.capture`` bytes of the response body."""

    def quota_moved(self) -> None:
        """The quota store's fd is readable: another worker gave room back."""

    # ---- endings ------------------------------------------------------------------

    def finished(
        self, ticket: Ticket, status: int, up: int, down: int, took_ns: int, /
    ) -> None:
        """An exchange or tunnel ended after it was carried out."""

    def abandoned(self, ticket: Ticket, /) -> None:
        """The client of a held request left before its departure."""

    def failed(self, ticket: Ticket, status: int, reason: str, /) -> bytes:
        """The upstream could not be reached or did not answer (502, 504)."""

    def tls_failed(self, ticket: Ticket, reason: Exception | str, /) -> None:
        """The TLS handshake with an intercepted client failed."""

    def head_too_large(self, client: str, /) -> bytes:
        """A request head larger than the loop's limit (431)."""

    def bad_body(self, ticket: Ticket, /) -> bytes:
        """A malformed chunked request body (400)."""

    def bad_response(self, ticket: Ticket, exc: Exception, /) -> bytes:
        """``on_response`` raised: the response cannot be passed on (502)."""

    def internal_error(self, ticket: Ticket | None, exc: BaseException, /) -> bytes:
        """Another policy call raised, or a step of the loop did (500)."""

    def drained(self, ticket: Ticket | None, sent: bool, /) -> bytes:
        """The worker's drain deadline came before this request's answer (503)."""


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


class ClientTLSSeam(Protocol):
    """Interception's side facing the upstream: a verifying SSL* to the host."""

    def new_ssl(self, fd: int, host: str, /) -> int:
        """An SSL* (as an address) connecting on ``fd`` and verifying ``host``."""

    def failure(self, ssl: int, /) -> Exception:
        """Why the handshake of ``ssl`` failed."""
