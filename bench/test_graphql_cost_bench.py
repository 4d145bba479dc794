"""What pricing a GraphQL query from its text costs (pytest-benchmark).

Not part of the test suite (``testpaths = ["tests"]``); run it as::

    python -m pytest bench/test_graphql_cost_bench.py --benchmark-only -q -p no:cacheprovider

Each round prices one request body. A *new* shape is a query text not seen
before (a counter in a search string makes every round's text unique, so
each one is parsed by graphql-core, printed for its shape key and walked); a
*cached* one is the same text again, with or without new variable values:
a JSON decode, a digest of the text and two dict lookups.
"""

from __future__ import annotations

import json
from itertools import count

import pytest

from elbasy.rules import RuleSet
from elbasy.rules.graphql_cost import clear_cache, estimate

BOUNDED = pytest.mark.benchmark(max_time=2.0, min_rounds=5, warmup=True, warmup_iterations=200)

#: An order sync as apps write it: a page of orders with their line items,
#: customer and addresses, a fragment, variables for the page sizes (1.2 KB).
ORDERS = """
query OrderSync($first: Int!, $lines: Int!, $after: String) {
  orders(first: $first, after: $after, query: "updated_at:>SINCE", sortKey: UPDATED_AT) {
    pageInfo { hasNextPage endCursor }
    edges {
      cursor
      node {
        id name createdAt updatedAt displayFinancialStatus displayFulfillmentStatus
        totalPriceSet { shopMoney { amount currencyCode } }
        customer { id email firstName lastName defaultAddress { ...Address } }
        shippingAddress { ...Address }
        lineItems(first: $lines) {
          edges {
            node {
              id title quantity sku
              originalUnitPriceSet { shopMoney { amount currencyCode } }
              variant { id sku product { id handle } }
            }
          }
        }
        fulfillments(first: 5) { id status trackingInfo { number url } }
      }
    }
  }
}
fragment Address on MailingAddress { address1 address2 city provinceCode zip countryCodeV2 }
"""

GITHUB = """query {
  viewer {
    login
    repositories(first: 100, orderBy: {field: PUSHED_AT, direction: DESC}) {
      edges { node { id nameWithOwner
        issues(first: 50, filterBy: {since: "SINCE"}) {
          edges { node { id title
            labels(first: 60) { edges { node { id name } } }
          } }
        }
      } }
    }
  }
  rateLimit { cost remaining }
}"""


def _body(query: str, since: str, **variables: object) -> bytes:
    return json.dumps({"query": query.replace("SINCE", since), "variables": variables}).encode()


@BOUNDED
def test_new_shape_shopify(benchmark) -> None:
    """(a) An unseen Shopify query: parse, shape and price it (2 + 50 x ...)."""
    clear_cache()
    n = count()

    def one() -> None:
        got = estimate(_body(ORDERS, f"2026-01-01T00:00:{next(n)}Z", first=50, lines=20), "shopify")
        assert got is not None and got.cost is not None and got.cost > 1000

    benchmark(one)


@BOUNDED
def test_new_shape_github(benchmark) -> None:
    """(b) An unseen GitHub query (the documented example's shape): 51 points."""
    clear_cache()
    n = count()

    def one() -> None:
        got = estimate(_body(GITHUB, f"2026-01-01T00:00:{next(n)}Z"), "github")
        assert got is not None and got.cost == 51

    benchmark(one)


@BOUNDED
def test_cached_shape(benchmark) -> None:
    """(c) The same Shopify query text and variables again: a lookup."""
    clear_cache()
    body = _body(ORDERS, "2026-01-01T00:00:00Z", first=50, lines=20, after=None)
    first = estimate(body, "shopify")

    def one() -> None:
        assert estimate(body, "shopify") is first

    benchmark(one)


@BOUNDED
def test_cached_shape_next_page(benchmark) -> None:
    """(d) The same text, a new cursor each round (variables that size nothing)."""
    clear_cache()
    bodies = [
        _body(ORDERS, "2026-01-01T00:00:00Z", first=50, lines=20, after=f"eyJsYXN0X2lkIjo{i:08d}")
        for i in range(1000)
    ]
    first = estimate(bodies[0], "shopify")
    n = count()

    def one() -> None:
        assert estimate(bodies[next(n) % 1000], "shopify") is first

    benchmark(one)


@BOUNDED
def test_cost_for_cached_shape(benchmark) -> None:
    """(e) RuleSet.cost_for on a Shopify GraphQL match: the estimate, the learned
    cost lookup and the match's copy."""
    clear_cache()
    rules = RuleSet.builtin()
    m = rules.match(
        "acme.myshopify.com",
        "POST",
        "/admin/api/2024-10/graphql.json",
        [(b"X-Shopify-Access-Token", b"shpat_0123456789abcdef")],
    )
    assert m is not None
    body = _body(ORDERS, "2026-01-01T00:00:00Z", first=50, lines=20, after=None)

    def one() -> None:
        assert rules.cost_for(m, body).cost == 1000  # the estimate, at the cap

    benchmark(one)
