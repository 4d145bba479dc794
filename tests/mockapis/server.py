"""A small threaded HTTP/1.1 server for elbasy's mock third-party APIs (stdlib only).

One thread per connection, keep-alive, Content-Length and chunked request bodies,
``Connection: close``, optional TLS.  The per-request work is kept small: one ``recv`` loop into
a bytes buffer, a split of the head, one ``sendall`` per response.

The server knows nothing about rate limits.  It hands each parsed ``Request`` to an *app*
(``ShopifyAPI``, ``EtsyAPI``), and it answers the control routes itself:

* ``POST /__mock/config``         JSON object (or a list of them) -> ``app.configure(**obj)``
* ``POST /__mock/clock/advance``  ``{"seconds": x}``; only when the clock is a ``ManualClock``
* ``GET  /__mock/state``          ``app.stats()`` as JSON
* ``POST /__mock/reset``          ``app.reset()``: state and counters cleared, config kept
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

Clock = Callable[[], float]
Reply = tuple[int, list[tuple[str, str]], bytes]

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024

REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
}


class ManualClock:
    """A clock for deterministic tests: time moves only when the test says so."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a ManualClock only moves forward")
        with self._lock:
            self._now += float(seconds)
            return self._now

    def set(self, now: float) -> float:
        with self._lock:
            if now < self._now:
                raise ValueError("a ManualClock only moves forward")
            self._now = float(now)
            return self._now


class Request:
    """One parsed request.  Header names are lower-case; repeated headers are joined by ", "."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "sni")

    def __init__(
        self,
        method: str,
        target: str,
        version: str,
        headers: dict[str, str],
        body: bytes,
        sni: str | None,
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        if path.startswith(("http://", "https://")):  # absolute form
            rest = path.split("://", 1)[1]
            slash = rest.find("/")
            path = rest[slash:] if slash >= 0 else "/"
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = body
        self.sni = sni

    def json(self) -> Any:
        return json.loads(self.body or b"null")


class App(Protocol):
    def handle(self, req: Request) -> Reply | None: ...
    def configure(self, **settings: Any) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def reset(self) -> None: ...


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_reply(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> Reply:
    h = [("Content-Type", "application/json")]
    if headers:
        h.extend(headers)
    return status, h, dumps(obj)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# SNI: recorded by a context callback into a thread-local, read back by the connection thread
# that ran the handshake (the callback runs inside ``wrap_socket`` on that same thread).
_SNI = threading.local()


def _record_sni(sslobj: Any, name: str | None, ctx: ssl.SSLContext) -> None:
    _SNI.name = name


def install_sni_recorder(ctx: ssl.SSLContext) -> bool:
    """Let servers using ``ctx`` see the client's SNI; False if ctx has another callback."""
    if ctx.sni_callback is None:
        ctx.sni_callback = _record_sni
    return ctx.sni_callback is _record_sni


class MockServer:
    """Threaded HTTP/1.1 server on 127.0.0.1:0 that serves one app plus the control routes."""

    def __init__(
        self,
        app: App,
        clock: Clock,
        tls_ctx: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        idle_timeout: float = 120.0,
    ) -> None:
        self.app = app
        self.clock = clock
        self.tls_ctx = tls_ctx
        if tls_ctx is not None:
            install_sni_recorder(tls_ctx)
        self.idle_timeout = idle_timeout
        self.errors: list[str] = []  # tracebacks of app exceptions (answered 500)
        self.connections = 0
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._stopped = False
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, 0))
        self.lsock.listen(1024)
        self.host = host
        self.port: int = self.lsock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="mock-accept")
        self._thread.start()

    # -- Python API ------------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.tls_ctx is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def configure(self, **settings: Any) -> None:
        self.app.configure(**settings)

    def stats(self) -> dict[str, Any]:
        return self.app.stats()

    def reset(self) -> None:
        self.app.reset()

    def advance(self, seconds: float) -> float:
        if not isinstance(self.clock, ManualClock):
            raise TypeError("the clock is not a ManualClock")
        return self.clock.advance(seconds)

    def close(self) -> None:
        from origins import stop_serving

        self._stopped = True
        with self._lock:
            live = list(self._live)
        stop_serving(self.lsock, live)
        self._thread.join(2)

    def __enter__(self) -> MockServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            if self._stopped:
                conn.close()
                return
            with self._lock:
                self.connections += 1
                self._live.add(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        sock: socket.socket = conn
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.idle_timeout)
            sni = None
            if self.tls_ctx is not None:
                _SNI.name = None
                sock = self.tls_ctx.wrap_socket(conn, server_side=True)
                sni = _SNI.name
            self._serve(sock, sni)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            with self._lock:
                self._live.discard(conn)
            try:
                sock.close()
            except OSError:
                pass

    def _serve(self, sock: socket.socket, sni: str | None) -> None:
        recv = sock.recv
        buf = b""
        while True:
            # -- head
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > MAX_HEAD:
                    self._send_error(sock, 431, "request head too large")
                    return
                data = recv(65536)
                if not data:
                    return
                buf += data
                buf = buf.lstrip(b"\r\n")  # tolerate empty lines before a request line
                end = buf.find(b"\r\n\r\n")
            head = buf[:end].decode("latin-1")
            buf = buf[end + 4 :]
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                self._send_error(sock, 400, "bad request line")
                return
            method, target, version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, colon, value = line.partition(":")
                if not colon or not name or name != name.strip():
                    self._send_error(sock, 400, "bad header line")
                    return
                name = name.lower()
                value = value.strip()
                if name in headers:
                    headers[name] = headers[name] + ", " + value
                else:
                    headers[name] = value
            # -- body
            try:
                body, buf = self._read_body(sock, headers, buf)
            except _BadRequest as e:
                self._send_error(sock, e.status, str(e))
                return
            conn_tokens = headers.get("connection", "").lower()
            close = "close" in conn_tokens or (
                version == "HTTP/1.0" and "keep-alive" not in conn_tokens
            )
            req = Request(method, target, version, headers, body, sni)
            status, rheaders, rbody = self._dispatch(req)
            self._write(sock, status, rheaders, rbody, close, method == "HEAD")
            if close:
                return

    def _read_body(
        self, sock: socket.socket, headers: dict[str, str], buf: bytes
    ) -> tuple[bytes, bytes]:
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        if te is not None:
            if cl is not None:
                raise _BadRequest(400, "both Content-Length and Transfer-Encoding")
            if te.lower() != "chunked":
                raise _BadRequest(501, f"unsupported transfer-encoding {te!r}")
            self._continue(sock, headers, buf)
            return self._read_chunked(sock, buf)
        if cl is None:
            return b"", buf
        if not cl.isdigit():
            raise _BadRequest(400, "bad content-length")
        n = int(cl)
        if n > MAX_BODY:
            raise _BadRequest(413, "body too large")
        if n == 0:
            return b"", buf
        self._continue(sock, headers, buf)
        while len(buf) < n:
            data = sock.recv(max(65536, n - len(buf)))
            if not data:
                raise OSError("eof in body")
            buf += data
        return buf[:n], buf[n:]

    @staticmethod
    def _continue(sock: socket.socket, headers: dict[str, str], buf: bytes) -> None:
        if not buf and headers.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    @staticmethod
    def _read_chunked(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
        out = bytearray()

        def line() -> bytes:
            nonlocal buf
            i = buf.find(b"\r\n")
            while i < 0:
                if len(buf) > MAX_HEAD:
                    raise _BadRequest(400, "chunk line too long")
                data = sock.recv(65536)
                if not data:
                    raise OSError("eof in chunked body")
                buf += data
                i = buf.find(b"\r\n")
            got = buf[:i]
            buf = buf[i + 2 :]
            return got

        while True:
            size_s = line().split(b";", 1)[0].strip()
            try:
                size = int(size_s, 16)
            except ValueError:
                raise _BadRequest(400, "bad chunk size") from None
            if size == 0:
                while line():  # trailers up to the empty line
                    pass
                return bytes(out), buf
            if len(out) + size > MAX_BODY:
                raise _BadRequest(413, "body too large")
            while len(buf) < size + 2:
                data = sock.recv(65536)
                if not data:
                    raise OSError("eof in chunk")
                buf += data
            if buf[size : size + 2] != b"\r\n":
                raise _BadRequest(400, "chunk not followed by CRLF")
            out += buf[:size]
            buf = buf[size + 2 :]

    @staticmethod
    def _write(
        sock: socket.socket,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        close: bool,
        head_only: bool,
    ) -> None:
        parts = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"]
        parts.extend(f"{n}: {v}\r\n" for n, v in headers)
        parts.append(f"Content-Length: {len(body)}\r\n")
        if close:
            parts.append("Connection: close\r\n")
        parts.append("\r\n")
        data = "".join(parts).encode("latin-1")
        sock.sendall(data if head_only else data + body)

    def _send_error(self, sock: socket.socket, status: int, message: str) -> None:
        try:
            s, h, b = json_reply(status, {"errors": message})
            self._write(sock, s, h, b, True, False)
        except OSError:
            pass

    # -- routing ---------------------------------------------------------------------------------

    def _dispatch(self, req: Request) -> Reply:
        try:
            if req.path.startswith("/__mock/"):
                return self._control(req)
            reply = self.app.handle(req)
            if reply is None:
                return json_reply(404, {"errors": "Not Found"})
            return reply
        except Exception:  # a bug in a mock must show up in the test, not hang the client
            tb = traceback.format_exc()
            self.errors.append(tb)
            print(tb, file=sys.stderr)
            return json_reply(500, {"errors": "mock failure", "traceback": tb})

    def _control(self, req: Request) -> Reply:
        path = req.path
        if path == "/__mock/state":
            if req.method != "GET":
                return json_reply(405, {"errors": "GET only"})
            return json_reply(200, self.app.stats())
        if req.method != "POST":
            return json_reply(405, {"errors": "POST only"})
        try:
            obj = req.json()
        except ValueError:
            return json_reply(400, {"errors": "body is not JSON"})
        if path == "/__mock/config":
            items = obj if isinstance(obj, list) else [obj]
            try:
                for item in items:
                    if not isinstance(item, dict):
                        raise ValueError("config must be a JSON object or a list of them")
                    self.app.configure(**item)
            except (TypeError, ValueError) as e:
                return json_reply(400, {"errors": str(e)})
            return json_reply(200, {"ok": True})
        if path == "/__mock/clock/advance":
            if not isinstance(self.clock, ManualClock):
                return json_reply(409, {"errors": "the mock runs on a real clock"})
            try:
                seconds = float((obj or {}).get("seconds", 0))
                now = self.clock.advance(seconds)
            except (TypeError, ValueError, AttributeError) as e:
                return json_reply(400, {"errors": str(e)})
            return json_reply(200, {"now": now})
        if path == "/__mock/reset":
            self.app.reset()
            return json_reply(200, {"ok": True})
        return json_reply(404, {"errors": "no such control route"})


def wall_clock() -> float:
    return time.time()
