"""Clients that reset around elbasy's refusals and timeouts leave nothing behind.

``tests/test_resets.py`` storms the forwarding paths; this file storms the
answers issue 16 added: 503 busy (``--max-client-connections``,
``--max-connections``), 407 (no proxy credentials), 401 (bad credentials
for elbasy's own pages), a client outside ``--allow-clients`` (closed at
accept), 403 (a destination denied), 504 (``--exchange-timeout``) and a
DNS lookup past ``--dns-timeout``. Each client resets (``SO_LINGER {1, 0}``)
at one of three moments:

* ``before``: half a request head sent, then the reset (before any answer);
* ``during``: the whole request sent, then the reset at once, or for a
  timeout just as it runs out (racing elbasy's answer);
* ``after``: the answer read (or the close seen), then the reset.

After each storm the worker's fds, its open connections in ``/healthz`` and
the live objects the loop counts are back at the baseline taken before it,
and a normal request is served.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import origins
import pytest
from conftest import Proxy, _start_factory, _stop_all
from dns_stub import DNSStub, namespaces_work

MODES = ("before", "during", "after")
STORM = 300  # connections per storm of an instant answer
SLOW_STORM = 64  # per storm of a timeout
TIMEOUT = 0.4  # --exchange-timeout and --dns-timeout
CREDENTIAL = "tok-resets"
AUTH = "Basic " + base64.b64encode(f"{CREDENTIAL}:".encode()).decode()
OTHER = "127.0.0.2"  # the source address of clients an --allow-clients or limit refuses


# ---------------------------------------------------------------------------------------------
# the proxy's state


def healthz(p: Proxy, auth: str | None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
    try:
        headers = {"Connection": "close"}
        if auth:
            headers["Authorization"] = auth
        conn.request("GET", "/healthz", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body)
        return json.loads(body)
    finally:
        conn.close()


def quiet(
    p: Proxy, auth: str | None, timeout: float = 15.0, target: int | None = None
) -> tuple[int, dict]:
    """(fds in use, /healthz) once only the /healthz connection is open and the
    count holds for 0.3 s, or (with ``target``) is back at ``target``: a lookup
    thread past elbasy's deadline holds its UDP socket until getaddrinfo gives up."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        h = healthz(p, auth)
        fds = p.fds_in_use(h)
        settled = (
            h["connections"]["open"] == 1
            and h["held"]["waiting"] == 0
            and h["live"]["conns"] == 1
            and h["live"]["pipes"] == h["live"]["pipes_pooled"]
        )
        done = fds <= target if target is not None else fds == last
        if (settled and done) or time.monotonic() > deadline:
            return fds, h
        last = fds if settled else -1
        time.sleep(0.3)


# ---------------------------------------------------------------------------------------------
# what each refusal is


@dataclass
class Case:
    args: tuple[str, ...]
    request: Callable[[int], bytes]
    expected: str  # the status a patient client reads ("closed": no answer at all)
    auth: str | None = None  # what elbasy's own pages need
    source: str = "127.0.0.1"
    held: int = 0  # connections from `source` kept open (half a head) during the storm
    slow: bool = False  # the answer comes after TIMEOUT
    guarded: bool = False  # the default destination rules
    dns: bool = False  # resolving through a DNS server that never answers .hang.test


def _get(target: str, extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def _connect(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def _cases(origin: origins.HTTPOrigin, silent: int, auth_file: Path) -> dict[str, Case]:
    hello = f"http://127.0.0.1:{origin.port}/hello"
    return {
        "busy-client-503": Case(
            ("--max-client-connections", "2"), lambda i: _get(hello), "503", source=OTHER, held=2
        ),
        "busy-global-503": Case(("--max-connections", "3"), lambda i: _get(hello), "503", held=3),
        "no-credentials-407": Case(
            ("--auth-file", str(auth_file)), lambda i: _get(hello), "407", auth=AUTH
        ),
        "bad-credentials-401": Case(
            ("--auth-file", str(auth_file)),
            lambda i: _get("/healthz", "Authorization: Basic bm9ib2R5Om5vdGhpbmc=\r\n"),
            "401",
            auth=AUTH,
        ),
        "outside-allow-clients": Case(
            ("--allow-clients", "127.0.0.1"), lambda i: _get(hello), "closed", source=OTHER
        ),
        "destination-403-get": Case(
            (), lambda i: _get(f"http://127.0.0.1:{origin.port}/hello"), "403", guarded=True
        ),
        "destination-403-connect": Case(
            (), lambda i: _connect("127.0.0.1:22"), "403", guarded=True
        ),
        "exchange-timeout-504": Case(
            ("--exchange-timeout", str(TIMEOUT), "--response-timeout", "30"),
            lambda i: _get(f"http://127.0.0.1:{silent}/"),
            "504",
            slow=True,
        ),
        "dns-timeout-connect": Case(
            ("--dns-timeout", str(TIMEOUT)),
            lambda i: _connect(f"n{i}.hang.test:443"),
            "502",
            slow=True,
            dns=True,
        ),
        "dns-timeout-get": Case(
            ("--dns-timeout", str(TIMEOUT)),
            lambda i: _get(f"http://n{i}.hang.test/"),
            "502",
            slow=True,
            dns=True,
        ),
    }


# ---------------------------------------------------------------------------------------------
# the storm


def _open(p: Proxy, source: str) -> socket.socket:
    s = socket.socket()
    s.settimeout(10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.bind((source, 0))
    s.connect(("127.0.0.1", p.port))
    return s


def _status(s: socket.socket) -> str:
    try:
        head = origins.Reader(s).read_head()
    except ConnectionResetError:
        return "closed"
    except (TimeoutError, origins.ProtocolError) as e:
        return type(e).__name__
    return "closed" if head is None else head.split(b" ", 2)[1].decode()


def _one(p: Proxy, case: Case, mode: str, i: int) -> str:
    s = _open(p, case.source)
    try:
        raw = case.request(i)
        if mode == "before":
            s.sendall(raw[: len(raw) // 2])
            return "sent"
        s.sendall(raw)
        if mode == "during":
            if case.slow:
                time.sleep(TIMEOUT)
            return "sent"
        return _status(s)
    finally:
        origins.reset_close(s)


def _storm(p: Proxy, case: Case, mode: str, n: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()

    def run(i: int) -> str:
        try:
            return _one(p, case, mode, i)
        except OSError as e:
            return type(e).__name__

    with ThreadPoolExecutor(max_workers=16) as pool:
        for result in pool.map(run, range(n)):
            outcomes[result] += 1
    return outcomes


@dataclass
class Site:
    origin: origins.HTTPOrigin
    silent: int
    auth_file: Path
    dns: DNSStub | None


def _silent(sock: socket.socket, origin: origins.RawOrigin) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    origin = origins.HTTPOrigin()
    silent = origins.RawOrigin(_silent)
    auth_file = tmp_path_factory.mktemp("resets-auth") / "elbasy.auth"
    auth_file.write_text(CREDENTIAL + "\n", encoding="utf-8")
    auth_file.chmod(0o600)
    # getaddrinfo's own wait is 2 s, past the 0.4 s --dns-timeout: elbasy
    # gives up first, and its lookup threads (and their UDP fds) end soon after
    dns = DNSStub(resolver_timeout=2) if namespaces_work() is None else None
    yield Site(origin, silent.port, auth_file, dns)
    origin.close()
    silent.close()
    if dns is not None:
        dns.close()


CASE_NAMES = [
    "busy-client-503",
    "busy-global-503",
    "no-credentials-407",
    "bad-credentials-401",
    "outside-allow-clients",
    "destination-403-get",
    "destination-403-connect",
    "exchange-timeout-504",
    "dns-timeout-connect",
    "dns-timeout-get",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_resets_around_a_refusal_leave_nothing_behind(site: Site, name: str) -> None:
    case = _cases(site.origin, site.silent, site.auth_file)[name]
    prefix: tuple[str, ...] = ()
    if case.dns:
        if site.dns is None:
            pytest.skip(f"no DNS stub for elbasy: {namespaces_work()}")
        prefix = site.dns.prefix()
    start, started = _start_factory()
    try:
        p = start("--log-level", "error", *case.args, guarded=case.guarded, prefix=prefix)
        fds, before = quiet(p, case.auth)
        for mode in MODES:
            held = [_open(p, case.source) for _ in range(case.held)]
            for s in held:
                s.sendall(b"GET / HTTP/1.1\r\n")  # half a head: the places stay taken
            time.sleep(0.2 if held else 0)
            outcomes = _storm(p, case, mode, SLOW_STORM if case.slow else STORM)
            for s in held:
                origins.reset_close(s)
            assert p.alive(), f"elbasy died in the {mode} storm"
            if mode == "after":
                assert outcomes[case.expected] >= 0.99 * sum(outcomes.values()), outcomes
            else:
                assert outcomes["sent"] >= 0.99 * sum(outcomes.values()), outcomes
            now, h = quiet(p, case.auth, timeout=20, target=fds)
            detail = f"{name} {mode}: outcomes={dict(outcomes)} healthz={h}"
            assert h["connections"]["open"] == 1, detail
            assert h["live"]["conns"] == 1, detail
            assert h["live"]["ssl"] <= before["live"]["ssl"], detail
            assert h["live"]["pipes"] == h["live"]["pipes_pooled"], detail
            assert h["connections"]["tunnels_open"] == 0, detail
            assert now <= fds, f"fds {now} after the storm, {fds} before; {detail}"
            # and the worker still serves
            if case.guarded:  # loopback origins are refused: elbasy's own page
                raw = _get("/healthz")
            else:
                extra = f"Proxy-Authorization: {AUTH}\r\n" if case.auth else ""
                raw = _get(f"http://127.0.0.1:{site.origin.port}/hello", extra)
            resp, _ = origins.send_and_read(p, raw)
            assert resp.status == 200, (detail, resp)
        if name.startswith("busy"):
            assert h["counters"]["refused_busy"] >= 3 * STORM * 0.99, h["counters"]
    finally:
        _stop_all(started)
