"""Mock Shopify Admin GraphQL: queries priced from a schema, a bucket of points per (shop, token).

The schema is ``shopify_admin.graphql`` (a small Admin-like SDL).  A query is parsed and
validated against it with graphql-core; the mock runs it against a shop's catalog of
deterministic fake data and answers the ``data`` it built, with ``extensions.cost``.

**Requested cost** (before execution), the documented defaults of
https://shopify.dev/docs/api/usage/limits and Shopify Engineering's "Rate Limiting
GraphQL APIs by Calculating Query Complexity":

* a field returning a scalar or an enum costs 0 (``__typename`` too, and introspection:
  ``__schema``/``__type`` are answered by graphql-core and priced 0);
* a field returning an object costs 1 plus its selections;
* a field returning an interface or a union costs 1 plus the most expensive of the
  selections it makes for each of its possible object types (fragments on one type count
  only for that type);
* a connection (a ``...Connection`` taking ``first``/``last``) costs 2 plus ``first``
  (or ``last``) times the cost of one node with its selections; ``edges``, ``cursor``,
  ``node``, ``nodes`` and ``pageInfo`` are within those 2 points (``edges { node }`` and
  ``nodes`` select on the same items: their selections are merged).  With both ``first``
  and ``last`` the page is sized by the larger;
* a plain list of objects (``Customer.addresses``) costs as one object; ``nodes(ids:)``
  costs one object per id;
* a mutation's root field costs 10, **whatever its payload selects**: the docs list
  "Mutation: 10" as the cost of the field, and the changelog's dynamic mutation costs
  ("a base cost of 10 points", plus points for the input) count nothing for the payload;
* variables come from the request's ``variables`` (defaults applied); fragments, inline
  fragments, aliases, ``@skip``/``@include`` and several root fields are collected the
  way GraphQL execution collects them (one response key, one cost).

Worked: ``products(first: 80){edges{node{id variants(first: 8){edges{node{id}}}}}}`` is
``2 + 80 * (1 + (2 + 8 * 1)) = 882``.

**Actual cost** (after execution): the same rules, with every connection sized by the
items the mock really returned (2 + the sum of each returned node's actual cost), an object
that resolved to null counting 1 and none of its selections, and a plain list counting its
most expensive item.  It never exceeds the requested cost.  How full the pages are comes
from the shop's catalog (``catalog`` setting, see ``CATALOG_DEFAULTS``): by default 250
products with 3 variants, 2 images and 2 metafields each, 50 orders of 3 line items, 40
customers; so ``products(first: 10)`` is full, ``variants(first: 10)`` 30 % full.
Mutations act on a copy: they answer the created or updated resource, and the catalog
stays as it was.

**Invalid requests cost nothing** and touch no bucket: a syntax or validation error
(graphql-core's messages; an unknown field in graphql-ruby's words, code
``undefinedField``), a variable that does not coerce, a missing operation name, a
connection with neither ``first`` nor ``last`` ("you must provide one of first or last"),
or a ``first``/``last`` outside 0..250.  They are answered HTTP 200 with ``errors`` and
no ``extensions.cost``: the cost is never computed.

**Bucket**, per (shop, access token): ``currentlyAvailable`` points, at most
``maximumAvailable``, restored continuously at ``restoreRate`` per second.  Plans:
standard 2000/100, advanced 4000/200, plus 20000/1000, legacy 1000/50, custom (``scale``
multiplies the restore rate only).  On a request at ``now`` (after the restore step,
which also runs outside traffic):

* requested > 1000: HTTP 200 with a ``MAX_COST_EXCEEDED`` error; the bucket is untouched;
* currentlyAvailable < requested: HTTP 200 (or 429 with ``graphql_throttle_status=429``)
  with the THROTTLED body of docs/api-limits.md part 1.2, ``actualQueryCost: null``, nothing
  taken (a query of exactly ``currentlyAvailable`` points runs);
* otherwise take ``requested``, execute, refund ``requested - actual``, and answer 200.

``throttleStatus`` shows numbers the way Shopify does: ``maximumAvailable`` and
``restoreRate`` as floats (``2000.0``, ``100.0``), ``currentlyAvailable`` as an integer
(floor of the level after the refund).  ``Shopify-GraphQL-Cost-Debug: 1`` adds
``extensions.cost.fields``: per non-leaf field, its ``path``, ``definedCost``,
``requestedTotalCost`` and ``requestedChildrenCost``.

Outside traffic (``graphql_outside_rps`` points/s): queries of ``graphql_outside_cost``
points arrive every ``cost / rps`` seconds on the same key; one that does not fit is
throttled.
"""

from __future__ import annotations

import itertools
import math
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from graphql import GraphQLSchema

from . import graphql_engine as ge
from .server import Reply, dumps

if TYPE_CHECKING:
    from .shopify_rest import ShopifyKey

SCHEMA_FILE = "shopify_admin.graphql"
GRAPHQL_PLANS: dict[str, tuple[float, float]] = {
    "standard": (2000.0, 100.0),
    "advanced": (4000.0, 200.0),
    "plus": (20000.0, 1000.0),
    "legacy": (1000.0, 50.0),
}
MAX_QUERY_COST = 1000
MAX_PAGE = 250
OBJECT_COST = 1
CONNECTION_COST = 2
MUTATION_COST = 10
EPS = 1e-9
TRACE_LEN = 4000  # accepted queries per key whose (time, requested, actual, available) are kept

CATALOG_DEFAULTS: dict[str, int] = {
    "products": 250,
    "variants": 3,  # per product
    "images": 2,  # per product
    "metafields": 2,  # per product and per customer
    "orders": 50,
    "line_items": 3,  # per order
    "customers": 40,  # orders go to customers in turn
    "addresses": 1,  # per customer
}

_JSON = [("Content-Type", "application/json")]


def schema() -> GraphQLSchema:
    return ge.load_schema(SCHEMA_FILE)


# -- cost --------------------------------------------------------------------------------------


def _req_fields(fields: list[ge.PField]) -> int:
    return sum(_req_field(f) for f in fields)


def _req_field(f: ge.PField) -> int:
    if f.kind == ge.LEAF:
        return 0
    if f.conn:
        return CONNECTION_COST + f.size() * _req_object(f.node)
    n = len(f.args["ids"]) if f.is_list and isinstance(f.args.get("ids"), list) else 1
    return n * _req_object(f)


def _req_object(f: ge.PField) -> int:
    return OBJECT_COST + max((_req_fields(f.sub(t)) for t in f.possible()), default=0)


def _is_mutation(p: ge.Plan) -> bool:
    return p.operation == "mutation"


def connection_errors(p: ge.Plan) -> list[dict[str, Any]]:
    """Shopify's pagination rules: one of first/last on every connection, each in 0..250."""
    got = p.memo.get("errors")
    if got is None:
        got = []
        for f in ge.connections(p.fields):
            first, last = f.args.get("first"), f.args.get("last")
            if first is None and last is None:
                got.append(ge.error_at("you must provide one of first or last", f.nodes, f.path))
            for name, v in (("first", first), ("last", last)):
                if v is not None and not 0 <= v <= MAX_PAGE:
                    msg = f"The {name} argument must be between 0 and {MAX_PAGE}, got {v}."
                    got.append(ge.error_at(msg, f.nodes, f.path))
        p.memo["errors"] = got
    return got  # type: ignore[no-any-return]


def requested_cost(p: ge.Plan) -> int:
    got = p.memo.get("requested")
    if got is None:
        if _is_mutation(p):
            got = sum(MUTATION_COST for f in p.fields if f.name != "__typename")
        else:
            got = _req_fields(p.fields)
        p.memo["requested"] = got
    return got  # type: ignore[no-any-return]


def debug_fields(p: ge.Plan) -> list[dict[str, Any]]:
    """The per-field breakdown of ``Shopify-GraphQL-Cost-Debug: 1`` (non-leaf fields)."""
    got = p.memo.get("debug")
    if got is not None:
        return got  # type: ignore[no-any-return]
    out: dict[tuple[Any, ...], dict[str, Any]] = {}

    def add(path: list[Any], defined: int, total: int) -> None:
        key = tuple(path)
        if key not in out or out[key]["requestedTotalCost"] < total:
            out[key] = {
                "path": list(path),
                "definedCost": defined,
                "requestedTotalCost": total,
                "requestedChildrenCost": total - defined,
            }

    def walk(fields: list[ge.PField], path: list[Any]) -> None:
        for f in fields:
            if f.kind == ge.LEAF:
                continue
            here = [*path, f.key]
            if f.conn:
                add(here, CONNECTION_COST, _req_field(f))
                inner = [*here, "edges", "node"]
                for t in f.node.possible():
                    walk(f.node.sub(t), inner)
            else:
                add(here, OBJECT_COST, _req_field(f))
                for t in f.possible():
                    walk(f.sub(t), here)

    if _is_mutation(p):
        for f in p.fields:
            if f.name != "__typename":
                out[(f.key,)] = {
                    "path": [f.key],
                    "definedCost": MUTATION_COST,
                    "requestedTotalCost": MUTATION_COST,
                    "requestedChildrenCost": 0,
                }
    else:
        walk(p.fields, [])
    got = list(out.values())
    p.memo["debug"] = got
    return got


def _act_fields(fields: list[ge.PField], obj: dict[str, Any], ctx: Any) -> int:
    total = 0
    for f in fields:
        if f.kind == ge.LEAF:
            continue
        try:
            total += _act_value(f, ge.resolve(obj, f, ctx), ctx)
        except ge.FieldError:
            total += CONNECTION_COST if f.conn else OBJECT_COST
    return total


def _act_value(f: ge.PField, v: Any, ctx: Any) -> int:
    if f.conn:
        if v is None:
            return CONNECTION_COST
        items = ge.page(v, f.args)[0]
        return CONNECTION_COST + sum(_act_object(f.node, it, ctx) for it in items)
    if f.is_list:
        if v is None:
            return OBJECT_COST
        each = [_act_object(f, x, ctx) for x in v]
        if isinstance(f.args.get("ids"), list):
            return sum(each)
        return max(each, default=OBJECT_COST)
    return _act_object(f, v, ctx)


def _act_object(f: ge.PField, obj: dict[str, Any] | None, ctx: Any) -> int:
    if obj is None:
        return OBJECT_COST
    return OBJECT_COST + _act_fields(f.sub(f.runtime_type(obj)), obj, ctx)


def actual_cost(p: ge.Plan, root: dict[str, Any], ctx: Any) -> int:
    if _is_mutation(p):
        return requested_cost(p)
    return min(requested_cost(p), _act_fields(p.fields, root, ctx))


def query_cost(
    query: str, variables: dict[str, Any] | None = None, operation_name: str | None = None
) -> int:
    """The requested cost of a query; raises ``GraphQLFailure`` for one Shopify would refuse."""
    p = ge.plan(schema(), query, operation_name, variables)
    errors = connection_errors(p)
    if errors:
        raise ge.GraphQLFailure(errors)
    return requested_cost(p)


# -- the catalog -------------------------------------------------------------------------------

_BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)


def _time(hours: int) -> str:
    return (_BASE_TIME + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _gid(kind: str, n: int) -> str:
    return f"gid://shopify/{kind}/{n}"


def _money(cents: int) -> dict[str, Any]:
    m = {
        "__typename": "Money",
        "amount": f"{cents // 100}.{cents % 100:02d}",
        "currencyCode": "USD",
    }
    return {"__typename": "MoneyBag", "shopMoney": m, "presentmentMoney": m}


_CAMEL = {
    "product_type": "productType",
    "created_at": "createdAt",
    "updated_at": "updatedAt",
    "tag": "tags",
}


def _matches(item: dict[str, Any], query: str | None) -> bool:
    """A little of Shopify's search syntax: ``field:value`` terms and bare words, all ANDed."""
    if not query:
        return True
    for term in query.split():
        if term in ("AND", "OR"):
            continue
        name, colon, want = term.partition(":")
        if not colon:
            name, want = "", term
        want = want.strip("'\"").lower()
        if want and want[0] in "<>=":  # comparisons: not modelled, every item matches
            continue
        if not name:
            hay = [item.get("title"), item.get("name"), item.get("displayName"), item.get("email")]
            if not any(want in str(h).lower() for h in hay if h is not None):
                return False
            continue
        v = item.get(_CAMEL.get(name, name))
        if v is None:
            return False
        values = v if isinstance(v, list) else [v]
        if not any(want == str(x).lower() or want in str(x).lower() for x in values):
            return False
    return True


_SORT_FIELD = {
    "TITLE": "title",
    "CREATED_AT": "createdAt",
    "UPDATED_AT": "updatedAt",
    "PRODUCT_TYPE": "productType",
    "VENDOR": "vendor",
    "NAME": "displayName",
}


def _listing(items: list[dict[str, Any]]) -> Any:
    """A root connection's resolver: the items matching ``query``, ordered by ``sortKey``."""

    memo: dict[tuple[Any, Any], list[dict[str, Any]]] = {}

    def resolve(args: dict[str, Any], ctx: Any) -> list[dict[str, Any]]:
        query, sort = args.get("query"), args.get("sortKey") or "ID"
        got = memo.get((query, sort))
        if got is None:
            got = [it for it in items if _matches(it, query)] if query else items
            key = _SORT_FIELD.get(sort)
            if key is not None:
                got = sorted(got, key=lambda it: (str(it.get(key)), it["_n"]))
            if len(memo) < 256:
                memo[(query, sort)] = got
        return got

    return resolve


class Catalog:
    """One shop's data: plain dicts the executor reads (see ``graphql_engine``)."""

    def __init__(self, shop: str, counts: dict[str, int]) -> None:
        self.shop = shop
        self.counts = counts
        self.by_gid: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1_000_001)  # ids of resources mutations create
        self._lock = threading.Lock()
        c = counts
        products = [self._product(i, c) for i in range(1, c["products"] + 1)]
        customers = [self._customer(i, c) for i in range(1, c["customers"] + 1)]
        orders = [self._order(i, c, products, customers) for i in range(1, c["orders"] + 1)]
        for p in products:  # metafields referencing other resources (the union)
            for mf in p["_metafields"]:
                n = mf["_n"]
                if mf["type"] == "product_reference" and products:
                    mf["reference"] = products[n % len(products)]
                elif mf["type"] == "variant_reference" and p["variants"]:
                    mf["reference"] = p["variants"][0]
        for cu in customers:
            for mf in cu["_metafields"]:
                if mf["type"] == "order_reference":
                    mf["reference"] = cu["orders"][0] if cu["orders"] else None
        shop_obj = {
            "__typename": "Shop",
            "id": _gid("Shop", 1),
            "name": shop,
            "email": f"owner@{shop}.example",
            "myshopifyDomain": f"{shop}.myshopify.com",
            "currencyCode": "USD",
            "timezoneAbbreviation": "UTC",
            "billingAddress": self._address(0),
        }
        self.by_gid[shop_obj["id"]] = shop_obj
        self.root: dict[str, Any] = {
            "shop": shop_obj,
            "products": _listing(products),
            "orders": _listing(orders),
            "customers": _listing(customers),
            "product": self._lookup("Product"),
            "productVariant": self._lookup("ProductVariant"),
            "order": self._lookup("Order"),
            "customer": self._lookup("Customer"),
            "node": lambda args, ctx: self.by_gid.get(args["id"]),
            "nodes": lambda args, ctx: [self.by_gid.get(i) for i in args["ids"]],
        }
        self.mutation_root: dict[str, Any] = {
            "productCreate": self._product_create,
            "productUpdate": self._product_update,
            "tagsAdd": self._tags_add,
        }

    def _lookup(self, typename: str) -> Any:
        def get(args: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
            obj = self.by_gid.get(args["id"])
            return obj if obj is not None and obj["__typename"] == typename else None

        return get

    def _add(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.by_gid[obj["id"]] = obj
        return obj

    def _address(self, n: int) -> dict[str, Any]:
        return self._add(
            {
                "__typename": "MailingAddress",
                "id": _gid("MailingAddress", n + 1),
                "_n": n + 1,
                "firstName": f"First{n}",
                "lastName": f"Last{n}",
                "address1": f"{n + 1} Main Street",
                "address2": None,
                "city": "Ottawa",
                "province": "Ontario",
                "country": "Canada",
                "countryCodeV2": "CA",
                "zip": "K1A 0B1",
                "phone": None,
            }
        )

    def _metafields(self, owner: str, base: int, count: int) -> list[dict[str, Any]]:
        kinds = (
            ("product_reference", "variant_reference")
            if owner == "Product"
            else ("order_reference", "single_line_text_field")
        )
        out = []
        for k in range(1, count + 1):
            n = base + k
            kind = kinds[(k - 1) % 2] if k <= 2 else "single_line_text_field"
            out.append(
                self._add(
                    {
                        "__typename": "Metafield",
                        "id": _gid("Metafield", n),
                        "_n": n,
                        "namespace": "custom",
                        "key": f"field{k}",
                        "type": kind,
                        "value": f"value {n}",
                        "createdAt": _time(n % 5000),
                        "reference": None,
                    }
                )
            )
        return out

    def _product(self, i: int, c: dict[str, int]) -> dict[str, Any]:
        status = "DRAFT" if i % 10 == 0 else "ARCHIVED" if i % 10 == 5 else "ACTIVE"
        images = [
            {
                "__typename": "Image",
                "id": _gid("ProductImage", (i - 1) * c["images"] + k),
                "_n": (i - 1) * c["images"] + k,
                "url": f"https://cdn.shopify.com/s/files/1/p{i}-{k}.jpg",
                "altText": None,
                "width": 800,
                "height": 800,
            }
            for k in range(1, c["images"] + 1)
        ]
        p: dict[str, Any] = {
            "__typename": "Product",
            "id": _gid("Product", i),
            "_n": i,
            "title": f"Product {i}",
            "handle": f"product-{i}",
            "descriptionHtml": f"<p>Product {i}</p>",
            "status": status,
            "vendor": f"Vendor {i % 7}",
            "productType": ("Shirts", "Shoes", "Hats")[i % 3],
            "tags": [f"tag{i % 4}", "mock"],
            "createdAt": _time(i),
            "updatedAt": _time(i + 24),
            "images": images,
            "featuredImage": images[0] if images else None,
        }
        variants = []
        for j in range(1, c["variants"] + 1):
            n = (i - 1) * c["variants"] + j
            cents = 1000 + (n * 37) % 9000
            variants.append(
                self._add(
                    {
                        "__typename": "ProductVariant",
                        "id": _gid("ProductVariant", n),
                        "_n": n,
                        "title": f"Option {j}",
                        "sku": f"SKU-{i}-{j}",
                        "price": f"{cents // 100}.{cents % 100:02d}",
                        "compareAtPrice": None,
                        "inventoryQuantity": n % 25,
                        "createdAt": _time(i),
                        "image": images[(j - 1) % len(images)] if images else None,
                        "product": p,
                    }
                )
            )
        p["variants"] = variants
        p["totalInventory"] = sum(v["inventoryQuantity"] for v in variants)
        prices = [v["price"] for v in variants] or ["0.00"]
        low, high = min(prices, key=float), max(prices, key=float)
        p["priceRangeV2"] = {
            "__typename": "ProductPriceRangeV2",
            "minVariantPrice": {"__typename": "Money", "amount": low, "currencyCode": "USD"},
            "maxVariantPrice": {"__typename": "Money", "amount": high, "currencyCode": "USD"},
        }
        metafields = self._metafields("Product", (i - 1) * c["metafields"], c["metafields"])
        p["_metafields"] = metafields
        p["metafields"] = lambda args, ctx: [
            m for m in metafields if args.get("namespace") in (None, m["namespace"])
        ]
        p["metafield"] = lambda args, ctx: next(
            (
                m
                for m in metafields
                if m["key"] == args["key"] and args.get("namespace") in (None, m["namespace"])
            ),
            None,
        )
        return self._add(p)

    def _customer(self, i: int, c: dict[str, int]) -> dict[str, Any]:
        addresses = [self._address(i * 1000 + k) for k in range(c["addresses"])]
        metafields = self._metafields(
            "Customer", 10_000_000 + (i - 1) * c["metafields"], c["metafields"]
        )
        return self._add(
            {
                "__typename": "Customer",
                "id": _gid("Customer", i),
                "_n": i,
                "firstName": f"Customer{i}",
                "lastName": "Mock",
                "displayName": f"Customer{i} Mock",
                "email": f"customer{i}@example.com",
                "phone": None,
                "tags": [f"segment{i % 3}"],
                "createdAt": _time(i),
                "updatedAt": _time(i + 48),
                "addresses": addresses,
                "defaultAddress": addresses[0] if addresses else None,
                "orders": [],
                "numberOfOrders": "0",
                "_metafields": metafields,
                "metafields": lambda args, ctx: [
                    m for m in metafields if args.get("namespace") in (None, m["namespace"])
                ],
            }
        )

    def _order(
        self,
        i: int,
        c: dict[str, int],
        products: list[dict[str, Any]],
        customers: list[dict[str, Any]],
    ) -> dict[str, Any]:
        customer = customers[(i - 1) % len(customers)] if customers else None
        lines = []
        total = 0
        for k in range(1, c["line_items"] + 1):
            n = (i - 1) * c["line_items"] + k
            product = products[(n - 1) % len(products)] if products else None
            variant = product["variants"][0] if product and product["variants"] else None
            cents = int(float(variant["price"]) * 100) if variant else 1000
            qty = 1 + n % 3
            total += cents * qty
            lines.append(
                self._add(
                    {
                        "__typename": "LineItem",
                        "id": _gid("LineItem", n),
                        "_n": n,
                        "title": product["title"] if product else f"Item {n}",
                        "name": product["title"] if product else f"Item {n}",
                        "quantity": qty,
                        "sku": variant["sku"] if variant else None,
                        "product": product,
                        "variant": variant,
                        "originalUnitPriceSet": _money(cents),
                    }
                )
            )
        order = self._add(
            {
                "__typename": "Order",
                "id": _gid("Order", i),
                "_n": i,
                "name": f"#{1000 + i}",
                "email": customer["email"] if customer else None,
                "createdAt": _time(100 + i),
                "updatedAt": _time(124 + i),
                "displayFinancialStatus": ("PAID", "PENDING", "REFUNDED")[i % 3],
                "displayFulfillmentStatus": ("FULFILLED", "UNFULFILLED")[i % 2],
                "tags": [],
                "customer": customer,
                "lineItems": lines,
                "shippingAddress": customer["defaultAddress"] if customer else None,
                "totalPriceSet": _money(total),
            }
        )
        if customer is not None:
            customer["orders"].append(order)
            customer["numberOfOrders"] = str(len(customer["orders"]))
        return order

    # -- mutations (on copies: the catalog does not change) -------------------------------------

    def _product_input(self, args: dict[str, Any]) -> dict[str, Any] | None:
        got = args.get("product")
        return got if got is not None else args.get("input")

    def _apply(self, base: dict[str, Any], inp: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in inp.items():
            if k != "id" and v is not None:
                out[k] = v
        return out

    def _product_create(self, args: dict[str, Any], ctx: Any) -> dict[str, Any]:
        inp = self._product_input(args)
        payload: dict[str, Any] = {"__typename": "ProductCreatePayload", "product": None}
        if inp is None or not inp.get("title"):
            payload["userErrors"] = [_user_error(["title"], "Title can't be blank")]
            return payload
        with self._lock:
            n = next(self._ids)
        base = {
            "__typename": "Product",
            "id": _gid("Product", n),
            "_n": n,
            "title": inp["title"],
            "handle": inp["title"].lower().replace(" ", "-"),
            "descriptionHtml": "",
            "status": "ACTIVE",
            "vendor": self.shop,
            "productType": "",
            "tags": [],
            "createdAt": _time(0),
            "updatedAt": _time(0),
            "images": [],
            "featuredImage": None,
            "variants": [],
            "totalInventory": 0,
            "priceRangeV2": {
                "__typename": "ProductPriceRangeV2",
                "minVariantPrice": {"__typename": "Money", "amount": "0.0", "currencyCode": "USD"},
                "maxVariantPrice": {"__typename": "Money", "amount": "0.0", "currencyCode": "USD"},
            },
            "metafields": [],
            "metafield": None,
        }
        payload["product"] = self._apply(base, inp)
        payload["userErrors"] = []
        return payload

    def _product_update(self, args: dict[str, Any], ctx: Any) -> dict[str, Any]:
        inp = self._product_input(args) or {}
        payload: dict[str, Any] = {"__typename": "ProductUpdatePayload", "product": None}
        found = self.by_gid.get(inp.get("id") or "")
        if found is None or found["__typename"] != "Product":
            payload["userErrors"] = [_user_error(["id"], "Product does not exist")]
            return payload
        payload["product"] = self._apply(found, inp)
        payload["userErrors"] = []
        return payload

    def _tags_add(self, args: dict[str, Any], ctx: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {"__typename": "TagsAddPayload", "node": None}
        found = self.by_gid.get(args["id"])
        if found is None or "tags" not in found:
            payload["userErrors"] = [_user_error(["id"], "Resource not found")]
            return payload
        node = dict(found)
        node["tags"] = list(dict.fromkeys([*found["tags"], *args["tags"]]))
        payload["node"] = node
        payload["userErrors"] = []
        return payload


def _user_error(field: list[str], message: str) -> dict[str, Any]:
    return {"__typename": "UserError", "field": field, "message": message}


def catalog_counts(overrides: dict[str, Any] | None) -> tuple[tuple[str, int], ...]:
    """The ``catalog`` setting checked: defaults overridden, every count an int >= 0."""
    counts = dict(CATALOG_DEFAULTS)
    for k, v in (overrides or {}).items():
        if k not in counts:
            raise ValueError(f"unknown catalog entry {k!r} (known: {sorted(counts)})")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"catalog {k} must be an int >= 0")
        counts[k] = v
    return tuple(sorted(counts.items()))


# -- the bucket --------------------------------------------------------------------------------


def restore(k: ShopifyKey, now: float) -> None:
    """Bring the points bucket of ``k`` to ``now``, running outside queries in time order."""
    cfg = k.cfg
    t = k.g_t_last
    if now <= t:
        return
    m = cfg.g_capacity
    r = cfg.g_rate
    a = k.g_avail
    if cfg.g_out_rps > 0:
        cost = cfg.g_out_cost
        step = cost / cfg.g_out_rps
        t0 = k.g_out_t0
        n = k.g_out_n
        nxt = t0 + n * step
        while nxt <= now:
            if nxt > t:
                a = min(m, a + r * (nxt - t))
                t = nxt
            if a + EPS < cost:
                k.g_out_throttled += 1
            else:
                a -= cost
                k.g_out_accepted += 1
                k.g_peak_used = max(k.g_peak_used, m - a)
            n += 1
            nxt = t0 + n * step
        k.g_out_n = n
    k.g_avail = min(m, a + r * (now - t))
    k.g_t_last = now


def throttle_status(k: ShopifyKey) -> dict[str, Any]:
    cfg = k.cfg
    return {
        "maximumAvailable": float(cfg.g_capacity),
        "currentlyAvailable": int(math.floor(k.g_avail + EPS)),
        "restoreRate": float(cfg.g_rate),
    }


def _cost_ext(requested: int, actual: int | None, status: dict[str, Any]) -> dict[str, Any]:
    return {
        "cost": {
            "requestedQueryCost": requested,
            "actualQueryCost": actual,
            "throttleStatus": status,
        }
    }


def _max_cost_body(cost: int, status: dict[str, Any]) -> dict[str, Any]:
    msg = (
        f"Query cost is {cost}, which exceeds the single query max cost limit "
        f"({MAX_QUERY_COST}).\n\nSee https://shopify.dev/concepts/about-apis/rate-limits for "
        "more information on how the\ncost of a query is calculated.\n\nTo query larger "
        "amounts of data with fewer limits, bulk operations should be used instead.\nSee "
        "https://shopify.dev/tutorials/perform-bulk-operations-with-admin-api for usage "
        "details.\n"
    )
    return {
        "errors": [
            {
                "message": msg,
                "extensions": {"code": "MAX_COST_EXCEEDED", "cost": cost, "maxCost": 1000},
            }
        ],
        "extensions": _cost_ext(cost, None, status),
    }


def throttled_body(cost: int, status: dict[str, Any]) -> dict[str, Any]:
    return {
        "errors": [
            {
                "message": "Throttled",
                "extensions": {
                    "code": "THROTTLED",
                    "documentation": "https://shopify.dev/api/usage/rate-limits",
                },
            }
        ],
        "extensions": _cost_ext(cost, None, status),
    }


def handle(
    k: ShopifyKey,
    catalog: Catalog,
    query: str,
    variables: dict[str, Any] | None,
    operation_name: str | None,
    debug: bool,
    now: float,
) -> Reply:
    """Run one GraphQL request against key ``k`` (takes ``k.lock`` itself)."""
    try:
        p = ge.plan(schema(), query, operation_name, variables)
        errors = connection_errors(p)
        if errors:
            raise ge.GraphQLFailure(errors)
        cost = requested_cost(p)
    except ge.GraphQLFailure as e:
        with k.lock:
            k.g_invalid += 1
        return 200, _JSON, dumps({"errors": e.errors})
    with k.lock:
        restore(k, now)
        cfg = k.cfg
        if cost > MAX_QUERY_COST:
            k.g_max_cost += 1
            return 200, _JSON, dumps(_max_cost_body(cost, throttle_status(k)))
        if k.g_avail + EPS < cost:
            k.g_throttled += 1
            if len(k.g_throttle_trace) < TRACE_LEN:
                k.g_throttle_trace.append((now, cost, throttle_status(k)["currentlyAvailable"]))
            return cfg.g_throttle_status, _JSON, dumps(throttled_body(cost, throttle_status(k)))
        a = k.g_avail - cost
        k.g_peak_used = max(k.g_peak_used, cfg.g_capacity - a)
        root = catalog.mutation_root if p.operation == "mutation" else catalog.root
        ex = ge.Executor(catalog)
        data = ex.fields(p.fields, root, [])
        actual = actual_cost(p, root, catalog)
        a += cost - actual
        k.g_avail = a
        k.g_accepted += 1
        k.g_points += actual
        k.g_requested += cost
        if p.operation == "mutation":
            k.g_mutations += 1
        if k.g_first is None:
            k.g_first = now
        k.g_last = now
        status = throttle_status(k)
        if len(k.g_trace) < TRACE_LEN:
            k.g_trace.append((now, cost, actual, status["currentlyAvailable"]))
    body: dict[str, Any] = {"data": data}
    if ex.errors:
        body["errors"] = ex.errors
    ext = _cost_ext(cost, actual, status)
    if debug:
        ext["cost"]["fields"] = debug_fields(p)
    body["extensions"] = ext
    return 200, _JSON, dumps(body)
