"""Clients that leave before (or while) elbasy answers them leave nothing behind.

Each storm sends a few thousand connections down one path and makes every
client go away at the worst moment: a reset (``SO_LINGER {1, 0}``) right
after its request, a plain close (FIN) right after it, or a half-close that
still waits for the answer. After each storm the fd count, the open
connections in ``/healthz`` and the live objects the loop counts (``Conn``,
``SSL*``, kernel pipes) are back where they were, held requests are all
gone, and a normal request is still served.

These paths once leaked their connection and fd for good when the client
reset first: the "send failed" result of the reply step was also the
value that marked an exception, so the caller's close never ran.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import origins
import pytest
from conftest import Proxy, _start_factory, _stop_all

from elbasy.policy import UPSTREAM_FAILED

SHOP_GLOB = "*.myshopify.com"
STORM = 2000  # connections per storm
HALF_CLOSED = 600  # connections per half-close storm (each reads its whole answer)


@dataclass
class Site:
    proxy: Proxy
    refused: int
    blackhole: int
    silent: int  # accepts and reads, never answers
    echo: int
    origin: origins.HTTPOrigin
    client_hello: bytes


def _silent(sock: socket.socket, origin: origins.RawOrigin) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def _echo(sock: socket.socket, origin: origins.RawOrigin) -> None:
    try:
        while data := sock.recv(65536):
            sock.sendall(data)
    except OSError:
        pass


def _client_hello(host: str) -> bytes:
    """The first flight of a real TLS client for ``host`` (never finished)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    start, started = _start_factory()
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    hole = origins.Blackhole()
    silent = origins.RawOrigin(_silent)
    echo = origins.RawOrigin(_echo)
    origin = origins.HTTPOrigin()
    data = tmp_path_factory.mktemp("resets")
    p = start(
        "--log-level",
        "error",
        "--data-dir",
        str(data),
        "--intercept",
        SHOP_GLOB,
        "--max-head-bytes",
        "1024",
        # longer than a storm's settling time: a connection only a head
        # deadline would close counts as leaked
        "--head-timeout",
        "60",
        "--connect-timeout",
        "0.5",
        "--response-timeout",
        "0.5",
        "--connect-to",
        f"{SHOP_GLOB}:443:127.0.0.1:{origin.port}",
        "--connect-to",
        f"{SHOP_GLOB}:80:127.0.0.1:{origin.port}",
    )
    yield Site(
        p,
        refused.getsockname()[1],
        hole.port,
        silent.port,
        echo.port,
        origin,
        _client_hello("shop1.myshopify.com"),
    )
    _stop_all(started)
    for closer in (origin.close, echo.close, silent.close, hole.close, refused.close):
        closer()


# ---------------------------------------------------------------------------------------------
# what each path sends, and the status a patient client gets


def _get(target: str, host: str = "x", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def _connect(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


PATHS: dict[str, tuple[Callable[[Site, int], bytes], str]] = {
    "bad-head-400": (lambda s, i: b"\x00\x01garbage head\r\n\r\n", "400"),
    "too-large-431": (
        lambda s, i: _get("http://127.0.0.1:1/", extra="X-Big: " + "z" * 1500),
        "431",
    ),
    "dns-502-connect": (lambda s, i: _connect("no-such-host.invalid:443"), "502"),
    "dns-502-get": (lambda s, i: _get("http://no-such-host.invalid/"), "502"),
    "refused-502-connect": (lambda s, i: _connect(f"127.0.0.1:{s.refused}"), "502"),
    "refused-502-get": (lambda s, i: _get(f"http://127.0.0.1:{s.refused}/"), "502"),
    "connect-504-connect": (lambda s, i: _connect(f"127.0.0.1:{s.blackhole}"), "504"),
    "connect-504-get": (lambda s, i: _get(f"http://127.0.0.1:{s.blackhole}/"), "504"),
    "response-504": (lambda s, i: _get(f"http://127.0.0.1:{s.silent}/"), "504"),
    "own-page": (lambda s, i: _get("/healthz"), "200"),
    "tunnel-200": (lambda s, i: _connect(f"127.0.0.1:{s.echo}"), "200"),
    "intercept-200": (lambda s, i: _connect("shop1.myshopify.com:443"), "200"),
    # a paced request on a full bucket: held (ten accounts of 200 requests, 40 leave at once)
    "held": (
        lambda s, i: _get(
            "http://shop1.myshopify.com/admin/api/2024-10/products.json",
            "shop1.myshopify.com",
            f"X-Shopify-Access-Token: storm-{s.proxy.port}-{i % 10}\r\nX-Elbasy-Max-Wait: 3600\r\n",
        ),
        "200",
    ),
}
# paths whose patient client gets a definite answer (half-close storms)
ANSWERED = [k for k in PATHS if k not in ("tunnel-200", "intercept-200", "held")]


def _open(site: Site) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", site.proxy.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _status(s: socket.socket) -> str:
    try:
        head = origins.Reader(s).read_head()
    except (ConnectionResetError, TimeoutError, origins.ProtocolError) as e:
        return type(e).__name__
    return "eof" if head is None else head.split(b" ", 2)[1].decode()


def _leave(s: socket.socket, how: str) -> None:
    if how == "rst":
        origins.reset_close(s)
    else:
        s.close()


# ---------------------------------------------------------------------------------------------
# one storm and its aftermath


def _baseline(p: Proxy) -> tuple[int, dict]:
    """(fds in use, /healthz) once the proxy is quiet: only the /healthz connection open."""
    h = p.wait_open_connections(1, timeout=10)
    return p.fds_in_use(h), h


def _storm(n: int, one: Callable[[int], str], clients: int = 16) -> Counter[str]:
    """``n`` runs of ``one``, ``clients`` at a time; what each came to, counted."""
    outcomes: Counter[str] = Counter()

    def run(i: int) -> str:
        try:
            return one(i)
        except OSError as e:
            return type(e).__name__

    with ThreadPoolExecutor(max_workers=clients) as pool:
        for result in pool.map(run, range(n), chunksize=16):
            outcomes[result] += 1
    return outcomes


def _assert_back(site: Site, fds: int, before: dict, outcomes: Counter[str]) -> dict:
    """Everything the storm used is given back within the deadlines; a request still works."""
    p = site.proxy
    assert p.alive(), "elbasy died during the storm"
    deadline = time.monotonic() + 15
    while True:
        h = p.healthz()
        now_fds = p.fds_in_use(h)
        settled = (
            h["connections"]["open"] == 1
            and h["held"]["waiting"] == 0
            and now_fds <= fds
            and h["live"]["conns"] == h["connections"]["open"]
            and h["live"]["ssl"] <= before["live"]["ssl"]
            and h["live"]["pipes"] - h["live"]["pipes_pooled"] == 0
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    detail = f"outcomes={dict(outcomes)} healthz={h}"
    assert h["connections"]["open"] == 1, detail
    assert h["connections"]["tunnels_open"] == 0, detail
    assert h["tls"]["intercepts_open"] == 0, detail
    assert h["held"]["waiting"] == 0, detail
    assert now_fds <= fds, f"fds {now_fds} after the storm, {fds} before; {detail}"
    assert h["live"]["conns"] == h["connections"]["open"], detail
    assert h["live"]["ssl"] <= before["live"]["ssl"], detail
    assert h["live"]["pipes"] - h["live"]["pipes_pooled"] == 0, detail
    resp, _ = origins.send_and_read(p, _get(f"http://127.0.0.1:{site.origin.port}/hello"))
    assert resp.status == 200 and resp.body == b"hello from origin", resp
    return h


def _run_storm(
    site: Site, n: int, one: Callable[[int], str], clients: int = 16
) -> tuple[Counter[str], dict]:
    one(-1)  # warm up the path once (resolver threads, pools, a leaf for the name)
    time.sleep(0.2)
    fds, before = _baseline(site.proxy)
    outcomes = _storm(n, one, clients)
    after = _assert_back(site, fds, before, outcomes)
    return outcomes, after


# ---------------------------------------------------------------------------------------------
# the storms


@pytest.mark.parametrize("how", ["rst", "fin"])
@pytest.mark.parametrize("path", list(PATHS))
def test_client_leaves_right_after_its_request(site: Site, path: str, how: str) -> None:
    make, _ = PATHS[path]

    def one(i: int) -> str:
        s = _open(site)
        s.sendall(make(site, i))
        _leave(s, how)
        return "sent"

    outcomes, after = _run_storm(site, STORM, one)
    assert outcomes["sent"] >= 0.99 * STORM, outcomes
    if path == "held":
        # every request past the first 40 of each account was held, and each
        # held one was given back when its client left
        assert after["held"]["total"] >= STORM - 10 * 40 - 50, after["held"]


@pytest.mark.parametrize("path", ANSWERED)
def test_half_closed_client_still_gets_its_answer(site: Site, path: str) -> None:
    make, expected = PATHS[path]

    def one(i: int) -> str:
        with _open(site) as s:
            s.sendall(make(site, i))
            s.shutdown(socket.SHUT_WR)
            return _status(s)

    # 64 at a time: the 504 paths each wait out a 0.5 s deadline
    outcomes, _ = _run_storm(site, HALF_CLOSED, one, clients=64)
    assert outcomes[expected] >= 0.99 * HALF_CLOSED, outcomes


@pytest.mark.parametrize("how", ["rst", "fin"])
def test_client_leaves_mid_handshake(site: Site, how: str) -> None:
    """An intercepted CONNECT: the "200", half a ClientHello, then the client goes."""

    def one(i: int) -> str:
        s = _open(site)
        s.sendall(_connect("shop1.myshopify.com:443"))
        status = _status(s)
        s.sendall(site.client_hello[: len(site.client_hello) // 2])
        _leave(s, how)
        return status

    outcomes, after = _run_storm(site, STORM // 2, one)
    assert outcomes["200"] >= 0.99 * (STORM // 2), outcomes
    assert after["tls"]["client_handshake_failures"] >= STORM // 2, after["tls"]


@pytest.mark.parametrize("how", ["rst", "fin"])
def test_client_leaves_mid_body(site: Site, how: str) -> None:
    """A forwarded 8 MB response: the client reads its head and 64 KiB, then goes."""

    target = f"http://127.0.0.1:{site.origin.port}/download?n={8 << 20}"

    def one(i: int) -> str:
        s = _open(site)
        s.sendall(_get(target))
        reader = origins.Reader(s)
        head = reader.read_head()
        got = 0
        while got < 65536:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        _leave(s, how)
        return "mid-body" if head and head.startswith(b"HTTP/1.1 200") and got else "short"

    outcomes, _ = _run_storm(site, STORM // 4, one)
    assert outcomes["mid-body"] >= 0.99 * (STORM // 4), outcomes


def test_tunnel_reset_mid_stream(site: Site) -> None:
    """A spliced tunnel carrying bytes both ways, reset by the client mid-flight."""

    def one(i: int) -> str:
        s = _open(site)
        s.sendall(_connect(f"127.0.0.1:{site.echo}"))
        status = _status(s)
        s.sendall(b"x" * 200_000)
        s.recv(4096)
        origins.reset_close(s)
        return status

    outcomes, _ = _run_storm(site, STORM // 2, one)
    assert outcomes["200"] >= 0.99 * (STORM // 2), outcomes


def test_bad_chunk_right_after_the_response_head_is_a_502(
    proxy: Callable[..., Proxy], raw_origin: Callable[..., origins.RawOrigin], tmp_path: Path
) -> None:
    """The head and a malformed chunk arrive together: the client hears 502, not nothing."""

    def bad(sock: socket.socket, origin: origins.RawOrigin) -> None:
        sock.recv(65536)
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz-not-hex\r\nhello\r\n"
        )
        time.sleep(0.5)

    o = raw_origin(bad)
    p = proxy("--log-level", "warning")
    resp, closed = origins.send_and_read(p, _get(f"http://127.0.0.1:{o.port}/"))
    assert resp.status == 502, resp
    # the client hears the one wording of upstream failures, elbasy's log the reason
    assert resp.body == UPSTREAM_FAILED.encode() + b"\n", resp.body
    deadline = time.monotonic() + 5
    while "malformed chunked body" not in p.stderr:
        assert time.monotonic() < deadline, p.stderr[-2000:]
        time.sleep(0.05)
    assert closed
    assert p.healthz()["counters"]["upstream_aborts"] == 1
