"""Forward at T: a policy holds requests on the loop's timer while other traffic flows.

The loop runs in this process (a real listener, real sockets) with a policy
that asks for a departure time through a query parameter, the way the
quota policy will ask for the departure its reservation gives.
"""

from __future__ import annotations

import hashlib
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

from elbasy._loop import Ended
from elbasy.cli import build_config
from elbasy.policy import COUNTERS, Exchange, Policy
from elbasy.server import Worker
from elbasy.verdicts import ABANDONED, NOW, Forward, Intercept, Reply, ResponsePlan

SHOP = "shop1.myshopify.com"
GLOB = "*.myshopify.com"


class Holding(Policy):
    """Holds a request for ``?hold=S`` seconds; ``&again=S`` moves it once more at departure."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.departures: list[float] = []
        self.abandoned_targets: list[str] = []
        self.again: dict[int, float] = {}
        self.bodies: list[bytes] = []
        self.response_bodies: list[bytes] = []
        self.retries: list[str] = []

    def _hold(self, v: Reply | Forward) -> Reply | Forward:
        if not isinstance(v, Forward):
            return v
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(v.ticket.target).query))
        if "hold" not in query:
            return v
        if "again" in query:
            self.again[id(v.ticket)] = float(query["again"])
        return v._replace(depart=time.monotonic() + float(query["hold"]))

    def on_request(self, head: bytes, client: str, site: Intercept | None = None) -> Any:
        return self._peek(self._hold(super().on_request(head, client, site)))

    def departing(self, ex: Exchange) -> float:
        self.departures.append(time.monotonic())
        again = self.again.pop(id(ex), None)
        return time.monotonic() + again if again else NOW

    def ended(self, ex: Exchange | None, end: Ended) -> bytes | None:
        if end.kind == ABANDONED:
            assert ex is not None
            self.abandoned_targets.append(ex.target)
        return super().ended(ex, end)

    # a body-priced request (?peek=N): the body says how long to hold it
    def _peek(self, v: Reply | Forward) -> Reply | Forward:
        if isinstance(v, Forward) and "peek=" in v.ticket.target:
            return v._replace(peek=int(v.ticket.target.rsplit("peek=", 1)[1]))
        return v

    def on_body(self, ex: Exchange, body: bytes) -> float | Reply:
        self.bodies.append(body)
        if body.startswith(b"refuse"):
            return Reply(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 4\r\n\r\nnope", True)
        hold = float(body[5 : body.index(b";")]) if body.startswith(b"hold=") else 0.0
        return time.monotonic() + hold

    # responses: ?capture=N shows the body; a 429 for ?retry is sent again
    def on_response(self, ex: Exchange, head: bytes) -> ResponsePlan:
        plan = super().on_response(ex, head)
        if "retry" in ex.target and plan.status == 429:
            self.retries.append(ex.target)
            return plan._replace(retry_at=time.monotonic() + 0.3)
        if "capture=" in ex.target:
            return plan._replace(capture=int(ex.target.rsplit("capture=", 1)[1]))
        return plan

    def on_response_body(self, ex: Exchange, body: bytes) -> None:
        self.response_bodies.append(body)


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
    o = origins.HTTPOrigin(tls=origins.server_context(test_ca, tmp_path, (GLOB, "localhost")))
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
        allow_internal=["127.0.0.1"],  # the plain http:// origin
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
            r = get(s, "/hello?hold=1.0")
            done["held"] = time.monotonic() - t0
            assert r.body == b"hello from origin"

    t = threading.Thread(target=held)
    t.start()
    with tls_session(running, tmp_path / "data") as s:
        deadline = time.monotonic() + 5
        while running.stats()["held"]["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the held request is waiting (its handshake first)
        t0 = time.monotonic()
        for _ in range(10):
            assert get(s, "/hello").status == 200
        quick = time.monotonic() - t0
        still = running.stats()["held"]["waiting"]
    t.join(10)
    assert 1.0 <= done["held"] < 1.8, done
    assert quick < 0.8 and still == 1, (quick, still)  # ten exchanges passed the held one
    stats = running.stats()
    assert stats["held"] == {
        "total": 1,
        "waiting": 0,
        "retried_after_refusal": 0,
        "clients_left": 0,
    }
    assert len(running.policy.departures) == 1


def test_departure_confirmed_later_waits_again(running: Running, tmp_path: Path) -> None:
    with tls_session(running, tmp_path / "data") as s:
        get(s, "/hello")
        t0 = time.monotonic()
        r = get(s, "/hello?hold=0.3&again=0.4")
        took = time.monotonic() - t0
    assert r.status == 200
    assert 0.7 <= took < 2.0, took
    assert len(running.policy.departures) == 2  # asked at 0.3 s, moved, asked again


def test_departure_already_past_is_still_confirmed(running: Running, tmp_path: Path) -> None:
    """A departure time the loop reads after it passed (the policy's clocks are read a
    moment after the loop's) is still confirmed with ``departing`` before it leaves:
    the policy counts what it sent there."""
    with tls_session(running, tmp_path / "data") as s:
        get(s, "/hello")
        assert get(s, "/hello?hold=-1").status == 200
        assert len(running.policy.departures) == 1
        # moved at departure to a time that is already past: asked once more
        assert get(s, "/hello?hold=-1&again=-1").status == 200
        assert len(running.policy.departures) == 3
    assert running.stats()["held"]["total"] == 2


def test_plain_http_forward_is_held_too(running: Running) -> None:
    origin = origins.HTTPOrigin()
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as s:
            t0 = time.monotonic()
            r = get(s, f"{origin.base}/hello?hold=0.5", host=origin.hostport)
            took = time.monotonic() - t0
        assert r.body == b"hello from origin"
        assert 0.5 <= took < 1.8, took
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
    assert stats["held"] == {
        "total": 1,
        "waiting": 0,
        "retried_after_refusal": 0,
        "clients_left": 1,
    }
    # one event, one counter: /healthz merges the policy's counters into
    # the loop's, so no name may be both (the policy's would hide the loop's)
    assert not set(stats["counters"]) & set(COUNTERS)
    assert running.policy.abandoned_targets == [f"https://{SHOP}/hello?hold=5"]
    assert running.policy.departures == []  # never departed
    assert running.policy.counters["abandoned_while_held"] == 1
    assert len(shop.requests_for("/hello")) == 1  # only the first ever reached the origin


def test_body_seen_before_departure(running: Running, tmp_path: Path) -> None:
    """A policy that prices a request by its body sees it first; it is forwarded whole."""
    with tls_session(running, tmp_path / "data") as s:
        body = b"hold=0.4;" + b"x" * 5000
        t0 = time.monotonic()
        s.sendall(
            f"POST /sha256?peek=65536 HTTP/1.1\r\nHost: {SHOP}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        r = origins.read_response(origins.Reader(s))
        took = time.monotonic() - t0
        assert r.body.decode() == f"{hashlib.sha256(body).hexdigest()} {len(body)}"
        assert 0.4 <= took < 1.8, took
        # a body larger than the peek: the policy sees its first bytes only
        big = b"hold=0;" + b"y" * 100_000
        s.sendall(
            f"POST /sha256?peek=1000 HTTP/1.1\r\nHost: {SHOP}\r\n"
            f"Content-Length: {len(big)}\r\n\r\n".encode()
            + big
        )
        r = origins.read_response(origins.Reader(s))
        assert r.body.decode() == f"{hashlib.sha256(big).hexdigest()} {len(big)}"
        # the policy may answer instead, having seen the body
        s.sendall(
            f"POST /echo?peek=100 HTTP/1.1\r\nHost: {SHOP}\r\nContent-Length: 6\r\n\r\n"
            "refuse".encode()
        )
        r = origins.read_response(origins.Reader(s))
        assert (r.status, r.body) == (400, b"nope")
    assert running.policy.bodies[0] == body
    assert running.policy.bodies[1] == big[:1000]


def test_response_body_shown_to_the_policy(running: Running, tmp_path: Path) -> None:
    with tls_session(running, tmp_path / "data") as s:
        r = get(s, "/chunked?n=3&capture=1000")
        assert r.body == b"chunk-0;chunk-1;chunk-2;"
        r = get(s, "/download?n=50000&capture=100")
        assert len(r.body) == 50000
    shown = running.policy.response_bodies
    assert len(shown) == 2
    assert b"chunk-0;" in shown[0] and shown[0].endswith(b"0\r\n\r\n")  # raw, chunked
    assert shown[1] == r.body[:100]


def test_refused_request_sent_again_without_the_client_seeing_it(
    running: Running, shop: origins.HTTPOrigin, tmp_path: Path
) -> None:
    with tls_session(running, tmp_path / "data") as s:
        t0 = time.monotonic()
        r = get(s, "/refuse-once?key=a&retry=1")
        took = time.monotonic() - t0
        assert (r.status, r.body) == (200, b"ok")
        assert 0.3 <= took < 1.8, took
        assert get(s, "/hello").status == 200  # the connection goes on
    assert len(shop.requests_for("/refuse-once")) == 2
    assert running.policy.retries == [f"https://{SHOP}/refuse-once?key=a&retry=1"]
    assert running.stats()["held"]["retried_after_refusal"] == 1
