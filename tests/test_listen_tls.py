"""--listen-tls HOST:PORT: clients reach elbasy's proxy over TLS (``HTTPS_PROXY=https://``).

Real clients (curl ``--proxy https://``, requests with urllib3 2, httpx) trust
the listener's certificate (the one elbasy makes in its data dir, or an
operator's ``--tls-cert``). Inside the session everything is as on the plain
proxy port: absolute-form requests, elbasy's own pages, CONNECT tunnels
(relayed through the TLS session, byte for byte) and intercepted hosts (a TLS
session with the client inside the first one, paced by the host's rule).
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import origins
import pytest
import requests
from conftest import Proxy
from mockapis.remote import RemoteMock

SITE = "api.example.test"  # no rule covers it: tunnelled
SHOP = "tls.myshopify.com"
REST_PATH = "/admin/api/2024-10/products.json"
BANNER = re.compile(r"TLS proxy on 127\.0\.0\.1:(\d+): .* and trust (\S+)")


@pytest.fixture
def site_origin(api_ca: tuple[origins.TestCA, Path]) -> Iterator[origins.HTTPOrigin]:
    ca, where = api_ca
    o = origins.HTTPOrigin(tls=origins.server_context(ca, where / "site", (SITE,)))
    yield o
    o.close()


@pytest.fixture
def shopify(api_ca: tuple[origins.TestCA, Path]) -> Iterator[RemoteMock]:
    ca, where = api_ca
    cert, key = origins.make_leaf(ca, where, names=("*.myshopify.com",), ips=("127.0.0.1",))
    mock = RemoteMock("shopify", cert, key, ca.path)
    yield mock
    mock.close()


class Secure:
    """A running elbasy with --listen-tls, and what its clients trust."""

    def __init__(self, proxy: Proxy, data: Path, test_ca: Path) -> None:
        self.proxy = proxy
        m = next(filter(None, map(BANNER.search, proxy.stderr_lines)), None)
        assert m, proxy.stderr
        self.port = int(m.group(1))
        self.cert = Path(m.group(2))  # the listener's certificate
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca = data / "ca.pem"  # elbasy's: intercepted hosts
        self.test_ca = test_ca  # the origins'
        self.bundle = data.parent / "bundle.pem"
        self.bundle.write_bytes(
            self.cert.read_bytes() + self.ca.read_bytes() + test_ca.read_bytes()
        )

    def curl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--proxy", self.url]
            + ["--proxy-cacert", str(self.cert), *args],
            capture_output=True,
            timeout=30,
        )


def start(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    tmp_path: Path,
    *routes: str,
    extra: tuple[str, ...] = (),
) -> Secure:
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--upstream-ca", str(api_ca[0].path)]
    for route in routes:
        args += ["--connect-to", route]
    p = proxy(*args, "--listen-tls", "127.0.0.1:0", *extra)
    return Secure(p, data, api_ca[0].path)


def test_curl_tunnels_byte_for_byte_and_forwards_plain_http(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    plain = origins.HTTPOrigin()
    try:
        s = start(proxy, api_ca, tmp_path, f"{SITE}:443:127.0.0.1:{site_origin.port}")
        n = 3 * 1024 * 1024
        out = s.curl("--cacert", str(s.test_ca), f"https://{SITE}/download?n={n}")
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"".join(origins.pattern_chunks(n))
        payload = bytes(range(256)) * 8192
        body = tmp_path / "body"
        body.write_bytes(payload)
        out = s.curl(
            "--cacert", str(s.test_ca), "--data-binary", f"@{body}", f"https://{SITE}/sha256"
        )
        assert out.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest(), out
        out = s.curl(f"http://127.0.0.1:{plain.port}/hello")
        assert out.stdout == b"hello from origin", out.stderr
        h = s.proxy.healthz()
        assert h["connections"]["tunnels_total"] == 2, h["connections"]
        assert h["bytes_spliced"] == 0  # nothing can be spliced out of a TLS session
    finally:
        plain.close()


def test_intercepted_hosts_are_tls_inside_tls_and_paced(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    shopify: RemoteMock,
    tmp_path: Path,
) -> None:
    """curl, requests and httpx with an https:// proxy, asking past the shop's bucket
    (40, 2 a second): all 200, none throttled, the ones past the bucket held."""
    s = start(
        proxy,
        api_ca,
        tmp_path,
        f"*.myshopify.com:443:127.0.0.1:{shopify.port}",
        extra=("--log-level", "warning"),
    )
    url = f"https://{SHOP}{REST_PATH}"
    token = {"X-Shopify-Access-Token": "tls-token"}
    waits: list[float] = []

    def with_requests(n: int) -> list[int]:
        with requests.Session() as session:
            got = []
            for _ in range(n):
                r = session.get(
                    url, headers=token, proxies={"https": s.url}, verify=str(s.bundle), timeout=30
                )
                waits.append(float(r.headers.get("x-elbasy-wait", "0")))
                got.append(r.status_code)
            return got

    def with_httpx(n: int) -> list[int]:
        ctx = ssl.create_default_context(cafile=str(s.bundle))
        # httpx checks the proxy's certificate with the Proxy's own context
        route = httpx.Proxy(s.url, ssl_context=ssl.create_default_context(cafile=str(s.cert)))
        with httpx.Client(proxy=route, verify=ctx, timeout=30) as client:
            got = []
            for _ in range(n):
                r = client.get(url, headers=token)
                waits.append(float(r.headers.get("x-elbasy-wait", "0")))
                got.append(r.status_code)
            return got

    def with_curl(n: int) -> list[int]:
        out = s.curl(
            "--cacert", str(s.ca), "-H", "X-Shopify-Access-Token: tls-token",
            "-w", "%{http_code}\n", *(["-o", "/dev/null", url] * n),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return [int(code) for code in out.stdout.split()]

    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(f, 8) for f in (with_requests, with_httpx, with_curl) * 2]
        statuses = [code for job in jobs for code in job.result()]
    took = time.monotonic() - started
    stats = shopify.key_stats("tls", "tls-token")["rest"]
    assert statuses == [200] * 48, statuses
    assert stats["throttled"] == 0 and stats["accepted"] == 48, stats
    assert took > 2.5 and max(waits) > 0.2, (took, waits)  # 8 past the bucket, 2 a second
    h = s.proxy.healthz()
    assert h["tls"]["intercepts_total"] >= 6, h["tls"]


def test_a_client_that_does_not_trust_the_listener_fails_cleanly(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    s = start(proxy, api_ca, tmp_path, f"{SITE}:443:127.0.0.1:{site_origin.port}")
    h = s.proxy.wait_open_connections(1)
    baseline, live = s.proxy.fds_in_use(h), h["live"]
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--proxy", s.url, f"https://{SITE}/hello"],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 60, out  # curl: the peer's certificate is not trusted
    with pytest.raises(requests.exceptions.ProxyError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(f"https://{SITE}/hello", proxies={"https": s.url}, verify=str(s.test_ca))
    deadline = time.monotonic() + 5
    while True:
        h = s.proxy.wait_open_connections(1)
        if h["tls"]["client_handshake_failures"] >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert h["tls"]["client_handshake_failures"] >= 2, h["tls"]
    assert s.proxy.fds_in_use(h) <= baseline
    assert h["live"]["ssl"] <= live["ssl"], (h["live"], live)


def test_clients_that_reset_leave_nothing(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    """Resets mid-handshake, inside a tunnel and inside an intercepted session within
    the TLS one: afterwards no connection, fd or SSL* is left over."""
    s = start(
        proxy,
        api_ca,
        tmp_path,
        f"{SITE}:443:127.0.0.1:{site_origin.port}",
        f"*.myshopify.com:443:127.0.0.1:{site_origin.port}",
        extra=("--log-level", "error"),
    )
    outer = ssl.create_default_context(cafile=str(s.cert))
    h = s.proxy.wait_open_connections(1)
    baseline, live = s.proxy.fds_in_use(h), h["live"]
    hello = origins.client_hello("127.0.0.1")

    def mid_handshake(_: int) -> None:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            c.sendall(hello[:60])
            origins.reset_close(c)

    def inside(host: str) -> None:
        raw = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        t = outer.wrap_socket(raw, server_hostname="127.0.0.1")
        t.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        head = origins.Reader(t).read_head()
        assert head is not None and head.startswith(b"HTTP/1.1 200"), head
        t.sendall(origins.client_hello(host)[:80])
        time.sleep(0.01)
        origins.reset_close(raw)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(mid_handshake, range(100)))
        list(pool.map(inside, [SITE] * 60 + [SHOP] * 60))
    deadline = time.monotonic() + 15
    while True:
        h = s.proxy.wait_open_connections(1, timeout=10)
        now = s.proxy.fds_in_use(h)
        if now <= baseline or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert h["connections"]["open"] == 1, h
    assert now <= baseline, (now, baseline, h)
    assert h["live"]["ssl"] <= live["ssl"], (h["live"], live)
    out = s.curl("--cacert", str(s.test_ca), f"https://{SITE}/hello")
    assert out.stdout == b"hello from origin", out.stderr


def test_an_operators_certificate_is_used(
    proxy: Callable[..., Proxy], api_ca: tuple[origins.TestCA, Path], tmp_path: Path
) -> None:
    ca, _ = api_ca
    cert, key = origins.make_leaf(ca, tmp_path, names=("proxy.internal",), ips=("127.0.0.1",))
    p = proxy("--data-dir", str(tmp_path / "data"), "--listen-tls", "127.0.0.1:0",
              "--tls-cert", str(cert), "--tls-key", str(key))  # fmt: skip
    port = int(next(filter(None, map(BANNER.search, p.stderr_lines))).group(1))  # type: ignore[union-attr]
    ctx = ssl.create_default_context(cafile=str(ca.path))
    with ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="proxy.internal"
    ) as t:
        t.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert origins.read_response(origins.Reader(t)).status == 200
    assert not (tmp_path / "data" / "listener.pem").exists()


def test_inner_records_that_come_in_one_outer_record_are_all_read(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    """An intercepted session inside a --listen-tls one: a head, its body in an
    inner record of its own and a pipelined request, all in one outer record.
    The outer session decrypts the three at once and holds the two the inner
    one has not asked for yet, where epoll never says they are there."""
    s = start(
        proxy, api_ca, tmp_path, f"{SITE}:443:127.0.0.1:{site_origin.port}",
        extra=("--intercept", SITE),
    )  # fmt: skip
    outer_ctx = ssl.create_default_context(cafile=str(s.cert))
    raw = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    with outer_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as outer:
        outer.sendall(f"CONNECT {SITE}:443 HTTP/1.1\r\nHost: {SITE}:443\r\n\r\n".encode())
        reader = origins.Reader(outer)
        assert reader.read_head().startswith(b"HTTP/1.1 200")  # type: ignore[union-attr]
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        inner = ssl.create_default_context(cafile=str(s.ca)).wrap_bio(
            incoming, outgoing, server_hostname=SITE
        )
        origins.handshake_held(inner, incoming, outgoing, outer.sendall, outer.recv)
        outer.sendall(outgoing.read())  # the inner Finished
        time.sleep(0.2)  # elbasy has read it and waits for a head
        body = b"y" * 300
        origins.write_echo_then_hello(inner, SITE, body)
        outer.sendall(outgoing.read())  # three inner records, one outer record
        got = origins.read_until_closed(outer.recv, incoming, inner)
    origins.check_echo_then_hello(got, body)
