"""The status page: ``/status.json`` and its builder, ``/ca.pem``, the page's files,
and the page itself in headless Chromium under a short paced load.

The builder is tested as plain Python with real rule matches and real
reports read by the rules; the rest against a real elbasy subprocess, with
Shopify's REST mock (tests/mockapis) on loopback as the covered API.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import origins
import pytest
from conftest import REPO, Proxy
from cryptography import x509
from mockapis.remote import RemoteMock

from elbasy.limits import ServerView
from elbasy.metrics import HISTORY_POINTS, HISTORY_STEP, InstanceView, MetricsMemory, WorkerMetrics
from elbasy.pacing import tightest
from elbasy.pages import own_page
from elbasy.policy import Policy
from elbasy.rules import Match, RuleSet
from elbasy.status import document as status_document
from elbasy.status import proxy_url
from elbasy.verdicts import Reply

# ---------------------------------------------------------------------------------------------
# the contract of /status.json

NUM = (int, float)
OPT = (int, float, type(None))
TOP = {
    "version": str,
    "uptime_seconds": float,
    "workers": int,
    "proxy_url": str,
    "rules": list,
    "accounts": list,
    "throttled_total": int,
    "shed_total": int,
    "requests_total": int,
    "connections_open": int,
    "tunnels_open": int,
    "bytes_up": int,
    "bytes_down": int,
    "wait_history": list,
}
RULE = {
    "id": str,
    "hosts": list,
    "requests": int,
    "queue_depth": int,
    "throttled": int,
    "shed": int,
    "wait_p50": OPT,
    "wait_p90": OPT,
    "wait_p99": OPT,
}
ACCOUNT = {
    "rule": str,
    "account": str,
    "queue_depth": int,
    "requests": int,
    "wait_seconds_total": NUM,
    "wait_p50": OPT,
    "wait_p99": OPT,
    "server_remaining": OPT,
    "server_limit": OPT,
    "reported_at": OPT,
}
INTERVAL_ENTRY = {"t": NUM, "count": int, "p50": OPT, "p90": OPT, "p99": OPT}


def _shaped(obj: dict[str, Any], shape: dict[str, Any], where: str) -> None:
    assert set(obj) == set(shape), (where, sorted(set(obj) ^ set(shape)))
    for key, kind in shape.items():
        value = obj[key]
        assert isinstance(value, kind) and not isinstance(value, bool), (where, key, value)


def check_contract(doc: dict[str, Any]) -> None:
    """Every field the contract names, with its type, and nothing else."""
    _shaped(doc, TOP, "status")
    for r in doc["rules"]:
        _shaped(r, RULE, "rule")
        assert all(isinstance(h, str) for h in r["hosts"])
        if r["requests"] == r["shed"]:
            assert r["wait_p50"] is None  # no request waited yet: null, not 0
    for a in doc["accounts"]:
        _shaped(a, ACCOUNT, "account")
    depth = [(a["queue_depth"], a["wait_seconds_total"]) for a in doc["accounts"]]
    assert depth == sorted(depth, reverse=True), "busiest first"
    ts = [h["t"] for h in doc["wait_history"]]
    assert ts == sorted(ts) and len(ts) <= HISTORY_POINTS
    assert all(b - a == HISTORY_STEP for a, b in zip(ts, ts[1:], strict=False))
    for h in doc["wait_history"]:
        _shaped(h, INTERVAL_ENTRY, "wait_history")
        assert h["t"] % HISTORY_STEP == 0
        assert (h["count"] == 0) == (h["p50"] is None)
        if h["count"]:
            assert h["p50"] <= h["p90"] <= h["p99"]


# ---------------------------------------------------------------------------------------------
# the builder, as plain Python

RULES = RuleSet.builtin()
REST_PATH = "/admin/api/2024-10/products.json"


def shop_match(shop: str, token: str = "tok") -> Match:
    m = RULES.match(
        f"{shop}.myshopify.com", "GET", REST_PATH, [(b"x-shopify-access-token", token.encode())]
    )
    assert m is not None and m.rule.id == "shopify-admin-rest"
    return m


def document(memory: MetricsMemory, now: float, top: int = 10) -> dict[str, Any]:
    doc = status_document(
        InstanceView(memory),
        now,
        version="9.9",
        proxy_url="http://10.0.0.1:8080",
        rules=RULES,
        top=top,
    )
    check_contract(doc)
    return doc


def test_the_document_sums_every_worker_per_rule_and_account() -> None:
    memory = MetricsMemory(2)
    one, two = WorkerMetrics(memory, 0, started=990.0), WorkerMetrics(memory, 1, started=995.0)
    a, b, g = shop_match("alpha"), shop_match("beta"), shop_match("gamma")
    rule = a.rule.id
    for w, wait in ((one, 0.1), (two, 0.2), (one, 0.3), (two, 0.4)):
        w.waited(rule, a.account, wait, 1000.0)
        w.finished(rule, 200, a.account, 1000.0)
    two.finished(rule, 429, b.account, 1001.0)
    two.shed(rule)
    one.throttled(rule, "429")
    # two requests wait for alpha (one in each worker), one for gamma
    one.queued(rule, a.account, 1, 1001.0)
    two.queued(rule, a.account, 1, 1001.0)
    one.queued(rule, g.account, 1, 1001.0)
    two.reported(rule, a.account, 12.0, 40.0, 1001.5)
    one.reported(rule, a.account, 30.0, 40.0, 1000.5)  # older: the newest report is shown
    doc = document(memory, 1002.0)
    assert (doc["version"], doc["workers"], doc["proxy_url"]) == ("9.9", 2, "http://10.0.0.1:8080")
    assert doc["uptime_seconds"] == 12.0  # since the oldest live worker started
    assert [r["id"] for r in doc["rules"]] == RULES.ids()
    rest = next(r for r in doc["rules"] if r["id"] == rule)
    assert rest["hosts"] == ["*.myshopify.com"]
    assert (rest["requests"], rest["shed"], rest["queue_depth"], rest["throttled"]) == (5, 1, 3, 1)
    # from the wait histogram: two of four in (0.2, 0.5], interpolated
    assert rest["wait_p50"] == 0.2 and 0.2 < rest["wait_p90"] < rest["wait_p99"] <= 0.5
    etsy = next(r for r in doc["rules"] if r["id"] == "etsy-v3")
    assert (etsy["requests"], etsy["wait_p50"]) == (0, None)
    # busiest first: the most held, then the most waited
    assert [x["account"] for x in doc["accounts"]] == [a.account, g.account, b.account]
    first = doc["accounts"][0]
    assert (first["queue_depth"], first["requests"], first["wait_seconds_total"]) == (2, 4, 1.0)
    assert (first["server_remaining"], first["server_limit"]) == (12.0, 40.0)
    assert first["reported_at"] == 1001.5
    held = doc["accounts"][1]
    assert (held["queue_depth"], held["requests"], held["wait_p50"]) == (1, 0, None)
    assert "tok" not in json.dumps(doc)  # the account is hashed, never the token
    assert (doc["requests_total"], doc["shed_total"], doc["throttled_total"]) == (5, 1, 1)


def test_top_accounts_are_bounded() -> None:
    memory = MetricsMemory(1)
    w = WorkerMetrics(memory, 0)
    for i in range(30):
        w.waited("shopify-admin-rest", f"s{i}", i / 1000, 1000.0)
        w.finished("shopify-admin-rest", 200, f"s{i}", 1000.0)
    doc = document(memory, 1000.0)
    assert [a["account"] for a in doc["accounts"]] == [f"s{i}" for i in range(29, 19, -1)]
    assert len(document(memory, 1000.0, top=3)["accounts"]) == 3


def test_wait_history_closes_five_second_intervals_and_keeps_ten_minutes() -> None:
    memory = MetricsMemory(1)
    w = WorkerMetrics(memory, 0)
    assert document(memory, 1000.0)["wait_history"] == []
    for t, wait in ((1001.0, 0.5), (1002.0, 1.5), (1004.9, 0.01), (1011.0, 2.0)):
        w.waited("shopify-admin-rest", "acct", wait, t)
        w.finished("shopify-admin-rest", 200, "acct", t)
    h = document(memory, 1016.0)["wait_history"]
    assert [(e["t"], e["count"]) for e in h] == [(1005.0, 3), (1010.0, 0), (1015.0, 1)]
    assert h[1]["p50"] is None
    assert 0.01 < h[0]["p50"] <= 1.0 and 1.0 < h[0]["p99"] <= 2.0
    assert 1.0 < h[2]["p50"] <= 2.0
    # the interval still open is not shown: 1016 s is in the one ending at 1020
    assert document(memory, 1019.9)["wait_history"] == h
    # an hour later: the ring has nothing of the last ten minutes
    assert document(memory, 1016.0 + 3600)["wait_history"] == []
    # a request then: ten minutes of intervals at most, from the oldest with one
    w.waited("shopify-admin-rest", "acct", 0.1, 4700.0)
    w.finished("shopify-admin-rest", 200, "acct", 4700.0)
    later = document(memory, 4700.0 + 9 * 60)["wait_history"]
    assert later[0]["t"] == 4705.0 and later[0]["count"] == 1
    assert len(later) <= HISTORY_POINTS


def test_the_tightest_limit_of_a_report_is_shown() -> None:
    views = [
        ServerView("etsy-qps", remaining=4, capacity=5),
        ServerView("etsy-qpd", remaining=100, capacity=10000),
        ServerView("other", capacity=7),  # says nothing of what is left: skipped
    ]
    assert tightest(views) == (100, 10000)
    assert tightest([ServerView("x", used=3, capacity=40)]) == (37, 40)
    assert tightest([ServerView("x", remaining=3)]) == (3, None)
    assert tightest([ServerView("x", capacity=40)]) is None


def test_the_proxy_url_is_the_address_clients_use() -> None:
    assert proxy_url("127.0.0.1", 8080, lambda: "box") == "http://127.0.0.1:8080"
    assert proxy_url("0.0.0.0", 8080, lambda: "box") == "http://box:8080"
    assert proxy_url("::", 3128, lambda: "box") == "http://box:3128"
    assert proxy_url("::1", 3128, lambda: "box") == "http://[::1]:3128"


def test_own_pages_without_a_status_or_a_ca_say_so() -> None:
    v = Policy(lambda: {}).on_request(b"GET /status.json HTTP/1.1\r\n\r\n", "c")
    assert isinstance(v, Reply) and v.data.startswith(b"HTTP/1.1 404 ")
    v = Policy(lambda: {}).on_request(b"GET /ca.pem HTTP/1.1\r\n\r\n", "c")
    assert isinstance(v, Reply) and v.data.startswith(b"HTTP/1.1 404 ")
    assert b"no CA to trust" in v.data
    status, data, close = own_page("POST", "/status.json", True, lambda: {}, {}, lambda: {})
    assert status == 405 and close


# ---------------------------------------------------------------------------------------------
# over sockets: a real elbasy


def get(p: Proxy, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def status_json(p: Proxy) -> dict[str, Any]:
    status, headers, body = get(p, "/status.json")
    assert status == 200 and headers["content-type"] == "application/json", (status, headers)
    assert headers["cache-control"] == "no-store"
    doc: dict[str, Any] = json.loads(body)
    check_contract(doc)
    return doc


def test_the_page_its_files_and_its_data_with_their_types(module_proxy: Proxy) -> None:
    p = module_proxy
    status, headers, page = get(p, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in headers["content-security-policy"]
    # nothing loaded from elsewhere: every link and source is this elbasy's own (or data:)
    links = re.findall(rb'(?:src|href)="([^"]*)"', page)
    assert links and all(u.startswith((b"/", b"data:")) for u in links), links
    types = {
        "/static/status.js": "text/javascript; charset=utf-8",
        "/static/status.css": "text/css; charset=utf-8",
    }
    for path, ctype in types.items():
        # the page links each file with its digest: that URL is cached for good
        marker = f'"{path}?v='.encode()
        assert marker in page, path
        versioned = page.split(marker, 1)[1].split(b'"', 1)[0].decode()
        status, headers, body = get(p, f"{path}?v={versioned}")
        assert status == 200 and headers["content-type"] == ctype and body
        assert b"url(" not in body and b"import" not in body and b"//cdn" not in body
        assert "immutable" in headers["cache-control"]
        assert headers["x-content-type-options"] == "nosniff"
        status, headers, again = get(p, path)
        assert (status, headers["cache-control"], again) == (200, "no-cache", body)
    assert get(p, "/static/nothing.js")[0] == 404
    assert get(p, "/", "POST")[0] == 405
    # a HEAD to each: the GET's head, no body
    pages = ("/", "/static/status.js", "/static/status.css", "/status.json", "/ca.pem", "/healthz")
    for path in pages:
        g_status, g_headers, g_body = get(p, path)
        h_status, h_headers, h_body = get(p, path, "HEAD")
        assert (h_status, h_body) == (g_status, b""), path
        assert h_headers["content-type"] == g_headers["content-type"], path
        if path not in ("/status.json", "/healthz"):  # their data moves between the two
            assert h_headers["content-length"] == str(len(g_body)), path
    assert p.healthz()["counters"]  # /healthz is as it was
    doc = status_json(p)
    assert doc["proxy_url"] == p.url and doc["workers"] == 1 and doc["version"] == p.version
    assert doc["requests_total"] == 0  # elbasy's own pages are not counted
    assert {"shopify-admin-rest", "github-rest"} <= {r["id"] for r in doc["rules"]}


def test_ca_pem_is_the_ca_the_intercepted_leaves_chain_to(
    proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    p = proxy("--data-dir", str(tmp_path / "data"))
    status, headers, pem = get(p, "/ca.pem")
    assert status == 200 and headers["content-type"] == "application/x-pem-file"
    assert "elbasy-ca.pem" in headers["content-disposition"]
    assert b"PRIVATE KEY" not in pem and pem.count(b"BEGIN CERTIFICATE") == 1
    assert pem == (tmp_path / "data" / "ca.pem").read_bytes()
    ca_file = tmp_path / "downloaded.pem"
    ca_file.write_bytes(pem)
    # an intercepted handshake, trusting only what /ca.pem gave
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(b"CONNECT leaf.myshopify.com:443 HTTP/1.1\r\n\r\n")
    assert origins.Reader(s).read_head().startswith(b"HTTP/1.1 200")  # type: ignore[union-attr]
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with ctx.wrap_socket(s, server_hostname="leaf.myshopify.com") as t:
        der = t.getpeercert(binary_form=True)
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    ca = x509.load_pem_x509_certificate(pem)
    leaf.verify_directly_issued_by(ca)  # raises unless the CA's key signed it
    assert leaf.issuer == ca.subject


def after_listening(p: Proxy, count: int) -> tuple[list[str], int]:
    """elbasy's stderr lines once ``count`` lines from its listening line are in, and
    that line's index."""
    deadline = time.monotonic() + 10
    while True:
        lines = [ln.rstrip("\n") for ln in p.stderr_lines]
        at = next(i for i, ln in enumerate(lines) if " listening on 127.0.0.1:" in ln)
        if len(lines) >= at + count or time.monotonic() > deadline:
            return lines, at
        time.sleep(0.05)


def test_startup_says_the_next_line_and_the_page_the_real_address(
    proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    p = proxy("--data-dir", str(data))
    lines, at = after_listening(p, 3)
    # right after the listening line: what to export, then where the CA is
    assert lines[at + 1] == f"next: export HTTPS_PROXY={p.url} HTTP_PROXY={p.url}"
    assert lines[at + 2] == (
        f"clients must trust {data / 'ca.pem'} (also at {p.url}/ca.pem): elbasy ca trust-help"
    )
    # the page's commands carry the address, with or without its script
    status, _, page = get(p, "/")
    assert status == 200 and b"HOST:PORT" not in page
    assert f"curl -fsS -o elbasy-ca.pem {p.url}/ca.pem".encode() in page
    assert f"export HTTPS_PROXY={p.url} HTTP_PROXY={p.url}".encode() in page
    # /ca.pem through the proxy, as a client with HTTP_PROXY set asks for it
    out = subprocess.run(
        ["curl", "-fsS", "--max-time", "10", "-x", p.url, f"{p.url}/ca.pem"],
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == (data / "ca.pem").read_bytes()
    out = subprocess.run(
        ["curl", "-fsS", "--max-time", "10", f"{p.url}/ca.pem"], capture_output=True, timeout=20
    )
    assert out.stdout == (data / "ca.pem").read_bytes()


def test_without_interception_startup_names_no_ca(proxy: Callable[..., Proxy]) -> None:
    p = proxy("--rules", "")
    lines, at = after_listening(p, 3)
    assert lines[at + 1] == f"next: export HTTPS_PROXY={p.url} HTTP_PROXY={p.url}"
    assert not any("clients must trust" in ln for ln in lines)


def test_the_pages_files_are_package_data(tmp_path: Path) -> None:
    """What a wheel carries: setuptools' build_py copies the package with its data."""
    egg = tmp_path / "egg"  # the metadata build_py makes goes here, not into the checkout
    egg.mkdir()
    build = tmp_path / "build"
    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "-e", str(egg)]
        + ["build_py", "-d", str(build)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    for name in ("index.html", "status.js", "status.css"):
        built = build / "elbasy" / "static" / name
        assert built.read_bytes() == (REPO / "elbasy" / "static" / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# the page in headless Chromium, under a short paced load

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Dom(HTMLParser):
    """The dumped DOM: each element's attributes by id, and the chart's marks."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str | None]] = {}
        self.body: dict[str, str | None] = {}
        self.marks = 0
        self.account_rows = 0
        self._in: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if a.get("id"):
            self.by_id[str(a["id"])] = a
        if tag in ("polyline", "circle"):
            self.marks += 1
        if tag == "tr" and "accounts" in self._in:
            self.account_rows += 1
        if tag == "table":
            self._in.append(str(a.get("id")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._in:
            self._in.pop()

    def value(self, element: str) -> int:
        return int(str(self.by_id[element]["data-value"]))


def browse(url: str, tmp_path: Path, name: str) -> tuple[Dom, Path]:
    """One headless Chromium run: the page after ~2.5 s of its (virtual) time,
    as a DOM and a screenshot; fails on any console message (a JS error among them)."""
    assert CHROMIUM is not None, "Debian's chromium is needed (apt-get install chromium)"
    shot = tmp_path / f"{name}.png"
    cmd = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-proxy-server",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1280,1500",
        "--virtual-time-budget=2500",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        "--dump-dom",
        url,
    ]
    run = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    err = run.stderr.decode("utf-8", "replace")
    assert run.returncode == 0, err[-2000:]
    console = [line for line in err.splitlines() if ":CONSOLE" in line]
    assert not console, console
    dom = Dom(run.stdout.decode("utf-8", "replace"))
    assert "data-js-errors" not in dom.body, dom.by_id.get("js-errors")
    assert int(str(dom.body.get("data-updates", "0"))) >= 1, "the page drew no data"
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("ELBASY_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / f"status-page-{name}.png")
    return dom, shot


@pytest.fixture
def shopify(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteMock, Path]]:
    where = tmp_path_factory.mktemp("shopify")
    ca = origins.make_ca(where)
    cert, key = origins.make_leaf(ca, where, names=("*.myshopify.com",), ips=("127.0.0.1",))
    mock = RemoteMock("shopify", cert, key, ca.path)
    yield mock, ca.path
    mock.close()


def shop_session(p: Proxy, ca: Path, shop: str) -> ssl.SSLSocket:
    s = socket.create_connection(("127.0.0.1", p.port), timeout=30)
    s.sendall(f"CONNECT {shop}.myshopify.com:443 HTTP/1.1\r\n\r\n".encode())
    assert origins.Reader(s).read_head().startswith(b"HTTP/1.1 200")  # type: ignore[union-attr]
    return ssl.create_default_context(cafile=str(ca)).wrap_socket(
        s, server_hostname=f"{shop}.myshopify.com"
    )


def rest_head(shop: str) -> bytes:
    return (
        f"GET {REST_PATH} HTTP/1.1\r\nHost: {shop}.myshopify.com\r\n"
        "X-Shopify-Access-Token: page-token\r\n\r\n"
    ).encode()


def test_the_page_in_chromium_moves_under_paced_load(
    proxy: Callable[..., Proxy], shopify: tuple[RemoteMock, Path], tmp_path: Path
) -> None:
    mock, mock_ca = shopify
    # the shop's bucket holds 2: elbasy, expecting Shopify's standard 40 until
    # the first answer says otherwise, lets a first burst through and sees 429s
    mock.configure(shop="page", capacity=2)
    data = tmp_path / "data"
    p = proxy(
        "--data-dir", str(data), "--upstream-ca", str(mock_ca), "--log-level", "warning",
        "--connect-to", f"*.myshopify.com:443:127.0.0.1:{mock.port}",
    )  # fmt: skip
    ca = data / "ca.pem"
    before, _ = browse(p.url + "/", tmp_path, "before")
    assert before.value("requests-total") == 0 and before.value("throttled-total") == 0
    assert "zero" in str(before.by_id["tile-throttled"]["class"])
    assert "hidden" not in before.by_id["accounts-empty"]  # no account yet

    # six at once on six connections (sent before any answer is back), then three
    # one after the other, which wait for the room the 429s' Retry-After leaves
    conns = [shop_session(p, ca, "page") for _ in range(6)]
    try:
        for t in conns:
            t.sendall(rest_head("page"))
        first = [origins.read_response(origins.Reader(t)).status for t in conns]
    finally:
        for t in conns:
            t.close()
    assert 429 in first and 200 in first, first
    with shop_session(p, ca, "page") as t:
        reader = origins.Reader(t)
        for _ in range(3):
            t.sendall(rest_head("page"))
            assert origins.read_response(reader).status == 200

    # the intervals those waits fell in close within 5 s: each request counted once
    deadline = time.monotonic() + HISTORY_STEP + 2
    doc = status_json(p)
    while sum(h["count"] for h in doc["wait_history"]) < 9 and time.monotonic() < deadline:
        time.sleep(0.25)
        doc = status_json(p)
    assert sum(h["count"] for h in doc["wait_history"]) == 9, doc["wait_history"]
    assert max(h["p99"] or 0 for h in doc["wait_history"]) > 0.2
    rest = next(r for r in doc["rules"] if r["id"] == "shopify-admin-rest")
    assert rest["requests"] == 9 and doc["requests_total"] == 9
    assert rest["throttled"] == first.count(429) == doc["throttled_total"]
    assert rest["wait_p99"] is not None and rest["wait_p99"] > 0.2
    (account,) = doc["accounts"]
    assert account["server_limit"] == 2.0 and account["server_remaining"] is not None
    assert abs(account["reported_at"] - time.time()) < 30
    assert "page-token" not in json.dumps(doc)

    after, shot = browse(p.url + "/", tmp_path, "after")
    assert after.value("requests-total") == 9
    assert after.value("throttled-total") == first.count(429)
    assert "seen" in str(after.by_id["tile-throttled"]["class"])  # red: the upstream refused
    assert "hidden" in after.by_id["accounts-empty"] and after.account_rows == 2  # head + one
    assert after.marks >= 3  # p50, p90 and p99 of the interval with waits
    print(f"screenshot: {shot}")
