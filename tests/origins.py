"""Small, strict origin servers and raw HTTP client helpers for the integration tests.

Everything here runs in threads on 127.0.0.1 with real sockets:

* ``HTTPOrigin``: an HTTP/1.1 keep-alive origin (optionally TLS) that records every request's
  raw head, parsed head, decoded body, the raw bytes of each connection and the number of TCP
  connections accepted.  Routes are chosen by path (see ``HTTPOrigin._respond``).
* ``RawOrigin``: a TCP server that runs a test-supplied handler per connection and records events
  (used for half-close and reset tests through CONNECT tunnels).
* ``make_ca`` / ``make_leaf``: a test CA and a server certificate, generated with ``cryptography``.
* ``read_response`` / ``Response``: a strict client-side HTTP/1.1 response reader for raw sockets.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import random
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# ---------------------------------------------------------------------------------------------
# deterministic content

_PATTERN_LEN = 65_537  # prime length: a dropped / repeated block changes the digest
_PATTERN = random.Random(0xE1BA5).randbytes(_PATTERN_LEN)


def pattern_chunks(n: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    """Yield ``n`` deterministic bytes in chunks of at most ``chunk`` bytes."""
    doubled = _PATTERN * ((chunk // _PATTERN_LEN) + 2)
    off = 0
    while off < n:
        size = min(chunk, n - off)
        start = off % _PATTERN_LEN
        yield doubled[start : start + size]
        off += size


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    for c in pattern_chunks(n):
        h.update(c)
    return h.hexdigest()


def set_linger0(sock: socket.socket) -> None:
    """Make close() send RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reset_close(sock: socket.socket) -> None:
    try:
        set_linger0(sock)
    except OSError:
        pass
    sock.close()


# ---------------------------------------------------------------------------------------------
# certificates


@dataclass
class TestCA:
    cert_pem: bytes
    key: object
    cert: object
    path: Path


def make_ca(directory: Path) -> TestCA:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elbasy test CA")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    path = directory / "test-ca.pem"
    path.write_bytes(pem)
    return TestCA(cert_pem=pem, key=key, cert=cert, path=path)


def make_leaf(
    ca: TestCA,
    directory: Path,
    names: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1",),
) -> tuple[Path, Path]:
    """Issue a server certificate signed by ``ca``; return (cert_path, key_path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)  # type: ignore[attr-defined]
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),  # type: ignore[attr-defined]
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path = directory / "leaf.pem"
    key_path = directory / "leaf.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# ---------------------------------------------------------------------------------------------
# a strict little HTTP/1.1 reader shared by the origin (requests) and the tests (responses)


class HasConnect(Protocol):
    def connect(self, timeout: float = ...) -> socket.socket: ...


class ProtocolError(Exception):
    pass


class Reader:
    """Buffered reader over a socket (plain or TLS) that also records every byte received."""

    def __init__(self, sock: socket.socket, record: bytearray | None = None) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.record = record
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self.sock.recv(256 * 1024)
        if not data:
            self.eof = True
            return False
        if self.record is not None:
            self.record += data
        self.buf += data
        return True

    def read_head(self, limit: int = 1 << 20) -> bytes | None:
        """Read through the blank line; None on clean EOF before any byte."""
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                head = bytes(self.buf[: i + 4])
                del self.buf[: i + 4]
                return head
            if len(self.buf) > limit:
                raise ProtocolError("head too large")
            if not self._fill():
                if self.buf:
                    raise ProtocolError(f"EOF inside head: {bytes(self.buf[:200])!r}")
                return None

    def read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            if len(self.buf) > 65536 or not self._fill():
                raise ProtocolError("EOF or overlong line")

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ProtocolError(f"EOF after {len(self.buf)} of {n} bytes")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def iter_exact(self, n: int) -> Iterator[bytes]:
        while n > 0:
            if not self.buf and not self._fill():
                raise ProtocolError(f"EOF with {n} bytes still expected")
            take = min(n, len(self.buf))
            data = bytes(self.buf[:take])
            del self.buf[:take]
            n -= take
            yield data

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def read_chunked(self) -> tuple[bytes, list[tuple[str, str]]]:
        body = bytearray()
        while True:
            line = self.read_line()
            size_s = line.split(b";", 1)[0].strip()
            if not size_s or any(c not in b"0123456789abcdefABCDEF" for c in size_s):
                raise ProtocolError(f"bad chunk size line {line!r}")
            size = int(size_s, 16)
            if size == 0:
                trailers = []
                while True:
                    t = self.read_line()
                    if not t:
                        return bytes(body), trailers
                    k, _, v = t.decode("latin-1").partition(":")
                    trailers.append((k.strip(), v.strip()))
            body += self.read_exact(size)
            if self.read_exact(2) != b"\r\n":
                raise ProtocolError("chunk data not followed by CRLF")


def parse_headers(lines: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for raw in lines:
        if b":" not in raw or raw[:1] in (b" ", b"\t"):
            raise ProtocolError(f"bad header line {raw!r}")
        k, _, v = raw.decode("latin-1").partition(":")
        if k != k.strip() or not k:
            raise ProtocolError(f"bad header name {k!r}")
        out.append((k, v.strip()))
    return out


class Headers:
    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.items:
            if k.lower() == name.lower():
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k.lower() == name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k.lower() == name.lower() for k, _ in self.items)

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.items}

    def __repr__(self) -> str:
        return f"Headers({self.items!r})"


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: Headers
    body: bytes
    raw_head: bytes
    interim: list[int] = field(default_factory=list)
    framing: str = ""  # "length" | "chunked" | "close" | "none"

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> object:
        return json.loads(self.body)


def read_response(reader: Reader, method: str = "GET", skip_interim: bool = True) -> Response:
    """Read one response. Raises ProtocolError on EOF before a status line."""
    interim: list[int] = []
    while True:
        head = reader.read_head()
        if head is None:
            raise ProtocolError("connection closed before a response")
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0]!r}")
        status = int(parts[1])
        headers = Headers(parse_headers(lines[1:]))
        if 100 <= status < 200 and status != 101 and skip_interim:
            interim.append(status)
            continue
        break
    te = headers.get("Transfer-Encoding")
    cl = headers.get("Content-Length")
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        body, framing = b"", "none"
    elif te is not None:
        if te.lower().split(",")[-1].strip() != "chunked":
            raise ProtocolError(f"unsupported transfer-encoding {te!r}")
        body, _ = reader.read_chunked()
        framing = "chunked"
    elif cl is not None:
        body, framing = reader.read_exact(int(cl)), "length"
    else:
        body, framing = reader.read_to_eof(), "close"
    return Response(
        status, parts[2] if len(parts) > 2 else "", parts[0], headers, body, head, interim, framing
    )


# ---------------------------------------------------------------------------------------------
# HTTP origin


@dataclass
class Request:
    conn_id: int
    raw_head: bytes
    method: str
    target: str
    version: str
    headers: Headers
    body: bytes
    framing: str  # "length" | "chunked" | "none"
    complete: bool = True

    @property
    def request_line(self) -> str:
        return f"{self.method} {self.target} {self.version}"

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path


def stop_serving(listener: socket.socket, live: list[socket.socket]) -> None:
    """Stop a test server: no more accepts, and every open connection shut both ways
    (its handler thread then sees the end and returns)."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()
    for c in live:
        try:
            c.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server:
    """Threaded accept loop on 127.0.0.1:0; one thread per connection."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(128)
        self.port: int = self.lsock.getsockname()[1]
        self.host = "127.0.0.1"
        self.lock = threading.Lock()
        self.connections = 0
        self.live: set[socket.socket] = set()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            if self._stopped:
                conn.close()
                return
            with self.lock:
                self.connections += 1
                cid = self.connections
                self.live.add(conn)
            threading.Thread(target=self._run, args=(conn, cid), daemon=True).start()

    def _run(self, conn: socket.socket, cid: int) -> None:
        sock = conn
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(30)
            if self.tls is not None:
                sock = self.tls.wrap_socket(conn, server_side=True)
            self.handle(sock, cid)
        except (OSError, ProtocolError, ssl.SSLError, ValueError):
            pass
        finally:
            with self.lock:
                self.live.discard(conn)
            try:
                sock.close()
            except OSError:
                pass

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    def handle(self, sock: socket.socket, cid: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        self._stopped = True
        with self.lock:
            live = list(self.live)
        stop_serving(self.lsock, live)


class HTTPOrigin(_Server):
    """HTTP/1.1 origin with keep-alive.

    Routes (any method unless noted; query parameters in brackets):
      /hello                fixed 200 "hello from origin" with Content-Length
      /echo                 200, body = request body, Content-Length
      /chunked[?n=]         200 chunked response of n chunks "chunk-<i>;" (default 5)
      /pieces[?n=]          200 with Content-Length: the head, then n pieces "piece-<i>;"
                            (default 5), each in a send of its own (over TLS, a record each),
                            corked: they reach the peer together
      /close                200 close-delimited (no Content-Length / Transfer-Encoding), then close
      /head-test            GET: 200 with body of 1234 bytes; HEAD: same headers, no body
      /204                  204 No Content
      /304                  304 Not Modified (with ETag and a Content-Length of the "full" body)
      /slow?s=              sleep s seconds, then 200 "slow"
      /download?n=          n deterministic bytes (pattern_chunks), Content-Length, streamed
      /sha256               consume request body, reply "<hex> <length>"
      /hop                  200 with hop-by-hop headers in the response
      /status?code=         reply with that status and a short body
      /refuse-once?key=     the first request per key: 429 with Retry-After 0.2; then 200 "ok"
    Anything else: 404.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Request] = []
        self.raw: dict[int, bytearray] = {}
        self.refused: set[str] = set()
        super().__init__(tls)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def requests_for(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def all_raw(self) -> bytes:
        with self.lock:
            return b"".join(bytes(v) for v in self.raw.values())

    def handle(self, sock: socket.socket, cid: int) -> None:
        record = bytearray()
        with self.lock:
            self.raw[cid] = record
        reader = Reader(sock, record)
        while True:
            head = reader.read_head()
            if head is None:
                return
            lines = head[:-4].split(b"\r\n")
            parts = lines[0].decode("latin-1").split(" ")
            if len(parts) != 3:
                raise ProtocolError(f"bad request line {lines[0]!r}")
            method, target, version = parts
            headers = Headers(parse_headers(lines[1:]))
            te = headers.get("Transfer-Encoding")
            cl = headers.get("Content-Length")
            if te is not None and cl is not None:
                raise ProtocolError("CL and TE both present")
            if (headers.get("Expect") or "").lower() == "100-continue":
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            path = urllib.parse.urlsplit(target).path
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(target).query))
            req = Request(cid, head, method, target, version, headers, b"", "none", complete=False)
            with self.lock:
                self.requests.append(req)
            if path == "/sha256":
                h = hashlib.sha256()
                total = 0
                if te is not None:
                    body, _ = reader.read_chunked()
                    h.update(body)
                    total = len(body)
                    req.framing = "chunked"
                elif cl is not None:
                    for piece in reader.iter_exact(int(cl)):
                        h.update(piece)
                        total += len(piece)
                    req.framing = "length"
                req.complete = True
                self._send(sock, 200, f"{h.hexdigest()} {total}".encode())
                continue
            if te is not None:
                if te.lower() != "chunked":
                    raise ProtocolError(f"unsupported TE {te!r}")
                req.body, _ = reader.read_chunked()
                req.framing = "chunked"
            elif cl is not None:
                if not cl.isdigit():
                    raise ProtocolError("bad content-length")
                req.body = reader.read_exact(int(cl))
                req.framing = "length"
            req.complete = True
            keep = self._respond(sock, req, path, query)
            conn_hdr = (headers.get("Connection") or "").lower()
            if not keep or "close" in conn_hdr or version == "HTTP/1.0":
                return

    def _send(
        self,
        sock: socket.socket,
        status: int,
        body: bytes,
        extra: str = "",
        reason: str = "X",
        head_only: bool = False,
    ) -> None:
        head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        sock.sendall(head.encode("latin-1") + (b"" if head_only else body))

    def _respond(self, sock: socket.socket, req: Request, path: str, q: dict[str, str]) -> bool:
        head_only = req.method == "HEAD"
        if path == "/hello":
            self._send(
                sock, 200, b"hello from origin", "Content-Type: text/plain\r\n", "OK", head_only
            )
        elif path == "/echo":
            self._send(
                sock, 200, req.body, "Content-Type: application/octet-stream\r\n", "OK", head_only
            )
        elif path == "/pieces":
            pieces = [f"piece-{i};".encode() for i in range(int(q.get("n", "5")))]
            size = sum(map(len, pieces))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
            for piece in pieces:
                sock.sendall(piece)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        elif path == "/chunked":
            n = int(q.get("n", "5"))
            out = bytearray(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            sock.sendall(bytes(out))
            for i in range(n):
                piece = f"chunk-{i};".encode()
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                time.sleep(0.005)
            sock.sendall(b"0\r\n\r\n")
        elif path == "/close":
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            for i in range(4):
                sock.sendall(f"close-delimited part {i}\n".encode())
                time.sleep(0.005)
            return False
        elif path == "/head-test":
            self._send(sock, 200, b"h" * 1234, "Content-Type: text/plain\r\n", "OK", head_only)
        elif path == "/204":
            sock.sendall(b"HTTP/1.1 204 No Content\r\nX-Origin: 204\r\n\r\n")
        elif path == "/304":
            sock.sendall(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 99\r\n\r\n')
        elif path == "/slow":
            time.sleep(float(q.get("s", "3")))
            self._send(sock, 200, b"slow", "", "OK", head_only)
        elif path == "/download":
            n = int(q.get("n", "1048576"))
            sock.sendall(
                f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n".encode()
            )
            if not head_only:
                for piece in pattern_chunks(n):
                    sock.sendall(piece)
        elif path == "/hop":
            self._send(
                sock,
                200,
                b"hop",
                "Connection: X-Resp-Hop, keep-alive\r\n"
                "X-Resp-Hop: secret\r\nKeep-Alive: timeout=30\r\n"
                "X-Resp-End: kept\r\n",
                "OK",
                head_only,
            )
        elif path == "/refuse-once":
            key = q.get("key", "")
            with self.lock:
                first = key not in self.refused
                self.refused.add(key)
            if first:
                self._send(sock, 429, b"slow down", "Retry-After: 0.2\r\n", "Too Many", head_only)
            else:
                self._send(sock, 200, b"ok", "", "OK", head_only)
        elif path == "/status":
            code = int(q.get("code", "200"))
            self._send(sock, code, f"status {code}".encode(), "", "Status", head_only)
        else:
            self._send(sock, 404, b"no such route", "", "Not Found", head_only)
        return True


class RawOrigin(_Server):
    """TCP server running ``handler(sock, origin)`` per connection; handlers append to .events."""

    def __init__(self, handler: Callable[[socket.socket, RawOrigin], None]) -> None:
        self.handler = handler
        self.events: list[tuple[str, object]] = []
        self.cond = threading.Condition()
        super().__init__(None)

    def event(self, name: str, value: object = None) -> None:
        with self.cond:
            self.events.append((name, value))
            self.cond.notify_all()

    def wait_event(self, name: str, timeout: float = 5.0) -> object:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for n, v in self.events:
                    if n == name:
                        return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"origin never reported {name!r}; events={self.events}")
                self.cond.wait(left)

    def handle(self, sock: socket.socket, cid: int) -> None:
        self.handler(sock, self)


# raw handlers ---------------------------------------------------------------------------------


def handler_read_to_eof_then_reply(sock: socket.socket, origin: RawOrigin) -> None:
    """Read everything until the peer half-closes, then reply with digest + length and close."""
    h = hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(256 * 1024)
        if not data:
            break
        h.update(data)
        total += len(data)
    origin.event("eof", total)
    reply = f"got {total} bytes sha256={h.hexdigest()}\n".encode()
    sock.sendall(reply + b"tail" * 1000)
    origin.event("replied", total)


def handler_stream_forever(sock: socket.socket, origin: RawOrigin) -> None:
    """Stream data until the peer goes away; report how it ended."""
    block = b"d" * 65536
    sent = 0
    origin.event("start")
    try:
        while True:
            sock.sendall(block)
            sent += len(block)
    except OSError as e:
        origin.event("ended", f"{type(e).__name__} after {sent}")


def handler_sink_forever(sock: socket.socket, origin: RawOrigin) -> None:
    """Read until the peer goes away; report EOF or error."""
    total = 0
    origin.event("start")
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                origin.event("ended", f"EOF after {total}")
                return
            total += len(data)
    except OSError as e:
        origin.event("ended", f"{type(e).__name__} after {total}")


def handler_send_then_reset(nbytes: int) -> Callable[[socket.socket, RawOrigin], None]:
    def handler(sock: socket.socket, origin: RawOrigin) -> None:
        sock.sendall(b"r" * nbytes)
        time.sleep(0.2)
        origin.event("reset", nbytes)
        set_linger0(sock)
        sock.close()

    return handler


def handler_read_then_reset(nbytes: int) -> Callable[[socket.socket, RawOrigin], None]:
    """Read ``nbytes`` of an upload, then reset the connection mid-stream."""

    def handler(sock: socket.socket, origin: RawOrigin) -> None:
        got = 0
        while got < nbytes:
            data = sock.recv(65536)
            if not data:
                break
            got += len(data)
        origin.event("reset", got)
        set_linger0(sock)
        sock.close()

    return handler


# ---------------------------------------------------------------------------------------------
# a listening socket that never completes a handshake: connect() to it hangs


class Blackhole:
    """listen(0) and fill the accept queue, so further SYNs are dropped and connects hang."""

    def __init__(self) -> None:
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(0)
        self.port = self.lsock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        import select

        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(s)
            _, w, _ = select.select([], [s], [], 0.3)
            if not w:
                return  # this one hangs: the queue is full
        raise RuntimeError("could not fill the accept queue of a listen(0) socket")

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.lsock.close()


# ---------------------------------------------------------------------------------------------
# raw client helpers (``p`` is anything with a ``connect(timeout)`` returning a socket)


def send_and_read(
    p: HasConnect, data: bytes, method: str = "GET", timeout: float = 10.0
) -> tuple[Response, bool]:
    """Send raw bytes on a new connection, read one response, report whether the proxy closed.

    The close is only waited for (up to 3 s) after an error or a ``Connection: close`` reply.
    """
    with p.connect(timeout) as s:
        s.sendall(data)
        reader = Reader(s)
        resp = read_response(reader, method)
        if resp.status < 400 and "close" not in (resp.headers.get("Connection") or "").lower():
            return resp, False  # a kept-alive success: do not wait for a close that won't come
        return resp, closed_after(s, reader)


def closed_after(s: socket.socket, reader: Reader, timeout: float = 3.0) -> bool:
    """True if the peer closes (EOF or reset) within ``timeout`` and sent nothing more."""
    s.settimeout(timeout)
    if reader.buf:
        return False
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def connect_tunnel(
    p: HasConnect, target: str, timeout: float = 10.0, extra: str = ""
) -> tuple[socket.socket, Response, Reader]:
    """Open a CONNECT tunnel; returns the socket, the proxy's response and the reader."""
    s = p.connect(timeout)
    host = target
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
    reader = Reader(s)
    head = reader.read_head()
    if head is None:
        raise ProtocolError("proxy closed the connection before answering CONNECT")
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].decode("latin-1").split(" ", 2)
    headers = Headers(parse_headers(lines[1:]))
    status = int(parts[1])
    body = b""
    if status != 200:
        cl = headers.get("Content-Length")
        body = reader.read_exact(int(cl)) if cl is not None else reader.read_to_eof()
    resp = Response(status, parts[2] if len(parts) > 2 else "", parts[0], headers, body, head)
    return s, resp, reader


def handshake_held(
    tls: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    send: Callable[[bytes], object],
    recv: Callable[[int], bytes],
) -> None:
    """A memory-BIO client handshake over ``send``/``recv``, done but for its
    last flight (the Finished), left in ``outgoing`` for the caller to send."""
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            if outgoing.pending:
                send(outgoing.read())
            incoming.write(recv(65536))


def write_echo_then_hello(tls: ssl.SSLObject, host: str, body: bytes) -> None:
    """Into a memory-BIO TLS session, three records: a ``POST /echo`` head, its
    ``body``, and a pipelined ``GET /hello`` that closes the connection."""
    tls.write(
        f"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    tls.write(body)
    tls.write(f"GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())


def read_until_closed(
    recv: Callable[[int], bytes], incoming: ssl.MemoryBIO, tls: ssl.SSLObject
) -> bytes:
    """All a memory-BIO TLS session reads from ``recv`` until the connection ends."""
    got = b""
    while True:
        try:
            data = recv(65536)
        except ssl.SSLZeroReturnError:  # ``recv`` of a TLS socket: its close_notify
            break
        if not data:
            break
        incoming.write(data)
        try:
            while chunk := tls.read(65536):
                got += chunk
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
    return got


def check_echo_then_hello(got: bytes, body: bytes) -> None:
    """The two answers to `write_echo_then_hello`, in order and whole."""
    first, _, second = got.partition(body)
    assert first.startswith(b"HTTP/1.1 200"), got
    assert second.count(b"HTTP/1.1 200") == 1 and b"hello from origin" in second, got


def client_hello(name: str | None) -> bytes:
    """The first bytes Python's ssl module sends for ``name`` (None: no server name):
    a real ClientHello, for the --transparent listener's scanner."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def server_context(ca: TestCA, directory: Path, names: tuple[str, ...]) -> ssl.SSLContext:
    """A server TLS context with a leaf for ``names`` (and 127.0.0.1) from ``ca``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = make_leaf(ca, directory, names=names, ips=("127.0.0.1",))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx
