"""--transparent HOST:PORT: clients that never heard of a proxy, sent to elbasy by name.

A client reaches the transparent port as DNS, /etc/hosts or a REDIRECT rule would
send it: here curl's ``--connect-to``/``--resolve`` and Python clients that dial
127.0.0.1 with the API's name as SNI and Host. elbasy reads the ClientHello's
server name without consuming it: a host a rule covers is intercepted (its leaf
from elbasy's CA, the one thing the client trusts) and paced exactly as through
a CONNECT; any other name is spliced to where that name leads (``--connect-to``
sends the test's names to local origins), the ClientHello replayed, byte for
byte. A plain HTTP client on the same port is routed by its Host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import origins
import pytest
import requests
from conftest import REPO, Proxy, _clean_env
from mockapis.remote import RemoteMock
from requests.adapters import HTTPAdapter

from elbasy._framing import hello_name

SHOP = "tp.myshopify.com"
SITE = "api.example.test"  # a host no rule covers: spliced
REST_PATH = "/admin/api/2024-10/products.json"
TRANSPARENT_RE = re.compile(r"transparent listener on 127\.0\.0\.1:(\d+)")


def transparent_port(p: Proxy) -> int:
    """The --transparent listener's port (its line comes before the banner)."""
    for line in p.stderr_lines:
        m = TRANSPARENT_RE.search(line)
        if m:
            return int(m.group(1))
    raise AssertionError("no transparent listener line:\n" + p.stderr)


def refragment(hello: bytes, size: int) -> bytes:
    """The same ClientHello with its handshake message cut into records of ``size`` bytes."""
    body = hello[5:]
    out = b""
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(piece)) + piece
    return out


# --------------------------------------------------------------------------- the scanner


def test_the_hello_scanner_finds_the_name_whole_split_and_in_many_records() -> None:
    hello = origins.client_hello("Shop1.MyShopify.com")
    assert hello_name(hello) == b"Shop1.MyShopify.com"
    for cut in range(len(hello)):
        assert hello_name(hello[:cut]) is ..., cut  # more is needed, never a guess
    assert hello_name(hello + b"\x17\x03\x03\x00\x01x") == b"Shop1.MyShopify.com"
    for size in (1, 7, 100):
        cut_up = refragment(hello, size)
        assert hello_name(cut_up) == b"Shop1.MyShopify.com", size
        assert hello_name(cut_up[:-1]) is ...
    assert hello_name(origins.client_hello(None)) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
        b"\x16\x02\x00\x00\x05hello",  # SSL 2 era
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\x40\x01" + b"\x01" * 16385,  # a record past 2^14
    ],
)
def test_the_hello_scanner_refuses_what_is_not_a_client_hello(data: bytes) -> None:
    with pytest.raises(ValueError):
        hello_name(data)


def test_a_name_with_a_control_byte_is_refused() -> None:
    hello = bytearray(origins.client_hello("abc.example.com"))
    at = bytes(hello).index(b"abc.example.com")
    hello[at + 1] = 0x0A
    with pytest.raises(ValueError):
        hello_name(bytes(hello))


# --------------------------------------------------------------------------- the listener


@pytest.fixture
def shopify(api_ca: tuple[origins.TestCA, Path]) -> Iterator[RemoteMock]:
    ca, where = api_ca
    cert, key = origins.make_leaf(ca, where, names=("*.myshopify.com",), ips=("127.0.0.1",))
    mock = RemoteMock("shopify", cert, key, ca.path)
    yield mock
    mock.close()


@pytest.fixture
def site_origin(api_ca: tuple[origins.TestCA, Path]) -> Iterator[origins.HTTPOrigin]:
    ca, where = api_ca
    o = origins.HTTPOrigin(tls=origins.server_context(ca, where / "site", (SITE,)))
    yield o
    o.close()


@pytest.fixture
def plain_origin() -> Iterator[origins.HTTPOrigin]:
    o = origins.HTTPOrigin()
    yield o
    o.close()


class Transparent:
    """A running elbasy with a --transparent listener, and how clients reach it."""

    def __init__(self, proxy: Proxy, data: Path, test_ca: Path) -> None:
        self.proxy = proxy
        self.port = transparent_port(proxy)
        self.ca = data / "ca.pem"  # elbasy's: what intercepted clients trust
        self.test_ca = test_ca  # the origins': what spliced clients trust

    def curl(self, host: str, *args: str, port: int = 443) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "20"]
            + ["--connect-to", f"{host}:{port}:127.0.0.1:{self.port}", *args],
            capture_output=True,
            timeout=30,
        )

    def tls(self, name: str | None, cafile: Path, timeout: float = 10.0) -> ssl.SSLSocket:
        ctx = ssl.create_default_context(cafile=str(cafile))
        if name is None:
            ctx.check_hostname = False
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return ctx.wrap_socket(s, server_hostname=name)


def start(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    tmp_path: Path,
    *routes: str,
    extra: tuple[str, ...] = (),
) -> Transparent:
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--upstream-ca", str(api_ca[0].path)]
    for route in routes:
        args += ["--connect-to", route]
    p = proxy(*args, "--transparent", "127.0.0.1:0", *extra)
    return Transparent(p, data, api_ca[0].path)


class NamedHost(HTTPAdapter):
    """requests to https://127.0.0.1:PORT as if to ``name``: its SNI, its certificate
    check (what a client sent by /etc/hosts does, with the name in the URL)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        kwargs["server_hostname"] = self.name
        kwargs["assert_hostname"] = self.name
        super().init_poolmanager(*args, **kwargs)  # type: ignore[no-untyped-call]


def test_a_covered_host_is_intercepted_and_paced_with_zero_429s(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    shopify: RemoteMock,
    tmp_path: Path,
) -> None:
    """curl and requests sent to the transparent port by name, asking far above the
    shop's bucket (40, 2 a second): every answer is the mock's 200, none throttled,
    and the ones past the bucket wait their turn."""
    t = start(
        proxy,
        api_ca,
        tmp_path,
        f"*.myshopify.com:443:127.0.0.1:{shopify.port}",
        extra=("--log-level", "warning"),
    )
    token = {"X-Shopify-Access-Token": "tp-token"}
    url = f"https://{SHOP}{REST_PATH}"
    statuses: Counter[object] = Counter()
    waits: list[float] = []
    lock = threading.Lock()

    def with_requests(n: int) -> None:
        with requests.Session() as s:
            s.mount(f"https://127.0.0.1:{t.port}", NamedHost(SHOP))
            for _ in range(n):
                r = s.get(
                    f"https://127.0.0.1:{t.port}{REST_PATH}",
                    headers={**token, "Host": SHOP},
                    verify=str(t.ca),
                    timeout=30,
                )
                with lock:
                    statuses[r.status_code] += 1
                    waits.append(float(r.headers.get("x-elbasy-wait", "0")))

    def with_curl(n: int) -> None:
        out = t.curl(
            SHOP,
            "--cacert",
            str(t.ca),
            "-H",
            "X-Shopify-Access-Token: tp-token",
            "-w",
            "%{http_code}\n",
            *(["-o", "/dev/null", url] * n),
        )
        with lock:
            for code in out.stdout.split():
                statuses[int(code)] += 1
            if out.returncode:
                statuses[out.stderr.decode()] += 1

    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(with_requests, 9) for _ in range(3)]
        jobs += [pool.submit(with_curl, 9) for _ in range(3)]
        for f in jobs:
            f.result()
    took = time.monotonic() - started
    stats = shopify.key_stats("tp", "tp-token")["rest"]
    assert set(statuses) == {200}, statuses
    assert stats["throttled"] == 0, stats
    assert stats["accepted"] == 54 == sum(statuses.values())
    # 40 fit the bucket; the other 14 leave as it leaks 2 a second
    assert took > 5, took
    assert max(waits) > 0.5, waits
    h = t.proxy.healthz()
    assert h["tls"]["intercepts_total"] >= 4, h["tls"]
    assert h["connections"]["tunnels_total"] == 0, h["connections"]


def test_an_uncovered_name_is_spliced_byte_for_byte(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    """The origin's own certificate reaches the client (the test CA, not elbasy's)
    and its bytes come through unchanged, both ways."""
    t = start(proxy, api_ca, tmp_path, f"{SITE}:443:127.0.0.1:{site_origin.port}")
    n = 3 * 1024 * 1024
    out = t.curl(SITE, "--cacert", str(t.test_ca), f"https://{SITE}/download?n={n}")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) == n
    assert out.stdout == b"".join(origins.pattern_chunks(n))
    payload = bytes(range(256)) * 4096
    with t.tls(SITE, t.test_ca) as s:
        s.sendall(
            f"POST /sha256 HTTP/1.1\r\nHost: {SITE}\r\n".encode()
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        r = origins.read_response(origins.Reader(s))
    assert r.status == 200
    assert r.body.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    h = t.proxy.healthz()
    assert h["connections"]["tunnels_total"] == 2 and h["tls"]["intercepts_total"] == 0, h


def test_plain_http_is_routed_by_host(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    plain_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    t = start(proxy, api_ca, tmp_path, f"{SITE}:80:127.0.0.1:{plain_origin.port}")
    out = t.curl(SITE, f"http://{SITE}/hello", port=80)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello from origin"
    # keep-alive: two requests on one connection, each routed by its Host
    with socket.create_connection(("127.0.0.1", t.port), timeout=10) as s:
        reader = origins.Reader(s)
        for _ in range(2):
            s.sendall(f"GET /hello HTTP/1.1\r\nHost: {SITE}\r\n\r\n".encode())
            r = origins.read_response(reader)
            assert (r.status, r.body) == (200, b"hello from origin")
        s.sendall(b"GET /hello HTTP/1.1\r\n\r\n")  # no Host: nowhere to go
        assert origins.read_response(reader).status == 400
    assert [r.headers.get("host") for r in plain_origin.requests_for("/hello")] == [SITE] * 3


def test_no_server_name_gets_an_alert_and_a_close(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    tmp_path: Path,
) -> None:
    t = start(proxy, api_ca, tmp_path, extra=("--log-level", "info"))
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
        t.tls(None, t.test_ca)
    deadline = time.monotonic() + 5
    while "names no server" not in t.proxy.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "its ClientHello names no server" in t.proxy.stderr
    # bytes that are a handshake record but not a ClientHello: decode_error
    with socket.create_connection(("127.0.0.1", t.port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")
        assert s.recv(100) == b"\x15\x03\x01\x00\x02\x02\x32"
        assert s.recv(100) == b""
    h = t.proxy.wait_open_connections(1)
    assert h["counters"]["bad_hellos"] == 1
    assert h["connections"]["open"] == 1


def test_a_name_that_leads_back_to_elbasy_is_refused(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    tmp_path: Path,
) -> None:
    """A name routed to the transparent port itself (as /etc/hosts pointing every
    name at elbasy would) is refused at the address guard, not relayed in a loop."""
    data = tmp_path / "data"
    p = proxy("--data-dir", str(data), "--transparent", "127.0.0.1:0", "--log-level", "info")
    port = transparent_port(p)
    p.stopped_by_test = True
    p.stop()
    # the same port again, now that it is known, with the name routed to it
    p = proxy(
        "--data-dir",
        str(data),
        "--transparent",
        f"127.0.0.1:{port}",
        "--connect-to",
        f"loop.example.test:443:127.0.0.1:{port}",
        "--log-level",
        "info",
    )
    t = Transparent(p, data, api_ca[0].path)
    with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR|internal error"):
        t.tls("loop.example.test", t.test_ca)
    h = p.wait_open_connections(1)
    assert h["connections"]["accepted"] <= 3, h["connections"]  # one client, one /healthz: no loop
    assert p.lines_with("is elbasy itself (a loop)", 1), p.stderr


def test_destination_rules_and_client_networks_apply(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    t = start(
        proxy,
        api_ca,
        tmp_path,
        f"{SITE}:443:127.0.0.1:{site_origin.port}",
        extra=("--deny-hosts", SITE),
    )
    with pytest.raises(ssl.SSLError, match="ACCESS_DENIED|access denied"):
        t.tls(SITE, t.test_ca)
    t = start(
        proxy,
        api_ca,
        tmp_path / "2",
        f"{SITE}:443:127.0.0.1:{site_origin.port}",
        extra=("--allow-clients", "10.0.0.0/8"),
    )
    with pytest.raises((ssl.SSLError, ConnectionError)):
        t.tls(SITE, t.test_ca)
    deadline = time.monotonic() + 5
    while "outside --allow-clients" not in t.proxy.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "refused connections from 127.0.0.1" in t.proxy.stderr


def test_a_transparent_listener_beyond_loopback_warns_without_client_networks(
    proxy: Callable[..., Proxy],
) -> None:
    p = proxy("--transparent", "0.0.0.0:0", "--auth-env", "ELBASY_TEST_TOKEN",
              env={"ELBASY_TEST_TOKEN": "secret"})  # fmt: skip
    assert "transparent listener on 0.0.0.0:" in p.stderr
    assert "with no --allow-clients" in p.stderr
    p = proxy("--transparent", "0.0.0.0:0", "--allow-clients", "127.0.0.0/8")
    assert "with no --allow-clients" not in p.stderr


def test_clients_that_reset_or_stall_leave_nothing(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    """Resets mid-hello, right after it, and mid-splice; half a hello left to time out:
    afterwards no connection, fd or SSL* is left over."""
    t = start(
        proxy,
        api_ca,
        tmp_path,
        f"{SITE}:443:127.0.0.1:{site_origin.port}",
        f"*.myshopify.com:443:127.0.0.1:{site_origin.port}",
        extra=("--log-level", "error", "--head-timeout", "1"),
    )
    h = t.proxy.wait_open_connections(1)
    baseline, live = t.proxy.fds_in_use(h), h["live"]
    spliced = origins.client_hello(SITE)
    intercepted = origins.client_hello(SHOP)

    def reset_after(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", t.port), timeout=10) as s:
            s.sendall(data)
            time.sleep(0.02)
            origins.reset_close(s)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(reset_after, [spliced[:40]] * 40 + [spliced] * 40 + [intercepted] * 40))
    stalled = socket.create_connection(("127.0.0.1", t.port), timeout=10)
    stalled.sendall(spliced[:30])
    try:
        assert stalled.recv(10) == b""  # the head deadline closes it
    finally:
        stalled.close()
    deadline = time.monotonic() + 15
    while True:
        h = t.proxy.wait_open_connections(1, timeout=10)
        now = t.proxy.fds_in_use(h)
        if now <= baseline or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert h["connections"]["open"] == 1, h
    assert now <= baseline, (now, baseline, h)
    assert h["live"]["ssl"] <= live["ssl"], (h["live"], live)
    assert h["counters"]["head_timeouts"] >= 1
    out = t.curl(SITE, "--cacert", str(t.test_ca), f"https://{SITE}/hello")
    assert out.stdout == b"hello from origin", out.stderr


def test_a_redirected_client_is_spliced_to_where_it_meant_to_go(tmp_path: Path) -> None:
    """An iptables REDIRECT in a network namespace of the test's own: elbasy reads the
    original destination (SO_ORIGINAL_DST) and splices there, not to the name
    (tests/redirected.py tells the scenario)."""
    for tool in ("unshare", "iptables", "ip"):
        assert shutil.which(tool), f"{tool} is required (CI installs it)"
    if os.geteuid() != 0:
        pytest.skip("a network namespace with iptables rules needs root")
    out = subprocess.run(
        ["unshare", "-n", sys.executable, str(REPO / "tests" / "redirected.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=90,
        env=_clean_env(),
        cwd=str(REPO),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["curl_rc"] == 0, got
    assert got["body"] == "hello from origin", got
    assert got["tunnels"] == 1 and got["origin_requests"] == 1, got


# --------------------------------------------------------------------------- start-up


def _elbasy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elbasy", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
        cwd=str(REPO),
    )


def test_a_bad_or_taken_transparent_address_is_one_line() -> None:
    out = _elbasy("--transparent", "nowhere")
    assert out.returncode == 2
    assert "transparent" in out.stderr and "HOST:PORT" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _elbasy("--transparent", f"127.0.0.1:{port}")
    assert out.returncode == 2
    assert f"--transparent 127.0.0.1:{port}" in out.stderr
    assert "address already in use" in out.stderr
    assert len([ln for ln in out.stderr.splitlines() if "Error" in ln or "error" in ln]) == 1
