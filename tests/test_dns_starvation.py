"""Names whose DNS never answers cannot starve other clients' lookups (issue 16).

The probe: 20 CONNECTs to names whose DNS never answered (4 resolver
threads, 10 s each) made every other client's new lookup end in 504 for
about 50 s, and SIGTERM then waited 9 s for the stuck lookups.

Here elbasy resolves through a real DNS server on loopback
(``tests/dns_stub.py``: elbasy in a mount namespace of its own with a
``resolv.conf`` naming it) that never answers names under ``.hang.test``
and answers names under ``.ok.test`` with 127.0.0.1 at once. While 20
CONNECTs wait on never-answering names under 20 domains, other clients'
GETs to fresh ``.ok.test`` names (each a lookup of its own) and to IP
literals are answered by the origin within a bound; the stuck CONNECTs get
their 502 at ``--dns-timeout``; and a SIGTERM with 20 more lookups stuck
ends elbasy in under 2 s.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import origins
import pytest
from conftest import Proxy, _start_factory, _stop_all
from dns_stub import DNSStub, namespaces_work

STUCK = 20
DNS_TIMEOUT = 5.0
BOUND = 1.0  # seconds a request to a resolvable name may take meanwhile


@pytest.fixture
def dns() -> Iterator[DNSStub]:
    why = namespaces_work()
    if why is not None:
        pytest.skip(f"cannot point elbasy at a DNS stub: {why}")
    stub = DNSStub()  # getaddrinfo waits 30 s: the names never answer in this test
    yield stub
    stub.close()


def _send_connect(p: Proxy, name: str) -> socket.socket:
    s = p.connect(timeout=DNS_TIMEOUT + 5)
    s.sendall(f"CONNECT {name}:443 HTTP/1.1\r\nHost: {name}:443\r\n\r\n".encode())
    return s


def _timed_get(p: Proxy, host: str, port: int) -> tuple[float, int, bytes]:
    t0 = time.monotonic()
    raw = f"GET http://{host}:{port}/hello HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    resp, _ = origins.send_and_read(p, raw, timeout=10)
    return time.monotonic() - t0, resp.status, resp.body


def test_never_answering_names_do_not_starve_other_lookups(dns: DNSStub, http_origin) -> None:
    start, started = _start_factory()
    try:
        p = start(
            "--dns-timeout",
            str(DNS_TIMEOUT),
            "--allow-internal",
            "*.ok.test",
            prefix=dns.prefix(),
        )
        t0 = time.monotonic()
        # 20 names under 20 domains: 20 lookup threads stuck, no per-domain wait
        stuck = [_send_connect(p, f"www.d{i}.hang.test") for i in range(STUCK)]
        deadline = time.monotonic() + 3
        while sum(1 for n in dns.asked if n.endswith(".hang.test")) < STUCK:
            assert time.monotonic() < deadline, f"elbasy asked the stub only {dns.asked}"
            time.sleep(0.05)
        # meanwhile: fresh names (a lookup each) and IP literals, 4 at a time
        targets = [(f"n{j}.ok.test", http_origin.port) for j in range(40)]
        targets += [("127.0.0.1", http_origin.port)] * 10
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda t: _timed_get(p, *t), targets))
        during = time.monotonic() - t0
        assert during < DNS_TIMEOUT - 0.5, f"the other clients took {during:.1f} s"
        for (host, _), (took, status, body) in zip(targets, results, strict=True):
            assert status == 200 and body == b"hello from origin", (host, status, body)
            assert took < BOUND, f"{host}: {took:.2f} s while {STUCK} lookups were stuck"
        assert all(dns.asked[f"n{j}.ok.test"] >= 1 for j in range(40))
        # the stuck ones are still waiting, then get their one answer at the deadline
        for s in stuck:
            s.settimeout(DNS_TIMEOUT + 3)
            head = origins.Reader(s).read_head()
            waited = time.monotonic() - t0
            assert head is not None and head.startswith(b"HTTP/1.1 502"), head
            assert waited < DNS_TIMEOUT + 2, f"a stuck CONNECT was answered after {waited:.1f} s"
            s.close()
        assert time.monotonic() - t0 >= DNS_TIMEOUT - 0.5  # not before the deadline
        assert p.healthz()["connections"]["open"] == 1
    finally:
        _stop_all(started)


def test_sigterm_does_not_wait_for_stuck_lookups(dns: DNSStub) -> None:
    """A draining worker gives a lookup DRAIN_RESOLVE_NS (0.5 s), then answers
    the drain's 503: the clients, reading their answers and closing as clients
    do, are all told, and elbasy is gone in under 2 s."""
    start, started = _start_factory()
    try:
        p = start("--dns-timeout", "30", "--connect-timeout", "30", prefix=dns.prefix())
        stuck = [_send_connect(p, f"www.d{i}.hang.test") for i in range(STUCK)]
        deadline = time.monotonic() + 3
        while sum(1 for n in dns.asked if n.endswith(".hang.test")) < STUCK:
            assert time.monotonic() < deadline, f"elbasy asked the stub only {dns.asked}"
            time.sleep(0.05)

        def answer(s: socket.socket) -> bytes | None:
            try:
                return origins.Reader(s).read_head()
            finally:
                s.close()

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=STUCK) as pool:
            answers = pool.map(answer, stuck)
            p.proc.send_signal(signal.SIGTERM)
            try:
                code = p.proc.wait(10)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - t0
            p.stopped_by_test = True
            heads = list(answers)
        assert code == 0, (code, p.stderr[-2000:])
        # stuck lookups would hold it until the wait's 10 s; a busy machine adds a little
        assert took < 5.0, f"SIGTERM took {took:.1f} s with {STUCK} lookups stuck"
        for head in heads:
            assert head is not None and head.startswith(b"HTTP/1.1 503"), head
            assert b"Retry-After" in head, head
    finally:
        _stop_all(started)
