"""The request as it leaves elbasy: origin-form, hop-by-hop headers gone, Host and Via set.

A client's head becomes the head the upstream gets, once: the target in
origin-form, the hop-by-hop headers (and those ``Connection`` names) and
elbasy's own headers dropped, ``Host`` set from the authority, and a ``Via``
that names this process, so a request that comes back to it (a client or a
``--connect-to`` pointing elbasy at itself) is refused instead of looping
until the fds run out.
"""

from __future__ import annotations

import os

import httptools

from elbasy.errors import RemoteProtocolError
from elbasy.protocol.http1 import IDEMPOTENT_METHODS, RequestHead
from elbasy.protocol.targets import check_host, check_port
from elbasy.verdicts import BODY_NONE, NOW, Forward, built

#: distinct URL authorities whose (host, port, Host value) are kept (all dropped when full)
AUTHORITIES_KEPT = 4096


class Outbound:
    """Builds the :class:`~elbasy.verdicts.Forward` of each request, for one process."""

    def __init__(self) -> None:
        # names this process in Via (RFC 9110 7.6.3)
        self.via = b"elbasy-" + os.urandom(4).hex().encode()
        self._authorities: dict[tuple[bytes, int | None], tuple[str, int, bytes]] = {}

    def absolute(self, target: str) -> tuple[str, int, bytes, bytes]:
        """An absolute-form ``http://`` target: (host, port, Host value, origin-form path)."""
        try:
            url = httptools.parse_url(target.encode("ascii"))
        except httptools.HttpParserInvalidURLError:
            raise RemoteProtocolError(f"bad request target {target!r}") from None
        scheme = (url.schema or b"").lower()
        if scheme == b"https":
            raise RemoteProtocolError("https:// URLs go through CONNECT, not absolute-form")
        if scheme != b"http" or not url.host:
            raise RemoteProtocolError(f"bad request target {target!r}")
        if url.userinfo:
            raise RemoteProtocolError("credentials in the request URL are refused")
        host, port, authority = self._authority(url.host, url.port)
        path = url.path or b"/"
        if url.query:
            path += b"?" + url.query
        return host, port, authority, path

    @staticmethod
    def origin_form(target: bytes) -> bytes:
        """The path and query of an absolute-form target (a client may send one to a server)."""
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise RemoteProtocolError(f"bad request target {target!r}") from None
        if not url.schema:
            raise RemoteProtocolError(f"bad request target {target!r}")
        path = url.path or b"/"
        return path + b"?" + url.query if url.query else path

    def forward(
        self,
        req: RequestHead,
        path: bytes,
        authority: bytes,
        host: str,
        port: int,
        ticket: object,
        tls: bool,
        drop: tuple[bytes, ...] = (),
        peek: int = 0,
        extra: bytes = b"",
    ) -> Forward:
        """The request as it leaves. ``drop``: more header names (lower-case) that must not
        leave (elbasy's own, a rule's). ``peek``: the policy reads this many bytes of the
        body before the request leaves (when it has one). ``extra``: header lines added
        after Host and Via, each after its own CRLF (a reverse listener's X-Forwarded-*)."""
        if req.via and any(self.via in value for value in req.via):
            raise RemoteProtocolError("request loop: it has already passed through here", 508)
        out = req.outgoing(path, authority, self.via, extra, drop, peek)
        head, body, length, peek, expect = out
        retryable = req.method in IDEMPOTENT_METHODS and body == BODY_NONE
        forward: Forward = built(
            Forward, (host, port, head, body, length, retryable, ticket, tls, NOW, peek, expect)
        )
        return forward

    def _authority(self, raw: bytes, port: int | None) -> tuple[str, int, bytes]:
        """(host, port, Host header value) of a URL's authority, checked once per authority."""
        key = (raw, port)
        known = self._authorities.get(key)
        if known is not None:
            return known
        text = raw.decode("ascii")
        host = check_host(f"[{text}]" if ":" in text else text)
        number = port or 80
        check_port(str(number))
        value = raw if ":" not in text else b"[" + raw + b"]"
        if port:
            value += b":%d" % port
        if len(self._authorities) >= AUTHORITIES_KEPT:
            self._authorities.clear()
        known = self._authorities[key] = (host, number, value)
        return known
