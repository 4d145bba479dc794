"""fd hygiene: thousands of connections ending in every kind of error leak no descriptor."""

from __future__ import annotations

import collections
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import origins
from origins import Reader


def _settle_fds(p, target: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = p.fd_count()
        if n <= target or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def _read_status(s: socket.socket) -> str:
    """Status code of the proxy's reply as a string, or how the connection ended."""
    try:
        head = Reader(s).read_head()
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    except origins.ProtocolError:
        return "eof-mid-head"
    if head is None:
        return "eof"
    return head.split(b" ", 2)[1].decode()


class Mix:
    def __init__(self, p, refused_port: int, echo_port: int) -> None:
        self.p = p
        self.refused_port = refused_port
        self.echo_port = echo_port

    def _conn(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.p.port), timeout=10)
        return s

    def garbage(self) -> str:
        with self._conn() as s:
            s.sendall(b"\x00\x01garbage head\r\n\r\n")
            return _read_status(s)

    def too_big(self) -> str:
        with self._conn() as s:
            s.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nX-Big: " + b"z" * 1500 + b"\r\n\r\n")
            return _read_status(s)

    def bad_connect(self) -> str:
        with self._conn() as s:
            s.sendall(b"CONNECT nohostport HTTP/1.1\r\n\r\n")
            return _read_status(s)

    def refused_connect(self) -> str:
        with self._conn() as s:
            s.sendall(f"CONNECT 127.0.0.1:{self.refused_port} HTTP/1.1\r\n\r\n".encode())
            return _read_status(s)

    def refused_forward(self) -> str:
        with self._conn() as s:
            s.sendall(
                f"GET http://127.0.0.1:{self.refused_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            return _read_status(s)

    def close_early(self) -> str:
        s = self._conn()
        s.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHos")
        s.close()
        return "client-closed"

    def reset_early(self) -> str:
        s = self._conn()
        s.sendall(b"CONNECT 127.0.0.1:1")
        origins.reset_close(s)
        return "client-reset"

    def silent_close(self) -> str:
        s = self._conn()
        s.close()
        return "client-closed"

    def tunnel_then_reset(self) -> str:
        s = self._conn()
        s.sendall(f"CONNECT 127.0.0.1:{self.echo_port} HTTP/1.1\r\n\r\n".encode())
        status = _read_status(s)
        try:
            s.sendall(b"x" * 1000)
        except OSError:
            pass
        origins.reset_close(s)
        return status

    def dns_failure(self) -> str:
        with self._conn() as s:
            s.sendall(b"CONNECT no-such-host.invalid:443 HTTP/1.1\r\n\r\n")
            return _read_status(s)


EXPECTED = {
    "garbage": "400",
    "too_big": "431",
    "bad_connect": "400",
    "refused_connect": "502",
    "refused_forward": "502",
    "tunnel_then_reset": "200",
    "dns_failure": "502",
}


def test_no_fd_leak_after_10k_failing_connections(proxy, raw_origin, refused_port):
    def echo(sock: socket.socket, origin: origins.RawOrigin) -> None:
        while data := sock.recv(65536):
            sock.sendall(data)

    echo_origin = raw_origin(echo)
    p = proxy("--max-head-bytes", "1024", "--log-level", "warning")
    mix = Mix(p, refused_port, echo_origin.port)
    kinds = [
        "garbage",
        "too_big",
        "bad_connect",
        "refused_connect",
        "refused_forward",
        "close_early",
        "reset_early",
        "silent_close",
        "tunnel_then_reset",
    ]

    # warm up every path once (lazily created fds: resolver threads, pools...)
    for k in [*kinds, "dns_failure"]:
        getattr(mix, k)()
    time.sleep(0.5)
    base_open = p.wait_open_connections(1)["connections"]["open"]
    time.sleep(0.2)
    base_fds = p.fd_count()

    total = 10_000
    plan = [kinds[i % len(kinds)] for i in range(total - 20)] + ["dns_failure"] * 20
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def run(kind: str) -> tuple[str, str]:
        try:
            return kind, getattr(mix, kind)()
        except OSError as e:
            return kind, type(e).__name__

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for kind, result in pool.map(run, plan, chunksize=32):
            outcomes[kind][result] += 1
    elapsed = time.monotonic() - t0

    assert p.alive(), "proxy died during the storm"
    fds = _settle_fds(p, base_fds, timeout=5)
    h = p.wait_open_connections(base_open, timeout=5)
    summary = {k: dict(v) for k, v in outcomes.items()}
    assert fds <= base_fds, (
        f"fd leak: {fds} open after the storm vs {base_fds} before; outcomes={summary}"
    )
    assert h["connections"]["open"] == base_open, (h["connections"], summary)
    assert h["connections"]["tunnels_open"] == 0, h["connections"]
    # every Conn object is an open connection, no SSL* is left, no pipe is in use
    assert h["live"]["conns"] == h["connections"]["open"], h["live"]
    assert h["live"]["ssl"] == 0, h["live"]
    assert h["live"]["pipes"] == h["live"]["pipes_pooled"], h["live"]
    # connections that never send a byte may never be accepted (TCP_DEFER_ACCEPT)
    assert h["connections"]["accepted"] >= total - plan.count("silent_close")
    for kind, status in EXPECTED.items():
        n = sum(outcomes[kind].values())
        ok = outcomes[kind][status]
        assert ok >= 0.95 * n, f"{kind}: expected {status} for most, got {dict(outcomes[kind])}"
    assert elapsed < 50, f"storm took {elapsed:.1f}s"
    # and it still serves
    assert p.healthz()["version"] == p.version


def _fd_kinds(p) -> collections.Counter[str]:
    """What the proxy's fds point at, by kind (socket, pipe, anon_inode:[eventpoll], ...)."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{p.worker_pid}/fd"):
        try:
            target = os.readlink(f"/proc/{p.worker_pid}/fd/{fd}")
        except OSError:
            continue
        kinds[target.split(":[")[0] if target.startswith(("socket", "pipe")) else target] += 1
    return kinds


def test_fd_count_stable_after_tunnels_and_forwards(proxy, http_origin, tls_origin, client_ssl_ctx):
    """Successful traffic (pooled upstreams aside) returns the fd count to where it was."""
    import http.client

    p = proxy("--keepalive-timeout", "1")
    hp = http_origin.hostport

    def one_round(i: int) -> str | None:
        step = "tunnel"
        try:
            conn = http.client.HTTPSConnection(
                "127.0.0.1", p.port, context=client_ssl_ctx, timeout=10
            )
            conn.set_tunnel("127.0.0.1", tls_origin.port)
            conn.request("GET", "/hello")
            body = conn.getresponse().read()
            conn.close()
            if body != b"hello from origin":
                return f"round {i}: tunnel body {body!r}"
            step = "forward"
            req = f"GET http://{hp}/hello HTTP/1.1\r\nHost: {hp}\r\nConnection: close\r\n\r\n"
            resp, _ = origins.send_and_read(p, req.encode())
            if resp.status != 200:
                return f"round {i}: forward status {resp.status}: {resp.raw_head!r} {resp.body!r}"
        except Exception as e:  # report every failing round, not just the first
            return f"round {i}: {step} raised {type(e).__name__}: {e}"
        return None

    assert one_round(-1) is None
    time.sleep(2.5)  # idle pooled upstream connections expire after the keep-alive timeout
    base = p.fd_count()
    base_kinds = _fd_kinds(p)
    with ThreadPoolExecutor(max_workers=8) as pool:
        errors = [e for e in pool.map(one_round, range(200)) if e]
    assert not errors, (
        f"{len(errors)} of 200 rounds failed: {errors[:5]}\nstderr tail:\n"
        + "".join(p.stderr_lines[-20:])
    )
    time.sleep(2.5)
    after = _settle_fds(p, base)
    assert after <= base, (
        f"fds {after} vs {base} before; by kind now {dict(_fd_kinds(p))} vs {dict(base_kinds)}; "
        f"healthz {p.healthz()}"
    )
