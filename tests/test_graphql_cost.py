"""elbasy.rules.graphql_cost: GraphQL requests priced from their text.

Every expected number is worked out by hand in a comment from the vendors'
documented rules, not taken from a run:

- Shopify (https://shopify.dev/docs/api/usage/limits): scalar/enum 0, object
  1 + its selection, connection 2 + n x (node 1 + its selection), n = first
  or last (250 when unknown), each root mutation field 10 + its selection.
- GitHub (https://docs.github.com/graphql/overview/rate-limits-and-query-limits-for-the-graphql-api):
  the requests of every connection (the product of its parents' page sizes,
  1 at the top) added up, / 100, rounded to the nearest, at least 1.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from graphql.language import parse

import elbasy.rules.graphql_cost as graphql_cost
from elbasy.rules.graphql_cost import Estimate, clear_cache, estimate


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()


def body(query: str, variables: Any = None, operation: str | None = None) -> bytes:
    payload: dict[str, Any] = {"query": query}
    if variables is not None:
        payload["variables"] = variables
    if operation is not None:
        payload["operationName"] = operation
    return json.dumps(payload).encode()


def shopify(query: str, variables: Any = None, operation: str | None = None) -> float | None:
    got = estimate(body(query, variables, operation), "shopify")
    return None if got is None else got.cost


def github(query: str, variables: Any = None, operation: str | None = None) -> float | None:
    got = estimate(body(query, variables, operation), "github")
    return None if got is None else got.cost


# --------------------------------------------------------------------------- Shopify

PRODUCTS_AND_VARIANTS = (
    "{ products(first: 80) { edges { node { id variants(first: 8) { edges { node { id } } } } } } }"
)


def test_shopify_nested_connections() -> None:
    # 2 + 80 x (node 1 + id 0 + variants (2 + 8 x (node 1 + id 0))) = 2 + 80 x 11 = 882
    assert shopify(PRODUCTS_AND_VARIANTS) == 882


def test_shopify_scalars_objects_and_root_fields() -> None:
    # shop: an object, 1; name, id, currencyCode: scalars and enums, 0
    assert shopify("{ shop { id name currencyCode } }") == 1
    # shop 1 + its plan object 1
    assert shopify("query { shop { name plan { displayName } } }") == 2
    # root fields add up: shop 1 + products (2 + 3 x node 1) = 6
    assert shopify("{ shop { name } products(first: 3) { nodes { id } } }") == 6
    # a root scalar only: 0
    assert shopify("{ __typename }") == 0


def test_shopify_first_from_variables() -> None:
    query = (
        "query Q($n: Int!, $m: Int!) { products(first: $n) { edges { node { "
        "variants(first: $m) { nodes { id } } } } } }"
    )
    # 2 + 10 x (node 1 + variants (2 + 5 x node 1)) = 2 + 10 x 8 = 82
    assert shopify(query, {"n": 10, "m": 5}) == 82
    # a variable not supplied: 250, the largest page: 2 + 250 x (1 + 2 + 5) = 2002
    assert shopify(query, {"m": 5}) == 2002
    # not an integer (the server refuses it): 250 as well
    assert shopify(query, {"n": "ten", "m": 5}) == 2002
    # a default in the operation's definition stands in: 2 + 20 x 1 = 22
    assert shopify("query($n: Int = 20) { orders(first: $n) { nodes { id } } }") == 22
    assert shopify("query($n: Int = 20) { orders(first: $n) { nodes { id } } }", {"n": 4}) == 6
    # last sizes it just as well: 2 + 7 x 1 = 9
    assert shopify("{ orders(last: 7) { edges { node { id } } } }") == 9


def test_shopify_connection_without_first_is_the_largest_page() -> None:
    # 2 + 250 x node 1 = 252, by edges or by nodes
    assert shopify('{ products(query: "title:shoe") { edges { node { id } } } }') == 252
    assert shopify("{ products { nodes { id title } } }") == 252


def test_shopify_edges_nodes_page_info_and_cursor() -> None:
    # edges and nodes both: both counted; cursor, pageInfo and totalCount add nothing:
    # 2 + 10 x node 1 (edges) + 10 x node 1 (nodes) = 22
    query = (
        "{ products(first: 10) { edges { cursor node { id } } nodes { id } "
        "pageInfo { hasNextPage endCursor } } }"
    )
    assert shopify(query) == 22
    # a connection that lists nothing still costs its 2
    assert shopify("{ products(first: 10) { pageInfo { hasNextPage } } }") == 2


def test_shopify_sized_list_without_edges() -> None:
    # first, but the items' fields selected directly (Order.fulfillments is a
    # list): n objects, erring upward: order 1 + (2 + 5 x (1 + trackingInfo 1)) = 13
    assert (
        shopify("{ order(id: 1) { fulfillments(first: 5) { id trackingInfo { number } } } }") == 13
    )
    # scalars only: order 1 + (2 + 5 x 1) = 8 (read as a connection: 1 + 2)
    assert shopify("{ order(id: 1) { fulfillments(first: 5) { id status } } }") == 8


def test_shopify_named_fragments() -> None:
    query = """
    query { products(first: 5) { ...Page } }
    fragment Page on ProductConnection { edges { node { ...Card } } }
    fragment Card on Product { id title featuredImage { url } }
    """
    # 2 + 5 x (node 1 + featuredImage 1) = 12
    assert shopify(query) == 12
    # a fragment used twice, under two aliases, counts twice:
    # a (2 + 5 x 2) + b (2 + 5 x 2) = 24
    twice = """
    query { a: products(first: 5) { ...Page } b: products(first: 5) { ...Page } }
    fragment Page on ProductConnection { edges { node { ...Card } } }
    fragment Card on Product { id featuredImage { url } }
    """
    assert shopify(twice) == 24


def test_shopify_unions_and_interfaces_take_the_dearest_branch() -> None:
    query = """{
      node(id: "gid://shopify/Product/1") {
        id
        ... on Product { title variants(first: 10) { nodes { id } } }
        ... on Order { lineItems(first: 3) { nodes { id } } customer { id } }
      }
    }"""
    # node 1 + max(Product: variants 2 + 10 x 1 = 12, Order: (2 + 3 x 1) + customer 1 = 6) = 13
    assert shopify(query) == 13
    # the same type condition twice is one branch: max(Product: 1 + 1, Order: 1) = 2; node 1
    merged = """{ node(id: "1") {
      ... on Product { a: featuredImage { url } }
      ... on Product { b: featuredImage { url } }
      ... on Order { customer { id } }
    } }"""
    assert shopify(merged) == 3
    # a fragment spread is a branch of its type condition:
    # node 1 + max(Product: variants 2 + 10 x 1 = 12, Order: customer 1) = 13
    spreads = """{ node(id: "1") { ...P ...O } }
    fragment P on Product { variants(first: 10) { nodes { id } } }
    fragment O on Order { customer { id } }"""
    assert shopify(spreads) == 13
    # an inline fragment without a type condition is no alternative: shop 1 + plan 1
    assert shopify("{ shop { ... { plan { displayName } } } }") == 2


def test_shopify_aliases_count_separately() -> None:
    # two product lookups, 1 each
    assert shopify('{ a: product(id: "1") { id } b: product(id: "2") { id } }') == 2
    # the same connection twice: 2 x (2 + 3 x 1) = 10
    assert (
        shopify("{ a: orders(first: 3) { nodes { id } } b: orders(first: 3) { nodes { id } } }")
        == 10
    )


def test_shopify_mutations() -> None:
    # productCreate 10 + product 1 + userErrors 1 = 12
    query = (
        'mutation { productCreate(input: {title: "x"}) { product { id } '
        "userErrors { field message } } }"
    )
    got = estimate(body(query), "shopify")
    assert got is not None and got.cost == 12 and got.is_mutation
    # each root mutation field is 10: 2 x (10 + node 1) = 22
    two = (
        'mutation { a: tagsAdd(id: "1", tags: ["x"]) { node { id } } '
        'b: tagsAdd(id: "2", tags: ["y"]) { node { id } } }'
    )
    assert shopify(two) == 22
    # root fields through a fragment are root fields too: 10 + node 1 = 11
    assert (
        shopify("mutation { ...M } fragment M on Mutation { tagsAdd(id: 1) { node { id } } }") == 11
    )
    query_estimate = estimate(body("{ shop { id } }"), "shopify")
    assert query_estimate is not None and not query_estimate.is_mutation


def test_shopify_skip_and_include() -> None:
    query = (
        "query($full: Boolean!) { shop { name } "
        "products(first: 10) @include(if: $full) { nodes { id } } }"
    )
    # shop 1, plus products 2 + 10 x 1 = 12 only when included
    assert shopify(query, {"full": False}) == 1
    assert shopify(query, {"full": True}) == 13
    # not supplied: counted (errs upward)
    assert shopify(query) == 13
    # literal conditions
    assert shopify("{ shop { name } orders(first: 4) @skip(if: true) { nodes { id } } }") == 1
    assert shopify("{ shop { name } orders(first: 4) @skip(if: false) { nodes { id } } }") == 7


def test_operation_name_picks_the_operation() -> None:
    doc = "query Small { shop { id } } query Big { products(first: 50) { nodes { id } } }"
    assert shopify(doc, operation="Small") == 1  # shop 1
    assert shopify(doc, operation="Big") == 52  # 2 + 50 x 1
    # no name in a document of two: the dearest
    assert shopify(doc) == 52
    # a name the document does not hold: the server refuses it; no estimate
    assert shopify(doc, operation="Other") is None
    mixed = "query R { shop { id } } mutation W { tagsAdd(id: 1) { node { id } } }"
    read = estimate(body(mixed, operation="R"), "shopify")
    write = estimate(body(mixed, operation="W"), "shopify")
    assert read is not None and not read.is_mutation and read.cost == 1
    assert write is not None and write.is_mutation and write.cost == 11
    assert read.shape != write.shape


def test_not_graphql_or_not_parsing_is_none() -> None:
    assert estimate(b"not json", "shopify") is None
    assert estimate(b"[1, 2]", "shopify") is None
    assert estimate(b'{"variables": {}}', "shopify") is None
    assert estimate(b'{"query": "   "}', "shopify") is None
    assert estimate(body("{ shop { name "), "shopify") is None
    assert estimate(body("{ shop { name } }")[:-5], "shopify") is None  # cut short
    # the same unparseable text again is answered from the cache, still None
    assert estimate(body("{ shop { name "), "github") is None
    with pytest.raises(ValueError, match="unknown GraphQL cost calculator"):
        estimate(body("{ shop { id } }"), "hubspot")


def test_fragment_cycles_and_fragment_bombs_stay_cheap() -> None:
    # a cycle (the server refuses it) is cut, not followed: shop 1 + nothing
    cycle = "{ shop { ...A } } fragment A on Shop { id ...B } fragment B on Shop { ...A }"
    assert shopify(cycle) == 1
    # 30 fragments, each spreading the next twice: 2^30 expansions if followed
    # naively. Each level costs c(i) = 2 x (1 + c(i + 1)), c(30) = 0, so
    # c(0) = 2^31 - 2; root object 1 on top: 2^31 - 1
    levels = 30
    parts = ["{ root { ...F0 } }"]
    for i in range(levels):
        parts.append(
            f"fragment F{i} on T {{ a{i}: o {{ ...F{i + 1} }} b{i}: o {{ ...F{i + 1} }} }}"
        )
    parts.append(f"fragment F{levels} on T {{ id }}")
    start = time.perf_counter()
    assert shopify(" ".join(parts)) == 2**31 - 1
    # side by side, spread at one level (the connection test looks through
    # them too), and as a mutation's root fields: 1 + 2^30 x 0 and 2^30 x 10
    flat = ["{ root { ...G0 } }"]
    flat += [f"fragment G{i} on T {{ ...G{i + 1} ...G{i + 1} }}" for i in range(levels)]
    flat.append(f"fragment G{levels} on T {{ id }}")
    assert shopify(" ".join(flat)) == 1
    root = ["mutation { ...M0 }"]
    root += [f"fragment M{i} on Mutation {{ ...M{i + 1} ...M{i + 1} }}" for i in range(levels)]
    root.append(f"fragment M{levels} on Mutation {{ tagsAdd(id: 1) {{ userErrors {{ field }} }} }}")
    # 2^30 root fields of 10 + userErrors 1
    assert shopify(" ".join(root)) == 2**30 * 11
    assert time.perf_counter() - start < 1.0
    # nested deeper than Python recurses: no estimate, no crash
    deep = "{" + "a {" * 3000 + "id" + "}" * 3001
    assert estimate(body(deep), "shopify") is None


# --------------------------------------------------------------------------- GitHub

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


def test_github_documented_example() -> None:
    # "Predicting the point value of a query": repositories 1 (the viewer, once)
    # + issues 100 (each repository) + labels 100 x 50 = 5,000 (each issue)
    # = 5,101 requests; / 100 = 51.01, rounded: 51
    assert github(GH_DOC_QUERY) == 51


def test_github_node_limit_examples_as_points() -> None:
    # the node-limit page's simple query: repositories 1 + issues 50 = 51
    # requests; 0.51 rounds to 1
    simple = """query { viewer { repositories(first: 50) { edges { repository: node { name
      issues(first: 10) { totalCount edges { node { title bodyHTML } } } } } } } }"""
    assert github(simple) == 1
    # its complex query: repositories 1 + pullRequests 50 + their comments 50 x 20
    # + issues 50 + their comments 50 x 20 + followers 1 = 2,102 requests; 21.02: 21
    complex_query = """query { viewer {
      repositories(first: 50) { edges { repository: node { name
        pullRequests(first: 20) { edges { pullRequest: node { title
          comments(first: 10) { edges { comment: node { bodyHTML } } } } } }
        issues(first: 20) { totalCount edges { issue: node { title bodyHTML
          comments(first: 10) { edges { comment: node { bodyHTML } } } } } } } } }
      followers(first: 10) { edges { follower: node { login } } } } }"""
    assert github(complex_query) == 21


def test_github_rounding_minimum_and_unknown_pages() -> None:
    # no connection at all: 0 requests, the minimum is 1
    assert github("{ viewer { login } }") == 1
    # (1 + 100) + (1 + 100) + (1 + 47) = 250 requests: 2.5 rounds half up to 3
    # (to the nearest; Python's round() would give 2)
    one = "repositories(first: {n}) {{ nodes {{ issues(first: 1) {{ totalCount }} }} }}"
    query = (
        "{ viewer { "
        + " ".join(f"r{i}: " + one.format(n=n) for i, n in enumerate((100, 100, 47)))
        + " } }"
    )
    assert github(query) == 3
    # a connection without first (GitHub refuses it) or with an unknown variable
    # is 100, the largest page: 1 + 100 (issues) + 100 x 10 (labels) = 1,101: 11
    nested = (
        "repositories{first} {{ nodes {{ issues(first: 10) {{ nodes {{ "
        "labels(first: 5) {{ nodes {{ name }} }} }} }} }} }}"
    )
    assert github("{ viewer { " + nested.format(first="") + " } }") == 11
    assert github("query($n: Int) { viewer { " + nested.format(first="(first: $n)") + " } }") == 11
    # ... and the page asked for when given: 1 + 7 + 70 = 78 requests: 0.78 rounds to 1
    assert (
        github("query($n: Int) { viewer { " + nested.format(first="(first: $n)") + " } }", {"n": 7})
        == 1
    )


def test_github_unions_take_the_dearest_branch() -> None:
    query = """{ search(query: "is:open", type: ISSUE, first: 100) { nodes {
      ... on Issue { comments(first: 50) { nodes { reactions(first: 10) { totalCount } } } }
      ... on PullRequest { commits(first: 20) { totalCount } }
    } } }"""
    # search 1; Issue: comments 100 + reactions 100 x 50 = 5,100; PullRequest:
    # commits 100. The dearer branch: 1 + 5,100 = 5,101: 51 (both would be 5,201: 52)
    assert github(query) == 51


def test_github_mutations() -> None:
    query = (
        'mutation { addStar(input: {starrableId: "R_1"}) { starrable { '
        "stargazers(first: 100) { nodes { login } } } } }"
    )
    # stargazers: 1 request; 0.01 rounds to 0, the minimum is 1
    got = estimate(body(query), "github")
    assert got is not None and got.cost == 1 and got.is_mutation


# --------------------------------------------------------------------------- shapes and cache


def test_shape_ignores_layout_and_keeps_what_prices() -> None:
    def shape(query: str, variables: Any = None) -> str:
        got = estimate(body(query, variables), None)
        assert got is not None and got.cost is None
        return got.shape

    base = shape("query { shop { name } }")
    # whitespace, commas and comments do not make another shape
    assert shape("query {\n  shop { name, }  # the shop\n}") == base
    # variables that size nothing do not either
    assert shape("query{shop{name}}", {"id": "gid://1", "n": 5}) == base
    # the shape is the tokens: the shorthand without "query" is another text
    assert shape("{ shop { name } }") != base
    # a literal string does
    assert shape('{ shop { name(x: "a  b") } }') != shape('{ shop { name(x: "a b") } }')
    # so does a page size, literal or by variable
    sized = "query($n: Int) { orders(first: $n) { nodes { id } } }"
    assert shape(sized, {"n": 5}) != shape(sized, {"n": 6})
    assert shape(sized, {"n": 5}) == shape(sized, {"n": 5, "other": 1})
    assert shape("{ orders(first: 5) { nodes { id } } }") != shape(
        "{ orders(first: 6) { nodes { id } } }"
    )
    # and a condition of @include
    cond = "query($a: Boolean!) { shop { name @include(if: $a) } }"
    assert shape(cond, {"a": True}) != shape(cond, {"a": False})
    # the calculator prices; it does not change the shape
    a = estimate(body(PRODUCTS_AND_VARIANTS), "shopify")
    b = estimate(body(PRODUCTS_AND_VARIANTS), "github")
    assert a is not None and b is not None and a.shape == b.shape and a.cost != b.cost


def test_cache_returns_the_same_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    first = estimate(body(PRODUCTS_AND_VARIANTS), "shopify")
    assert isinstance(first, Estimate)
    # the second time is a lookup: the very same object, and no parse
    monkeypatch.setattr(graphql_cost, "parse", lambda *a, **k: pytest.fail("parsed again"))
    assert estimate(body(PRODUCTS_AND_VARIANTS), "shopify") is first
    # variables that size nothing: the same estimate, no parse
    query = "query($n: Int, $after: String) { orders(first: $n, after: $after) { nodes { id } } }"
    monkeypatch.undo()
    assert shopify(query, {"n": 1}) == 3  # 2 + 1 x 1
    monkeypatch.setattr(graphql_cost, "parse", lambda *a, **k: pytest.fail("parsed again"))
    assert shopify(query, {"n": 1, "after": "abc"}) == 3
    # a new page size is parsed once more (no syntax tree is kept), then cached
    calls: list[str] = []
    monkeypatch.setattr(graphql_cost, "parse", lambda q, **k: calls.append(q) or parse(q, **k))
    assert shopify(query, {"n": 9}) == 11  # 2 + 9 x 1
    assert shopify(query, {"n": 9, "after": "def"}) == 11
    assert len(calls) == 1


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graphql_cost, "MAX_SHAPES", 3)
    for i in range(5):
        assert shopify(f"{{ orders(first: {i}) {{ nodes {{ id }} }} }}") == 2 + i
    assert len(graphql_cost._texts) == 3
    # the oldest were dropped: the first text is parsed anew, and priced the same
    calls: list[str] = []
    monkeypatch.setattr(graphql_cost, "parse", lambda q, **k: calls.append(q) or parse(q, **k))
    assert shopify("{ orders(first: 0) { nodes { id } } }") == 2
    assert shopify("{ orders(first: 4) { nodes { id } } }") == 6
    assert len(calls) == 1
