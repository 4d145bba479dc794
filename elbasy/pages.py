"""What elbasy answers itself: its error replies and its own pages.

Every byte elbasy writes to a client on its own account is formatted here:
the one-line error replies (a bad head, an upstream that cannot be reached,
a request shed for its quota), ``GET /healthz``, and the status page
(``GET /``, its files under ``/static/``, its data ``/status.json``, and
``/ca.pem``). The policy decides which one; this module only spells it.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Any

from elbasy import __version__
from elbasy.access import REALM
from elbasy.protocol.headers import serialize


@functools.cache
def status_line(status: int) -> bytes:
    """``HTTP/1.1 <status> <phrase>``: the standard reason phrase (RFC 9110, via
    http.HTTPStatus) of every answer elbasy writes itself."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return b"HTTP/1.1 %d %s" % (status, phrase.encode("ascii"))


def response(
    status: int,
    body: bytes,
    content_type: bytes,
    close: bool,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A whole response from elbasy itself: head (with ``Server``) and body."""
    head = [
        (b"Content-Type", content_type),
        (b"Content-Length", str(len(body)).encode()),
        (b"Server", b"elbasy/" + __version__.encode()),
        *extra,
    ]
    if close:
        head.append((b"Connection", b"close"))
    return serialize(status_line(status), head) + body


def error_response(status: int, reason: str) -> bytes:
    """elbasy's own error: a one-line plain-text reason, then close."""
    return response(status, reason.encode("utf-8", "replace") + b"\n", b"text/plain", True)


def shed_response(limit: str, retry_after: float, close: bool) -> bytes:
    """elbasy's own 429: the request would wait longer than allowed; nothing was sent."""
    retry = max(1, math.ceil(retry_after))
    body = (
        f"elbasy: the {limit} quota of this account has no room within the max wait; "
        f"retry after {retry} s\n"
    ).encode()
    return response(
        429,
        body,
        b"text/plain",
        close,
        ((b"Retry-After", str(retry).encode()), (b"X-Elbasy-Shed", b"1")),
    )


def unavailable_response(reason: str, retry_after: float, close: bool) -> bytes:
    """elbasy's own 503: it cannot take the request now (the reason says why)."""
    retry = max(1, math.ceil(retry_after))
    body = f"elbasy: {reason}; retry after {retry} s\n".encode()
    return response(503, body, b"text/plain", close, ((b"Retry-After", str(retry).encode()),))


def _challenges(header: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """Basic first (every client answers it), then Bearer (RFC 9110 11.6.1)."""
    realm = REALM.encode()
    return ((header, b'Basic realm="%s"' % realm), (header, b'Bearer realm="%s"' % realm))


#: elbasy's 407: a request or CONNECT without valid proxy credentials (elbasy.access)
PROXY_AUTH_REQUIRED = response(
    407,
    b"elbasy: proxy authentication required\n",
    b"text/plain",
    True,
    _challenges(b"Proxy-Authenticate"),
)
#: elbasy's 401: one of its own pages without valid credentials, which a browser,
#: curl -u and a Prometheus scrape (basic_auth, authorization) answer
PAGE_AUTH_REQUIRED = response(
    401,
    b"elbasy: authentication required\n",
    b"text/plain",
    True,
    _challenges(b"WWW-Authenticate"),
)


#: what a request cut off by a drain is told to wait before trying again: by
#: then a reload's new workers (or a restarted elbasy) are listening
DRAIN_RETRY_AFTER = 1


def draining_response(sent: bool) -> bytes:
    """elbasy's own 503: this worker is shutting down and its drain's deadline came.

    ``sent``: the request had already gone to the upstream, whose answer did
    not come in time (the client should check before repeating it).
    """
    if sent:
        reason = "shutting down; the upstream did not answer before the drain deadline"
    else:
        reason = "shutting down; this request was not sent"
    return unavailable_response(reason, DRAIN_RETRY_AFTER, True)


@dataclass(frozen=True)
class LoopPages:
    """The answers the loop sends when the policy's ``ended``, asked for the
    answer an ending owes, raised or gave no bytes (elbasy.seam): handed to
    the Loop once when it is built, so no answer is written in the loop's
    Cython. By the ``Ended`` kind it asked for:"""

    head_too_large: bytes  # 431: HEAD_TOO_LARGE
    bad_body: bytes  # 400: BAD_BODY
    internal_error: bytes  # 500: INTERNAL_ERROR
    bad_gateway: bytes  # 502: FAILED or BAD_RESPONSE
    drained: bytes  # 503 + Retry-After: DRAINED
    busy: bytes  # 503 + Retry-After: a connection over --max-connections / --max-client-connections


LOOP_PAGES = LoopPages(
    head_too_large=error_response(431, "elbasy: request head too large"),
    bad_body=error_response(400, "elbasy: malformed request body"),
    internal_error=error_response(500, "elbasy hit an internal error; see its log"),
    bad_gateway=error_response(502, "elbasy: bad gateway"),
    drained=unavailable_response("shutting down", DRAIN_RETRY_AFTER, True),
    busy=unavailable_response("too many connections", 1, True),
)


def own_page(
    method: str,
    target: str,
    keep_alive: bool,
    stats: Callable[[], dict[str, Any]],
    counters: Mapping[str, int],
    metrics: Callable[[], tuple[bytes, bytes]],
    status: Callable[[], dict[str, Any]] | None = None,
    ca_pem: bytes | None = None,
    proxy_url: str | None = None,
) -> tuple[int, bytes, bool]:
    """A request to elbasy itself (origin-form): (status, the whole answer, close after).

    ``metrics``: ``/metrics``, the instance's Prometheus text and its type;
    ``status``: the data of ``/status.json`` (None: not wired in, a 404);
    ``ca_pem``: the certificate of the CA that signs the intercepted hosts'
    leaves, for ``/ca.pem`` (None: elbasy intercepts nothing); ``proxy_url``: the
    address clients use, written into the page's commands (None: placeholders).
    """
    path, _, query = target.partition("?")
    close = not keep_alive
    if method not in ("GET", "HEAD"):
        status_code, data = 405, error_response(405, "elbasy's own pages answer GET only")
        close = True
    elif path == "/healthz":
        status_code = 200
        data = response(200, healthz(stats, counters), b"application/json", close)
    elif path == "/metrics":
        text, content_type = metrics()
        status_code, data = 200, response(200, text, content_type, close)
    elif path == "/status.json" and status is not None:
        body = json.dumps(status(), sort_keys=True).encode() + b"\n"
        status_code = 200
        data = response(200, body, b"application/json", close, NO_STORE)
    elif path == "/ca.pem":
        if ca_pem is None:
            status_code, data = 404, response(404, NO_CA, b"text/plain", close)
        else:
            status_code = 200
            data = response(200, ca_pem, b"application/x-pem-file", close, CA_HEADERS)
    elif path == "/" or path in STATIC_PATHS:
        status_code, data = 200, static_page(path, query, close, proxy_url)
    else:
        status_code, data = 404, response(404, b"not found\n", b"text/plain", close)
    if method == "HEAD":
        data = data[: data.index(b"\r\n\r\n") + 4]
    return status_code, data, close


def healthz(stats: Callable[[], dict[str, Any]], counters: Mapping[str, int]) -> bytes:
    """``/healthz``: the loop's counters and the policy's, as one JSON object."""
    out = stats()
    out["version"] = __version__
    out["pid"] = os.getpid()
    # this machine's wall clock: a fleet sharing quota in Redis keeps its own
    # clocks out of the arithmetic (Redis's TIME), and this shows how far off
    out["time"] = time.time()
    merged = out.setdefault("counters", {})
    for name, value in counters.items():
        merged[name] = value
    return json.dumps(out, sort_keys=True).encode() + b"\n"


# ---- the status page: files in elbasy/static, read once per process


#: what the page may load: its own files and its own JSON, nothing from elsewhere
PAGE_HEADERS = (
    (
        b"Content-Security-Policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
)
NO_STORE = ((b"Cache-Control", b"no-store"), (b"X-Content-Type-Options", b"nosniff"))
CA_HEADERS = (
    (b"Cache-Control", b"no-cache"),
    (b"Content-Disposition", b'attachment; filename="elbasy-ca.pem"'),
    (b"X-Content-Type-Options", b"nosniff"),
)
NO_CA = (
    b"elbasy intercepts no host (no rule is enabled and --intercept is empty), "
    b"so it has no CA to trust\n"
)
#: the page's files, by the path they are served at, and their types
STATIC_FILES = {
    "/static/status.js": ("status.js", b"text/javascript; charset=utf-8"),
    "/static/status.css": ("status.css", b"text/css; charset=utf-8"),
}
STATIC_PATHS = frozenset(STATIC_FILES)


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: bytes
    version: str  # a digest of the body: the ``?v=`` its links carry


@functools.cache
def static_files() -> dict[str, StaticFile]:
    """The page's files from the package (``/`` is index.html, which links the
    others with their digests, so a browser may keep them as long as it likes)."""
    root = resources.files("elbasy").joinpath("static")
    out: dict[str, StaticFile] = {}
    for path, (name, ctype) in STATIC_FILES.items():
        body = root.joinpath(name).read_bytes()
        out[path] = StaticFile(body, ctype, hashlib.sha256(body).hexdigest()[:16])
    index = root.joinpath("index.html").read_bytes()
    for path, f in out.items():
        index = index.replace(f'"{path}"'.encode(), f'"{path}?v={f.version}"'.encode())
    out["/"] = StaticFile(index, b"text/html; charset=utf-8", "")
    return out


#: what the page says until it knows the address clients use
PLACEHOLDER = b"http://HOST:PORT"


def static_page(path: str, query: str, close: bool, proxy_url: str | None = None) -> bytes:
    """``/`` or one of the page's files. A file asked for with its current digest
    never changes (cached for a year); the page itself and an unversioned
    link are checked again each time. ``proxy_url`` replaces the page's
    ``http://HOST:PORT`` placeholders, so its commands work as shown, script or not."""
    f = static_files()[path]
    if f.version and query == f"v={f.version}":
        cache = b"public, max-age=31536000, immutable"
    else:
        cache = b"no-cache"
    body = f.body
    if path == "/" and proxy_url:
        body = body.replace(PLACEHOLDER, html.escape(proxy_url).encode("ascii", "replace"))
    extra = ((b"Cache-Control", cache), *PAGE_HEADERS)
    return response(200, body, f.content_type, close, extra)
