"""Where elbasy may go: destination rules, the address guard, loops, pipelining, DNS.

Each attack of issue 16's probe is a regression test here, against a real
elbasy (``guarded=True``: the default destination rules, not the test
suite's open ones) on real sockets, with its harm bounded: the origin a
refused request aimed at saw nothing, the fds and connections elbasy holds
after a self-CONNECT pipeline. The resolver's tests drive
:class:`elbasy.resolver.Resolver` itself with a lookup function handed to its
constructor (its ``getaddrinfo`` seam): a name whose lookup hangs needs a DNS
server the test controls, which an unprivileged test on loopback has not.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import origins
import pytest
from conftest import Proxy, _start_factory, _stop_all
from hypothesis import given
from hypothesis import strategies as st

from elbasy.destinations import DENIED, Destinations, internal_reason
from elbasy.resolver import Denied, Resolver, TimedOut

DENIED_BODY = DENIED.encode() + b"\n"

#: every spelling of "this machine" or "the cloud's metadata service" the probe used
INTERNAL_HOSTS = (
    "127.0.0.1",
    "localhost",
    "0.0.0.0",
    "2130706433",
    "0x7f.1",
    "0177.0.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "169.254.169.254",
)


@pytest.fixture(scope="module")
def guarded() -> Iterator[Proxy]:
    """One elbasy with the default destination rules."""
    start, started = _start_factory()
    yield start(guarded=True)
    _stop_all(started)


def _get(p: Proxy, url: str, host: str) -> origins.Response:
    resp, _ = origins.send_and_read(
        p, f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("ascii")
    )
    return resp


# ---- the address guard, by a real elbasy ---------------------------------------------------


@pytest.mark.parametrize("host", INTERNAL_HOSTS)
def test_get_to_an_internal_address_is_refused_and_never_sent(guarded, http_origin, host):
    port = http_origin.port
    before = len(http_origin.requests)
    resp = _get(guarded, f"http://{host}:{port}/hello", f"{host}:{port}")
    assert (resp.status, resp.body) == (403, DENIED_BODY), resp.raw_head
    assert len(http_origin.requests) == before  # nothing reached the origin


@pytest.mark.parametrize("host", INTERNAL_HOSTS)
def test_connect_to_an_internal_address_is_refused(guarded, host):
    s, resp, reader = origins.connect_tunnel(guarded, f"{host}:443")
    with s:
        assert (resp.status, resp.body) == (403, DENIED_BODY), resp.raw_head
        assert origins.closed_after(s, reader)


def test_connect_to_a_port_other_than_443_is_refused_by_default(guarded, http_origin):
    # a name that never resolves: the port alone decides, before any lookup
    s, resp, _ = origins.connect_tunnel(guarded, "elbasy-test.invalid:8443")
    s.close()
    assert (resp.status, resp.body) == (403, DENIED_BODY)
    assert "not in --allow-ports" in guarded.stderr


def test_the_client_is_told_the_same_words_and_the_log_the_reason(guarded):
    s, resp, _ = origins.connect_tunnel(guarded, "169.254.169.254:443")
    s.close()
    assert resp.body == DENIED_BODY
    deadline = time.monotonic() + 5
    while "169.254.169.254 is link-local" not in guarded.stderr:
        assert time.monotonic() < deadline, guarded.stderr[-2000:]
        time.sleep(0.05)


def test_an_allowed_internal_host_passes(proxy, http_origin):
    p = proxy("--allow-internal", "127.0.0.1", "--allow-ports", str(http_origin.port), guarded=True)
    resp = _get(p, f"http://127.0.0.1:{http_origin.port}/hello", "x")
    assert (resp.status, resp.body) == (200, b"hello from origin")
    s, resp, _ = origins.connect_tunnel(p, f"127.0.0.1:{http_origin.port}")
    with s:
        assert resp.status == 200
    # the name itself is not allowed, only the host matching the glob
    assert _get(p, f"http://localhost:{http_origin.port}/hello", "x").status == 403


def test_connect_to_addresses_are_the_operators_choice(proxy, http_origin):
    p = proxy("--connect-to", f"api.test::127.0.0.1:{http_origin.port}", guarded=True)
    resp = _get(p, "http://api.test/hello", "api.test")
    assert (resp.status, resp.body) == (200, b"hello from origin")


def test_deny_and_allow_host_globs(proxy, http_origin):
    route = f"::127.0.0.1:{http_origin.port}"
    p = proxy(
        "--connect-to",
        route,
        "--allow-hosts",
        "*.test",
        "--deny-hosts",
        "secret.test",
        guarded=True,
    )
    assert _get(p, "http://api.test/hello", "api.test").status == 200
    for host in ("secret.test", "SECRET.test.", "api.example"):
        resp = _get(p, f"http://{host}/hello", host)
        assert (resp.status, resp.body) == (403, DENIED_BODY), host
    assert len(http_origin.requests_for("/hello")) == 1


def test_upstream_failures_tell_the_client_one_wording(proxy, refused_port):
    p = proxy()
    resp = _get(p, f"http://127.0.0.1:{refused_port}/", "x")
    s, tunnel, _ = origins.connect_tunnel(p, "no-such-host.invalid:443")
    s.close()
    assert resp.status == tunnel.status == 502
    assert resp.body == tunnel.body  # refused and unresolvable: the same words
    assert b"refused" not in resp.body.lower()


# ---- loops --------------------------------------------------------------------------------


def test_a_request_to_elbasy_itself_is_refused_by_address(proxy):
    # loopback is allowed (the suite's open rules): the loop is refused all the same
    p = proxy()
    # a GET to its own address through the proxy (HTTP_PROXY set) is one of its
    # pages, answered at once: never dialed, so no loop
    resp = _get(p, f"http://127.0.0.1:{p.port}/healthz", f"127.0.0.1:{p.port}")
    assert resp.status == 200 and b'"counters"' in resp.body
    # by a name, it is dialed, and the dial refused by address
    resp = _get(p, f"http://localhost:{p.port}/healthz", f"localhost:{p.port}")
    assert (resp.status, resp.body) == (403, DENIED_BODY)
    s, resp, _ = origins.connect_tunnel(p, f"localhost:{p.port}")
    s.close()
    assert resp.status == 403


def test_the_self_connect_pipeline_is_refused_without_fd_growth(proxy):
    p = proxy()
    fds = p.fd_count()
    one = f"CONNECT 127.0.0.1:{p.port} HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\n\r\n".encode()
    for _ in range(3):
        with p.connect() as s:
            s.sendall(one * 300)  # the probe's 10,500, bounded
            reader = origins.Reader(s)
            resp = origins.read_response(reader, "CONNECT")
            assert (resp.status, resp.body) == (403, DENIED_BODY)
            assert origins.closed_after(s, reader)
    h = p.wait_open_connections(1)
    assert h["connections"]["open"] == 1, h["connections"]
    # one head each (and the /healthz ones): no tunnel nested in another
    assert h["connections"]["requests_total"] <= 3 + 10, h
    assert p.fd_count() <= fds + 2


def test_pipelined_requests_wait_for_the_client_to_read_then_all_are_answered(proxy):
    p = proxy()
    # 4000 requests (140 KB) whose answers (9 MB) are not read, for now: the
    # kernel's socket buffers take some 4 MB of them, elbasy 32 more, and then it
    # reads no more of this client's requests until the client reads
    n = 4000
    before = p.healthz()["connections"]["requests_total"]
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little
        s.settimeout(10)
        s.connect(("127.0.0.1", p.port))
        s.sendall(b"".join(b"GET /healthz?%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(n)))
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            read = p.healthz()["connections"]["requests_total"] - before
            time.sleep(0.1)
        assert read < n * 3 // 4, read
        reader = origins.Reader(s)
        for i in range(n):  # every one is answered, in order, once the client reads
            resp = origins.read_response(reader)
            assert resp.status == 200, i


# ---- the resolver, with the lookup handed to it ----------------------------------------


class Lookups:
    """A getaddrinfo stand-in: names starting with "slow" hang until released."""

    def __init__(self, answers: dict[str, str] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[str] = []
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, host: str, port: Any, **kw: Any) -> list[tuple[Any, ...]]:
        with self.lock:
            self.calls.append(host)
        if host.startswith("slow"):
            self.release.wait(30)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addr = self.answers[host]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, 0))]


def _wait(r: Resolver, want: int) -> dict[Any, Any]:
    """Answers until ``want`` tokens have one (each within 10 s)."""
    got: dict[Any, Any] = {}
    while len(got) < want:
        ready, _, _ = select.select([r.fileno()], [], [], 10)
        assert ready, f"no answer; have {got}"
        got.update(r.completed())
    return got


@pytest.fixture
def lookups() -> Iterator[Lookups]:
    lk = Lookups({"a.example": "93.184.216.34", "b.example": "10.0.0.5", "mixed.example": ""})
    yield lk
    lk.release.set()


def test_a_hanging_name_times_out_and_others_still_resolve(lookups):
    r = Resolver(time.monotonic, getaddrinfo=lookups, timeout=0.5, threads=8)
    try:
        for i in range(6):  # the probe's: hanging names, more than the old 4 threads
            assert r.lookup(f"slow{i}.hang{i}.test", 443, ("slow", i)) is None
        assert r.lookup("a.example", 443, "a") is None
        got = _wait(r, 7)
        assert got["a"] == [(socket.AF_INET, "93.184.216.34", 443)]
        assert all(isinstance(got[("slow", i)], TimedOut) for i in range(6))
        assert got[("slow", 0)].status == 502
    finally:
        started = time.monotonic()
        r.close()  # never waits for the hanging lookups
        assert time.monotonic() - started < 1.0


def test_lookups_under_one_domain_are_limited(lookups):
    r = Resolver(time.monotonic, getaddrinfo=lookups, timeout=30, threads=8, per_domain=2)
    try:
        for i in range(10):
            r.lookup(f"slow{i}.zone.test", 443, i)
        assert r.lookup("a.example", 443, "a") is None
        got = _wait(r, 1)
        assert "a" in got
        assert sum(c.startswith("slow") for c in lookups.calls) == 2  # the rest wait their turn
        lookups.release.set()
        assert len(_wait(r, 10)) == 10
    finally:
        r.close()


def test_the_cache_is_keyed_by_name_and_failures_are_cached(lookups):
    r = Resolver(time.monotonic, getaddrinfo=lookups)
    try:
        r.lookup("a.example", 1, "one")
        r.lookup("a.example", 2, "two")
        got = _wait(r, 2)
        assert got["one"] == [(socket.AF_INET, "93.184.216.34", 1)]
        assert got["two"] == [(socket.AF_INET, "93.184.216.34", 2)]
        assert r.lookup("A.example", 3, "three") == [(socket.AF_INET, "93.184.216.34", 3)]
        r.lookup("nowhere.example", 443, "x")
        assert isinstance(_wait(r, 1)["x"], str)
        assert isinstance(r.lookup("nowhere.example", 80, "y"), str)  # the negative cache
        assert lookups.calls == ["a.example", "nowhere.example"]
    finally:
        r.close()


def test_the_guard_checks_the_resolved_address(lookups):
    guard = Destinations(allow_internal=["b.allowed"], own=[("0.0.0.0", 8080)])
    lookups.answers["b.allowed"] = "10.0.0.5"
    r = Resolver(time.monotonic, getaddrinfo=lookups, destinations=guard)
    try:
        r.lookup("b.example", 443, "private")
        r.lookup("b.allowed", 443, "allowed")
        got = _wait(r, 2)
        assert isinstance(got["private"], Denied) and got["private"].status == 403
        assert got["allowed"] == [(socket.AF_INET, "10.0.0.5", 443)]
        # elbasy itself (listening on every address) even for an allowed host
        assert isinstance(r.lookup("127.0.0.1", 8080, "self"), Denied)
        assert r.lookup("93.184.216.34", 8080, "public") == [
            (socket.AF_INET, "93.184.216.34", 8080)
        ]
    finally:
        r.close()


# ---- the address classifier ---------------------------------------------------------------

INTERNAL_V4 = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
)


def _in(net: str) -> st.SearchStrategy[ipaddress.IPv4Address]:
    n = ipaddress.ip_network(net)
    return st.integers(int(n.network_address), int(n.broadcast_address)).map(ipaddress.IPv4Address)


internal_v4 = st.one_of(*(_in(n) for n in INTERNAL_V4))
global_v4 = (
    st.integers(0, 2**32 - 1)
    .map(ipaddress.IPv4Address)
    .filter(lambda ip: ip.is_global and not ip.is_multicast)
)


def _forms(ip: ipaddress.IPv4Address) -> list[str]:
    """``ip`` as itself and inside each IPv6 form that carries an IPv4 address."""
    v = int(ip)
    return [
        str(ip),
        str(ipaddress.IPv6Address((0xFFFF << 32) | v)),  # ::ffff:a.b.c.d
        str(ipaddress.IPv6Address((0x64FF9B << 96) | v)),  # NAT64 64:ff9b::/96
        str(ipaddress.IPv6Address((0x2002 << 112) | (v << 80))),  # 6to4
        # Teredo: 2001:0:<server>:<flags>:<port>:<client, inverted>
        str(ipaddress.IPv6Address((0x20010000 << 96) | (v ^ 0xFFFFFFFF))),
    ]


@given(internal_v4)
def test_every_form_of_an_internal_ipv4_address_is_internal(ip):
    for form in _forms(ip):
        assert internal_reason(form) is not None, form


@given(global_v4)
def test_a_global_ipv4_address_is_global_in_every_form_but_teredo(ip):
    plain, mapped, nat64, sixtofour, teredo = _forms(ip)
    for form in (plain, mapped, nat64, sixtofour):
        assert internal_reason(form) is None, form
    assert internal_reason(teredo) is not None  # a tunnel endpoint: never dialed


@given(st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))
def test_the_classifier_agrees_with_ipaddress_on_plain_ipv6(ip):
    embeds = ip.ipv4_mapped or ip.sixtofour or ip.teredo or int(ip) >> 32 == 0x64FF9B << 64
    if not embeds and int(ip) >> 32 != 0:
        assert (internal_reason(str(ip)) is None) == (
            ip.is_global and not ip.is_multicast and not ip.is_reserved
        )


@pytest.mark.parametrize(
    "address",
    [
        "::1",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::",
        "255.255.255.255",
        "169.254.169.254",
        "100.64.0.1",
        "64:ff9b::a9fe:a9fe",
    ],
)
def test_known_internal_addresses(address):
    assert internal_reason(address) is not None


def test_numeric_spellings_resolve_to_loopback():
    # what getaddrinfo makes of them (the guard sees its answer, never the spelling)
    for spelling in ("2130706433", "0x7f.1", "0177.0.0.1"):
        infos = socket.getaddrinfo(spelling, None, type=socket.SOCK_STREAM)
        assert {i[4][0] for i in infos} == {"127.0.0.1"}
        assert internal_reason(infos[0][4][0]) == "loopback"


def test_own_addresses_added_later_are_seen_by_an_answer_already_given() -> None:
    """is_own keeps its answers (a plain request asks for each), and an address
    elbasy starts listening on later (a listener bound after the rules were
    made) is seen at once, not hidden behind a kept "no"."""
    d = Destinations(own=[("127.0.0.1", 8080)])
    assert d.is_own("127.0.0.1", 8080) and not d.is_own("127.0.0.1", 9090)
    assert not d.is_own("127.0.0.1", 9090)  # kept
    d.add_own("127.0.0.1", 9090)
    assert d.is_own("127.0.0.1", 9090)
    assert not d.is_own("example.com", 8080)  # a name is never an address
