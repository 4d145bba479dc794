"""Forward at T: a policy holds requests on the loop's timer while other traffic flows.

The loop runs in this process (a real listener, real sockets) with a policy
that asks for a departure time through a query parameter, the way the
quota policy will ask for the departure its reservation gives.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import origins
import pytest

from elbasy.cli import build_config
from elbasy.policy import Exchange, Proxy
from elbasy.server import Worker
from elbasy.verdicts import Forward, Intercept, Reply

SHOP = "shop1.myshopify.com"
GLOB = "*.myshopify.com"


class Holding(Proxy):
    """Holds a request for ``?hold=S`` seconds; ``&again=S`` moves it once more at departure."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.departures: list[float] = []
        self.abandoned_targets: list[str] = []
        self.again: dict[int, float] = {}

    def _hold(self, v: Reply | Forward) -> Reply | Forward:
        if not isinstance(v, Forward):
            return v
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(v.ticket.target).query))
        if "hold" not in query:
            return v
        if "again" in query:
            self.again[id(v.ticket)] = float(query["again"])
        return v._replace(depart=time.monotonic() + float(query["hold"]))

    def on_request(self, head: bytes, client: str) -> Any:
        return self._hold(super().on_request(head, client))

    def on_intercepted(self, head: bytes, client: str, site: Intercept) -> Reply | Forward:
        return self._hold(super().on_intercepted(head, client, site))

    def departing(self, ex: Exchange) -> float | None:
        self.departures.append(time.monotonic())
        again = self.again.pop(id(ex), None)
        return time.monotonic() + again if again else None

    def abandoned(self, ex: Exchange) -> None:
        self.abandoned_targets.append(ex.target)
        super().abandoned(ex)


class Running:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.port = worker.address[1]
        self.policy: Holding = worker.policy  # type: ignore[assignment]
        self.thread = threading.Thread(target=worker.serve, daemon=True)
        self.thread.start()

    def stats(self) -> dict[str, Any]:
        return self.worker.loop.stats()


@pytest.fixture
def shop(test_ca: origins.TestCA, tmp_path: Path) -> Iterator[origins.HTTPOrigin]:
    cert, key = origins.make_leaf(test_ca, tmp_path, names=(GLOB, "localhost"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    o = origins.HTTPOrigin(tls=ctx)
    yield o
    o.close()


@pytest.fixture
def running(shop: origins.HTTPOrigin, test_ca: origins.TestCA, tmp_path: Path) -> Iterator[Running]:
    config = build_config(
        listen="127.0.0.1:0",
        intercept=[GLOB],
        data_dir=str(tmp_path / "data"),
        upstream_ca=str(test_ca.path),
        connect_to=[f"{GLOB}:443:127.0.0.1:{shop.port}"],
        log_level="warning",
    )
    worker = Worker(config, Holding)
    r = Running(worker)
    yield r
    worker.stop()
    r.thread.join(5)
    assert not r.thread.is_alive()
    worker.close()


def tls_session(r: Running, data_dir: Path) -> ssl.SSLSocket:
    s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
    s.sendall(f"CONNECT {SHOP}:443 HTTP/1.1\r\n\r\n".encode())
    head = origins.Reader(s).read_head()
    assert head is not None and head.startswith(b"HTTP/1.1 200")
    ctx = ssl.create_default_context(cafile=str(data_dir / "ca.pem"))
    return ctx.wrap_socket(s, server_hostname=SHOP)


def get(sock: socket.socket, path: str, host: str = SHOP) -> origins.Response:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return origins.read_response(origins.Reader(sock))


def test_held_request_departs_at_its_time_while_others_flow(
    running: Running, tmp_path: Path
) -> None:
    done: dict[str, float] = {}

    def held() -> None:
        with tls_session(running, tmp_path / "data") as s:
            get(s, "/hello")  # warm: handshakes out of the timing
            t0 = time.monotonic()
            r = get(s, "/hello?hold=0.8")
            done["held"] = time.monotonic() - t0
            assert r.body == b"hello from origin"

    t = threading.Thread(target=held)
    t.start()
    with tls_session(running, tmp_path / "data") as s:
        time.sleep(0.2)  # the held request is waiting now
        t0 = time.monotonic()
        for _ in range(10):
            assert get(s, "/hello").status == 200
        quick = time.monotonic() - t0
        assert running.stats()["held"]["waiting"] == 1
    t.join(10)
    assert 0.8 <= done["held"] < 1.6, done
    assert quick < 0.6, quick  # ten exchanges passed the held one
    stats = running.stats()
    assert stats["held"] == {"total": 1, "waiting": 0}
    assert len(running.policy.departures) == 1


def test_departure_confirmed_later_waits_again(running: Running, tmp_path: Path) -> None:
    with tls_session(running, tmp_path / "data") as s:
        get(s, "/hello")
        t0 = time.monotonic()
        r = get(s, "/hello?hold=0.3&again=0.4")
        took = time.monotonic() - t0
    assert r.status == 200
    assert 0.7 <= took < 1.4, took
    assert len(running.policy.departures) == 2  # asked at 0.3 s, moved, asked again


def test_plain_http_forward_is_held_too(running: Running) -> None:
    origin = origins.HTTPOrigin()
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as s:
            t0 = time.monotonic()
            r = get(s, f"{origin.base}/hello?hold=0.5", host=origin.hostport)
            took = time.monotonic() - t0
        assert r.body == b"hello from origin"
        assert 0.5 <= took < 1.2, took
    finally:
        origin.close()


def test_client_leaving_while_held_returns_the_request(
    running: Running, shop: origins.HTTPOrigin, tmp_path: Path
) -> None:
    s = tls_session(running, tmp_path / "data")
    get(s, "/hello")
    s.sendall(f"GET /hello?hold=5 HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
    deadline = time.monotonic() + 5
    while running.stats()["held"]["waiting"] != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    s.close()
    while running.stats()["held"]["waiting"] != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = running.stats()
    assert stats["held"] == {"total": 1, "waiting": 0}
    assert stats["counters"]["abandoned_while_held"] == 1
    assert running.policy.abandoned_targets == [f"https://{SHOP}/hello?hold=5"]
    assert running.policy.departures == []  # never departed
    assert running.policy.counters["abandoned_while_held"] == 1
    assert len(shop.requests_for("/hello")) == 1  # only the first ever reached the origin
