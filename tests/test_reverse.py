"""--reverse LISTEN=URL: a client with a base URL reaches one target through elbasy.

Real clients (requests, httpx, urllib, curl) use ``http://127.0.0.1:P`` as their
base URL; elbasy forwards to the target over verified TLS (the test CA through
--upstream-ca, the target's name routed to a local origin by --connect-to),
rewrites Host, sets X-Forwarded-*, streams the answer as it comes, and paces by
the target's rule exactly as for a proxied request.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import origins
import pytest
import requests
from conftest import REPO, Proxy, _clean_env
from mockapis.remote import RemoteMock

ETSY = "openapi.etsy.com"
SITE = "api.example.test"  # a host no rule covers: forwarded unpaced
REVERSE_RE = re.compile(r"reverse proxy on 127\.0\.0\.1:(\d+) to (\S+)")


def reverse_ports(p: Proxy) -> dict[str, int]:
    """Each --reverse listener's port by its target's origin (the lines come before the
    banner the Proxy waited for)."""
    return {m.group(2): int(m.group(1)) for m in map(REVERSE_RE.search, p.stderr_lines) if m}


@pytest.fixture
def etsy(api_ca: tuple[origins.TestCA, Path]) -> Iterator[RemoteMock]:
    ca, where = api_ca
    cert, key = origins.make_leaf(ca, where, names=(ETSY,), ips=("127.0.0.1",))
    mock = RemoteMock("etsy", cert, key, ca.path)
    yield mock
    mock.close()


@pytest.fixture
def site_ctx(api_ca: tuple[origins.TestCA, Path]) -> ssl.SSLContext:
    """A server context with a leaf for SITE from the test CA."""
    ca, where = api_ca
    (where / "site").mkdir(exist_ok=True)
    cert, key = origins.make_leaf(ca, where / "site", names=(SITE,), ips=("127.0.0.1",))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.fixture
def site_origin(site_ctx: ssl.SSLContext) -> Iterator[origins.HTTPOrigin]:
    o = origins.HTTPOrigin(tls=site_ctx)
    yield o
    o.close()


def reverse_to(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    tmp_path: Path,
    host: str,
    port: int,
    *extra: str,
) -> tuple[Proxy, str]:
    """elbasy with --reverse 127.0.0.1:0=https://host, host routed to 127.0.0.1:port;
    (the proxy, the base URL its clients use)."""
    p = proxy(
        "--data-dir",
        str(tmp_path / "data"),
        "--upstream-ca",
        str(api_ca[0].path),
        "--connect-to",
        f"{host}:443:127.0.0.1:{port}",
        "--reverse",
        f"127.0.0.1:0=https://{host}",
        *extra,
    )
    return p, f"http://127.0.0.1:{reverse_ports(p)[f'https://{host}']}"


# --------------------------------------------------------------------------- pacing


def test_sdk_clients_are_paced_with_zero_429s(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    etsy: RemoteMock,
    tmp_path: Path,
) -> None:
    """requests, httpx, urllib and curl with a base URL, asking far above Etsy's 10/s:
    every answer is the mock's 200, the mock throttled none, and the rate is its limit."""
    etsy.configure(key="k1", qps=10, qpd=100000)
    p, base = reverse_to(proxy, api_ca, tmp_path, ETSY, etsy.port, "--log-level", "warning")
    path = "/v3/application/shops/123/listings/active"
    headers = {"x-api-key": "k1:secret"}
    run = 4.0
    statuses: Counter[object] = Counter()
    waits: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + run

    def note(status: object, wait: str | None = None) -> None:
        with lock:
            statuses[status] += 1
            if wait is not None:
                waits.append(float(wait))

    def with_requests() -> None:
        with requests.Session() as s:
            while time.monotonic() < stop:
                r = s.get(base + path, headers=headers, timeout=30)
                note(r.status_code, r.headers.get("x-elbasy-wait"))

    def with_httpx() -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            while time.monotonic() < stop:
                r = c.get(path)
                note(r.status_code, r.headers.get("x-elbasy-wait"))

    def with_urllib() -> None:
        while time.monotonic() < stop:
            req = urllib.request.Request(base + path, headers=headers)
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
                note(r.status, r.headers.get("x-elbasy-wait"))

    def with_curl() -> None:
        exe = shutil.which("curl")
        assert exe, "curl is required (CI installs it)"
        while time.monotonic() < stop:
            out = subprocess.run(
                [exe, "-s", "-w", "%{http_code}\n", "-H", "x-api-key: k1:s"]
                + ["-o", "/dev/null", base + path] * 5,
                capture_output=True,
                timeout=60,
                check=False,
            )
            for code in out.stdout.split():
                note(int(code))

    workers = [with_requests] * 3 + [with_httpx] * 3 + [with_urllib] * 2 + [with_curl]
    started = time.monotonic()
    with ThreadPoolExecutor(len(workers)) as pool:
        for f in [pool.submit(w) for w in workers]:
            f.result()
    took = time.monotonic() - started
    stats = etsy.key_stats("k1")
    assert stats["throttled"] == 0, stats
    assert set(statuses) == {200}, statuses
    assert stats["accepted"] == sum(statuses.values())
    # paced: close to 10 a second; at most 10 in each calendar second the run touched
    assert 0.7 * 10 * took <= stats["accepted"] <= 10 * (took + 2), (stats, took)
    assert waits and max(waits) > 0.1  # held for their quota: the clients asked for more
    print(f"reverse, 9 clients: {stats['accepted']} requests in {took:.1f} s, 0 throttled")


# --------------------------------------------------------------------------- streaming


def test_a_slow_origin_streams_to_the_client(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_ctx: ssl.SSLContext,
    raw_origin: Callable[..., origins.RawOrigin],
    tmp_path: Path,
) -> None:
    """The origin sends a chunk and waits until the client has it before it sends the rest:
    a proxy that buffered the answer would leave both waiting until the origin gives up."""
    got_first = threading.Event()

    def drip(sock: socket.socket, origin: origins.RawOrigin) -> None:
        tls = site_ctx.wrap_socket(sock, server_side=True)
        if origins.Reader(tls).read_head() is None:
            return
        tls.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        origin.event("released" if got_first.wait(5) else "waited in vain")
        time.sleep(0.2)
        tls.sendall(b"4\r\nlast\r\n0\r\n\r\n")

    slow = raw_origin(drip)
    p, base = reverse_to(proxy, api_ca, tmp_path, SITE, slow.port)
    parts = []
    with httpx.Client(base_url=base, timeout=30) as c, c.stream("GET", "/drip") as r:
        assert r.status_code == 200
        for piece in r.iter_raw():
            parts.append(piece)
            if b"first" in b"".join(parts):
                got_first.set()
    assert b"".join(parts) == b"firstlast"
    assert slow.wait_event("released") is None
    assert ("waited in vain", None) not in slow.events


# --------------------------------------------------------------------------- headers


def test_host_is_the_targets_and_x_forwarded_are_elbasys(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    """The origin sees its own Host, elbasy's Via and X-Forwarded-*; the ones the client
    sent (and a Forwarded) are dropped, never passed on beside them."""
    p, base = reverse_to(proxy, api_ca, tmp_path, SITE, site_origin.port)
    port = int(base.rsplit(":", 1)[1])
    lies = {
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=6.6.6.6;proto=https",
    }
    r = requests.get(base + "/hello?x=1", headers=lies, timeout=30)
    assert (r.status_code, r.content) == (200, b"hello from origin")
    r = requests.get(base + "/hello", headers={"Host": "sdk.internal:1234"}, timeout=30)
    assert r.status_code == 200
    first, second = site_origin.requests_for("/hello")
    assert first.target == "/hello?x=1"
    for req in (first, second):
        h = req.headers
        assert h.get_all("Host") == [SITE]
        assert h.get_all("X-Forwarded-For") == ["127.0.0.1"]
        assert h.get_all("X-Forwarded-Proto") == ["http"]
        assert "Forwarded" not in h
        assert (h.get("Via") or "").startswith("1.1 elbasy-")
    assert first.headers.get_all("X-Forwarded-Host") == [f"127.0.0.1:{port}"]
    assert second.headers.get_all("X-Forwarded-Host") == ["sdk.internal:1234"]


def test_credentials_and_client_networks_apply(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    """--auth-file asks for Proxy-Authorization on the reverse port too (and never passes
    it on); --allow-clients closes an address outside it at accept."""
    auth = tmp_path / "elbasy.auth"
    auth.write_text("tok-1\n", encoding="utf-8")
    auth.chmod(0o600)
    p, base = reverse_to(proxy, api_ca, tmp_path, SITE, site_origin.port, "--auth-file", auth)
    assert requests.get(base + "/hello", timeout=30).status_code == 407
    ok = requests.get(base + "/hello", headers={"Proxy-Authorization": "Bearer tok-1"}, timeout=30)
    assert (ok.status_code, ok.content) == (200, b"hello from origin")
    assert [r.headers.get("Proxy-Authorization") for r in site_origin.requests] == [None]

    (tmp_path / "two").mkdir()
    q, base2 = reverse_to(
        proxy, api_ca, tmp_path / "two", SITE, site_origin.port, "--allow-clients", "10.0.0.0/8"
    )
    # closed at accept, unread, as on the proxy port
    with pytest.raises(requests.ConnectionError):
        requests.get(base2 + "/hello", timeout=30)
    assert len(site_origin.requests) == 1


# --------------------------------------------------------------------------- resets


def test_reset_clients_leave_no_fd(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    """Clients that reset before their answer (the origin is slow) or in the middle of it
    (a large download): afterwards no connection, fd or SSL* is left over."""
    p, base = reverse_to(proxy, api_ca, tmp_path, SITE, site_origin.port, "--log-level", "error")
    port = int(base.rsplit(":", 1)[1])
    assert requests.get(base + "/hello", timeout=30).status_code == 200
    h = p.wait_open_connections(1, timeout=10)
    baseline, live = p.fds_in_use(h), h["live"]

    def before(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /slow?s=0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.05)
            origins.reset_close(s)

    def during(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /download?n=4194304 HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(65536)
            origins.reset_close(s)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(before, range(150)))
        list(pool.map(during, range(150)))
    deadline = time.monotonic() + 15
    while True:
        h = p.wait_open_connections(1, timeout=10)
        now = p.fds_in_use(h)
        if now <= baseline or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert h["connections"]["open"] == 1, h
    assert now <= baseline, (now, baseline, h)
    assert h["live"]["ssl"] <= live["ssl"] + h["connections"]["upstream_idle"], (h, live)
    r = requests.get(base + "/hello", timeout=30)
    assert (r.status_code, r.content) == (200, b"hello from origin")


# --------------------------------------------------------------------------- workers, reload


def test_workers_share_the_reverse_listener_through_a_reload(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],
    site_origin: origins.HTTPOrigin,
    tmp_path: Path,
) -> None:
    """With --workers 2 the reverse port serves from both; a reload to 3 workers keeps
    it serving; a reload that changes --reverse is refused and the workers go on."""
    config = tmp_path / "elbasy.toml"
    reverse = f'reverse = ["127.0.0.1:0=https://{SITE}"]\n'
    config.write_text("workers = 2\n" + reverse)
    p = proxy(
        "--data-dir", str(tmp_path / "data"), "--upstream-ca", str(api_ca[0].path),
        "--connect-to", f"{SITE}:443:127.0.0.1:{site_origin.port}",
        "--config", str(config), "--drain-timeout", "3",
    )  # fmt: skip
    base = f"http://127.0.0.1:{reverse_ports(p)[f'https://{SITE}']}"

    def served(n: int) -> set[str]:
        for _ in range(n):
            r = requests.get(base + "/hello", headers={"Connection": "close"}, timeout=30)
            assert (r.status_code, r.content) == (200, b"hello from origin")
        pattern = re.compile(r"GET \S*api\.example\.test/hello 200 .* worker=(\d+)")
        return {m.group(1) for m in map(pattern.search, p.stderr_lines) if m}

    def logged(text: str) -> None:
        deadline = time.monotonic() + 20
        while not any(text in ln for ln in p.stderr_lines):
            assert time.monotonic() < deadline, p.stderr
            time.sleep(0.1)

    assert len(served(40)) == 2, p.stderr
    config.write_text("workers = 3\n" + reverse)
    p.proc.send_signal(signal.SIGHUP)
    logged("reloaded: 3 new worker(s) ready")
    served(20)
    config.write_text(f'workers = 3\nreverse = ["127.0.0.1:0=https://{SITE}:8443"]\n')
    p.proc.send_signal(signal.SIGHUP)
    logged("a reload cannot change --reverse")
    served(5)
    assert "Traceback" not in p.stderr


# --------------------------------------------------------------------------- errors


def _elbasy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elbasy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(REPO),
        env=_clean_env(),
        check=False,
    )


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("127.0.0.1:9001=ftp://api.example.com", "must be an http:// or https:// URL"),
        ("127.0.0.1:9001=https://api.example.com/v3", "no path, query or credentials"),
        ("127.0.0.1:9001=https://user@api.example.com", "no path, query or credentials"),
        ("127.0.0.1:9001=https://api.example.com:0", "port out of range"),
        ("127.0.0.1:9001", "expected LISTEN=URL"),
        ("localhost=https://api.example.com", "invalid listen address"),
    ],
)
def test_a_bad_reverse_is_one_line(spec: str, says: str) -> None:
    out = _elbasy("--reverse", spec, "show-config")
    assert out.returncode == 2, out
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--reverse" in lines[0] and says in lines[0], out.stderr


def test_a_taken_reverse_port_is_one_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        out = _elbasy(
            "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path),
            "--reverse", f"127.0.0.1:{port}=https://api.example.com",
        )  # fmt: skip
    finally:
        taken.close()
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if "cannot listen" in ln]
    assert len(errors) == 1, out.stderr
    assert f"--reverse 127.0.0.1:{port}=https://api.example.com" in errors[0], errors
    assert "Traceback" not in out.stderr
