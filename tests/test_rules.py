"""elbasy.rules: the built-in rules against realistic requests and responses,
GraphQL pricing and cost learning, tier learning, rule checking, config and CLI."""

from __future__ import annotations

import gzip
import json
import os
import tomllib
import zlib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from elbasy.cli import main
from elbasy.limits import BUCKET, ROLLING, WINDOW, Limit, ServerView
from elbasy.rules import BUILTIN_IDS, Match, Report, RuleError, RuleSet
from elbasy.rules.graphql_cost import clear_cache
from elbasy.rules.wire import decode_body, hash_secret

H = list[tuple[bytes, bytes]]

SHOP_TOKEN = "shpat_0123456789abcdef0123456789abcdef"
ETSY_KEY = "1aa2bb33cc4dd5ee6ff7gg8h"
ETSY_SECRET = "s3cr3tsh4red"
AMZ_TOKEN = "Atza|IwEBIAbcdefghijklmnopqrstuvwxyz0123456789"
GH_TOKEN = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ELBASY_"):
            monkeypatch.delenv(name)


@pytest.fixture
def rules() -> RuleSet:
    clear_cache()
    return RuleSet.builtin()


def shopify(rules: RuleSet, path: str, method: str = "GET", shop: str = "acme") -> Match:
    m = rules.match(
        f"{shop}.myshopify.com", method, path, [(b"X-Shopify-Access-Token", SHOP_TOKEN.encode())]
    )
    assert m is not None
    return m


def assert_token_free(m: Match, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in m.account
        assert secret not in m.label
        assert all(secret not in key for key in m.keys)


# --------------------------------------------------------------------------- built-ins


def test_builtins_load_and_every_number_has_a_source(rules: RuleSet) -> None:
    assert rules.ids() == list(BUILTIN_IDS)
    for rule_id in BUILTIN_IDS:
        _, text = RuleSet.builtin_rule_data(rule_id)
        data = tomllib.loads(text)
        assert data["docs"] and all(d.startswith("https://") for d in data["docs"])
        for limit in data["limits"]:
            assert limit["source"].startswith("https://"), (rule_id, limit["name"])
            for tier, numbers in limit.get("tiers", {}).items():
                assert numbers["source"].startswith("https://"), (rule_id, limit["name"], tier)
        assert data["throttle"]["source"].startswith("https://")


def test_intercept_globs(rules: RuleSet) -> None:
    assert rules.intercept_globs() == [
        "*.myshopify.com",
        "openapi.etsy.com",
        "sellingpartnerapi-na.amazon.com",
        "sellingpartnerapi-eu.amazon.com",
        "sellingpartnerapi-fe.amazon.com",
        "sandbox.sellingpartnerapi-na.amazon.com",
        "sandbox.sellingpartnerapi-eu.amazon.com",
        "sandbox.sellingpartnerapi-fe.amazon.com",
        "api.bigcommerce.com",
        "api.github.com",
    ]


def test_built_in_hosts_keep_the_ca_narrow(tmp_path: Path) -> None:
    """Every built-in host glob is a subtree: the first-run CA permits those hosts only."""
    import datetime as dt

    from elbasy.ca import CertificateAuthority

    ca = CertificateAuthority.create(
        tmp_path, RuleSet.builtin().intercept_globs(), now=dt.datetime.now(dt.UTC)
    )
    assert ca.constraints is not None
    assert not ca.constraints.permits("www.amazon.com")
    assert not ca.constraints.permits("example.com")
    assert ca.constraints.permits("shop1.myshopify.com")
    assert ca.constraints.permits("sellingpartnerapi-eu.amazon.com")


def test_unknown_host_and_uncovered_paths(rules: RuleSet) -> None:
    assert rules.match("example.com", "GET", "/", []) is None
    assert rules.match("acme.myshopify.com", "GET", "/admin/oauth/authorize", []) is None
    assert rules.match("acme.myshopify.com", "GET", "/products/shoe", []) is None
    assert rules.match("openapi.etsy.com", "GET", "/v2/listings", []) is None
    assert rules.match("api.bigcommerce.com", "GET", "/stores/abc/v1/x", []) is None
    # GraphQL is its own rule, for POST only
    assert rules.match("api.github.com", "GET", "/graphql", []) is None


# --------------------------------------------------------------------------- Shopify


def test_shopify_rest_match(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/products.json?limit=250")
    assert m.rule.id == "shopify-admin-rest"
    assert m.limits == (Limit("shopify-rest", BUCKET, 40, rate=2),)
    assert m.cost == 1 and m.body_needed == 0 and m.max_single is None
    app = hash_secret(SHOP_TOKEN)
    assert m.account == f"shopify-admin-rest|acme|{app}"
    assert m.keys == (f"shopify-admin-rest|shopify-rest|acme|{app}",)
    assert m.label == f"shopify-admin-rest shop=acme app=#{app}"
    assert m.strip_headers == (b"x-elbasy-account",)
    assert m.retry_safe and m.operation is None and m.tier == "standard"
    assert_token_free(m, SHOP_TOKEN)
    # older unversioned paths, nested resources, absolute-form targets, host case and port
    assert shopify(rules, "/admin/products/1/variants.json").rule.id == "shopify-admin-rest"
    abs_form = rules.match(
        "ACME.myshopify.com:443",
        "PUT",
        "https://acme.myshopify.com/admin/api/2024-01/orders/5.json",
        [(b"x-shopify-access-token", SHOP_TOKEN.encode())],
    )
    assert abs_form is not None and abs_form.account == m.account
    assert not shopify(rules, "/admin/api/2024-10/products.json", "POST").retry_safe


def test_shopify_accounts_are_app_times_shop(rules: RuleSet) -> None:
    a = shopify(rules, "/admin/api/2024-10/products.json")
    b = shopify(rules, "/admin/api/2024-10/products.json", shop="other")
    c = rules.match(
        "acme.myshopify.com",
        "GET",
        "/admin/api/2024-10/products.json",
        [(b"X-Shopify-Access-Token", b"shpat_another")],
    )
    assert c is not None
    assert len({a.account, b.account, c.account}) == 3
    assert shopify(rules, "/admin/api/2024-10/orders.json").account == a.account  # stable


def test_shopify_graphql_match(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/graphql.json", "POST")
    assert m.rule.id == "shopify-admin-graphql"
    assert m.limits == (Limit("shopify-graphql-cost", BUCKET, 2000, rate=100, unit="points"),)
    assert m.cost == 50 and m.body_needed == 65536 and m.max_single == 1000
    assert_token_free(m, SHOP_TOKEN)
    # REST and GraphQL are separate buckets
    assert m.account != shopify(rules, "/admin/api/2024-10/shop.json").account
    # graphql.json is never REST, whatever the method
    assert rules.match("acme.myshopify.com", "GET", "/admin/api/2024-10/graphql.json", []) is None


def test_shopify_rest_learns_plus_from_the_header(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/products.json")
    report = rules.read_response(m, 200, [(b"X-Shopify-Shop-Api-Call-Limit", b"12/400")], b"[]")
    assert report == Report(views=(ServerView("shopify-rest", used=12, capacity=400),), tier="plus")
    rules.learn(m, report)
    again = shopify(rules, "/admin/api/2024-10/products.json")
    assert again.tier == "plus"
    assert again.limits == (Limit("shopify-rest", BUCKET, 400, rate=20),)
    # another shop of the same app is still standard
    assert shopify(rules, "/admin/api/2024-10/products.json", shop="other").limits[0].capacity == 40


def test_shopify_rest_429(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/products.json")
    report = rules.read_response(
        m,
        429,
        [(b"X-Shopify-Shop-Api-Call-Limit", b"40/40"), (b"Retry-After", b"2.0")],
        b'{"errors":"Exceeded 2 calls per second for api client. Reduce request rates."}',
    )
    assert report.throttled and not report.resource_throttle
    assert report.retry_after == 2.0
    assert report.view("shopify-rest") == ServerView("shopify-rest", used=40, capacity=40)
    assert report.tier == "standard"


def test_shopify_rest_resource_throttle(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/products/1/variants.json", "POST")
    report = rules.read_response(
        m,
        429,
        [(b"X-Shopify-Shop-Api-Call-Limit", b"5/40"), (b"Retry-After", b"1.0")],
        b'{"errors":"Daily variant creation limit reached"}',
    )
    assert report.throttled and report.resource_throttle and report.retry_after == 1.0


def test_shopify_rest_429_without_retry_after_gets_a_second(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/products.json")
    report = rules.read_response(m, 429, [], None)
    assert report.throttled and report.retry_after == 1.0 and report.views == ()


GQL_QUERY = '{"query": "query { products(first: 10) { edges { node { id title } } } }"}'
GQL_SAME_SHAPE = (
    '{"query": "query {\\n  products(first: 10) {\\n    edges { node { id, title } }'
    '  # a comment\\n  }\\n}"}'
)


def gql_body(
    requested: float | None, actual: float | None, available: float, rate: float = 100
) -> bytes:
    cost = {
        "requestedQueryCost": requested,
        "actualQueryCost": actual,
        "throttleStatus": {
            "maximumAvailable": rate * 20,
            "currentlyAvailable": available,
            "restoreRate": rate,
        },
    }
    return json.dumps({"data": {"products": {"edges": []}}, "extensions": {"cost": cost}}).encode()


def test_graphql_cost_learning_by_shape(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/graphql.json", "POST")
    first = rules.cost_for(m, GQL_QUERY.encode())
    # unseen: priced from its text, 2 + 10 x (node 1 + id, title 0) = 12
    assert first.cost == 12 and first.cost_key is not None
    assert first.retry_safe and not first.mutation
    report = rules.read_response(first, 200, [], gql_body(22, 12, 1978))
    assert not report.throttled
    assert report.requested_cost == 22 and report.actual_cost == 12
    assert report.view("shopify-graphql-cost") == ServerView(
        "shopify-graphql-cost", remaining=1978, capacity=2000, rate=100
    )
    assert report.tier == "standard"
    rules.learn(first, report)
    # the same query with other whitespace, commas and comments: the learned cost
    second = rules.cost_for(m, GQL_SAME_SHAPE.encode())
    assert second.cost_key == first.cost_key and second.cost == 22
    # another page size is another shape, priced anew: 2 + 250 x 1
    other = rules.cost_for(m, GQL_QUERY.replace("first: 10", "first: 250").encode())
    assert other.cost_key != first.cost_key and other.cost == 252
    # a later response reconciles the shape's cost
    rules.learn(second, rules.read_response(second, 200, [], gql_body(31, 20, 1950)))
    assert rules.cost_for(m, GQL_QUERY.encode()).cost == 31


def test_graphql_cost_capped_and_mutations(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/graphql.json", "POST")
    orders = b'{"query": "{ orders(first: 250) { edges { node { id } } } }"}'
    big = rules.cost_for(m, orders)
    assert big.cost == 252  # 2 + 250 x 1
    # the server says it is dearer than the single-query cap: it refuses such a
    # query before running it and without touching the bucket, so it is not paced
    report = rules.read_response(big, 200, [], gql_body(5000, None, 2000))
    assert report.actual_cost == 0  # answered, nothing run: the reservation comes back
    rules.learn(big, report)
    assert rules.cost_for(m, orders).cost == 0
    # at the cap exactly, it runs: the cap is reserved
    rules.learn(big, rules.read_response(big, 200, [], gql_body(1000, 900, 1000)))
    assert rules.cost_for(m, orders).cost == 1000
    mutation = rules.cost_for(m, b'{"query": "mutation { productDelete(input: {id: 1}) { id } }"}')
    assert mutation.mutation and not mutation.retry_safe
    assert mutation.cost == 10  # one root mutation field, 10; id is a scalar
    # no query, or not JSON: the match as it was
    assert rules.cost_for(m, b"not json") is m
    assert rules.cost_for(m, b'{"query": "{ shop { name "}') is m
    assert m.cost == 50  # the rule's default stands for those
    rest = shopify(rules, "/admin/api/2024-10/products.json")
    assert rules.cost_for(rest, GQL_QUERY.encode()) is rest


PRODUCTS_AND_VARIANTS = (
    b'{"query": "{ products(first: 80) { edges { node { id '
    b'variants(first: 8) { edges { node { id } } } } } } }"}'
)


def test_graphql_unseen_shape_is_priced_from_its_text(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/graphql.json", "POST")
    # the flat default (50) let this one through to a THROTTLED; the text says
    # 2 + 80 x (node 1 + variants (2 + 8 x node 1)) = 882
    priced = rules.cost_for(m, PRODUCTS_AND_VARIANTS)
    assert priced.cost == 882 and priced.costs == (882,)
    # after the first answer, the server's own price for the shape wins
    rules.learn(priced, rules.read_response(priced, 200, [], gql_body(802, 300, 1700)))
    again = rules.cost_for(m, PRODUCTS_AND_VARIANTS)
    assert again.cost == 802 and again.cost_key == priced.cost_key
    # above the single-query cap, an estimate reserves the cap:
    # 2 + 250 x (node 1 + variants (2 + 10 x node 1)) = 3252
    dear = rules.cost_for(
        m,
        b'{"query": "{ products(first: 250) { edges { node { '
        b'variants(first: 10) { edges { node { id } } } } } } }"}',
    )
    assert dear.cost == 1000


def test_graphql_actual_cost_null(rules: RuleSet) -> None:
    m = rules.cost_for(
        shopify(rules, "/admin/api/2024-10/graphql.json", "POST"), PRODUCTS_AND_VARIANTS
    )
    refused = json.dumps(
        {
            "errors": [
                {
                    "message": "Query cost is 1502, which exceeds the single query max cost limit",
                    "extensions": {"code": "MAX_COST_EXCEEDED", "cost": 1502, "maxCost": 1000},
                }
            ],
            "extensions": {"cost": {"requestedQueryCost": 1502, "actualQueryCost": None}},
        }
    ).encode()
    report = rules.read_response(m, 200, [], refused)
    assert not report.throttled
    assert report.requested_cost == 1502 and report.actual_cost == 0
    # throttled, actualQueryCost is null too, but the bucket is what refused it:
    # no refund here, the throttle handling has the account
    throttled = rules.read_response(
        m,
        200,
        [],
        json.dumps(
            {
                "errors": [{"message": "Throttled", "extensions": {"code": "THROTTLED"}}],
                "extensions": {"cost": {"requestedQueryCost": 882, "actualQueryCost": None}},
            }
        ).encode(),
    )
    assert throttled.throttled and throttled.actual_cost is None
    # no cost in the answer at all (an error page): nothing known, nothing refunded
    assert rules.read_response(m, 502, [], b"<html>bad gateway</html>").actual_cost is None
    assert rules.read_response(m, 200, [], None).actual_cost is None


def test_graphql_throttled_with_200(rules: RuleSet) -> None:
    m = rules.cost_for(
        shopify(rules, "/admin/api/2024-10/graphql.json", "POST"), GQL_QUERY.encode()
    )
    body = json.dumps(
        {
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
                    "requestedQueryCost": 752,
                    "actualQueryCost": None,
                    "throttleStatus": {
                        "maximumAvailable": 2000.0,
                        "currentlyAvailable": 52,
                        "restoreRate": 100.0,
                    },
                }
            },
        }
    ).encode()
    report = rules.read_response(m, 200, [(b"content-type", b"application/json")], body)
    assert report.throttled and not report.resource_throttle
    assert report.retry_after == pytest.approx(7.0)  # (752 - 52) / 100
    assert report.requested_cost == 752 and report.actual_cost is None
    assert report.view("shopify-graphql-cost") == ServerView(
        "shopify-graphql-cost", remaining=52, capacity=2000, rate=100
    )
    rules.learn(m, report)
    assert rules.cost_for(m, GQL_QUERY.encode()).cost == 752


def test_graphql_429_without_marker_is_a_resource_throttle(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/graphql.json", "POST")
    report = rules.read_response(
        m, 429, [(b"Retry-After", b"3")], b'{"errors":[{"message":"Too many variants"}]}'
    )
    assert report.throttled and report.resource_throttle and report.retry_after == 3


def test_graphql_plus_tier_from_restore_rate(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/graphql.json", "POST")
    report = rules.read_response(m, 200, [], gql_body(10, 10, 19990, rate=1000.0))
    assert report.tier == "plus"
    rules.learn(m, report)
    assert shopify(rules, "/admin/api/2024-10/graphql.json", "POST").limits[0] == Limit(
        "shopify-graphql-cost", BUCKET, 20000, rate=1000, unit="points"
    )


def test_graphql_body_gzip_chunked(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/graphql.json", "POST")
    packed = gzip.compress(gql_body(22, 12, 1978))
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(packed[i : i + 50]), packed[i : i + 50])
        for i in range(0, len(packed), 50)
    )
    chunked += b"0\r\n\r\n"
    headers = [(b"Transfer-Encoding", b"chunked"), (b"Content-Encoding", b"gzip")]
    report = rules.read_response(m, 200, headers, chunked)
    assert report.requested_cost == 22 and report.tier == "standard"


def test_graphql_huge_body_keeps_the_cost_at_its_end(rules: RuleSet) -> None:
    m = shopify(rules, "/admin/api/2024-10/graphql.json", "POST")
    edges = [{"node": {"id": i, "title": "x" * 100}} for i in range(60_000)]
    body = json.dumps(
        {
            "data": {"products": {"edges": edges}},
            "extensions": {"cost": {"requestedQueryCost": 252, "actualQueryCost": 100}},
        }
    ).encode()
    assert len(body) > 5_000_000
    report = rules.read_response(m, 200, [(b"content-encoding", b"deflate")], zlib.compress(body))
    assert report.requested_cost == 252 and report.actual_cost == 100


# --------------------------------------------------------------------------- Etsy


def etsy(rules: RuleSet, key: str = f"{ETSY_KEY}:{ETSY_SECRET}") -> Match:
    headers = [
        (b"x-api-key", key.encode()),
        (b"Authorization", b"Bearer 12345678.oauthtokenvalue"),
    ]
    m = rules.match("openapi.etsy.com", "GET", "/v3/application/shops/123/listings/active", headers)
    assert m is not None
    return m


def test_etsy_match(rules: RuleSet) -> None:
    m = etsy(rules)
    assert m.rule.id == "etsy-v3"
    assert m.limits == (
        Limit("etsy-qps", WINDOW, 10, window=1),
        Limit("etsy-qpd", ROLLING, 10000, window=86400, sub_buckets=12),
    )
    assert m.account == f"etsy-v3|{hash_secret(ETSY_KEY)}"
    assert_token_free(m, ETSY_KEY, ETSY_SECRET, "oauthtokenvalue")
    # the keystring alone (older apps) is the same account
    assert etsy(rules, ETSY_KEY).account == m.account
    assert m.retry_safe


def test_etsy_reports(rules: RuleSet) -> None:
    m = etsy(rules)
    ok = rules.read_response(
        m,
        200,
        [
            (b"X-Limit-Per-Second", b"150"),
            (b"X-Remaining-This-Second", b"149"),
            (b"x-limit-per-day", b"100000"),
            (b"x-remaining-today", b"99870"),
        ],
        b"{}",
    )
    assert not ok.throttled
    assert ok.views == (
        ServerView("etsy-qps", remaining=149, capacity=150),
        ServerView("etsy-qpd", remaining=99870, capacity=100000),
    )
    throttled = rules.read_response(m, 429, [(b"retry-after", b"7")], b'{"error":"Too many"}')
    assert throttled.throttled and throttled.retry_after == 7 and throttled.views == ()


# --------------------------------------------------------------------------- Amazon SP-API


def amazon(rules: RuleSet, path: str, hint: str | None = None, region: str = "na") -> Match:
    headers = [(b"x-amz-access-token", AMZ_TOKEN.encode())]
    if hint is not None:
        headers.append((b"X-Elbasy-Account", hint.encode()))
    m = rules.match(f"sellingpartnerapi-{region}.amazon.com", "GET", path, headers)
    assert m is not None
    return m


def test_sp_api_operations(rules: RuleSet) -> None:
    orders = amazon(rules, "/orders/v0/orders?MarketplaceIds=ATVPDKIKX0DER&CreatedAfter=x")
    assert orders.operation == "getOrders"
    assert orders.limits == (Limit("sp-getOrders", BUCKET, 20, rate=0.0167),)
    order = amazon(rules, "/orders/v0/orders/902-3159896-1390916")
    assert order.operation == "getOrder"
    assert order.limits == (Limit("sp-getOrder", BUCKET, 30, rate=0.5),)
    items = amazon(rules, "/orders/v0/orders/902-3159896-1390916/orderItems")
    assert items.operation == "getOrderItems"
    assert items.limits == (Limit("sp-getOrderItems", BUCKET, 30, rate=0.5),)
    # one account, one bucket per operation
    assert orders.account == order.account == items.account
    assert len({orders.keys[0], order.keys[0], items.keys[0]}) == 3
    assert orders.keys[0].endswith("|getOrders")
    assert_token_free(orders, AMZ_TOKEN)
    assert orders.retry_safe
    # an operation the rule does not know: matched, but nothing to pace
    unknown = amazon(rules, "/fba/outbound/2020-07-01/fulfillmentOrders")
    assert unknown.operation is None and unknown.limits == ()
    # the sandbox and other regions
    eu = rules.match("sandbox.sellingpartnerapi-eu.amazon.com", "GET", "/orders/v0/orders", [])
    assert eu is not None and eu.account == "amazon-sp-api|none|eu"


def test_sp_api_caller_hint(rules: RuleSet) -> None:
    hinted = amazon(rules, "/orders/v0/orders", hint="A2SELLER42")
    assert hinted.account == "amazon-sp-api|A2SELLER42|na"
    assert "seller=A2SELLER42" in hinted.label
    assert b"x-elbasy-account" in hinted.strip_headers
    # a hint that is no plain name is hashed, never logged as given
    odd = amazon(rules, "/orders/v0/orders", hint="seller with spaces\t")
    assert "spaces" not in odd.account and "spaces" not in odd.label


def test_sp_api_reports(rules: RuleSet) -> None:
    m = amazon(rules, "/orders/v0/orders/1")
    ok = rules.read_response(m, 200, [(b"x-amzn-RateLimit-Limit", b"0.5")], b"{}")
    assert ok.views == (ServerView("sp-getOrder", rate=0.5),) and not ok.throttled
    body = b'{"errors":[{"code":"QuotaExceeded","message":"You exceeded your quota"}]}'
    throttled = rules.read_response(m, 429, [], body)
    assert throttled.throttled and throttled.retry_after == 1.0
    assert not m.rule.throttle.retry_methods - {"GET"}


# --------------------------------------------------------------------------- BigCommerce


def test_bigcommerce(rules: RuleSet) -> None:
    m = rules.match(
        "api.bigcommerce.com",
        "GET",
        "/stores/abc123/v3/catalog/products?limit=250",
        [(b"X-Auth-Token", b"bc-secret-token")],
    )
    assert m is not None and m.rule.id == "bigcommerce"
    assert m.account == "bigcommerce|abc123"  # the store, shared by every app
    assert m.limits == (Limit("bc-window", WINDOW, 150, window=30),)
    assert_token_free(m, "bc-secret-token")
    headers = [
        (b"X-Rate-Limit-Requests-Left", b"447"),
        (b"X-Rate-Limit-Requests-Quota", b"450"),
        (b"X-Rate-Limit-Time-Reset-Ms", b"20649"),
        (b"X-Rate-Limit-Time-Window-Ms", b"30000"),
    ]
    ok = rules.read_response(m, 200, headers, b"{}")
    assert ok.views == (ServerView("bc-window", remaining=447, capacity=450, reset_after=20.649),)
    assert ok.tier == "pro"
    rules.learn(m, ok)
    again = rules.match("api.bigcommerce.com", "GET", "/stores/abc123/v2/orders", [])
    assert again is not None and again.limits[0].capacity == 450
    throttled = rules.read_response(
        m,
        429,
        [(b"X-Rate-Limit-Time-Reset-Ms", b"1500"), (b"X-Rate-Limit-Requests-Left", b"0")],
        b"",
    )
    assert throttled.throttled and throttled.retry_after == 1.5


# --------------------------------------------------------------------------- GitHub


def github(rules: RuleSet, path: str, method: str = "GET", token: str | None = GH_TOKEN) -> Match:
    headers = [(b"Accept", b"application/vnd.github+json")]
    if token is not None:
        headers.append((b"Authorization", f"Bearer {token}".encode()))
    m = rules.match("api.github.com", method, path, headers)
    assert m is not None
    return m


def test_github_match(rules: RuleSet) -> None:
    m = github(rules, "/repos/octo/hello/issues")
    assert m.limits == (Limit("gh-core", WINDOW, 5000, window=3600),)
    assert m.account == f"github-rest|{hash_secret(GH_TOKEN)}"
    assert_token_free(m, GH_TOKEN)
    # "token X" and "Bearer X" are the same principal
    headers = [(b"authorization", f"token {GH_TOKEN}".encode())]
    same = rules.match("api.github.com", "GET", "/user", headers)
    assert same is not None and same.account == m.account
    search = github(rules, "/search/issues?q=x")
    assert search.operation == "search"
    assert [x.name for x in search.limits] == ["gh-search"]
    assert [x.name for x in github(rules, "/search/code?q=x").limits] == ["gh-code-search"]
    write = github(rules, "/repos/octo/hello/issues", "POST")
    assert [x.name for x in write.limits] == ["gh-core", "gh-content-minute", "gh-content-hour"]
    assert not write.retry_safe and m.retry_safe
    anon = github(rules, "/repos/octo/hello", token=None)
    assert anon.account == "github-rest|anon" and anon.tier == "unauthenticated"
    assert anon.limits == (Limit("gh-core", WINDOW, 60, window=3600),)


GH_DATE = b"Thu, 01 Jan 2026 00:00:00 GMT"  # 1767225600


def test_github_reports(rules: RuleSet) -> None:
    m = github(rules, "/repos/octo/hello/issues")
    headers = [
        (b"Date", GH_DATE),
        (b"x-ratelimit-limit", b"5000"),
        (b"x-ratelimit-remaining", b"4990"),
        (b"x-ratelimit-used", b"10"),
        (b"x-ratelimit-reset", b"1767227400"),
        (b"x-ratelimit-resource", b"core"),
    ]
    ok = rules.read_response(m, 200, headers, b"[]")
    assert ok.views == (
        ServerView("gh-core", used=10, remaining=4990, capacity=5000, reset_after=1800),
    )
    assert ok.tier == "standard" and not ok.throttled
    # search responses report into the search limit and say nothing about the plan
    search = github(rules, "/search/issues?q=x")
    headers_s = [(b"x-ratelimit-limit", b"30"), (b"x-ratelimit-resource", b"search")]
    report = rules.read_response(search, 200, headers_s, b"{}", now=0)
    assert report.views == (ServerView("gh-search", capacity=30),) and report.tier is None


def test_github_403_rate_limit_vs_permission(rules: RuleSet) -> None:
    m = github(rules, "/repos/octo/hello/issues")
    primary = rules.read_response(
        m,
        403,
        [
            (b"Date", GH_DATE),
            (b"x-ratelimit-remaining", b"0"),
            (b"x-ratelimit-reset", b"1767225720"),
            (b"x-ratelimit-resource", b"core"),
        ],
        b'{"message":"API rate limit exceeded for user ID 1."}',
    )
    assert primary.throttled and primary.retry_after == 120
    secondary = rules.read_response(
        m,
        403,
        [(b"retry-after", b"30"), (b"x-ratelimit-remaining", b"4000")],
        b'{"message":"You have exceeded a secondary rate limit."}',
    )
    assert secondary.throttled and secondary.retry_after == 30
    silent = rules.read_response(
        m, 403, [(b"x-ratelimit-remaining", b"4000")], b'{"message":"secondary rate limit"}'
    )
    assert silent.throttled and silent.retry_after == 60
    permission = rules.read_response(
        m,
        403,
        [(b"x-ratelimit-remaining", b"4999")],
        b'{"message":"Resource not accessible by integration"}',
    )
    assert not permission.throttled and permission.retry_after is None
    # the last request of the hour succeeds with remaining 0: not a throttle
    last = rules.read_response(m, 200, [(b"x-ratelimit-remaining", b"0")], b"{}")
    assert not last.throttled
    assert rules.read_response(m, 429, [(b"retry-after", b"5")], b"").retry_after == 5


# --------------------------------------------------------------------------- GitHub GraphQL

# the worked example of GitHub's "Predicting the point value of a query"
GH_DOC_QUERY = """query {
  viewer {
    login
    repositories(first: 100) {
      edges { node { id
        issues(first: 50) {
          edges { node { id
            labels(first: 60) { edges { node { id name } } }
          } }
        }
      } }
    }
  }
}"""


def gh_graphql(rules: RuleSet, query: str | None = None, token: str = GH_TOKEN) -> Match:
    headers = [(b"Authorization", f"bearer {token}".encode())]
    m = rules.match("api.github.com", "POST", "/graphql", headers)
    assert m is not None
    if query is not None:
        m = rules.cost_for(m, json.dumps({"query": query}).encode())
    return m


def test_github_graphql_match_and_costs(rules: RuleSet) -> None:
    m = gh_graphql(rules)
    assert m.rule.id == "github-graphql"
    assert m.limits == (
        Limit("gh-graphql", WINDOW, 5000, window=3600, unit="points"),
        Limit("gh-graphql-minute", ROLLING, 2000, window=60, sub_buckets=6, unit="points"),
    )
    principal = hash_secret(GH_TOKEN)
    assert m.account == f"github-graphql|{principal}"
    assert m.keys == (
        f"github-graphql|gh-graphql|{principal}",
        f"github-graphql|gh-graphql-minute|{principal}",
    )
    assert_token_free(m, GH_TOKEN)
    assert m.body_needed == 65536 and m.max_single is None and m.retry_safe
    # REST and GraphQL keep to their own paths, and their own buckets
    rest = github(rules, "/repos/octo/hello/issues", "POST")
    assert rest.rule.id == "github-rest" and not set(rest.keys) & set(m.keys)
    abs_form = rules.match("api.github.com", "POST", "https://api.github.com/graphql?x=1", [])
    assert abs_form is not None and abs_form.rule.id == "github-graphql"
    # 1 + 100 + 100 x 50 = 5,101 requests; / 100, rounded: 51 points. The
    # secondary limit counts the request: 1 point without a mutation
    priced = gh_graphql(rules, GH_DOC_QUERY)
    assert priced.cost == 51 and priced.costs == (51, 1) and not priced.mutation
    # a mutation: primary at least 1 point, the secondary limit 5
    mutation = gh_graphql(
        rules, 'mutation { addStar(input: {starrableId: "R_1"}) { clientMutationId } }'
    )
    assert mutation.mutation and mutation.costs == (1, 5) and not mutation.retry_safe
    # a body that does not parse: the rule's default (1), the request still counts 1
    broken = rules.cost_for(m, b'{"query": "{ viewer { login "}')
    assert broken is m and m.costs == (1, 1)
    # a rule whose limits all count points: the match's cost for each
    assert rest.costs == (1, 1, 1)


def test_github_graphql_learns_rate_limit_cost(rules: RuleSet) -> None:
    query = "{ viewer { login } rateLimit { cost remaining } }"
    m = gh_graphql(rules, query)
    assert m.cost == 1  # no connection: the minimum
    body = b'{"data": {"viewer": {"login": "octo"}, "rateLimit": {"cost": 3, "remaining": 4990}}}'
    report = rules.read_response(m, 200, [], body)
    assert report.requested_cost == 3 and report.actual_cost is None
    rules.learn(m, report)
    assert gh_graphql(rules, query).costs == (3, 1)
    # a query that does not ask keeps its estimate
    assert gh_graphql(rules, "{ viewer { login } }").cost == 1


def test_github_graphql_feedback(rules: RuleSet) -> None:
    m = gh_graphql(rules, GH_DOC_QUERY)
    headers = [
        (b"Date", GH_DATE),
        (b"x-ratelimit-limit", b"10000"),
        (b"x-ratelimit-remaining", b"9949"),
        (b"x-ratelimit-used", b"51"),
        (b"x-ratelimit-reset", b"1767227400"),
        (b"x-ratelimit-resource", b"graphql"),
    ]
    ok = rules.read_response(m, 200, headers, b'{"data": {}}')
    assert not ok.throttled
    # routed to the hourly limit only: the secondary one has no headers
    assert ok.views == (
        ServerView("gh-graphql", used=51, remaining=9949, capacity=10000, reset_after=1800),
    )
    assert ok.tier == "enterprise"
    rules.learn(m, ok)
    assert gh_graphql(rules).limits[0] == Limit(
        "gh-graphql", WINDOW, 10000, window=3600, unit="points"
    )
    # another resource's numbers say nothing about this rule's limits or plan
    core = [(b"x-ratelimit-limit", b"5000"), (b"x-ratelimit-resource", b"core")]
    other = rules.read_response(m, 200, core, b"{}")
    assert other.views == () and other.tier is None


def test_github_graphql_throttles(rules: RuleSet) -> None:
    m = gh_graphql(rules, GH_DOC_QUERY)
    spent = [
        (b"Date", GH_DATE),
        (b"x-ratelimit-remaining", b"0"),
        (b"x-ratelimit-reset", b"1767225720"),
        (b"x-ratelimit-resource", b"graphql"),
    ]
    # the primary limit: 200, an error, remaining 0; wait for the reset
    primary = rules.read_response(
        m,
        200,
        spent,
        b'{"errors": [{"type": "RATE_LIMITED", '
        b'"message": "API rate limit exceeded for user ID 1."}]}',
    )
    assert primary.throttled and primary.retry_after == 120
    newer = rules.read_response(
        m,
        200,
        spent,
        b'{"errors": [{"type": "RATE_LIMIT", "code": "graphql_rate_limit", '
        b'"message": "API rate limit already exceeded for user ID 1."}]}',
    )
    assert newer.throttled and newer.retry_after == 120
    # the last point of the hour: 200 and remaining 0 too, but data and no error
    last = rules.read_response(m, 200, spent, b'{"data": {"viewer": {"login": "rate limit"}}}')
    assert not last.throttled
    # an ordinary error in a 200 is no throttle either
    wrong = rules.read_response(
        m, 200, [], b'{"errors": [{"type": "NOT_FOUND", "message": "Could not resolve"}]}'
    )
    assert not wrong.throttled
    # secondary: 200 or 403 with its message; Retry-After, else a minute
    secondary = rules.read_response(
        m,
        403,
        [(b"retry-after", b"30"), (b"x-ratelimit-remaining", b"4000")],
        b'{"message": "You have exceeded a secondary rate limit."}',
    )
    assert secondary.throttled and secondary.retry_after == 30
    in_200 = rules.read_response(
        m, 200, [], b'{"errors": [{"message": "You have exceeded a secondary rate limit."}]}'
    )
    assert in_200.throttled and in_200.retry_after == 60
    permission = rules.read_response(
        m,
        403,
        [(b"x-ratelimit-remaining", b"4999")],
        b'{"message": "Resource not accessible by integration"}',
    )
    assert not permission.throttled
    assert rules.read_response(m, 429, [(b"retry-after", b"5")], b"").retry_after == 5


# --------------------------------------------------------------------------- wire


def test_decode_body_deflate_raw_and_unknown() -> None:
    raw = zlib.compressobj(wbits=-15)
    data = raw.compress(b'{"a": 1}') + raw.flush()
    assert decode_body(data, [(b"content-encoding", b"deflate")]) == (b'{"a": 1}', None)
    assert decode_body(b"xx", [(b"content-encoding", b"br")]) == (b"", None)
    assert decode_body(b"5\r\nhello\r\n3\r\n", [(b"transfer-encoding", b"chunked")]) == (
        b"hello",
        None,
    )


# --------------------------------------------------------------------------- load / check


MY_API = """
[[rule]]
id = "my-api"
provider = "Example"
docs = ["https://example.com/limits"]
match = { hosts = ["api.example.com"], path = "^/v1/" }
account.parts = [{ name = "key", from = "header", header = "X-Api-Key", hash = true }]
[[rule.limits]]
name = "per-second"
kind = "bucket"
capacity = 10
rate = {rate}
source = "https://example.com/limits"
"""


def write(tmp_path: Path, text: str, name: str = "rules.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_check_file_ok(tmp_path: Path) -> None:
    rules = RuleSet.check_file(write(tmp_path, MY_API.replace("{rate}", "5")))
    assert [r.id for r in rules] == ["my-api"]
    # a data file (one rule at the top level) checks too
    _, text = RuleSet.builtin_rule_data("etsy-v3")
    assert [r.id for r in RuleSet.check_file(write(tmp_path, text, "etsy.toml"))] == ["etsy-v3"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("rate = {rate}", "rate = 0"),
            "rules.toml: rule 'my-api': limits[0].rate: must be a number > 0",
        ),
        (("rate = {rate}", 'rate = "fast"'), "limits[0].rate: must be a number > 0"),
        (("rate = {rate}", "rate = 1\nburst = 3"), "limits[0].burst: unknown key"),
        (
            ('kind = "bucket"', 'kind = "leaky"'),
            "limits[0].kind: must be bucket, window or rolling",
        ),
        (('path = "^/v1/"', 'path = "^/v1/("'), "match.path: not a valid regex"),
        (('from = "header"', 'from = "cookie"'), "account.parts[0].from: must be one of"),
        (('id = "my-api"', 'id = "My API"'), "rule 'My API': id: must be lower-case"),
        (('hosts = ["api.example.com"]', "hosts = []"), "match.hosts: must list at least one"),
    ],
)
def test_check_file_errors_name_the_field(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    text = MY_API.replace(*change).replace("{rate}", "5")
    with pytest.raises(RuleError) as info:
        RuleSet.check_file(write(tmp_path, text))
    assert message in str(info.value)


GQL_API = """
[[rule]]
id = "my-gql"
docs = ["https://example.com/limits"]
match = { hosts = ["gql.example.com"], path = "^/graphql$" }
[[rule.limits]]
name = "points"
kind = "bucket"
capacity = 1000
rate = 50
source = "https://example.com/limits"
[[rule.limits]]
name = "calls"
kind = "window"
capacity = 100
window = 60
counts = "requests"
mutation_cost = 3
source = "https://example.com/limits"
[rule.cost]
kind = "graphql"
estimator = "shopify"
[[rule.feedback]]
limit = "points"
remaining = { json = "cost.left" }
[rule.throttle]
markers = [{ json = "errors[*].message", pattern = "(?i)slow down", statuses = [200] }]
"""


def test_check_file_estimator_counts_and_marker_patterns(tmp_path: Path) -> None:
    (rule,) = RuleSet.check_file(write(tmp_path, GQL_API))
    assert rule.cost.estimator == "shopify"
    points, calls = rule.limits
    assert (points.counts, calls.counts) == ("points", "requests")
    assert (calls.request_cost, calls.mutation_cost) == (1, 3)
    rules = RuleSet([rule])
    m = rules.match("gql.example.com", "POST", "/graphql", [])
    assert m is not None
    query = rules.cost_for(m, b'{"query": "{ shop { name } }"}')
    assert query.costs == (1, 1)  # shop: an object, 1; name: a scalar
    mutation = rules.cost_for(m, b'{"query": "mutation { a { id } b { id } }"}')
    assert mutation.costs == (20, 3)  # two root mutation fields, 10 each
    slow = rules.read_response(m, 200, [], b'{"errors": [{"message": "Slow down!"}]}')
    assert slow.throttled
    assert not rules.read_response(m, 500, [], b'{"errors": [{"message": "Slow down!"}]}').throttled


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('estimator = "shopify"', 'estimator = "hubspot"'), "cost.estimator: must be one of"),
        (('kind = "graphql"', 'kind = "constant"'), "cost.estimator: only a cost of kind"),
        (('counts = "requests"', 'counts = "calls"'), "limits[1].counts: must be points or"),
        (('counts = "requests"\n', ""), "limits[1].mutation_cost: only a limit with counts"),
        (("mutation_cost = 3", "mutation_cost = -1"), "limits[1].mutation_cost: must be a number"),
        (('pattern = "(?i)slow down"', 'pattern = "("'), "markers[0].pattern: not a valid regex"),
        (
            ('pattern = "(?i)slow down"', 'pattern = "x", equals = "y"'),
            "markers[0]: a header or json marker needs exactly one of equals, pattern",
        ),
        (("statuses = [200]", "statuses = [2000]"), "markers[0].statuses: must be a list"),
    ],
)
def test_check_file_cost_and_counting_errors(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    text = GQL_API.replace(*change)
    assert text != GQL_API
    with pytest.raises(RuleError) as info:
        RuleSet.check_file(write(tmp_path, text))
    assert message in str(info.value)


def test_check_file_reports_every_bad_rule(tmp_path: Path) -> None:
    text = MY_API.replace("{rate}", "0") + MY_API.replace("my-api", "other").replace("{rate}", "-1")
    with pytest.raises(RuleError) as info:
        RuleSet.check_file(write(tmp_path, text))
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and "'my-api'" in lines[0] and "'other'" in lines[1]


def test_check_file_not_toml_or_no_rules(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="rules.toml: not valid TOML"):
        RuleSet.check_file(write(tmp_path, "[[rule]\n"))
    with pytest.raises(RuleError, match="no rules"):
        RuleSet.check_file(write(tmp_path, "x = 1\n"))
    with pytest.raises(RuleError, match="cannot read"):
        RuleSet.check_file(tmp_path / "missing.toml")


def test_load_subset_and_unknown() -> None:
    subset = RuleSet.load(["etsy-v3", "github-rest"])
    assert subset.ids() == ["etsy-v3", "github-rest"]
    assert subset.intercept_globs() == ["openapi.etsy.com", "api.github.com"]
    assert subset.match("acme.myshopify.com", "GET", "/admin/products.json", []) is None
    with pytest.raises(RuleError, match="unknown rule 'nope', 'nada'"):
        RuleSet.load(["etsy-v3", "nope", "nada"])
    assert RuleSet.load([]).ids() == []


def test_load_user_rules_override_and_add() -> None:
    etsy_override: dict[str, Any] = tomllib.loads(RuleSet.builtin_rule_data("etsy-v3")[1])
    etsy_override["limits"][0]["capacity"] = 150
    mine = tomllib.loads(MY_API.replace("{rate}", "5"))["rule"][0]
    rules = RuleSet.load(extra=[etsy_override, mine])
    assert rules.ids()[0] == "my-api"  # new rules first: they win over built-in globs
    assert rules.ids().count("etsy-v3") == 1
    assert etsy(rules).limits[0] == Limit("etsy-qps", WINDOW, 150, window=1)
    m = rules.match("api.example.com", "GET", "/v1/things", [(b"x-api-key", b"k-123")])
    assert m is not None and m.limits == (Limit("per-second", BUCKET, 10, rate=5),)
    assert m.account == f"my-api|{hash_secret('k-123')}"
    with pytest.raises(RuleError, match="config: rule 'my-api' is given twice"):
        RuleSet.load(extra=[mine, mine])


def test_learned_state_is_bounded(rules: RuleSet, monkeypatch: pytest.MonkeyPatch) -> None:
    import elbasy.quota as quota

    monkeypatch.setattr(quota, "FACTS", 3)
    for i in range(5):
        m = shopify(rules, "/admin/products.json", shop=f"shop{i}")
        rules.learn(m, Report(tier="plus"))
    assert [shopify(rules, "/admin/products.json", shop=f"shop{i}").tier for i in range(5)] == [
        "standard",
        "standard",
        "plus",
        "plus",
        "plus",
    ]


# --------------------------------------------------------------------------- CLI


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, args, env=env, prog_name="elbasy")


def test_cli_rules_list() -> None:
    result = invoke(["rules", "list"])
    assert result.exit_code == 0, result.output
    header, *lines = result.output.splitlines()
    assert header.split() == ["RULE", "ON", "HOSTS", "LIMITS", "(default", "tier)"]
    assert [line.split()[:2] for line in lines] == [[i, "yes"] for i in BUILTIN_IDS]
    rest = next(line for line in lines if line.startswith("shopify-admin-rest "))
    assert "*.myshopify.com" in rest and "shopify-rest 40 @ 2/s" in rest
    amazon = next(line for line in lines if line.startswith("amazon-sp-api "))
    assert "sellingpartnerapi-na.amazon.com +5 more" in amazon and "+11 more" in amazon
    subset = invoke(["--rules", "etsy-v3", "rules", "list"])
    assert subset.exit_code == 0
    on = {line.split()[0]: line.split()[1] for line in subset.output.splitlines()[1:]}
    assert on == {i: "yes" if i == "etsy-v3" else "no" for i in BUILTIN_IDS}
    env = invoke(["rules", "list"], {"ELBASY_RULES": "github-rest,bigcommerce"})
    on = {line.split()[0]: line.split()[1] for line in env.output.splitlines()[1:]}
    assert [i for i in on if on[i] == "yes"] == ["bigcommerce", "github-rest"]


@pytest.mark.parametrize("columns", ["80", "100", "120", "300"])
def test_cli_rules_list_fits_the_terminal(columns: str) -> None:
    result = invoke(["rules", "list"], {"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(BUILTIN_IDS) + 1
    width = min(int(columns), 120)
    assert max(len(line) for line in lines) <= width, result.output
    # a narrower terminal gets shorter cells, never a wrapped table
    assert all(line.split()[0] in ("RULE", *BUILTIN_IDS) for line in lines)


def test_cli_unknown_rule_id() -> None:
    result = invoke(["--rules", "etsy-v3,nope", "rules", "list"])
    assert result.exit_code == 2
    assert "Error: invalid value for --rules: unknown rule 'nope'" in result.output


def test_cli_rules_show() -> None:
    result = invoke(["rules", "show", "shopify-admin-rest"])
    assert result.exit_code == 0
    data = tomllib.loads(result.output)
    assert data["id"] == "shopify-admin-rest"
    assert "https://shopify.dev/docs/api/admin-rest/usage/rate-limits" in result.output
    disabled = invoke(["--rules", "etsy-v3", "rules", "show", "github-rest"])
    assert disabled.exit_code == 0, disabled.output
    first = disabled.output.splitlines()[0]
    assert first == "# built-in rule, builtin:github-rest.toml; disabled (not in --rules)"
    assert tomllib.loads(disabled.output)["id"] == "github-rest"
    enabled = invoke(["--rules", "etsy-v3", "rules", "show", "etsy-v3"])
    assert "disabled" not in enabled.output.splitlines()[0]
    typo = invoke(["rules", "show", "github-rst"])
    assert typo.exit_code == 1
    assert typo.output == "Error: no rule 'github-rst' (did you mean 'github-rest'?)\n"
    missing = invoke(["rules", "show", "nope"])
    assert missing.exit_code == 1
    assert "Error: no rule 'nope' (rules: shopify-admin-graphql, " in missing.output


def test_cli_rules_check(tmp_path: Path) -> None:
    good = invoke(["rules", "check", str(write(tmp_path, MY_API.replace("{rate}", "5")))])
    assert good.exit_code == 0 and good.output == "ok: 1 rule\n"
    bad = invoke(["rules", "check", str(write(tmp_path, MY_API.replace("{rate}", "0")))])
    assert bad.exit_code == 1
    assert "error: rules.toml: rule 'my-api': limits[0].rate: must be a number > 0" in bad.output


def test_cli_config_file_user_rules(tmp_path: Path) -> None:
    text = 'rules = ["my-api", "etsy-v3"]\n' + MY_API.replace("{rate}", "5")
    path = write(tmp_path, text, "elbasy.toml")
    listed = invoke(["--config", str(path), "rules", "list"])
    assert listed.exit_code == 0, listed.output
    on = [line.split()[0] for line in listed.output.splitlines()[1:] if line.split()[1] == "yes"]
    assert on == ["my-api", "etsy-v3"]
    assert listed.output.splitlines()[1].startswith("my-api ")  # user rules first
    shown = invoke(["--config", str(path), "rules", "show", "my-api"])
    assert shown.exit_code == 0
    assert tomllib.loads(shown.output)["limits"][0]["rate"] == 5
    # show-config writes the user rules back as [[rule]] tables that load again
    config = invoke(["--config", str(path), "show-config"])
    assert config.exit_code == 0, config.output
    again = invoke(["--config", str(write(tmp_path, config.output, "again.toml")), "show-config"])
    assert again.output == config.output
    assert tomllib.loads(config.output)["rule"][0]["id"] == "my-api"


def test_cli_config_file_bad_user_rule(tmp_path: Path) -> None:
    path = write(tmp_path, MY_API.replace("{rate}", "0"), "elbasy.toml")
    result = invoke(["--config", str(path), "rules", "list"])
    assert result.exit_code == 2
    assert f"config file {str(path)!r}: rule 'my-api': limits[0].rate: must be a number > 0" in (
        result.output
    )


def test_every_entry_checks_rules_by_one_path(tmp_path: Path) -> None:
    """A file for `elbasy rules check`, a config file, Config(rule=...) (tests, a
    reload's command line read again): each reports the same lines, from
    check_rules, under its own origin."""
    from elbasy.config import Config, ConfigError
    from elbasy.rules import check_rules

    text = (
        MY_API.replace("{rate}", "0")
        + MY_API.replace("my-api", "other").replace("{rate}", "5")
        + MY_API.replace("my-api", "other").replace("{rate}", "5")
    )
    tables = tomllib.loads(text)["rule"]
    with pytest.raises(RuleError) as direct:
        check_rules(tables, "here")
    lines = str(direct.value).splitlines()
    assert lines == [
        "here: rule 'my-api': limits[0].rate: must be a number > 0",
        "here: rule 'other' is given twice",
    ]
    with pytest.raises(RuleError) as checked:
        RuleSet.check_file(write(tmp_path, text))
    assert str(checked.value) == str(direct.value).replace("here:", "rules.toml:")
    with pytest.raises(ConfigError) as configured:
        Config(rule=tuple(tables))
    assert str(direct.value).replace("here:", "config:") in str(configured.value)
    path = write(tmp_path, text, "elbasy.toml")
    result = invoke(["--config", str(path), "rules", "list"])
    assert result.exit_code == 2
    assert lines[0].replace("here", f"config file {str(path)!r}") in result.output
