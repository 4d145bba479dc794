"""The mock third-party APIs follow api-limits.md part 4 exactly, over real HTTP on loopback."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import origins
import pytest
from mockapis import (
    EtsyMock,
    ManualClock,
    MockServer,
    ShopifyMock,
    query_cost,
    start_etsy,
    start_shopify,
    tls_context_for,
)

SHOP = "acme"
HOST = f"{SHOP}.myshopify.com"
TOKEN = "shpat_test"
REST = "/admin/api/2024-10/products.json"
GQL = "/admin/api/2024-10/graphql.json"
LIMIT = "X-Shopify-Shop-Api-Call-Limit"
TOO_MANY_2 = (
    b'{"errors":"Exceeded 2 calls per second for api client. '
    b'Reduce request rates to resume uninterrupted service."}'
)


class Client:
    """A keep-alive client for one mock; TLS with SNI = ``host`` when ``ctx`` is given."""

    def __init__(self, mock: MockServer, host: str, ctx: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=10)
        if ctx is not None:
            raw = socket.create_connection(("127.0.0.1", mock.port), timeout=10)
            self.conn.sock = ctx.wrap_socket(raw, server_hostname=host)

    def call(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        h = {"Host": self.host}
        h.update(headers or {})
        self.conn.request(method, path, body=body, headers=h)
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, resp.headers, data

    def rest(self, token: str | None = TOKEN, path: str = REST, method: str = "GET") -> Any:
        return self.call(method, path, {"X-Shopify-Access-Token": token} if token else {})

    def gql(self, query: str, token: str = TOKEN) -> tuple[int, Any]:
        body = json.dumps({"query": query}).encode()
        headers = {"X-Shopify-Access-Token": token, "Content-Type": "application/json"}
        status, _, data = self.call("POST", GQL, headers, body)
        return status, json.loads(data)

    def etsy(self, key: str | None = "app1", path: str = "/v3/application/shops/1") -> Any:
        return self.call("GET", path, {"x-api-key": key} if key else {})

    def close(self) -> None:
        self.conn.close()


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mock_tls(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for *.myshopify.com and openapi.etsy.com, client context trusting it)."""
    d = tmp_path_factory.mktemp("mockca")
    ca = origins.make_ca(d)
    server = tls_context_for(ca, d / "leaf")
    client = ssl.create_default_context(cafile=str(ca.path))
    return server, client


@pytest.fixture(params=["plain", "tls"])
def transport(
    request: pytest.FixtureRequest, mock_tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    return mock_tls if request.param == "tls" else (None, None)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
def shopify(
    transport: tuple[ssl.SSLContext | None, ssl.SSLContext | None], clock: ManualClock
) -> Iterator[tuple[ShopifyMock, Client]]:
    mock = start_shopify(transport[0], clock)
    client = Client(mock, HOST, transport[1])
    yield mock, client
    client.close()
    mock.close()
    assert not mock.errors


@pytest.fixture
def plain_shopify(clock: ManualClock) -> Iterator[tuple[ShopifyMock, Client]]:
    mock = start_shopify(clock=clock)
    client = Client(mock, HOST)
    yield mock, client
    client.close()
    mock.close()
    assert not mock.errors


def rest_state(mock: ShopifyMock, token: str = TOKEN) -> dict[str, Any]:
    return mock.key_stats(SHOP, token)["rest"]


# -- Shopify REST: the worked vectors ------------------------------------------------------------


def test_shopify_forty_at_one_instant_then_429(shopify: tuple[ShopifyMock, Client]) -> None:
    mock, c = shopify
    for i in range(1, 41):
        status, headers, body = c.rest()
        assert status == 200
        assert headers[LIMIT] == f"{i}/40"
        assert json.loads(body) == {"ok": True, "method": "GET", "path": REST}
    status, headers, body = c.rest()
    assert status == 429
    assert headers[LIMIT] == "40/40"
    assert headers["Retry-After"] == "2.0"
    assert headers["Content-Type"] == "application/json"
    assert body == TOO_MANY_2
    st = mock.stats()
    assert list(st["keys"]) == [f"{SHOP}/{TOKEN}"]
    r = st["keys"][f"{SHOP}/{TOKEN}"]["rest"]
    assert (r["accepted"], r["throttled"], r["peak_used"], r["level"]) == (40, 1, 40, 40.0)
    assert st["totals"]["accepted"] == 40 and st["totals"]["throttled"] == 1


def test_shopify_level_39_after_ten_seconds_shows_20(shopify: tuple[ShopifyMock, Client]) -> None:
    mock, c = shopify
    for _ in range(39):
        c.rest()
    assert rest_state(mock)["level"] == 39.0
    mock.advance(10.0)
    assert rest_state(mock)["level"] == pytest.approx(19.0)
    status, headers, _ = c.rest()
    assert (status, headers[LIMIT]) == (200, "20/40")


def test_shopify_missing_token_is_401_and_leaves_the_bucket(
    plain_shopify: tuple[ShopifyMock, Client],
) -> None:
    mock, c = plain_shopify
    for _ in range(5):
        c.rest()
    status, headers, body = c.rest(token=None)
    assert status == 401
    assert LIMIT not in headers
    assert json.loads(body) == {
        "errors": "[API] Invalid API key or access token (unrecognized login or wrong password)"
    }
    assert rest_state(mock)["level"] == 5.0
    assert c.rest()[1][LIMIT] == "6/40"
    assert mock.stats()["totals"]["unauthorized"] == 1


def test_shopify_keys_are_shop_and_token(plain_shopify: tuple[ShopifyMock, Client]) -> None:
    mock, c = plain_shopify
    for _ in range(3):
        c.rest()
    assert c.rest(token="other")[1][LIMIT] == "1/40"  # another app on the same shop
    other = Client(mock, "globex.myshopify.com")
    assert other.rest()[1][LIMIT] == "1/40"  # the same app on another shop
    headers = {"X-Shopify-Access-Token": TOKEN, "X-Mock-Shop": SHOP}  # overrides the Host
    assert other.call("GET", REST, headers)[1][LIMIT] == "4/40"
    other.close()
    assert sorted(mock.stats()["keys"]) == ["acme/other", "acme/shpat_test", "globex/shpat_test"]


def test_shopify_shop_from_sni_without_host(
    mock_tls: tuple[ssl.SSLContext, ssl.SSLContext], clock: ManualClock
) -> None:
    mock = start_shopify(mock_tls[0], clock)
    try:
        raw = socket.create_connection(("127.0.0.1", mock.port), timeout=5)
        s = mock_tls[1].wrap_socket(raw, server_hostname="initech.myshopify.com")
        s.sendall(f"GET {REST} HTTP/1.1\r\nX-Shopify-Access-Token: t\r\n\r\n".encode())
        resp = origins.read_response(origins.Reader(s))
        s.close()
        assert resp.status == 200
        assert list(mock.stats()["keys"]) == ["initech/t"]
    finally:
        mock.close()


def test_shopify_exact_retry_after(plain_shopify: tuple[ShopifyMock, Client]) -> None:
    mock, c = plain_shopify
    mock.configure(shop=SHOP, retry_after_mode="exact")
    for _ in range(40):
        c.rest()
    status, headers, _ = c.rest()
    assert (status, headers["Retry-After"], headers[LIMIT]) == (429, "0.5", "40/40")
    mock.advance(0.25)  # level 39.5: one marble fits after 0.25 s more -> ceil to 0.3
    status, headers, _ = c.rest()
    assert (status, headers["Retry-After"]) == (429, "0.3")
    mock.advance(0.3)
    status, headers, _ = c.rest()
    assert (status, headers[LIMIT]) == (200, "40/40")
    assert rest_state(mock)["level"] == pytest.approx(39.9)
    mock.advance(0.04)  # level 39.82: needs 0.82 more marbles' room... 0.41 s
    status, headers, _ = c.rest()
    assert (status, headers["Retry-After"]) == (429, "0.5")


def test_shopify_plus_plan_and_scale(plain_shopify: tuple[ShopifyMock, Client]) -> None:
    mock, c = plain_shopify
    mock.configure(shop=SHOP, plan="plus")
    for i in range(1, 401):
        status, headers, _ = c.rest()
        assert (status, headers[LIMIT]) == (200, f"{i}/400")
    status, headers, body = c.rest()
    assert (status, headers[LIMIT], headers["Retry-After"]) == (429, "400/400", "2.0")
    assert json.loads(body)["errors"].startswith("Exceeded 20 calls per second")
    mock.advance(1.0)
    assert c.rest()[1][LIMIT] == "381/400"
    # standard x10: C stays 40, R becomes 20
    mock.configure(shop="fast", plan="standard", scale=10)
    fast = Client(mock, "fast.myshopify.com")
    for _ in range(40):
        fast.rest()
    status, _, body = fast.rest()
    assert status == 429 and json.loads(body)["errors"].startswith("Exceeded 20 calls")
    mock.advance(1.0)
    assert fast.rest()[1][LIMIT] == "21/40"
    fast.close()
    mock.configure(shop="custom", plan="custom", capacity=10, leak_rate=0.5)
    cust = Client(mock, "custom.myshopify.com")
    assert [cust.rest()[1][LIMIT] for _ in range(11)][-2:] == ["10/10", "10/10"]
    cust.close()


def test_shopify_outside_traffic_adds_marbles(plain_shopify: tuple[ShopifyMock, Client]) -> None:
    mock, c = plain_shopify
    mock.configure(shop=SHOP, token=TOKEN, outside_traffic_rps=5)
    mock.advance(2.0)  # 10 outside marbles, 0.2 s apart, leaking 0.4 between: level 6.4
    status, headers, _ = c.rest()
    assert (status, headers[LIMIT]) == (200, "8/40")
    r = rest_state(mock)
    assert (r["outside_accepted"], r["outside_throttled"]) == (10, 0)
    assert r["level"] == pytest.approx(7.4)


def test_shopify_outside_marbles_on_a_full_bucket_are_throttled(
    plain_shopify: tuple[ShopifyMock, Client],
) -> None:
    mock, c = plain_shopify
    mock.configure(
        shop=SHOP, token=TOKEN, plan="custom", capacity=5, leak_rate=1, outside_traffic_rps=10
    )
    mock.advance(1.0)  # levels 1, 1.9, 2.8, 3.7, 4.6, then 5.5.. 5.1 do not fit: level 4.1
    status, headers, _ = c.rest()
    assert (status, headers[LIMIT]) == (429, "5/5")
    r = rest_state(mock)
    assert (r["outside_accepted"], r["outside_throttled"]) == (5, 5)
    assert (r["accepted"], r["throttled"]) == (0, 1)
    totals = mock.stats()["totals"]
    assert (totals["outside_accepted"], totals["outside_throttled"]) == (5, 5)


def test_shopify_resource_throttle_with_room_in_the_bucket(
    plain_shopify: tuple[ShopifyMock, Client], clock: ManualClock
) -> None:
    mock, c = plain_shopify
    paths = ["products.json", "products/*/variants.json"]
    mock.configure(shop=SHOP, resource_throttle_paths=paths, daily_cap=2)
    assert c.rest(method="POST")[0] == 200
    assert c.rest(method="POST", path="/admin/api/2024-10/products/7/variants.json")[0] == 200
    status, headers, body = c.rest(method="POST")
    assert (status, headers[LIMIT]) == (429, "3/40")
    assert "Retry-After" not in headers
    assert json.loads(body) == {"errors": "Daily variant creation limit reached, throttle applied"}
    assert c.rest(path="/admin/api/2024-10/orders.json")[0] == 200
    r = rest_state(mock)
    assert (r["accepted"], r["throttled"], r["resource_throttled"]) == (3, 1, 1)
    clock.set(86400.0 * 2)  # the next calendar day
    assert c.rest(method="POST")[0] == 200


def test_shopify_control_routes_over_http(plain_shopify: tuple[ShopifyMock, Client]) -> None:
    mock, c = plain_shopify
    ctl = Client(mock, "127.0.0.1")

    def post(path: str, obj: Any) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        status, _, body = ctl.call("POST", path, headers, json.dumps(obj).encode())
        return status, json.loads(body)

    assert post("/__mock/config", {"shop": SHOP, "plan": "plus"}) == (200, {"ok": True})
    assert post("/__mock/config", {"shop": SHOP, "plan": "gold"})[0] == 400
    assert post("/__mock/config", {"bogus_setting": 1})[0] == 400
    assert c.rest()[1][LIMIT] == "1/400"  # the bad config was not applied
    assert post("/__mock/clock/advance", {"seconds": 0.5}) == (200, {"now": 1000.5})
    status, _, body = ctl.call("GET", "/__mock/state")
    state = json.loads(body)
    assert status == 200 and state["now"] == 1000.5
    assert state["keys"][f"{SHOP}/{TOKEN}"]["rest"]["accepted"] == 1
    assert post("/__mock/reset", {}) == (200, {"ok": True})
    assert json.loads(ctl.call("GET", "/__mock/state")[2])["keys"] == {}
    assert ctl.call("GET", "/nope")[0] == 404
    ctl.close()


def test_clock_advance_needs_a_manual_clock() -> None:
    mock = start_shopify()
    c = Client(mock, HOST)
    status, _, _ = c.call("POST", "/__mock/clock/advance", {}, b'{"seconds": 1}')
    assert status == 409
    c.close()
    mock.close()


# -- Shopify GraphQL -----------------------------------------------------------------------------


def test_graphql_cost_rule() -> None:
    assert query_cost("{ shop { name } }") == 1
    q = "{ products(first: 50) { edges { node { variants(first:10) { edges { id } } } } } }"
    assert query_cost(q) == 61
    assert query_cost("{ orders(last: 5, after: $c) { id } }") == 6
    assert query_cost("query($n: Int) { orders(first: $n) { id } }") == 1


def test_graphql_take_refund_throttle_and_max_cost(
    shopify: tuple[ShopifyMock, Client],
) -> None:
    mock, c = shopify
    mock.configure(shop=SHOP, graphql_plan="legacy", actual_fraction=0.6)
    status, body = c.gql("{ products(first: 100) { id } }")  # 101 requested, ceil(60.6) actual
    assert status == 200
    assert body == {
        "data": {"mock": {"requestedQueryCost": 101}},
        "extensions": {
            "cost": {
                "requestedQueryCost": 101,
                "actualQueryCost": 61,
                "throttleStatus": {
                    "maximumAvailable": 1000.0,
                    "currentlyAvailable": 939,
                    "restoreRate": 50.0,
                },
            }
        },
    }
    mock.configure(shop=SHOP, actual_fraction=1.0)
    cost = c.gql("{ a(first: 800) { id } }")[1]["extensions"]["cost"]
    assert cost["throttleStatus"]["currentlyAvailable"] == 138
    status, body = c.gql("{ a(first: 200) { id } }")  # 201 > 138: THROTTLED, nothing taken
    assert status == 200
    assert body == {
        "errors": [
            {
                "message": "Throttled",
                "extensions": {
                    "code": "THROTTLED",
                    "documentation": "https://shopify.dev/api/usage/rate-limits",
                },
            }
        ],
        "extensions": {
            "cost": {
                "requestedQueryCost": 201,
                "actualQueryCost": None,
                "throttleStatus": {
                    "maximumAvailable": 1000.0,
                    "currentlyAvailable": 138,
                    "restoreRate": 50.0,
                },
            }
        },
    }
    g = mock.key_stats(SHOP, TOKEN)["graphql"]
    assert (g["available"], g["accepted"], g["throttled"]) == (138.0, 2, 1)
    status, body = c.gql("{ a(first: 1000) { id } }")  # 1001 > 1000: rejected before the bucket
    assert status == 200
    assert body["errors"][0]["extensions"] == {
        "code": "MAX_COST_EXCEEDED",
        "cost": 1001,
        "maxCost": 1000,
    }
    assert mock.key_stats(SHOP, TOKEN)["graphql"]["available"] == 138.0
    mock.advance(1.26)  # +63 points: 201 fits exactly
    status, body = c.gql("{ a(first: 200) { id } }")
    assert body["extensions"]["cost"]["throttleStatus"]["currentlyAvailable"] == 0
    mock.configure(shop=SHOP, graphql_throttle_status=429)
    status, body = c.gql("{ shop { name } }")
    assert status == 429 and body["errors"][0]["extensions"]["code"] == "THROTTLED"
    st = mock.stats()["totals"]
    assert (st["graphql_accepted"], st["graphql_throttled"], st["graphql_max_cost_exceeded"]) == (
        3,
        2,
        1,
    )
    assert mock.key_stats(SHOP, TOKEN)["rest"]["accepted"] == 0  # REST bucket untouched


def test_graphql_plans_and_outside_points(plain_shopify: tuple[ShopifyMock, Client]) -> None:
    mock, c = plain_shopify
    ts = c.gql("{ shop { name } }")[1]["extensions"]["cost"]["throttleStatus"]
    assert ts == {"maximumAvailable": 2000.0, "currentlyAvailable": 1999, "restoreRate": 100.0}
    mock.configure(shop="big", plan="plus")
    big = Client(mock, "big.myshopify.com")
    ts = big.gql("{ shop { name } }")[1]["extensions"]["cost"]["throttleStatus"]
    assert ts == {"maximumAvailable": 20000.0, "currentlyAvailable": 19999, "restoreRate": 1000.0}
    big.close()
    mock.configure(shop="o", token=TOKEN, graphql_plan="legacy", graphql_outside_rps=100)
    o = Client(mock, "o.myshopify.com")
    mock.advance(1.0)  # 10 outside queries of 10 points, +5 restored between each: 945
    ts = o.gql("{ shop { name } }")[1]["extensions"]["cost"]["throttleStatus"]
    assert ts["currentlyAvailable"] == 944
    assert mock.key_stats("o", TOKEN)["graphql"]["outside_accepted"] == 10
    o.close()


def test_graphql_chunked_and_raw_bodies(plain_shopify: tuple[ShopifyMock, Client]) -> None:
    mock, _ = plain_shopify
    s = socket.create_connection(("127.0.0.1", mock.port), timeout=5)
    body = json.dumps({"query": "{ p(first: 9) { id } }"}).encode()
    half = len(body) // 2
    chunks = b"%x\r\n%s\r\n%x;ext=1\r\n%s\r\n0\r\n\r\n" % (
        half,
        body[:half],
        len(body) - half,
        body[half:],
    )
    head = (
        f"POST {GQL} HTTP/1.1\r\nHost: {HOST}\r\nX-Shopify-Access-Token: {TOKEN}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    s.sendall(head.encode() + chunks)
    reader = origins.Reader(s)
    resp = origins.read_response(reader)
    assert json.loads(resp.body)["extensions"]["cost"]["requestedQueryCost"] == 10
    raw = b"{ p(last: 4) { id } }"
    head = (
        f"POST {GQL} HTTP/1.1\r\nHost: {HOST}\r\nX-Shopify-Access-Token: {TOKEN}\r\n"
        f"Content-Type: application/graphql\r\nContent-Length: {len(raw)}\r\n"
        "Connection: close\r\n\r\n"
    )
    s.sendall(head.encode() + raw)
    resp = origins.read_response(reader)
    assert resp.headers.get("Connection") == "close"
    assert json.loads(resp.body)["extensions"]["cost"]["requestedQueryCost"] == 5
    assert reader.read_to_eof() == b""
    s.close()


# -- Etsy ---------------------------------------------------------------------------------------


@pytest.fixture
def etsy(
    transport: tuple[ssl.SSLContext | None, ssl.SSLContext | None],
) -> Iterator[tuple[EtsyMock, Client, ManualClock]]:
    clk = ManualClock(0.0)
    mock = start_etsy(transport[0], clk, qps=10, qpd=30, sub_buckets=12)
    client = Client(mock, "openapi.etsy.com", transport[1])
    yield mock, client, clk
    client.close()
    mock.close()
    assert not mock.errors


def _ok(c: Client, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        status, h, _ = c.etsy()
        assert status == 200
        assert (h["x-limit-per-second"], h["x-limit-per-day"]) == ("10", "30")
        out.append((h["x-remaining-this-second"], h["x-remaining-today"]))
    return out


def _too_many(c: Client, limit: str, retry: int) -> None:
    status, h, body = c.etsy()
    assert status == 429
    assert (h["retry-after"], h["x-mock-limit"]) == (str(retry), limit)
    assert not [n for n in h if n.lower().startswith(("x-limit", "x-remaining"))]
    assert json.loads(body) == {
        "error": "You have exceeded your rate limit. Please try again later."
    }


@pytest.mark.parametrize("count_rejected", [False, True])
def test_etsy_worked_vectors(
    etsy: tuple[EtsyMock, Client, ManualClock], count_rejected: bool
) -> None:
    mock, c, clk = etsy
    mock.configure(count_rejected=count_rejected)
    clk.set(100.2)  # vector 1
    assert _ok(c, 10) == [(str(9 - i), str(29 - i)) for i in range(10)]
    _too_many(c, "qps", 1)
    clk.set(101.0)  # vector 2
    extra = 1 if count_rejected else 0  # the rejected one counted in the day
    assert [t for _, t in _ok(c, 10)] == [str(19 - i - extra) for i in range(10)]
    clk.set(102.0)  # vector 3
    if not count_rejected:
        assert [t for _, t in _ok(c, 10)] == [str(9 - i) for i in range(10)]
        _too_many(c, "qps", 1)  # QPS is checked before QPD
    else:
        assert [t for _, t in _ok(c, 9)] == [str(8 - i) for i in range(9)]
        _too_many(c, "qpd", 12 * 7200 - 102)
        _too_many(c, "qps", 1)  # the counted rejection filled this second
    clk.set(103.0)
    _too_many(c, "qpd", 86297)
    clk.set(86400.0)  # vector 4: bucket 0 leaves the window
    assert _ok(c, 1) == [("9", "29")]
    k = mock.key_stats("app1")
    assert k["accepted"] == (30 if count_rejected else 31)
    assert (k["throttled_qps"], k["throttled_qpd"]) == ((2, 2) if count_rejected else (2, 1))
    assert mock.stats()["totals"]["throttled"] == k["throttled"]


def test_etsy_key_and_401(etsy: tuple[EtsyMock, Client, ManualClock]) -> None:
    mock, c, clk = etsy
    clk.set(5.0)
    assert _ok(c, 1) == [("9", "29")]
    status, h, _ = c.etsy(key="app1:shared-secret")
    assert (status, h["x-remaining-this-second"]) == (200, "8")
    status, _, body = c.etsy(key=None)
    assert (status, json.loads(body)) == (401, {"error": "Missing API key"})
    assert c.etsy(key="app2")[1]["x-remaining-this-second"] == "9"
    assert c.etsy(path="/v2/other")[0] == 404
    assert mock.stats()["totals"]["unauthorized"] == 1
    assert sorted(mock.stats()["keys"]) == ["app1", "app2"]


def test_etsy_outside_traffic(etsy: tuple[EtsyMock, Client, ManualClock]) -> None:
    mock, c, clk = etsy
    clk.set(50.0)
    mock.configure(key="app1", outside_traffic_rps=4)
    clk.set(52.0)  # 8 outside requests (50.25 .. 52.0); the one at 52.0 is in this second
    status, h, _ = c.etsy()
    assert (h["x-remaining-this-second"], h["x-remaining-today"]) == ("8", "21")
    k = mock.key_stats("app1")
    assert (k["outside_accepted"], k["outside_throttled"], k["accepted"]) == (8, 0, 1)


# -- concurrency and load -----------------------------------------------------------------------


def test_shopify_concurrent_one_key_real_time() -> None:
    mock = start_shopify(plan="standard", scale=10)  # C=40, R=20, wall clock
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        c = Client(mock, HOST)
        try:
            mine = []
            for _ in range(20):
                status, h, _ = c.rest()
                mine.append((status, h[LIMIT]))
            with lock:
                results.extend(mine)
        except BaseException as e:
            errors.append(e)
        finally:
            c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - t0
    try:
        assert not errors and not mock.errors
        ok = [u for s, u in results if s == 200]
        limited = [u for s, u in results if s == 429]
        assert len(ok) + len(limited) == 1000
        r = mock.key_stats(SHOP, TOKEN)["rest"]
        assert (r["accepted"], r["throttled"]) == (len(ok), len(limited))
        assert r["accepted"] + r["throttled"] == 1000
        assert all(u == "40/40" for u in limited)
        used = [int(u.split("/")[0]) for u in ok]
        assert all(1 <= x <= 40 for x in used) and r["peak_used"] <= 40
        assert r["peak_level"] <= 40 + 1e-9 and 0 <= r["level"] <= 40
        # what was accepted fits the bucket: at most C plus what leaked meanwhile
        assert 40 <= r["accepted"] <= 40 + 20 * elapsed + 1
        assert mock.stats()["totals"]["accepted"] == r["accepted"]
    finally:
        mock.close()


def test_two_hundred_keep_alive_connections() -> None:
    mock = start_etsy(qps=1_000_000, qpd=10_000_000)
    socks = [socket.create_connection(("127.0.0.1", mock.port), timeout=10) for _ in range(200)]
    req = b"GET /v3/application/x HTTP/1.1\r\nHost: openapi.etsy.com\r\nx-api-key: k\r\n\r\n"
    try:
        t0 = time.monotonic()
        for _ in range(5):
            for s in socks:
                s.sendall(req)
            for s in socks:
                assert origins.read_response(origins.Reader(s)).status == 200
        elapsed = time.monotonic() - t0
        assert mock.stats()["totals"]["accepted"] == 1000
        assert mock.connections == 200
        assert elapsed < 10
    finally:
        for s in socks:
            s.close()
        mock.close()


def test_tls_context_for_names(tmp_path: Path) -> None:
    ca = origins.make_ca(tmp_path)
    ctx = tls_context_for(ca, tmp_path / "leaf", names=("openapi.etsy.com",))
    mock = start_etsy(ctx)
    client_ctx = ssl.create_default_context(cafile=str(ca.path))
    c = Client(mock, "openapi.etsy.com", client_ctx)
    try:
        assert c.etsy()[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            Client(mock, "acme.myshopify.com", client_ctx)
    finally:
        c.close()
        mock.close()


def test_http10_expect_continue_and_head() -> None:
    mock = start_etsy()
    try:
        s = socket.create_connection(("127.0.0.1", mock.port), timeout=5)
        s.sendall(b"GET /v3/application/x HTTP/1.0\r\nx-api-key: k\r\n\r\n")
        reader = origins.Reader(s)
        resp = origins.read_response(reader)
        assert resp.status == 200 and resp.headers.get("Connection") == "close"
        assert reader.read_to_eof() == b""
        s.close()
        s = socket.create_connection(("127.0.0.1", mock.port), timeout=5)
        s.sendall(
            b"POST /v3/application/y HTTP/1.1\r\nx-api-key: k\r\nContent-Length: 3\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        reader = origins.Reader(s)
        assert reader.read_head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"abc")
        assert origins.read_response(reader).status == 200
        s.sendall(b"HEAD /v3/application/z HTTP/1.1\r\nx-api-key: k\r\n\r\n")
        resp = origins.read_response(reader, method="HEAD")
        assert resp.status == 200 and resp.body == b""
        assert int(resp.headers.get("Content-Length") or 0) > 0
        s.close()
        assert mock.stats()["totals"]["accepted"] == 3
    finally:
        mock.close()
