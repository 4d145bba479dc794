"""Mock Shopify Admin GraphQL: a bucket of points per (shop, access token).

The bucket holds ``currentlyAvailable`` points, at most ``maximumAvailable``, restored
continuously at ``restoreRate`` points/s (plans: standard 2000/100, plus 20000/1000,
legacy 1000/50, custom; ``scale`` multiplies the restore rate only).

Requested cost, deterministic from the query text (the mock's rule, not Shopify's):
``cost = 1 + sum(N for every "first: N" / "last: N" in the query)``.  So ``{ shop { name } }``
costs 1 and ``{ products(first: 50) { edges { node { variants(first: 10) { ... } } } } }``
costs 61.  Variables (``first: $n``) count 0.

On a request at ``now`` (after the restore step, which also runs outside traffic):

* requested > 1000: HTTP 200 with a ``MAX_COST_EXCEEDED`` error; the bucket is untouched;
* currentlyAvailable < requested: HTTP 200 (or 429 with ``graphql_throttle_status=429``) with
  the THROTTLED body of api-limits.md part 1.2, ``actualQueryCost: null``, nothing taken;
* otherwise take ``requested``, then refund ``requested - actual`` with
  ``actual = ceil(requested * actual_fraction)``, and answer 200 with ``extensions.cost``.

``throttleStatus`` shows numbers the way Shopify does: ``maximumAvailable`` and ``restoreRate``
as floats (``2000.0``, ``100.0``), ``currentlyAvailable`` as an integer (floor of the level).

Outside traffic (``graphql_outside_rps`` points/s): queries of ``graphql_outside_cost`` points
arrive every ``cost / rps`` seconds on the same key; one that does not fit is throttled.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

from .server import Reply, dumps

if TYPE_CHECKING:
    from .shopify_rest import ShopifyKey

GRAPHQL_PLANS: dict[str, tuple[float, float]] = {
    "standard": (2000.0, 100.0),
    "plus": (20000.0, 1000.0),
    "legacy": (1000.0, 50.0),
}
MAX_QUERY_COST = 1000
EPS = 1e-9

_CONNECTION_ARG = re.compile(r"\b(?:first|last)\s*:\s*(\d+)")
_JSON = [("Content-Type", "application/json")]


def query_cost(query: str) -> int:
    """The mock's requested cost: 1 + every ``first: N`` / ``last: N`` in the text."""
    return 1 + sum(int(n) for n in _CONNECTION_ARG.findall(query))


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
        "extensions": {
            "cost": {
                "requestedQueryCost": cost,
                "actualQueryCost": None,
                "throttleStatus": status,
            }
        },
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
        "extensions": {
            "cost": {
                "requestedQueryCost": cost,
                "actualQueryCost": None,
                "throttleStatus": status,
            }
        },
    }


def parse_query(body: bytes, content_type: str) -> str | None:
    """The query text of a POST body (JSON ``{"query": ...}`` or application/graphql)."""
    if content_type.split(";")[0].strip().lower() == "application/graphql":
        return body.decode("utf-8", "replace")
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("query"), str):
        return None
    return str(obj["query"])


def handle(k: ShopifyKey, query: str, now: float) -> Reply:
    """Run one GraphQL request against key ``k`` (the caller holds ``k.lock``)."""
    cost = query_cost(query)
    restore(k, now)
    cfg = k.cfg
    if cost > MAX_QUERY_COST:
        k.g_max_cost += 1
        return 200, _JSON, dumps(_max_cost_body(cost, throttle_status(k)))
    if k.g_avail + EPS < cost:
        k.g_throttled += 1
        return cfg.g_throttle_status, _JSON, dumps(throttled_body(cost, throttle_status(k)))
    a = k.g_avail - cost
    k.g_peak_used = max(k.g_peak_used, cfg.g_capacity - a)
    actual = math.ceil(cost * cfg.g_fraction - EPS)
    a += cost - actual
    k.g_avail = a
    k.g_accepted += 1
    k.g_points += actual
    if k.g_first is None:
        k.g_first = now
    k.g_last = now
    body = {
        "data": {"mock": {"requestedQueryCost": cost}},
        "extensions": {
            "cost": {
                "requestedQueryCost": cost,
                "actualQueryCost": actual,
                "throttleStatus": throttle_status(k),
            }
        },
    }
    return 200, _JSON, dumps(body)
