"""The mock third-party APIs follow docs/api-limits.md part 4 and the vendors' docs, over HTTP."""

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
    GitHubMock,
    ManualClock,
    MockServer,
    ShopifyMock,
    github_graphql,
    query_cost,
    start_etsy,
    start_github,
    start_shopify,
    tls_context_for,
)
from mockapis.graphql_engine import GraphQLFailure
from mockapis.remote import RemoteMock

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

    def gql(
        self,
        query: str,
        variables: dict[str, Any] | None = None,
        token: str = TOKEN,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        obj: dict[str, Any] = {"query": query}
        if variables is not None:
            obj["variables"] = variables
        h = {"X-Shopify-Access-Token": token, "Content-Type": "application/json"}
        h.update(headers or {})
        status, _, data = self.call("POST", GQL, h, json.dumps(obj).encode())
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


# -- Shopify GraphQL: requested cost from the schema ---------------------------------------------

PRODUCTS_80 = "{ products(first: 80){edges{node{id variants(first: 8){edges{node{id}}}}}} }"


def shopify_error(query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    with pytest.raises(GraphQLFailure) as e:
        query_cost(query, variables)
    assert len(e.value.errors) == 1
    return e.value.errors[0]


def test_graphql_requested_cost_worked_examples() -> None:
    # shop: an object, 1; name: a scalar, 0
    assert query_cost("{ shop { name id currencyCode } }") == 1
    # the connection: 2 + 80 x (product 1 + variants (2 + 8 x variant 1)) = 2 + 80 x 11
    assert query_cost(PRODUCTS_80) == 882
    # edges { node } and nodes select on the same items: 2 + 5 x (1 + featuredImage 1)
    q = "{ products(first: 5) { edges { cursor node { id } } nodes { featuredImage { url } } } }"
    assert query_cost(q) == 12
    # pageInfo is within the connection's 2 points
    assert query_cost("{ products(first: 5) { pageInfo { hasNextPage } nodes { id } } }") == 7
    # both first and last: sized by the larger, 2 + 5
    assert query_cost("{ products(first: 3, last: 5) { nodes { id } } }") == 7


def test_graphql_requested_cost_of_unions_and_interfaces() -> None:
    # product 1 + metafields (2 + 10 x (metafield 1 + reference)); reference, a union:
    # 1 + the most of Product (variants: 2 + 5 x 1 = 7), ProductVariant (0), the others (0)
    q = """{ product(id: "gid://shopify/Product/1") {
      metafields(first: 10) { edges { node { key reference {
        __typename
        ... on Product { id variants(first: 5) { nodes { id } } }
        ... on ProductVariant { id price }
      } } } } } }"""
    assert query_cost(q) == 1 + 2 + 10 * (1 + 1 + 7)  # 93
    # node, an interface: 1 + the most of Order (lineItems: 2 + 4 x 1) and the rest (0)
    q = """{ node(id: "gid://shopify/Order/1") {
      id ... on Order { lineItems(first: 4) { nodes { title } } } } }"""
    assert query_cost(q) == 7
    # nodes(ids:): one object per id
    q = '{ nodes(ids: ["gid://shopify/Product/1", "gid://shopify/Order/2", "x"]) { id } }'
    assert query_cost(q) == 3


def test_graphql_requested_cost_of_fragments_aliases_and_root_fields() -> None:
    # P: title 0 + variants (2 + 2 x (variant 1 + its product 1)) = 6, so one product is 7;
    # a: 2 + 3 x 7 = 23; b: 2 + 2 x 7 = 16; shop: 1 -> 40
    q = """
    query Catalog {
      a: products(first: 3) { nodes { ...P } }
      b: products(last: 2) { edges { node { ...P } } }
      shop { name }
    }
    fragment P on Product { title variants(first: 2) { nodes { ...V } } }
    fragment V on ProductVariant { id price product { title } }
    """
    assert query_cost(q) == 40
    # the same response key twice is one field (merged, as execution merges it)
    assert query_cost("{ shop { name } shop { id } }") == 1
    # two keys are two fields
    assert query_cost("{ one: shop { name } two: shop { id } }") == 2


def test_graphql_requested_cost_with_variables_and_directives() -> None:
    q = """query($n: Int!, $m: Int = 4) {
      products(first: $n) { nodes { variants(first: $m) { nodes { id } } } }
    }"""
    assert query_cost(q, {"n": 10}) == 2 + 10 * (1 + 2 + 4)  # 72: $m's default
    assert query_cost(q, {"n": 10, "m": 1}) == 2 + 10 * (1 + 2 + 1)  # 42
    q = """query($x: Boolean!) {
      shop { name } products(first: 10) @include(if: $x) { nodes { id } } }"""
    assert query_cost(q, {"x": False}) == 1
    assert query_cost(q, {"x": True}) == 1 + 12
    err = shopify_error(q)  # $x missing
    # graphql-core's own words, which changed between 3.2 and 3.3
    assert err["message"] in (
        "Variable '$x' of required type 'Boolean!' was not provided.",
        "Variable '$x' has invalid value: Expected a value of non-null type 'Boolean!' to be"
        " provided.",
    ), err


def test_graphql_requested_cost_of_mutations() -> None:
    # a mutation field is 10, whatever its payload selects (even a connection)
    q = """mutation {
      productCreate(product: {title: "Hat"}) {
        product { id variants(first: 10) { nodes { id } } }
        userErrors { field message }
      }
    }"""
    assert query_cost(q) == 10
    q = """mutation($id: ID!) {
      first: tagsAdd(id: $id, tags: ["a"]) { userErrors { message } }
      second: tagsAdd(id: $id, tags: ["b"]) { userErrors { message } }
    }"""
    assert query_cost(q, {"id": "gid://shopify/Product/1"}) == 20


def test_graphql_queries_shopify_refuses() -> None:
    err = shopify_error("{ products { edges { node { id } } } }")
    assert err == {
        "message": "you must provide one of first or last",
        "locations": [{"line": 1, "column": 3}],
        "path": ["products"],
    }
    err = shopify_error('{ product(id: "x") { variants { nodes { id } } } }')
    assert err["path"] == ["product", "variants"]
    err = shopify_error("{ products(first: 251) { nodes { id } } }")
    assert "between 0 and 250" in err["message"]
    assert shopify_error("{ shop { nme } }") == {
        "message": "Field 'nme' doesn't exist on type 'Shop'",
        "locations": [{"line": 1, "column": 10}],
        "extensions": {"code": "undefinedField", "typeName": "Shop", "fieldName": "nme"},
    }
    assert shopify_error("{ shop { name }")["message"].startswith("Syntax Error")
    two = "query A { shop { name } } query B { shop { id } }"
    assert shopify_error(two)["message"] == "An operation name is required"
    assert query_cost(two, operation_name="B") == 1


# -- Shopify GraphQL over HTTP: data, actual cost, the bucket ------------------------------------


def cost_of(body: Any) -> dict[str, Any]:
    cost: dict[str, Any] = body["extensions"]["cost"]
    return cost


def test_graphql_answers_data_and_its_actual_cost(
    plain_shopify: tuple[ShopifyMock, Client],
) -> None:
    mock, c = plain_shopify
    status, body = c.gql(PRODUCTS_80)
    assert status == 200
    edges = body["data"]["products"]["edges"]
    assert len(edges) == 80 and edges[0]["node"]["id"] == "gid://shopify/Product/1"
    assert [len(e["node"]["variants"]["edges"]) for e in edges] == [3] * 80
    # the catalog's 3 variants a product: 2 + 80 x (1 + 2 + 3 x 1) = 482 of 882
    assert cost_of(body) == {
        "requestedQueryCost": 882,
        "actualQueryCost": 482,
        "throttleStatus": {
            "maximumAvailable": 2000.0,
            "currentlyAvailable": 1518,
            "restoreRate": 100.0,
        },
    }
    # the union, really resolved: metafield 1 of product 1 points at product 2, metafield 2
    # at product 1's first variant. Product 1 + metafields (2 + (1 + reference: 1 + its
    # variants 2 + 3) + (1 + reference 1)) = 1 + 2 + 7 + 2 = 12 of 93
    q = """{ product(id: "gid://shopify/Product/1") {
      metafields(first: 10) { edges { node { key reference {
        __typename
        ... on Product { id variants(first: 5) { nodes { id } } }
        ... on ProductVariant { id price }
      } } } } } }"""
    status, body = c.gql(q)
    refs = [e["node"]["reference"] for e in body["data"]["product"]["metafields"]["edges"]]
    assert [r["__typename"] for r in refs] == ["Product", "ProductVariant"]
    assert refs[0]["id"] == "gid://shopify/Product/2" and len(refs[0]["variants"]["nodes"]) == 3
    assert (cost_of(body)["requestedQueryCost"], cost_of(body)["actualQueryCost"]) == (93, 12)
    # an object that is not there: its point, none of its selections
    q = """{ product(id: "gid://shopify/Product/999999") {
      title variants(first: 5) { nodes { id } } } }"""
    status, body = c.gql(q)
    assert body["data"] == {"product": None}
    assert (cost_of(body)["requestedQueryCost"], cost_of(body)["actualQueryCost"]) == (8, 1)
    g = mock.key_stats(SHOP, TOKEN)["graphql"]
    assert (g["points_requested"], g["points_spent"], g["points_refunded"]) == (983, 495, 488)
    assert [t[1:] for t in g["trace"]] == [[882, 482, 1518], [93, 12, 1506], [8, 1, 1505]]


def test_graphql_introspection_is_answered_and_free(
    plain_shopify: tuple[ShopifyMock, Client],
) -> None:
    _, c = plain_shopify
    status, body = c.gql('{ __typename __type(name: "Product") { kind } shop { name } }')
    assert body["data"] == {
        "__typename": "QueryRoot",
        "__type": {"kind": "OBJECT"},
        "shop": {"name": SHOP},
    }
    assert cost_of(body)["requestedQueryCost"] == cost_of(body)["actualQueryCost"] == 1


def test_graphql_pages_and_the_catalog_setting(
    plain_shopify: tuple[ShopifyMock, Client],
) -> None:
    mock, c = plain_shopify
    mock.configure(shop=SHOP, catalog={"products": 16, "variants": 8})
    # 8 variants a product: variants(first: 8) are full; 16 products: products(first: 80)
    # returns 16. 2 + 16 x 11 = 178 of 882
    status, body = c.gql(PRODUCTS_80)
    assert cost_of(body)["actualQueryCost"] == 178
    q = """query($after: String) {
      products(first: 10, after: $after) { pageInfo { hasNextPage endCursor } nodes { title } }
    }"""
    status, body = c.gql(q)
    page1 = body["data"]["products"]
    assert page1["pageInfo"]["hasNextPage"] is True and len(page1["nodes"]) == 10
    status, body = c.gql(q, {"after": page1["pageInfo"]["endCursor"]})
    page2 = body["data"]["products"]
    assert [n["title"] for n in page2["nodes"]] == [f"Product {i}" for i in range(11, 17)]
    assert page2["pageInfo"]["hasNextPage"] is False
    assert (cost_of(body)["requestedQueryCost"], cost_of(body)["actualQueryCost"]) == (12, 8)
    # a search: every 10th product is a draft
    status, body = c.gql('{ products(first: 5, query: "status:draft") { nodes { id status } } }')
    assert body["data"]["products"]["nodes"] == [
        {"id": "gid://shopify/Product/10", "status": "DRAFT"}
    ]
    # last: 3 of the reverse order
    status, body = c.gql("{ products(last: 3, reverse: true) { nodes { title } } }")
    assert [n["title"] for n in body["data"]["products"]["nodes"]] == [
        "Product 3",
        "Product 2",
        "Product 1",
    ]
    status, body = c.gql('{ products(first: 2, after: "bogus") { nodes { id } } }')
    assert body["data"] == {"products": None}
    assert body["errors"][0]["path"] == ["products"]
    with pytest.raises(ValueError, match="unknown catalog entry"):
        mock.configure(shop=SHOP, catalog={"widgets": 3})


def test_graphql_take_refund_throttle_and_max_cost(
    shopify: tuple[ShopifyMock, Client],
) -> None:
    mock, c = shopify
    mock.configure(shop=SHOP, graphql_plan="legacy")  # 1000 points, 50 a second
    # 2 + 60 x (1 + 2 + 10) = 782 requested; 3 variants each: 2 + 60 x 6 = 362 actual
    status, body = c.gql(
        "{ products(first: 60) { nodes { id variants(first: 10) { nodes { id } } } } }"
    )
    assert status == 200 and len(body["data"]["products"]["nodes"]) == 60
    assert cost_of(body) == {
        "requestedQueryCost": 782,
        "actualQueryCost": 362,
        "throttleStatus": {
            "maximumAvailable": 1000.0,
            "currentlyAvailable": 638,  # 1000 - 782 taken + 420 refunded
            "restoreRate": 50.0,
        },
    }
    # one point more than the bucket holds: 2 + 49 x 13 = 639 > 638, THROTTLED, nothing taken
    q639 = "{ products(first: 49) { nodes { id variants(first: 10) { nodes { id } } } } }"
    status, body = c.gql(q639)
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
                "requestedQueryCost": 639,
                "actualQueryCost": None,
                "throttleStatus": {
                    "maximumAvailable": 1000.0,
                    "currentlyAvailable": 638,
                    "restoreRate": 50.0,
                },
            }
        },
    }
    # exactly the bucket: 2 + 53 x (1 + 2 + 9) = 638 runs; actual 2 + 53 x 6 = 320
    status, body = c.gql(
        "{ products(first: 53) { nodes { id variants(first: 9) { nodes { id } } } } }"
    )
    assert "errors" not in body
    assert cost_of(body)["requestedQueryCost"] == 638
    assert cost_of(body)["actualQueryCost"] == 320
    assert cost_of(body)["throttleStatus"]["currentlyAvailable"] == 318  # 0 + the refund
    # 2 + 100 x 13 = 1302 > 1000: refused before the bucket
    status, body = c.gql(
        "{ products(first: 100) { nodes { variants(first: 10) { nodes { id } } } } }"
    )
    assert status == 200 and "data" not in body
    assert body["errors"][0]["extensions"] == {
        "code": "MAX_COST_EXCEEDED",
        "cost": 1302,
        "maxCost": 1000,
    }
    assert cost_of(body)["actualQueryCost"] is None
    assert mock.key_stats(SHOP, TOKEN)["graphql"]["available"] == 318.0
    # a mutation: 10 requested, 10 actual (after 1 s: 318 + 50 - 10)
    mock.advance(1.0)
    q = """mutation { tagsAdd(id: "gid://shopify/Product/1", tags: ["sale"]) {
      node { id ... on Product { tags } } userErrors { message } } }"""
    status, body = c.gql(q)
    assert body["data"]["tagsAdd"] == {
        "node": {"id": "gid://shopify/Product/1", "tags": ["tag1", "mock", "sale"]},
        "userErrors": [],
    }
    assert cost_of(body)["requestedQueryCost"] == cost_of(body)["actualQueryCost"] == 10
    assert cost_of(body)["throttleStatus"]["currentlyAvailable"] == 358
    mock.configure(shop=SHOP, graphql_throttle_status=429)
    status, body = c.gql(q639)
    assert status == 429 and body["errors"][0]["extensions"]["code"] == "THROTTLED"
    st = mock.stats()["totals"]
    assert (st["graphql_accepted"], st["graphql_throttled"], st["graphql_max_cost_exceeded"]) == (
        3,
        2,
        1,
    )
    g = mock.key_stats(SHOP, TOKEN)["graphql"]
    assert (g["points_requested"], g["points_spent"], g["mutations"]) == (1430, 692, 1)
    assert mock.key_stats(SHOP, TOKEN)["rest"]["accepted"] == 0  # REST bucket untouched


def test_graphql_invalid_queries_cost_nothing(plain_shopify: tuple[ShopifyMock, Client]) -> None:
    mock, c = plain_shopify
    for q in (
        "{ shop { name }",
        "{ shop { nme } }",
        "{ products { nodes { id } } }",
        "{ products(first: 300) { nodes { id } } }",
        "query($n: Int!) { products(first: $n) { nodes { id } } }",
    ):
        status, body = c.gql(q)
        assert status == 200 and list(body) == ["errors"], body
    g = mock.key_stats(SHOP, TOKEN)["graphql"]
    assert (g["invalid"], g["accepted"], g["available"]) == (5, 0, 2000.0)
    assert mock.stats()["totals"]["graphql_invalid"] == 5
    status, body = c.gql("query($n: Int!) { products(first: $n) { nodes { id } } }", {"n": 2})
    assert cost_of(body)["requestedQueryCost"] == 4


def test_graphql_cost_debug_fields(plain_shopify: tuple[ShopifyMock, Client]) -> None:
    _, c = plain_shopify
    status, body = c.gql(PRODUCTS_80, headers={"Shopify-GraphQL-Cost-Debug": "1"})
    assert cost_of(body)["fields"] == [
        {
            "path": ["products"],
            "definedCost": 2,
            "requestedTotalCost": 882,
            "requestedChildrenCost": 880,
        },
        {
            "path": ["products", "edges", "node", "variants"],
            "definedCost": 2,
            "requestedTotalCost": 10,
            "requestedChildrenCost": 8,
        },
    ]
    assert "fields" not in cost_of(c.gql(PRODUCTS_80)[1])


def test_graphql_plans_and_outside_points(plain_shopify: tuple[ShopifyMock, Client]) -> None:
    mock, c = plain_shopify
    ts = cost_of(c.gql("{ shop { name } }")[1])["throttleStatus"]
    assert ts == {"maximumAvailable": 2000.0, "currentlyAvailable": 1999, "restoreRate": 100.0}
    mock.configure(shop="big", plan="plus")
    big = Client(mock, "big.myshopify.com")
    ts = cost_of(big.gql("{ shop { name } }")[1])["throttleStatus"]
    assert ts == {"maximumAvailable": 20000.0, "currentlyAvailable": 19999, "restoreRate": 1000.0}
    big.close()
    mock.configure(shop="adv", graphql_plan="advanced")
    adv = Client(mock, "adv.myshopify.com")
    ts = cost_of(adv.gql("{ shop { name } }")[1])["throttleStatus"]
    assert ts == {"maximumAvailable": 4000.0, "currentlyAvailable": 3999, "restoreRate": 200.0}
    adv.close()
    mock.configure(shop="o", token=TOKEN, graphql_plan="legacy", graphql_outside_rps=100)
    o = Client(mock, "o.myshopify.com")
    mock.advance(1.0)  # 10 outside queries of 10 points, +5 restored between each: 945
    ts = cost_of(o.gql("{ shop { name } }")[1])["throttleStatus"]
    assert ts["currentlyAvailable"] == 944
    assert mock.key_stats("o", TOKEN)["graphql"]["outside_accepted"] == 10
    o.close()


def test_graphql_chunked_and_raw_bodies(plain_shopify: tuple[ShopifyMock, Client]) -> None:
    mock, _ = plain_shopify
    s = socket.create_connection(("127.0.0.1", mock.port), timeout=5)
    body = json.dumps({"query": "{ products(first: 9) { nodes { id } } }"}).encode()
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
    assert json.loads(resp.body)["extensions"]["cost"]["requestedQueryCost"] == 11
    raw = b"{ products(last: 4) { nodes { id } } }"
    head = (
        f"POST {GQL} HTTP/1.1\r\nHost: {HOST}\r\nX-Shopify-Access-Token: {TOKEN}\r\n"
        f"Content-Type: application/graphql\r\nContent-Length: {len(raw)}\r\n"
        "Connection: close\r\n\r\n"
    )
    s.sendall(head.encode() + raw)
    resp = origins.read_response(reader)
    assert resp.headers.get("Connection") == "close"
    assert json.loads(resp.body)["extensions"]["cost"]["requestedQueryCost"] == 6
    assert reader.read_to_eof() == b""
    s.close()


def test_graphql_concurrent_queries_one_key_real_time() -> None:
    """Dozens of threads on one key: the bucket never goes below 0, the numbers add up."""
    mock = start_shopify(graphql_plan="custom", graphql_capacity=500, graphql_restore_rate=1000)
    queries = [
        "{ products(first: 20) { nodes { id variants(first: 10) { nodes { id } } } } }",
        "{ orders(first: 10) { nodes { name lineItems(first: 5) { nodes { quantity } } } } }",
        "{ shop { name } }",
    ]
    errors: list[BaseException] = []

    def worker(j: int) -> None:
        c = Client(mock, HOST)
        try:
            for i in range(15):
                status, body = c.gql(queries[(i + j) % 3])
                assert status == 200 and "extensions" in body
        except BaseException as e:
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors and not mock.errors
        g = mock.key_stats(SHOP, TOKEN)["graphql"]
        assert g["accepted"] + g["throttled"] == 24 * 15
        assert g["peak_used"] <= 500 + 1e-6
        assert g["points_requested"] - g["points_spent"] == g["points_refunded"] > 0
        assert sum(t[2] for t in g["trace"]) == g["points_spent"]
    finally:
        mock.close()


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


# -- GitHub GraphQL ------------------------------------------------------------------------------

GH_TOKEN = "ghp_test"
# the docs' "Predicting the point value of a query" example
GH_5101 = """query {
  viewer {
    login
    repositories(first: 100) {
      edges { node { id
        issues(first: 50) { edges { node { id
          labels(first: 60) { edges { node { id name } } }
        } } }
      } }
    }
  }
}"""
# the docs' "Calculating nodes in a call", complex query
GH_22060 = """query {
  viewer {
    repositories(first: 50) { edges { repository:node { name
      pullRequests(first: 20) { edges { pullRequest:node { title
        comments(first: 10) { edges { comment:node { bodyHTML } } }
      } } }
      issues(first: 20) { totalCount edges { issue:node { title bodyHTML
        comments(first: 10) { edges { comment:node { bodyHTML } } }
      } } }
    } } }
    followers(first: 10) { edges { follower:node { login } } }
  }
}"""


def github_error(query: str) -> dict[str, Any]:
    with pytest.raises(GraphQLFailure) as e:
        github_graphql.query_cost(query)
    assert len(e.value.errors) == 1
    return e.value.errors[0]


def test_github_point_values_of_the_docs_examples() -> None:
    # repositories: 1 request (the viewer, once); issues: one per repository, 100; labels:
    # one per issue, 100 x 50 = 5,000. 5,101 / 100 = 51.01 -> 51
    assert github_graphql.query_cost(GH_5101) == (51, 5101, 100 + 5000 + 300000)
    # requests: repositories 1 + pullRequests 50 + their comments 50 x 20 + issues 50 +
    # their comments 50 x 20 + followers 1 = 2,102 -> 21; nodes: the docs' 22,060
    assert github_graphql.query_cost(GH_22060) == (21, 2102, 22060)
    # the simple one: 50 + 50 x 10 = 550 nodes; 1 + 50 requests -> 0.51 -> 1
    q = """query { viewer { repositories(first: 50) { edges { repository:node { name
      issues(first: 10) { totalCount edges { node { title bodyHTML } } } } } } } }"""
    assert github_graphql.query_cost(q) == (1, 51, 550)
    # no connection at all: the minimum, 1
    assert github_graphql.query_cost("{ viewer { login } rateLimit { cost } }") == (1, 0, 0)
    # halves round up: 1 + 83 + 83 x 2 = 250 requests -> 2.5 -> 3
    q = """{ viewer { repositories(first: 83) { nodes { issues(first: 2) { nodes {
      comments(first: 1) { nodes { id } } } } } } } }"""
    assert github_graphql.query_cost(q) == (3, 250, 83 + 166 + 166)
    # nodes(ids:) needs one request per id for what is below it
    ids = json.dumps([f"R_{i}" for i in range(1, 251)])
    below = "... on Repository { issues(first: 1) { nodes { id } } }"
    q = f"{{ nodes(ids: {ids}) {{ {below} }} }}"
    assert github_graphql.query_cost(q)[:2] == (3, 250)


def test_github_node_limits() -> None:
    err = github_error("{ viewer { repositories { nodes { id } } } }")
    assert err["type"] == "MISSING_PAGINATION_BOUNDARIES"
    assert err["message"] == (
        "You must provide a `first` or `last` value to properly paginate the "
        "`repositories` connection."
    )
    assert err["path"] == ["viewer", "repositories"]
    err = github_error("{ viewer { followers(last: 101) { nodes { login } } } }")
    assert err["type"] == "EXCESSIVE_PAGINATION"
    assert "101 records on the `followers` connection exceeds the `last` limit" in err["message"]
    err = github_error("{ viewer { followers(first: 0) { nodes { login } } } }")
    assert err["type"] == "EXCESSIVE_PAGINATION"
    # 100 + 100 x 100 + 100 x 100 x 100 = 1,010,100 > 500,000
    err = github_error(
        "{ viewer { repositories(first: 100) { nodes { issues(first: 100) { nodes {"
        " comments(first: 100) { nodes { id } } } } } } } }"
    )
    assert err == {
        "type": "MAX_NODE_LIMIT_EXCEEDED",
        "message": "This query requests up to 1,010,100 possible nodes which exceeds the "
        "maximum limit of 500,000.",
    }


@pytest.fixture
def github(
    transport: tuple[ssl.SSLContext | None, ssl.SSLContext | None],
) -> Iterator[tuple[GitHubMock, Client, ManualClock]]:
    clk = ManualClock(1000.5)
    mock = start_github(transport[0], clk)
    client = Client(mock, "api.github.com", transport[1])
    yield mock, client, clk
    client.close()
    mock.close()
    assert not mock.errors


def gh_call(
    c: Client, query: str, token: str | None = GH_TOKEN, scheme: str = "bearer", **extra: Any
) -> tuple[int, http.client.HTTPMessage, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    body = json.dumps({"query": query, **extra}).encode()
    status, h, data = c.call("POST", "/graphql", headers, body)
    return status, h, json.loads(data)


def limits(h: http.client.HTTPMessage) -> tuple[str | None, ...]:
    names = ("limit", "remaining", "used", "reset", "resource")
    return tuple(h.get(f"x-ratelimit-{n}") for n in names)


RATE = "rateLimit { cost limit remaining used resetAt nodeCount }"


def test_github_primary_window_headers_and_rate_limited(
    github: tuple[GitHubMock, Client, ManualClock],
) -> None:
    mock, c, clk = github
    mock.configure(limit=100)
    q51 = GH_5101.replace("query {", "query { " + RATE)
    status, h, body = gh_call(c, q51)
    # the window starts at the first request (1000.5, floored) and lasts an hour
    assert status == 200
    assert limits(h) == ("100", "49", "51", "4600", "graphql")
    assert body["data"]["rateLimit"] == {
        "cost": 51,
        "limit": 100,
        "remaining": 49,
        "used": 51,
        "resetAt": "1970-01-01T01:16:40Z",
        "nodeCount": 305100,
    }
    repos = body["data"]["viewer"]["repositories"]["edges"]
    assert len(repos) == 30  # the catalog's 30 repositories, 20 issues each, 2 labels each
    assert len(repos[0]["node"]["issues"]["edges"]) == 20
    assert len(repos[0]["node"]["issues"]["edges"][0]["node"]["labels"]["edges"]) == 2
    # 51 more than the 49 left: refused, nothing charged; the docs' remaining: 0
    clk.advance(10)
    status, h, body = gh_call(c, q51)
    assert status == 200
    user_id = mock.key_stats(GH_TOKEN)["user_id"]
    assert body == {
        "errors": [
            {
                "type": "RATE_LIMITED",
                "code": "graphql_rate_limit",
                "message": f"API rate limit exceeded for user ID {user_id}.",
            }
        ]
    }
    assert limits(h) == ("100", "0", "51", "4600", "graphql")
    # what still fits runs: the minimum of 1 point
    status, h, body = gh_call(c, "{ viewer { login } " + RATE + " }")
    assert body["data"]["viewer"] == {"login": "octocat"}
    assert body["data"]["rateLimit"]["cost"] == 1 and limits(h)[1:3] == ("48", "52")
    mock.configure(limited_remaining="actual")
    status, h, body = gh_call(c, q51)
    assert body["errors"][0]["type"] == "RATE_LIMITED" and limits(h)[1] == "48"
    # a dry run answers the cost and charges nothing, even over the limit
    status, h, body = gh_call(c, q51.replace("rateLimit {", "rateLimit(dryRun: true) {"))
    assert body["data"]["rateLimit"]["cost"] == 51 and limits(h)[1:3] == ("48", "52")
    k = mock.key_stats(GH_TOKEN)
    assert (k["accepted"], k["rate_limited"], k["dry_runs"], k["used"]) == (3, 2, 1, 52)
    # the next window begins at the first request at or after the reset
    clk.set(4600.0)
    status, h, body = gh_call(c, q51)
    assert limits(h) == ("100", "49", "51", "8200", "graphql")
    status, h, body = gh_call(c, GH_22060)  # 21
    status, h, body = gh_call(c, GH_22060)  # 21: 93 used
    for _ in range(7):
        gh_call(c, "{ viewer { login } }")
    assert limits(h)[1] == "7" and mock.key_stats(GH_TOKEN)["remaining"] == 0
    status, h, body = gh_call(c, "{ viewer { login } }")
    assert body["errors"][0]["message"] == f"API rate limit already exceeded for user ID {user_id}."
    assert mock.key_stats(GH_TOKEN)["points_spent"] == 52 + 100


def test_github_secondary_limit(github: tuple[GitHubMock, Client, ManualClock]) -> None:
    mock, c, clk = github
    mock.configure(secondary_points=12)
    add = """mutation($id: ID!) { addComment(input: {subjectId: $id, body: "hi"}) {
      commentEdge { node { body } } subject { id ... on Issue { title } } } }"""
    status, h, body = gh_call(c, add, variables={"id": "I_1_1"})
    assert body["data"]["addComment"] == {
        "commentEdge": {"node": {"body": "hi"}},
        "subject": {"id": "I_1_1", "title": "Issue 1 of repo-1"},
    }
    assert limits(h)[1:3] == ("4999", "1")  # the primary cost of a mutation: 1
    gh_call(c, add, variables={"id": "I_1_2"})  # 5 + 5 secondary points
    clk.advance(20)
    gh_call(c, "{ viewer { login } }")  # 11
    gh_call(c, "{ viewer { nope } }")  # 12: an invalid query is still a request
    status, h, body = gh_call(c, "{ viewer { login } }")
    assert status == 403
    assert body["message"].startswith("You have exceeded a secondary rate limit.")
    assert body["documentation_url"].endswith("#secondary-rate-limits")
    # one point must leave: the first mutation's 5, 40 s from now
    assert h["retry-after"] == "40"
    assert limits(h) == ("5000", "4997", "3", str(1000 + 3600), "graphql")
    clk.advance(39)
    assert gh_call(c, "{ viewer { login } }")[0] == 403
    clk.advance(1)
    status, h, body = gh_call(c, "{ viewer { login } }")
    assert status == 200 and body == {"data": {"viewer": {"login": "octocat"}}}
    k = mock.key_stats(GH_TOKEN)
    assert (k["secondary_limited"], k["invalid"], k["mutations"], k["accepted"]) == (2, 1, 2, 4)
    # both mutations (at 1000.5) have left the minute: 1 + 1 + 1
    assert k["secondary_points"] == 3 and k["peak_secondary"] == 12


def test_github_keys_auth_and_invalid_queries(
    github: tuple[GitHubMock, Client, ManualClock],
) -> None:
    mock, c, _ = github
    status, h, body = gh_call(c, "{ viewer { login } }", token=None)
    assert status == 401 and body["message"] == "This endpoint requires you to be authenticated."
    assert h.get("x-ratelimit-limit") is None
    assert gh_call(c, "{ viewer { login } }", scheme="token")[1]["x-ratelimit-used"] == "1"
    assert gh_call(c, "{ viewer { login } }", token="other")[1]["x-ratelimit-used"] == "1"
    status, h, body = gh_call(c, "{ viewer { repositories { nodes { id } } } }")
    assert status == 200 and body["errors"][0]["type"] == "MISSING_PAGINATION_BOUNDARIES"
    assert limits(h)[2] == "1"  # nothing charged
    status, h, body = gh_call(c, "{ viewer { logn } }")
    assert body["errors"][0]["message"] == "Field 'logn' doesn't exist on type 'User'"
    # a union in a connection: search
    q = """{ search(query: "repo-1", type: REPOSITORY, first: 3) {
      repositoryCount nodes { ... on Repository { name } } } }"""
    status, h, body = gh_call(c, q)
    got = body["data"]["search"]
    assert got["repositoryCount"] == 11  # repo-1, repo-10 .. repo-19
    assert [n["name"] for n in got["nodes"]] == ["repo-1", "repo-10", "repo-11"]
    st = mock.stats()
    assert sorted(st["keys"]) == ["ghp_test", "other"]
    assert (st["totals"]["invalid"], st["totals"]["unauthorized"]) == (2, 1)
    assert c.call("GET", "/graphql")[0] == 404


def test_github_in_a_process_of_its_own(tmp_path: Path) -> None:
    ca = origins.make_ca(tmp_path)
    (tmp_path / "leaf").mkdir()
    cert, key = origins.make_leaf(ca, tmp_path / "leaf", names=("api.github.com",), ips=())
    remote = RemoteMock("github", cert, key, ca.path)
    try:
        remote.configure(token=GH_TOKEN, limit=60)
        ctx = ssl.create_default_context(cafile=str(ca.path))
        raw = socket.create_connection(("127.0.0.1", remote.port), timeout=10)
        s = ctx.wrap_socket(raw, server_hostname="api.github.com")
        body = json.dumps({"query": GH_22060}).encode()
        s.sendall(
            b"POST /graphql HTTP/1.1\r\nHost: api.github.com\r\n"
            b"Authorization: bearer " + GH_TOKEN.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        resp = origins.read_response(origins.Reader(s))
        s.close()
        assert resp.status == 200 and resp.headers.get("x-ratelimit-remaining") == "39"
        assert remote.key_stats(GH_TOKEN)["used"] == 21
    finally:
        remote.close()


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
