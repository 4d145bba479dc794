"""What elbasy does with each request and response head.

The loop calls the :class:`Policy` once per request head and once per response head;
it answers with the verdicts in `elbasy.verdicts`. Everything here is plain
Python over bytes: no fds, and the clock only as the callable it is handed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

import httptools

from elbasy import __version__
from elbasy.errors import RemoteProtocolError
from elbasy.logs import log_access
from elbasy.pacing import OWN_HEADERS, BadMaxWait, Paced, Pacer, Verdict
from elbasy.protocol.headers import drop_header_lines, named_in_connection, serialize
from elbasy.protocol.http1 import (
    IDEMPOTENT_METHODS,
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
    upstream_keeps_alive,
)
from elbasy.protocol.targets import check_host, check_port, parse_authority
from elbasy.verdicts import (
    BODY_CLOSE,
    BODY_NONE,
    Forward,
    Intercept,
    Reply,
    ResponsePlan,
    Tunnel,
)

log = logging.getLogger("elbasy.proxy")

REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    508: "Loop Detected",
}

COUNTERS = (
    "bad_requests",
    "heads_too_large",
    "upstream_errors",
    "tls_client_failures",
    "abandoned_while_held",
)
_REFUSAL_COUNTER = {400: "bad_requests", 431: "heads_too_large"}
_HOST_LINE = re.compile(rb"\r\nhost:[ \t]*([^\r]*)", re.IGNORECASE)
_EXPECT_LINE = re.compile(rb"\r\nexpect:[ \t]*100-continue[ \t]*\r\n", re.IGNORECASE)
# nginx's convention for "the client closed the request before an answer"
CLIENT_CLOSED = 499

#: distinct CONNECT heads whose decision is kept (all are dropped when full)
CONNECT_HEADS_KEPT = 1024


class Exchange:
    """One request (or one tunnel) as the access log will tell it."""

    __slots__ = ("client", "method", "target", "keep_alive", "paced")

    def __init__(self, client: str, method: str, target: str, keep_alive: bool = False) -> None:
        self.client = client
        self.method = method
        self.target = target
        self.keep_alive = keep_alive
        self.paced: Paced | None = None  # a request to a covered API: its pacing state


def response(
    status: int,
    body: bytes,
    content_type: bytes,
    close: bool,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    head = [
        (b"Content-Type", content_type),
        (b"Content-Length", str(len(body)).encode()),
        (b"Server", b"elbasy/" + __version__.encode()),
        *extra,
    ]
    if close:
        head.append((b"Connection", b"close"))
    line = b"HTTP/1.1 %d %s" % (status, REASONS.get(status, "Error").encode())
    return serialize(line, head) + body


def error_response(status: int, reason: str) -> bytes:
    """elbasy's own error: a one-line plain-text reason, then close."""
    return response(status, reason.encode("utf-8", "replace") + b"\n", b"text/plain", True)


class Policy:
    """The per-request decisions of one worker."""

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        intercept: Sequence[str] = (),
        pacer: Pacer | None = None,
    ) -> None:
        self._stats = stats
        # without one (tests of routing alone): a pacer whose rules cover nothing
        self.pacer = pacer if pacer is not None else Pacer.unpaced()
        # host globs whose CONNECTs are intercepted (TLS terminated here)
        self.intercept = tuple(g.lower() for g in intercept)
        self._intercepted: dict[str, bool] = {}
        # CONNECT heads already checked, to their (host, port, target, intercept):
        # a worker pool sends the same few heads over and over, and the same bytes
        # always get the same answer, so llhttp reads each one once
        self._connects: dict[bytes, tuple[str, int, str, bool]] = {}
        self._authorities: dict[tuple[bytes, int | None], tuple[str, int, bytes]] = {}
        # names this process in Via (RFC 9110 §7.6.3), so a request that comes
        # back (a client or --connect-to pointing elbasy at itself) is refused
        # instead of looping until the fds run out
        self._via = b"elbasy-" + os.urandom(4).hex().encode()
        # every counter is present from the start, so dashboards see zeros
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))

    # ---- request heads -----------------------------------------------------------

    def on_request(self, head: bytes, client: str) -> Reply | Tunnel | Intercept | Forward:
        known = self._connects.get(head) if head.startswith(b"CONNECT ") else None
        if known is not None:
            host, port, target, intercept = known
            ex = Exchange(client, "CONNECT", target)
            return Intercept(host, port, ex) if intercept else Tunnel(host, port, ex)
        try:
            req = parse_request_head(head)
        except RemoteProtocolError as exc:
            return self._refuse(Exchange(client, "-", "-"), exc)
        # HTTP/1.0 clients get one request per connection: their upstream
        # request is HTTP/1.0 too, so no chunked answer can reach them.
        ex = Exchange(client, req.method, req.target, req.keep_alive and req.version != "1.0")
        try:
            if req.method == "CONNECT":
                host, port = parse_authority(req.target)
                intercept = self.intercepts(host)
                if len(self._connects) >= CONNECT_HEADS_KEPT:
                    self._connects.clear()
                self._connects[head] = (host, port, req.target, intercept)
                return Intercept(host, port, ex) if intercept else Tunnel(host, port, ex)
            if req.target.startswith("/"):
                return self._own_page(req, ex)
            return self._forward(req, ex)
        except RemoteProtocolError as exc:
            return self._refuse(ex, exc)

    def intercepts(self, host: str) -> bool:
        """Whether CONNECTs to ``host`` are intercepted (one glob match per host, cached)."""
        known = self._intercepted.get(host)
        if known is None:
            name = host.lower()
            known = any(fnmatchcase(name, glob) for glob in self.intercept)
            if len(self._intercepted) >= 4096:
                self._intercepted.clear()
            self._intercepted[host] = known
        return known

    def on_intercepted(self, head: bytes, client: str, site: Intercept) -> Reply | Forward:
        """A request inside an intercepted TLS session: forward it to the site over TLS."""
        origin = "https://" + (site.host if site.port == 443 else f"{site.host}:{site.port}")
        try:
            req = parse_request_head(head)
        except RemoteProtocolError as exc:
            return self._refuse(Exchange(client, "-", origin), exc)
        ex = Exchange(
            client, req.method, origin + req.target, req.keep_alive and req.version != "1.0"
        )
        try:
            if req.method == "CONNECT":
                raise RemoteProtocolError("CONNECT inside an intercepted TLS session")
            if b"upgrade" in req.framing.connection:
                raise RemoteProtocolError(
                    f"elbasy does not relay protocol upgrades on intercepted hosts ({site.host})",
                    501,
                )
            path = req.target.encode("ascii")
            if not (path.startswith(b"/") or path == b"*"):
                path = self._origin_form(path)
            found = _HOST_LINE.search(req.raw)
            authority = found[1].rstrip(b" \t") if found else origin[8:].encode("ascii")
            return self._paced(req, path, authority, site.host, site.port, True, ex)
        except RemoteProtocolError as exc:
            return self._refuse(ex, exc)

    def _paced(
        self,
        req: RequestHead,
        path: bytes,
        authority: bytes,
        host: str,
        port: int,
        tls: bool,
        ex: Exchange,
    ) -> Reply | Forward:
        """A request on its way to host:port: paced on its quota account if a rule covers it."""
        if not self.pacer.rules.covers(host):
            return self._upstream(req, path, authority, host, port, ex, tls, OWN_HEADERS)
        headers = req.headers()
        match = self.pacer.match(host, req.method, path.decode("ascii"), headers)
        drop = OWN_HEADERS + (match.strip_headers if match is not None else ())
        fwd = self._upstream(req, path, authority, host, port, ex, tls, drop)
        if match is None:
            return fwd
        try:
            paced = self.pacer.start(match, req.method, headers)
        except BadMaxWait as exc:
            raise RemoteProtocolError(str(exc)) from None
        ex.paced = paced
        if match.body_needed and fwd.body != BODY_NONE:
            if _EXPECT_LINE.search(fwd.head):
                # elbasy reads the body before the request leaves, so it says
                # "100 Continue" itself; the upstream gets the body with the head
                head = drop_header_lines(fwd.head, (b"expect",))
                return fwd._replace(head=head, peek=match.body_needed, expect=True)
            return fwd._replace(peek=match.body_needed)
        v = self.pacer.admit(paced, ex)
        if v.shed_after:
            return self._shed(ex, v)
        return fwd._replace(depart=v.depart)

    def _shed(self, ex: Exchange, v: Verdict) -> Reply:
        """elbasy's own 429: the request would wait longer than allowed; nothing was sent."""
        retry = max(1, math.ceil(v.shed_after))
        body = (
            f"elbasy: the {v.limit} quota of this account has no room within the max wait; "
            f"retry after {retry} s\n"
        ).encode()
        close = not ex.keep_alive
        data = response(
            429,
            body,
            b"text/plain",
            close,
            ((b"Retry-After", str(retry).encode()), (b"X-Elbasy-Shed", b"1")),
        )
        log_access(ex.client, ex.method, ex.target, 429, 0, len(data), 0.0)
        return Reply(data, close)

    @staticmethod
    def _origin_form(target: bytes) -> bytes:
        """The path and query of an absolute-form target (a client may send one to a server)."""
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise RemoteProtocolError(f"bad request target {target!r}") from None
        if not url.schema:
            raise RemoteProtocolError(f"bad request target {target!r}")
        path = url.path or b"/"
        return path + b"?" + url.query if url.query else path

    def _refuse(self, ex: Exchange, exc: RemoteProtocolError) -> Reply:
        status = exc.status_hint
        self.counters[_REFUSAL_COUNTER.get(status, f"refused_{status}")] += 1
        log_access(ex.client, ex.method, ex.target, status, 0, 0, 0.0)
        log.info("refused %s from %s: %s", ex.target, ex.client, exc)
        return Reply(error_response(status, str(exc)), True)

    def _forward(self, req: RequestHead, ex: Exchange) -> Reply | Forward:
        try:
            url = httptools.parse_url(req.target.encode("ascii"))
        except httptools.HttpParserInvalidURLError:
            raise RemoteProtocolError(f"bad request target {req.target!r}") from None
        scheme = (url.schema or b"").lower()
        if scheme == b"https":
            raise RemoteProtocolError("https:// URLs go through CONNECT, not absolute-form")
        if scheme != b"http" or not url.host:
            raise RemoteProtocolError(f"bad request target {req.target!r}")
        if url.userinfo:
            raise RemoteProtocolError("credentials in the request URL are refused")
        host, port, authority = self._authority(url.host, url.port)
        path = url.path or b"/"
        if url.query:
            path += b"?" + url.query
        # plain http:// to an API a rule covers is paced just the same
        return self._paced(req, path, authority, host, port, False, ex)

    def _upstream(
        self,
        req: RequestHead,
        path: bytes,
        authority: bytes,
        host: str,
        port: int,
        ex: Exchange,
        tls: bool,
        drop: tuple[bytes, ...] = (),
    ) -> Forward:
        """The request as it leaves: origin-form, hop-by-hop stripped, Host and Via set.

        ``drop``: more header names (lower-case) that must not leave (elbasy's own).
        """
        if self._via in req.raw:
            raise RemoteProtocolError("request loop: it has already passed through here", 508)
        body, length = request_framing(req)
        version = b"HTTP/1.0" if req.version == "1.0" else b"HTTP/1.1"
        line = req.method.encode("ascii") + b" " + path + b" " + version
        rest = req.stripped
        named = named_in_connection(req.framing.connection)
        if named or drop:
            rest = drop_header_lines(rest, named | frozenset(drop))
        head = line + b"\r\nHost: " + authority + b"\r\nVia: 1.1 " + self._via
        head += rest[rest.index(b"\r\n") :]
        retryable = req.method in IDEMPOTENT_METHODS and body == BODY_NONE
        return Forward(host, port, head, body, length, retryable, ex, tls)

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
        if len(self._authorities) >= 4096:
            self._authorities.clear()
        known = self._authorities[key] = (host, number, value)
        return known

    def _own_page(self, req: RequestHead, ex: Exchange) -> Reply:
        """Origin-form: a request to elbasy itself, not through it."""
        path = req.target.split("?", 1)[0]
        close = not req.keep_alive
        if req.method not in ("GET", "HEAD"):
            status, data = 405, error_response(405, "elbasy's own pages answer GET only")
            close = True
        elif path == "/healthz":
            status = 200
            data = response(200, self._healthz(), b"application/json", close)
        elif path == "/":
            status, data = 200, response(200, _INDEX, b"text/html; charset=utf-8", close)
        else:
            status, data = 404, response(404, b"not found\n", b"text/plain", close)
        if req.method == "HEAD":
            data = data[: data.index(b"\r\n\r\n") + 4]
        log_access(ex.client, ex.method, ex.target, status, 0, len(data), 0.0)
        return Reply(data, close)

    def _healthz(self) -> bytes:
        stats = self._stats()
        stats["version"] = __version__
        stats["pid"] = os.getpid()
        counters = stats.setdefault("counters", {})
        for name, value in self.counters.items():
            counters[name] = value
        return json.dumps(stats, sort_keys=True).encode() + b"\n"

    # ---- response heads ---------------------------------------------------------

    def on_response(self, ex: Exchange, head: bytes) -> ResponsePlan:
        resp = parse_response_head(head)
        if 100 <= resp.status < 200 and resp.status != 101:
            return ResponsePlan(head, resp.status, BODY_NONE, 0, True, True, True)
        plan = self._plan(ex, resp)
        paced = ex.paced
        if paced is None:
            return plan
        headers = resp.headers()
        paced.response = (resp.status, headers)
        again = self.pacer.answered(paced, resp.status, headers, None)
        if again:
            return plan._replace(retry_at=again)
        wait = b"X-Elbasy-Wait: %.3f\r\n\r\n" % paced.waited()
        return plan._replace(head=plan.head[:-2] + wait, capture=self.pacer.wants_body(paced))

    def on_body(self, ex: Exchange, body: bytes) -> float | Reply:
        """The request body a paced request's price depends on (GraphQL): admit it now."""
        assert ex.paced is not None
        v = self.pacer.priced(ex.paced, body, ex)
        if v.shed_after:
            return self._shed(ex, v)
        return v.depart

    def departing(self, ex: Exchange) -> float | None:
        """A held request's departure time came: None to send it, or a later time."""
        if ex.paced is None:
            return None
        return self.pacer.departing(ex.paced)

    def on_response_body(self, ex: Exchange, body: bytes) -> None:
        """The body of a paced response whose rule reads bodies (GraphQL cost)."""
        paced = ex.paced
        if paced is None or paced.response is None:
            return
        status, headers = paced.response
        self.pacer.answered(paced, status, headers, body)

    def _plan(self, ex: Exchange, resp: ResponseHead) -> ResponsePlan:
        body, length = response_framing(resp, ex.method)
        keep_client = ex.keep_alive and body != BODY_CLOSE and resp.status != 101
        f = resp.framing
        head = resp.stripped
        named = named_in_connection(f.connection)
        if named:
            head = drop_header_lines(head, named)
        if not keep_client:
            head = head[:-2] + b"Connection: close\r\n\r\n"
        # a 101 hands the connection to another protocol: never pooled
        reuse = upstream_keeps_alive(resp) and body != BODY_CLOSE and resp.status != 101
        return ResponsePlan(head, resp.status, body, length, False, keep_client, reuse)

    # ---- endings ------------------------------------------------------------------

    def finished(self, ex: Exchange, status: int, up: int, down: int, took_ns: int) -> None:
        log_access(
            ex.client, ex.method, ex.target, status, up, down, took_ns / 1e6, self._paced_log(ex)
        )

    def failed(self, ex: Exchange, status: int, reason: str) -> bytes:
        self.counters["upstream_errors"] += 1
        self.counters[f"upstream_{status}"] += 1
        log_access(ex.client, ex.method, ex.target, status, 0, 0, 0.0)
        log.warning("%s %s from %s: %s", ex.method, ex.target, ex.client, reason)
        return error_response(status, reason)

    def abandoned(self, ex: Exchange) -> None:
        """The client of a held request left before its departure."""
        self.counters["abandoned_while_held"] += 1
        if ex.paced is not None:
            self.pacer.abandoned(ex.paced)
        log_access(ex.client, ex.method, ex.target, CLIENT_CLOSED, 0, 0, 0.0, self._paced_log(ex))

    def _paced_log(self, ex: Exchange) -> tuple[str, str, float, float | None, float] | None:
        """What the access log says of a paced request: rule, account, costs, its wait."""
        p = ex.paced
        if p is None:
            return None
        r = p.reservation
        cost = r.cost if r is not None else p.match.cost
        # held and gone before it left: how long it had waited by then
        waited = p.waited() if p.sent_at else max(0.0, self.pacer.mono() - p.arrived)
        return (p.match.rule.id, p.match.account, cost, p.actual, waited * 1000)

    def tls_failed(self, ex: Exchange, error: Exception) -> None:
        """The TLS handshake with an intercepted client failed (untrusted CA, garbage...)."""
        self.counters["tls_client_failures"] += 1
        log.info("TLS with %s for %s failed: %s", ex.client, ex.target, error)

    def head_too_large(self, client: str) -> bytes:
        return self._refuse(
            Exchange(client, "-", "-"),
            RemoteProtocolError("request head is larger than the configured limit", 431),
        ).data

    def bad_body(self, ex: Exchange) -> bytes:
        return self._refuse(ex, RemoteProtocolError("malformed chunked request body")).data

    def bad_response(self, ex: Exchange, exc: Exception) -> bytes:
        return self.failed(ex, 502, f"bad response from the upstream: {exc}")

    def internal_error(self, ex: Exchange | None, exc: BaseException) -> bytes:
        log.error("internal error on %s", ex.target if ex else "-", exc_info=exc)
        if ex is not None and ex.paced is not None:
            # the request will not leave: its place in line goes back
            self.pacer.abandoned(ex.paced)
        return error_response(500, "elbasy hit an internal error; see its log")


_INDEX = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>elbasy</title></head>
<body>
<h1>elbasy</h1>
<p>This is elbasy, an egress proxy for calling rate-limited APIs. It is not a
web server: point your HTTP client at it as a proxy instead.</p>
<pre>
export HTTPS_PROXY=http://HOST:PORT
export HTTP_PROXY=http://HOST:PORT
curl -x http://HOST:PORT https://example.com/
</pre>
<p>Health and counters: <a href="/healthz">/healthz</a> (JSON).</p>
</body></html>
"""
