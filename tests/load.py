"""A bounded load of real HTTPS clients through elbasy, for the pacing tests.

Each client is a thread with one kept-alive TLS connection through elbasy's
CONNECT to one API host, sending requests back to back until a deadline (and
at most ``max_requests``), and recording what came back.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Client:
    """One client's identity and script."""

    host: str  # the API host it talks to (the CONNECT target and SNI)
    request: Callable[[int], bytes]  # the i-th request it sends, whole
    account: str  # how the test groups results (shop|app, key...)
    port: int = 0  # the elbasy it goes through (0: the run's); a fleet spreads clients


@dataclass
class Outcome:
    """What one account's clients saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    shed: int = 0  # 429s elbasy answered itself (X-Elbasy-Shed: 1)
    first_answer: float = 0.0  # monotonic time of the account's first response
    late_refusals: int = 0  # 429s from the API for requests sent after first_answer
    waits: list[float] = field(default_factory=list)  # X-Elbasy-Wait values
    retry_afters: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    last_answer: float = 0.0


def _read_response(sock: ssl.SSLSocket, buf: bytearray) -> tuple[int, dict[bytes, bytes], bytes]:
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before a response head")
        buf += data
    head = bytes(buf[:end])
    del buf[: end + 4]
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    while len(buf) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed inside a response body")
        buf += data
    body = bytes(buf[:length])
    del buf[:length]
    return status, headers, body


def run(
    proxy_port: int,
    ca_file: str,
    clients: list[Client],
    seconds: float,
    max_requests: int = 100_000,
    timeout: float = 60.0,
    at: tuple[float, Callable[[], None]] | None = None,
) -> tuple[dict[str, Outcome], float]:
    """Run every client until ``seconds`` have passed.

    Returns the outcomes by account, and the monotonic time the first
    requests were sent (every client connected before it). ``at``: (seconds,
    callable) to run that long after the start, e.g. a mid-run snapshot.
    """
    outcomes: dict[str, Outcome] = {c.account: Outcome() for c in clients}
    lock = threading.Lock()
    ctx = ssl.create_default_context(cafile=ca_file)
    start = threading.Barrier(len(clients) + 1)
    deadline = [float("inf")]

    def client(c: Client) -> None:
        out = outcomes[c.account]
        try:
            port = c.port or proxy_port
            raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.sendall(f"CONNECT {c.host}:443 HTTP/1.1\r\nHost: {c.host}:443\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = raw.recv(4096)
                if not chunk:
                    raise ConnectionError("CONNECT refused")
                head += chunk
            assert head.startswith(b"HTTP/1.1 200"), head
            sock = ctx.wrap_socket(raw, server_hostname=c.host)
        except Exception as exc:  # noqa: BLE001 - recorded for the test to assert on
            with lock:
                out.errors.append(f"connect: {exc!r}")
            start.wait()
            return
        buf = bytearray()
        start.wait()
        try:
            with sock:
                for i in range(max_requests):
                    if time.monotonic() >= deadline[0]:
                        break
                    sent = time.monotonic()
                    sock.sendall(c.request(i))
                    status, headers, _ = _read_response(sock, buf)
                    now = time.monotonic()
                    with lock:
                        out.statuses[status] += 1
                        out.last_answer = max(out.last_answer, now)
                        if status == 429:
                            if headers.get(b"x-elbasy-shed") == b"1":
                                out.shed += 1
                                out.retry_afters.append(headers.get(b"retry-after", b"").decode())
                            elif out.first_answer and sent > out.first_answer:
                                out.late_refusals += 1
                        if not out.first_answer:
                            out.first_answer = now
                        wait = headers.get(b"x-elbasy-wait")
                        if wait is not None:
                            out.waits.append(float(wait))
        except Exception as exc:  # noqa: BLE001
            with lock:
                out.errors.append(f"request: {exc!r}")

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    # every client is connected (or failed) before the clock starts
    deadline[0] = float("inf")
    start.wait()
    started = time.monotonic()
    deadline[0] = started + seconds
    if at is not None:
        time.sleep(max(0.0, started + at[0] - time.monotonic()))
        at[1]()
    for t in threads:
        t.join(seconds + timeout)
    return outcomes, started
