"""What elbasy does with each request and response head.

The loop calls the :class:`Policy` once per request head and once per response head;
it answers with the verdicts in `elbasy.verdicts`. Everything here is plain
Python over bytes: no fds, and the clock only as the callable it is handed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from elbasy.access import CLIENTS_KEPT, OPEN, Access, address_of_key
from elbasy.destinations import DENIED, Destinations
from elbasy.errors import RemoteProtocolError
from elbasy.hostglob import covered
from elbasy.logs import access_on, log_access
from elbasy.outbound import Outbound
from elbasy.pacing import OWN_HEADERS, BadMaxWait, Paced, Pacer, Verdict
from elbasy.pages import (
    PAGE_AUTH_REQUIRED,
    PROXY_AUTH_REQUIRED,
    draining_response,
    error_response,
    own_page,
    shed_response,
    unavailable_response,
)
from elbasy.protocol.http1 import (
    RequestHead,
    parse_request_head,
    parse_response_head,
)
from elbasy.protocol.targets import check_host, parse_authority
from elbasy.trust import (
    WarnedClients,
    client_address,
    distrusts_ca,
    untrusted_ca_warning,
    upstream_hint,
)
from elbasy.verdicts import (
    ABANDONED,
    BAD_BODY,
    BAD_RESPONSE,
    BODY_NONE,
    DRAINED,
    FAILED,
    FINISHED,
    HEAD_TOO_LARGE,
    INTERNAL_ERROR,
    NOW,
    TLS_FAILED,
    Forward,
    Intercept,
    Reply,
    ResponsePlan,
    Reverse,
    Transparent,
    Tunnel,
    built,
)

if TYPE_CHECKING:
    from elbasy._loop import Ended
    from elbasy.config import ReverseTo

log = logging.getLogger("elbasy.proxy")

COUNTERS = (
    "bad_requests",
    "heads_too_large",
    "upstream_errors",
    "tls_client_failures",
    "abandoned_while_held",
    "auth_refused",
    "destination_denied",
    "no_server_name",
)
_REFUSAL_COUNTER = {400: "bad_requests", 431: "heads_too_large"}
#: the fatal TLS alerts (RFC 8446 §6.2) that close a --transparent listener's TLS
#: client elbasy will not carry: its ClientHello names no server (unrecognized_name),
#: or the destination rules refuse the name (access_denied)
ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x01\x00\x02\x02\x70"
ALERT_ACCESS_DENIED = b"\x15\x03\x01\x00\x02\x02\x31"
#: what a client is told when its upstream could not be reached or did not answer
#: (the same words for a refused connect, an unreachable network, a timeout or a
#: bad answer: the reason is elbasy's log's, not a port scanner's)
UPSTREAM_FAILED = "elbasy: the upstream could not be reached or did not answer"
# nginx's convention for "the client closed the request before an answer"
CLIENT_CLOSED = 499
#: the access line's status of an intercepted CONNECT whose client's TLS handshake
#: failed (the "SSL handshake failed" status some proxies and CDNs log); never sent
TLS_HANDSHAKE_FAILED = 525

#: distinct CONNECT heads whose decision is kept (all are dropped when full)
CONNECT_HEADS_KEPT = 1024
#: intercepted (host, port) pairs whose origin text is kept (all dropped when full)
ORIGINS_KEPT = 4096
#: where credentials are read: a proxy request's one header, or for elbasy's own
#: pages the one a browser, curl -u and Prometheus send (or the proxy's)
_PROXY_CREDENTIALS = (b"proxy-authorization",)
_PAGE_CREDENTIALS = (b"authorization", b"proxy-authorization")
#: what a --reverse listener's client may not say about the hops before the target:
#: elbasy sets the X-Forwarded-* itself, and a Forwarded would contradict them
FORWARDED_HEADERS = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded")
_REVERSE_DROP = OWN_HEADERS + FORWARDED_HEADERS


def reverse_site(rule: ReverseTo, listening: tuple[str, int]) -> Reverse:
    """The site of a --reverse listener bound to ``listening`` (its address as bound:
    port 0 is the port the kernel chose)."""
    host = f"[{rule.host}]" if ":" in rule.host else rule.host
    default = 443 if rule.tls else 80
    authority = host if rule.port == default else f"{host}:{rule.port}"
    where = f"[{listening[0]}]" if ":" in listening[0] else listening[0]
    return Reverse(
        rule.host,
        rule.port,
        rule.tls,
        authority.encode("ascii"),
        rule.origin,
        f"{where}:{listening[1]}".encode("ascii"),
    )


class Exchange:
    """One request (or one tunnel) as the access log will tell it."""

    __slots__ = (
        "client",
        "method",
        "target",
        "keep_alive",
        "paced",
        "queued",
        "sent_at",
        "head_at",
    )

    def __init__(self, client: str, method: str, target: str, keep_alive: bool = False) -> None:
        self.client = client
        self.method = method
        self.target = target
        self.keep_alive = keep_alive
        self.paced: Paced | None = None  # a request to a covered API: its pacing state
        self.queued = False  # held for its quota, counted in the rule's queue depth
        # monotonic, for an unpaced request: when it left, when its answer's head came
        # (a paced one's are its Paced's)
        self.sent_at = self.head_at = 0.0


class Policy:
    """The per-request decisions of one worker."""

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        intercept: Sequence[str] = (),
        pacer: Pacer | None = None,
        access: Access = OPEN,
        destinations: Destinations | None = None,
    ) -> None:
        self._stats = stats
        # who may use the proxy (elbasy.access): credentials, client networks
        self.access = access
        # where requests may go by name (elbasy.destinations); the resolver
        # checks the addresses. None: anywhere (tests of routing alone)
        self.destinations = destinations
        # without one (tests of routing alone): a pacer whose rules cover nothing
        self.pacer = pacer if pacer is not None else Pacer.unpaced()
        # host globs whose CONNECTs are intercepted (TLS terminated here)
        self.intercept = tuple(g.lower() for g in intercept)
        self._intercepted: dict[str, bool] = {}
        # an intercepted (host, port) to its "https://host[:port]", the start of
        # its requests' targets in the access log
        self._origins: dict[tuple[str, int], str] = {}
        # CONNECT heads already checked, to their (host, port, target, intercept):
        # a worker pool sends the same few heads over and over, and the same bytes
        # always get the same answer, so llhttp reads each one once
        self._connects: dict[bytes, tuple[str, int, str, bool]] = {}
        self._refused_clients: set[bytes] = set()  # --allow-clients: logged already
        self.outbound = Outbound()
        # what this worker counts lives in its slot of the instance's metrics
        # (elbasy.metrics), where /metrics reads every worker's
        self.metrics = self.pacer.metrics
        # the worker wires in the data of /status.json and the CA of /ca.pem
        self.status: Callable[[], dict[str, Any]] | None = None
        self.ca_pem: bytes | None = None
        # the CA's certificate file, named in the warning for a client that
        # does not trust it; the client addresses already warned
        self.ca_file: str | None = None
        # the address clients set as their proxy, shown on the status page
        self.proxy_url: str | None = None
        self._warned = WarnedClients()
        # the endings other than FINISHED (ended() takes that one itself)
        self._endings: dict[str, Callable[[Exchange | None, Ended], bytes | None]] = {
            ABANDONED: self._on_abandoned,
            TLS_FAILED: self._on_tls_failed,
            FAILED: self._on_failed,
            HEAD_TOO_LARGE: self._on_head_too_large,
            BAD_BODY: self._on_bad_body,
            BAD_RESPONSE: self._on_bad_response,
            INTERNAL_ERROR: self._on_internal_error,
            DRAINED: self._on_drained,
        }

    @property
    def counters(self) -> dict[str, int]:
        """This worker's failures by kind (every kind present, so dashboards see zeros)."""
        out = dict.fromkeys(COUNTERS, 0)
        for (kind,), n in self.metrics.local("errors").items():
            out[kind] = int(n)
        return out

    # ---- request heads -----------------------------------------------------------

    def on_request(
        self, head: bytes, client: str, site: Intercept | Reverse | Transparent | None = None
    ) -> Reply | Tunnel | Intercept | Forward:
        """A request head from ``client``; ``site``: the interception it came in, or the
        --reverse or --transparent listener it came to, if any."""
        if site is not None:
            if type(site) is Intercept:  # the common case first
                # its CONNECT was let in: the session's requests need no credentials
                return self._in_session(head, client, site)
            if isinstance(site, Reverse):
                return self._reversed(head, client, site)
            if isinstance(site, Transparent):
                return self._transparent_http(head, client)
            return self._in_session(head, client, site)
        access = self.access
        # a head kept here was let in before, credentials and all (same bytes,
        # same answer); only heads that passed the check are kept
        known = self._connects.get(head) if head.startswith(b"CONNECT ") else None
        if known is not None:
            host, port, target, intercept = known
            ex = Exchange(client, "CONNECT", target)
            return self._intercept(host, port, ex) if intercept else Tunnel(host, port, ex)
        try:
            req = parse_request_head(head)
        except RemoteProtocolError as exc:
            return self._refuse(Exchange(client, "-", "-"), exc)
        # HTTP/1.0 clients get one request per connection: their upstream
        # request is HTTP/1.0 too, so no chunked answer can reach them.
        ex = Exchange(client, req.method, req.target, req.keep_alive and req.version != "1.0")
        if access.credentials is not None:
            own = req.method != "CONNECT" and req.target.startswith("/")
            if not self._authorized(req, access.credentials.check, own):
                return self._refuse_credentials(ex, own)
        try:
            if req.method == "CONNECT":
                host, port = parse_authority(req.target)
                denied = self._denied(ex, host, port, True)
                if denied is not None:
                    return denied
                intercept = self.intercepts(host)
                if len(self._connects) >= CONNECT_HEADS_KEPT:
                    self._connects.clear()
                self._connects[head] = (host, port, req.target, intercept)
                return self._intercept(host, port, ex) if intercept else Tunnel(host, port, ex)
            if req.target.startswith("/"):
                return self._own_page(req, req.target, ex)
            return self._plain_http(req, req.target, ex)
        except RemoteProtocolError as exc:
            return self._refuse(ex, exc)

    def _plain_http(self, req: RequestHead, target: str, ex: Exchange) -> Reply | Forward:
        """A request for an absolute ``http://`` target: paced by its rule as an https
        one would be, or one of elbasy's own pages when it names elbasy itself."""
        host, port, authority, path = self.outbound.absolute(target)
        if self.destinations is not None and self.destinations.is_own(host, port):
            # elbasy's own address through the proxy (a client with HTTP_PROXY
            # set): its pages, as if asked directly, never a loop
            return self._own_page(req, path.decode("ascii"), ex)
        denied = self._denied(ex, host, port, False)
        if denied is not None:
            return denied
        return self._paced(req, path, authority, host, port, False, ex)

    def _transparent_http(self, head: bytes, client: str) -> Reply | Forward:
        """A plain HTTP request to a --transparent listener: its Host says where it
        was meant to go, and it is carried as the same request through the proxy
        would be (``http://`` + Host + its path)."""
        try:
            req = parse_request_head(head)
        except RemoteProtocolError as exc:
            return self._refuse(Exchange(client, "-", "-"), exc)
        ex = Exchange(client, req.method, req.target, req.keep_alive and req.version != "1.0")
        try:
            if req.method == "CONNECT":
                raise RemoteProtocolError(
                    "CONNECT to a transparent listener (use the proxy's port)"
                )
            host = req.lines.host
            if not host:
                raise RemoteProtocolError("a request to a transparent listener needs a Host")
            if not req.target.startswith("/"):
                # absolute-form: a client that takes this port for a proxy
                return self._plain_http(req, req.target, ex)
            target = "http://" + host.decode("ascii", "replace") + req.target
            ex.target = target
            return self._plain_http(req, target, ex)
        except RemoteProtocolError as exc:
            return self._refuse(ex, exc)

    # ---- a --transparent listener's TLS clients ------------------------------------

    def on_hello(
        self, name: str | None, client: str, site: Transparent, original: str | None
    ) -> Reply | Tunnel | Intercept:
        """A --transparent listener's TLS client opened with a ClientHello naming
        ``name`` (None: it names no server). ``original``: where the client meant to
        connect ("address:port") when a REDIRECT rule sent it here, else None.

        It gets what a CONNECT to the name would: an interception for a host a rule
        or ``--intercept`` covers, else a tunnel (to ``original``, or to the name on
        port 443), both under the destination rules. A name that resolves to elbasy
        itself is refused by the resolver's address guard, as for a CONNECT. A client
        that names no server, or one the rules refuse, gets a TLS alert and a close.
        """
        if name is None:
            ex = Exchange(client, "CONNECT", f"-:{site.port}")
            self.metrics.error("no_server_name")
            self._finished(ex, 400, 0, len(ALERT_UNRECOGNIZED_NAME))
            log.info(
                "closed a TLS connection from %s: its ClientHello names no server, and "
                "a transparent listener routes by that name",
                client,
            )
            return Reply(ALERT_UNRECOGNIZED_NAME, True)
        to_host = host = name.lower().rstrip(".")
        port = site.port
        if original is not None:
            to_host, port = parse_authority(original)
            to_host = to_host.strip("[]")
        ex = Exchange(client, "CONNECT", f"{host}:{port}")
        try:
            check_host(host)
        except RemoteProtocolError as exc:
            self._refuse(ex, exc)
            return Reply(ALERT_UNRECOGNIZED_NAME, True)
        if self._denied(ex, host, port, True) is not None:
            return Reply(ALERT_ACCESS_DENIED, True)
        if self.intercepts(host):
            return self._intercept(host, port, ex)
        return Tunnel(to_host, port, ex)

    def _own_page(self, req: RequestHead, target: str, ex: Exchange) -> Reply:
        """One of elbasy's own pages (origin-form ``target``)."""
        status, data, close = own_page(
            req.method,
            target,
            req.keep_alive,
            self._stats,
            self.counters,
            self.metrics.scrape,
            self.status,
            self.ca_pem,
            self.proxy_url,
        )
        self._finished(ex, status, 0, len(data), own=True)
        return Reply(data, close)

    @staticmethod
    def _authorized(req: RequestHead, check: Callable[[bytes | None], bool], own: bool) -> bool:
        """Whether a request carries valid credentials: a proxy request exactly one
        valid Proxy-Authorization; a request for one of elbasy's pages a valid
        Authorization (or Proxy-Authorization)."""
        if not own and not req.lines.hop:
            return False  # no hop-by-hop line at all, so no Proxy-Authorization
        names = _PAGE_CREDENTIALS if own else _PROXY_CREDENTIALS
        values = [value for name, value in req.headers() if name.lower() in names]
        if own:
            return any([check(value) for value in values])
        return len(values) == 1 and check(values[0])

    def _refuse_credentials(self, ex: Exchange, own: bool) -> Reply:
        """No valid credentials: 407 with the challenges (401 for elbasy's own pages)."""
        self.metrics.error("auth_refused")
        data = PAGE_AUTH_REQUIRED if own else PROXY_AUTH_REQUIRED
        self._finished(ex, 401 if own else 407, 0, len(data), own=own)
        # the access line names the target, without query values or URL credentials
        log.info("refused a %s from %s: no valid credentials", ex.method, ex.client)
        return Reply(data, True)

    def client_allowed(self, key: bytes) -> bool:
        """--allow-clients, asked by the loop at accept, once per client address
        (``key``: the address's family, 4 or 6, and its packed bytes): whether
        it may be served. A refused address is logged the first time only (of
        the last ``CLIENTS_KEPT`` refused); the loop closes its connections
        unread and counts each (``clients_refused``)."""
        clients = self.access.clients
        if clients is None or clients.allows_key(key):
            return True
        if key not in self._refused_clients:
            if len(self._refused_clients) >= CLIENTS_KEPT:
                self._refused_clients.clear()
            self._refused_clients.add(key)
            log.info(
                "refused connections from %s: its address is outside --allow-clients "
                "(closed at accept, unread; logged once per address)",
                address_of_key(key),
            )
        return False

    def intercepts(self, host: str) -> bool:
        """Whether CONNECTs to ``host`` are intercepted (one glob match per host, cached).

        A glob covers names at its own depth only (:mod:`elbasy.hostglob`): a CONNECT
        to ``n1.deep.myshopify.com`` under ``*.myshopify.com`` is tunnelled, not
        intercepted, since no leaf would be minted for it.
        """
        known = self._intercepted.get(host)
        if known is None:
            name = host.lower()
            known = covered(name, self.intercept)
            if len(self._intercepted) >= 4096:
                self._intercepted.clear()
            self._intercepted[host] = known
        return known

    def _intercept(self, host: str, port: int, ex: Exchange) -> Intercept:
        """The verdict of an intercepted CONNECT (or --transparent TLS client), with the
        origin its requests' access lines start with (made once per host and port)."""
        origin = self._origins.get((host, port))
        if origin is None:
            if len(self._origins) >= ORIGINS_KEPT:
                self._origins.clear()
            origin = "https://" + (host if port == 443 else f"{host}:{port}")
            self._origins[(host, port)] = origin
        return Intercept(host, port, ex, origin)

    def _in_session(self, head: bytes, client: str, site: Intercept) -> Reply | Forward:
        """A request inside an intercepted TLS session: forward it to the site over TLS."""
        host, port, origin = site.host, site.port, site.origin
        try:
            req = parse_request_head(head)
        except RemoteProtocolError as exc:
            return self._refuse(Exchange(client, "-", origin), exc)
        method = req.method
        ex = Exchange(client, method, origin + req.target, req.keep_alive and req.version != "1.0")
        try:
            if method == "CONNECT":
                raise RemoteProtocolError("CONNECT inside an intercepted TLS session")
            if b"upgrade" in req.options:
                raise RemoteProtocolError(
                    f"elbasy does not relay protocol upgrades on intercepted hosts ({host})",
                    501,
                )
            path = req.target_bytes
            if not (path.startswith(b"/") or path == b"*"):
                path = self.outbound.origin_form(path)
            authority = req.host
            if authority is None:
                authority = origin[8:].encode("ascii")
            return self._paced(req, path, authority, host, port, True, ex)
        except RemoteProtocolError as exc:
            return self._refuse(ex, exc)

    def _reversed(self, head: bytes, client: str, site: Reverse) -> Reply | Forward:
        """A request to a --reverse listener: forwarded to its one target, paced by the
        target's rule, with the X-Forwarded-* the target may read."""
        access = self.access  # --allow-clients was decided at accept, as on the proxy port
        try:
            req = parse_request_head(head)
        except RemoteProtocolError as exc:
            return self._refuse(Exchange(client, "-", site.origin), exc)
        path = req.target_bytes
        ex = Exchange(client, req.method, "-", req.keep_alive and req.version != "1.0")
        try:
            if not (path.startswith(b"/") or path == b"*"):
                path = self.outbound.origin_form(path)  # a client may send absolute-form
            ex.target = site.origin + path.decode("ascii")
            if access.credentials is not None and not self._authorized(
                req, access.credentials.check, False
            ):
                return self._refuse_credentials(ex, False)
            if req.method == "CONNECT":
                raise RemoteProtocolError("CONNECT to a reverse listener (use the proxy's port)")
            if b"upgrade" in req.options:
                raise RemoteProtocolError(
                    f"elbasy does not relay protocol upgrades to {site.origin}", 501
                )
            address = client.rpartition(":")[0].strip("[]").encode("ascii")
            told = req.lines.host
            extra = (
                b"\r\nX-Forwarded-For: "
                + address
                + b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: "
                + (told if told else site.listen)
            )
            return self._paced(
                req, path, site.authority, site.host, site.port, site.tls, ex, _REVERSE_DROP, extra
            )
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
        own: tuple[bytes, ...] = OWN_HEADERS,
        extra: bytes = b"",
    ) -> Reply | Forward:
        """A request on its way to host:port: paced on its quota account if a rule covers it.
        ``own``: the headers that never leave (elbasy's; a reverse listener's also drops
        the X-Forwarded-* the client sent); ``extra``: header lines it adds."""
        out = self.outbound
        if not self.pacer.rules.covers(host):
            ex.sent_at = self.pacer.mono()  # unpaced: it leaves now
            return out.forward(req, path, authority, host, port, ex, tls, own, extra=extra)
        headers = req.headers()
        match = self.pacer.match(host, req.method, path.decode("ascii"), headers)
        if match is None:
            ex.sent_at = self.pacer.mono()
            return out.forward(req, path, authority, host, port, ex, tls, own, extra=extra)
        drop = own + match.strip_headers
        fwd = out.forward(req, path, authority, host, port, ex, tls, drop, match.body_needed, extra)
        try:
            paced = self.pacer.start(match, req.method, headers)
        except BadMaxWait as exc:
            raise RemoteProtocolError(str(exc)) from None
        ex.paced = paced
        if fwd.peek:
            return fwd
        v = self.pacer.admit(paced, ex)
        if v.shed_after:
            return self._shed(ex, v)
        if v.depart != NOW:
            self._queue(ex, paced, 1)
        return fwd._replace(depart=v.depart)

    def _queue(self, ex: Exchange, paced: Paced, change: int) -> None:
        """A request joins (+1) or leaves (-1) the count of those held for quota."""
        ex.queued = change > 0
        self.metrics.queued(paced.match.rule.id, paced.match.account, change, self.pacer.wall())

    def _count(self, ex: Exchange, status: int) -> None:
        """One request's ending, as /metrics counts it (beside its access line)."""
        p = ex.paced
        if p is None:
            self.metrics.finished("none", status, None, 0.0)
            return
        if ex.queued:
            self._queue(ex, p, -1)
        wall = self.pacer.wall()
        rule = p.match.rule.id
        waited = p.waited() if p.sent_at else None
        self.metrics.finished(rule, status, p.match.account, wall, waited)

    def _shed(self, ex: Exchange, v: Verdict, *, close: bool = False) -> Reply:
        """elbasy's own 429: the request would wait longer than allowed; nothing was sent.
        Or its 503 when the quota table has no room for the account. ``close``:
        the connection ends after it (a held request's: its body is unread)."""
        close = close or not ex.keep_alive
        if v.full:
            data = unavailable_response("the quota table is full", v.shed_after, close)
            status = 503
        else:
            data = shed_response(v.limit, v.shed_after, close)
            status = 429
            if ex.paced is not None:
                self.metrics.shed(ex.paced.match.rule.id)
        self._finished(ex, status, 0, len(data), shed=True)
        return Reply(data, close)

    def _denied(self, ex: Exchange, host: str, port: int, tunnel: bool) -> Reply | None:
        """elbasy's 403 when the destination rules refuse ``host:port``; else None."""
        if self.destinations is None:
            return None
        why = self.destinations.refusal(host, port, tunnel)
        if why is None:
            return None
        return Reply(self._deny(ex, why), True)

    def _deny(self, ex: Exchange, why: str) -> bytes:
        """The one 403 every refused destination gets; ``why`` goes to the log only."""
        self.metrics.error("destination_denied")
        data = error_response(403, DENIED)
        self._finished(ex, 403, 0, len(data))
        log.info("denied %s %s from %s: %s", ex.method, ex.target, ex.client, why)
        return data

    def _refuse(self, ex: Exchange, exc: RemoteProtocolError) -> Reply:
        status = exc.status_hint
        self.metrics.error(_REFUSAL_COUNTER.get(status, f"refused_{status}"))
        data = error_response(status, str(exc))
        self._finished(ex, status, 0, len(data))
        log.info("refused %s from %s: %s", ex.target, ex.client, exc)
        return Reply(data, True)

    # ---- response heads ---------------------------------------------------------

    def on_response(self, ex: Exchange, head: bytes) -> ResponsePlan:
        resp = parse_response_head(head)
        status = resp.status
        if 100 <= status < 200 and status != 101:
            return ResponsePlan(head, status, BODY_NONE, 0, True, True, True)
        head, body, length, keep_client, reuse = resp.relayed(ex.method, ex.keep_alive)
        plan: ResponsePlan = built(
            ResponsePlan, (head, status, body, length, False, keep_client, reuse, 0, NOW)
        )
        paced = ex.paced
        if paced is None:
            ex.head_at = self.pacer.mono()  # a paced one's is the pacer's (Paced.head_at)
            return plan
        headers = resp.headers()
        paced.response = (status, headers)
        again = self.pacer.answered(paced, status, headers, None, ex)
        if again != NOW:
            return plan._replace(retry_at=again)
        wait = b"X-Elbasy-Wait: %.3f\r\n\r\n" % paced.waited()
        return plan._replace(head=plan.head[:-2] + wait, capture=self.pacer.wants_body(paced))

    def on_body(self, ex: Exchange, body: bytes) -> float | Reply:
        """The request body a paced request's price depends on (GraphQL): admit it now."""
        assert ex.paced is not None
        v = self.pacer.priced(ex.paced, body, ex)
        if v.shed_after:
            return self._shed(ex, v)
        if v.depart != NOW:
            self._queue(ex, ex.paced, 1)
        return v.depart

    def quota_moved(self) -> None:
        """The quota store's fd became readable: another worker gave room back."""
        self.pacer.quota_moved()

    def departing(self, ex: Exchange) -> float | Reply:
        """A held request's departure time came: NOW to send it, a later time,
        or elbasy's 429 when its reservation's answer came late and shed it."""
        if ex.paced is None:
            return NOW
        got = self.pacer.departing(ex.paced)
        if isinstance(got, Verdict):
            return self._shed(ex, got, close=True)
        if got == NOW and ex.queued:
            self._queue(ex, ex.paced, -1)
        return got

    def on_response_body(self, ex: Exchange, body: bytes) -> None:
        """The body of a paced response whose rule reads bodies (GraphQL cost)."""
        paced = ex.paced
        if paced is None or paced.response is None:
            return
        status, headers = paced.response
        self.pacer.answered(paced, status, headers, body)

    # ---- endings ------------------------------------------------------------------

    def ended(self, ex: Exchange | None, end: Ended) -> bytes | None:
        """Every ending, by its kind: logged and counted; the answer owed, if any."""
        if end.kind == FINISHED:  # the common case first: one comparison
            assert ex is not None
            if ex.paced is None:
                # counted and logged as _finished would, a frame or two sooner
                self.metrics.finished("none", end.status, None, 0.0)
                if access_on():
                    self._logged(ex, end.status, end.up, end.down, end.took_ns / 1e6, False)
                return None
            self.pacer.abandoned(ex.paced)  # a request with no answer lands now
            self._finished(ex, end.status, end.up, end.down, end.took_ns / 1e6)
            return None
        return self._endings[end.kind](ex, end)

    def _failed(self, ex: Exchange, status: int, reason: str) -> bytes:
        """The upstream could not be reached or did not answer (or answered nonsense);
        403: the resolver's guard left no address to dial. The client is told
        one wording for all of them; ``reason`` goes to the log."""
        if ex.paced is not None:
            self.pacer.abandoned(ex.paced)  # sent: it lands; never sent: its place goes back
        if status == 403:
            return self._deny(ex, reason)
        self.metrics.error("upstream_errors")
        self.metrics.error(f"upstream_{status}")
        # a 503 is elbasy's own state (out of sockets): the client may know it
        data = error_response(status, reason if status == 503 else UPSTREAM_FAILED)
        self._finished(ex, status, 0, len(data))
        log.warning(
            "%s %s from %s: %s%s", ex.method, ex.target, ex.client, reason, upstream_hint(reason)
        )
        return data

    def _on_failed(self, ex: Exchange | None, end: Ended) -> bytes:
        assert ex is not None
        return self._failed(ex, end.status, end.reason)

    def _on_bad_response(self, ex: Exchange | None, end: Ended) -> bytes:
        assert ex is not None
        return self._failed(ex, 502, f"bad response from the upstream: {end.error}")

    def _on_abandoned(self, ex: Exchange | None, end: Ended) -> None:
        """The client of a held request left before its departure."""
        assert ex is not None
        self.metrics.error("abandoned_while_held")
        if ex.paced is not None:
            self.pacer.abandoned(ex.paced)
        self._finished(ex, CLIENT_CLOSED)

    def _on_drained(self, ex: Exchange | None, end: Ended) -> bytes:
        """The worker's drain deadline came before this request's answer: elbasy's 503.

        ``end.sent``: it was already forwarded (its quota was spent); otherwise a
        paced request's place in line goes back. ``ex`` is None for a
        request whose head had not all arrived.
        """
        data = draining_response(end.sent)
        if ex is not None:
            if ex.paced is not None:
                self.pacer.abandoned(ex.paced)  # sent: it lands; else its place goes back
            self._finished(ex, 503, 0, len(data))
        return data

    def _finished(
        self,
        ex: Exchange,
        status: int,
        up: int = 0,
        down: int = 0,
        took_ms: float = 0.0,
        *,
        shed: bool = False,
        own: bool = False,
    ) -> None:
        """Every request and tunnel that ends is told here, once: its access line
        (and whatever else counts finished exchanges belongs here, before the
        level check). ``shed``: elbasy answered it itself for its quota (429,
        or 503 when the quota table is full). ``own``: a request for one of
        elbasy's own pages (logged, not counted in /metrics' requests)."""
        if not own:
            self._count(ex, status)
        if access_on():  # off: one level check
            self._logged(ex, status, up, down, took_ms, shed)

    def _logged(
        self, ex: Exchange, status: int, up: int, down: int, took_ms: float, shed: bool
    ) -> None:
        """An exchange's access line."""
        wait_ms, upstream_ms, paced, retried = self._access_fields(ex, took_ms)
        log_access(
            ex.client,
            ex.method,
            ex.target,
            status,
            up,
            down,
            took_ms,
            wait_ms,
            upstream_ms,
            paced,
            shed,
            retried,
        )

    def _access_fields(
        self, ex: Exchange, took_ms: float
    ) -> tuple[float, float, tuple[str, str, float, float | None] | None, bool]:
        """What the access line says of an exchange's pacing: ms waited for quota,
        upstream ms, (rule, account, cost, actual cost) or None, and whether it was
        sent again."""
        p = ex.paced
        if p is None:
            return 0.0, self._upstream_ms(ex, took_ms), None, False
        wait_ms, upstream_ms = self._pace_times(p)
        return wait_ms, upstream_ms, self._paced_log(p), p.retried

    @staticmethod
    def _upstream_ms(ex: Exchange, took_ms: float) -> float:
        """An unpaced exchange's upstream time: from its departure to its answer's
        head; a tunnel's whole life; 0 when nothing was answered."""
        if ex.head_at and ex.sent_at:
            return max(0.0, (ex.head_at - ex.sent_at) * 1000)
        return took_ms if ex.method == "CONNECT" else 0.0

    def _pace_times(self, p: Paced) -> tuple[float, float]:
        """A paced request's wait for its quota and its upstream time (from its
        last departure to its answer's head), in ms."""
        # held and gone before it left: how long it had waited by then
        waited = p.waited() if p.sent_at else max(0.0, self.pacer.mono() - p.arrived)
        upstream = p.head_at - p.sent_at if p.head_at and p.sent_at else 0.0
        return waited * 1000, max(0.0, upstream * 1000)

    @staticmethod
    def _paced_log(p: Paced) -> tuple[str, str, float, float | None]:
        """What the access log says of a paced request: its rule, account and costs."""
        r = p.reservation
        cost = r.cost if r is not None else p.match.cost
        return (p.match.rule.id, p.match.account, cost, p.actual)

    def _on_tls_failed(self, ex: Exchange | None, end: Ended) -> None:
        """The TLS handshake with an intercepted client failed (untrusted CA, garbage...)."""
        assert ex is not None
        self.metrics.error("tls_client_failures")
        if access_on():
            took_ms = end.took_ns / 1e6
            log_access(
                ex.client, ex.method, ex.target, TLS_HANDSHAKE_FAILED, end.up, end.down, took_ms
            )
        address = client_address(ex.client)
        if distrusts_ca(end.reason, end.error) and self._warned.first(address):
            why = getattr(end.error, "reason", None) or end.reason
            log.warning(untrusted_ca_warning(address, ex.target, why, self.ca_file))
            return
        log.info("TLS with %s for %s failed: %s", ex.client, ex.target, end.reason)

    def _on_head_too_large(self, ex: Exchange | None, end: Ended) -> bytes:
        return self._refuse(
            Exchange(end.client, "-", "-"),
            RemoteProtocolError("request head is larger than the configured limit", 431),
        ).data

    def _on_bad_body(self, ex: Exchange | None, end: Ended) -> bytes:
        assert ex is not None
        if ex.paced is not None:
            self.pacer.abandoned(ex.paced)  # part of it went: it lands
        return self._refuse(ex, RemoteProtocolError("malformed chunked request body")).data

    def _on_internal_error(self, ex: Exchange | None, end: Ended) -> bytes:
        log.error("internal error on %s", ex.target if ex else "-", exc_info=end.error)
        if ex is not None:
            self._count(ex, 500)
        if ex is not None and ex.paced is not None:
            # the request will not leave: its place in line goes back
            self.pacer.abandoned(ex.paced)
        return error_response(500, "elbasy hit an internal error; see its log")
