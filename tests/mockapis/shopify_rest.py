"""Mock Shopify Admin REST (docs/api-limits.md 4.1), plus the per-key store shared with GraphQL.

Routes: ``ANY /admin/api/{version}/{anything}.json`` (REST) and
``POST /admin/api/{version}/graphql.json`` (GraphQL, see ``shopify_graphql``).

The shop is ``X-Mock-Shop`` if sent, else ``{shop}`` of a ``{shop}.myshopify.com`` Host, else of
the TLS SNI, else the Host without its port.  The key is (shop, ``X-Shopify-Access-Token``);
a missing token is a 401 that touches no bucket.

REST bucket per key: level ``L`` and ``t_last``.  At ``now``: leak ``L = max(0, L - R*dt)``
(outside marbles, if configured, arrive at ``t0 + n/x`` and are run through the same
pass/fail rule in time order within the leak); then ``L + 1 > C + 1e-9`` is a 429, else
``L += 1`` and a 200.  Every bucket answer carries ``X-Shopify-Shop-Api-Call-Limit: U/C`` with
``U = ceil(L - 1e-9)`` after the fill, clamped to [0, C]; a 429 shows ``C/C``.

Settings (``configure(shop=None, token=None, **settings)``; shop None = every shop; a key's
settings override its shop's, which override the defaults):

==========================  =================================================================
plan                        ``standard`` (C=40, R=2) | ``plus`` (400, 20) | ``custom``
capacity, leak_rate         override C and R (required with ``custom``)
scale                       multiplies R (and GraphQL's restore rate); standard x10 = 40, 20
retry_after_mode            ``literal`` (``Retry-After: 2.0``) | ``exact`` (ceil to 0.1 s)
outside_traffic_rps         outside marbles per second on the same key (not scaled)
resource_throttle_paths     fnmatch patterns on the path after ``/admin/api/{version}/``
daily_cap                   requests per calendar day allowed on those paths (None: none)
graphql_plan                ``standard`` 2000/100 | ``advanced`` 4000/200 | ``plus`` 20000/1000
                            | ``legacy`` 1000/50 | ``custom``; default: ``plan`` when it names
                            a GraphQL plan, else standard
graphql_capacity            override maximumAvailable (required with ``custom``)
graphql_restore_rate        override restoreRate (required with ``custom``)
catalog                     the shop's data, which sizes actual costs: a dict overriding
                            ``shopify_graphql.CATALOG_DEFAULTS`` (products, variants, images,
                            metafields, orders, line_items, customers, addresses)
graphql_outside_rps         outside GraphQL traffic in points per second
graphql_outside_cost        the cost of one outside query (default 10)
graphql_throttle_status     HTTP status of a THROTTLED answer: 200 (default) or 429
==========================  =================================================================
"""

from __future__ import annotations

import fnmatch
import math
import threading
from typing import Any

from . import graphql_engine as ge
from . import shopify_graphql as gql
from .server import Clock, Reply, Request, dumps

REST_PLANS: dict[str, tuple[float, float]] = {"standard": (40.0, 2.0), "plus": (400.0, 20.0)}
EPS = 1e-9
LIMIT_HEADER = "X-Shopify-Shop-Api-Call-Limit"
ACCEPT_TIMES = 4000  # accepted requests per key whose times are kept (the tests' rate measure)

DEFAULTS: dict[str, Any] = {
    "plan": "standard",
    "capacity": None,
    "leak_rate": None,
    "scale": 1.0,
    "retry_after_mode": "literal",
    "outside_traffic_rps": 0.0,
    "resource_throttle_paths": (),
    "daily_cap": None,
    "resource_throttle_message": "Daily variant creation limit reached, throttle applied",
    "graphql_plan": None,
    "graphql_capacity": None,
    "graphql_restore_rate": None,
    "catalog": None,
    "graphql_outside_rps": 0.0,
    "graphql_outside_cost": 10.0,
    "graphql_throttle_status": 200,
}

UNAUTHORIZED = dumps(
    {"errors": "[API] Invalid API key or access token (unrecognized login or wrong password)"}
)
_JSON = ("Content-Type", "application/json")


def fmt_num(x: float) -> str:
    """2.0 -> "2", 2.5 -> "2.5" (how R appears in the 429 message)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Resolved:
    """One key's effective settings, checked and turned into numbers."""

    __slots__ = (
        "capacity",
        "rate",
        "exact",
        "out_rps",
        "patterns",
        "daily_cap",
        "resource_body",
        "g_capacity",
        "g_rate",
        "catalog",
        "g_out_rps",
        "g_out_cost",
        "g_throttle_status",
        "too_many_body",
        "raw",
    )

    def __init__(self, s: dict[str, Any]) -> None:
        self.raw = dict(s)
        plan = s["plan"]
        scale = float(s["scale"])
        if scale <= 0:
            raise ValueError("scale must be > 0")
        if plan in REST_PLANS:
            c, r = REST_PLANS[plan]
        elif plan == "custom":
            if s["capacity"] is None or s["leak_rate"] is None:
                raise ValueError("plan 'custom' needs capacity and leak_rate")
            c, r = float(s["capacity"]), float(s["leak_rate"])
        else:
            raise ValueError(f"unknown REST plan {plan!r}")
        if s["capacity"] is not None:
            c = float(s["capacity"])
        if s["leak_rate"] is not None:
            r = float(s["leak_rate"])
        if c < 1 or r <= 0:
            raise ValueError("capacity must be >= 1 and leak_rate > 0")
        self.capacity = c
        self.rate = r * scale
        mode = s["retry_after_mode"]
        if mode not in ("literal", "exact"):
            raise ValueError("retry_after_mode is 'literal' or 'exact'")
        self.exact = mode == "exact"
        self.out_rps = float(s["outside_traffic_rps"] or 0.0)
        paths = s["resource_throttle_paths"] or ()
        if isinstance(paths, str):
            paths = (paths,)
        self.patterns = tuple(paths)
        self.daily_cap = None if s["daily_cap"] is None else int(s["daily_cap"])
        self.resource_body = dumps({"errors": s["resource_throttle_message"]})
        self.too_many_body = dumps(
            {
                "errors": f"Exceeded {fmt_num(self.rate)} calls per second for api client. "
                "Reduce request rates to resume uninterrupted service."
            }
        )
        gplan = s["graphql_plan"] or (plan if plan in gql.GRAPHQL_PLANS else "standard")
        if gplan in gql.GRAPHQL_PLANS:
            gc, gr = gql.GRAPHQL_PLANS[gplan]
        elif gplan == "custom":
            if s["graphql_capacity"] is None or s["graphql_restore_rate"] is None:
                raise ValueError("graphql_plan 'custom' needs graphql_capacity and _restore_rate")
            gc, gr = 0.0, 0.0
        else:
            raise ValueError(f"unknown GraphQL plan {gplan!r}")
        if s["graphql_capacity"] is not None:
            gc = float(s["graphql_capacity"])
        if s["graphql_restore_rate"] is not None:
            gr = float(s["graphql_restore_rate"])
        if gc <= 0 or gr <= 0:
            raise ValueError("graphql capacity and restore rate must be > 0")
        self.g_capacity = gc
        self.g_rate = gr * scale
        if s["catalog"] is not None and not isinstance(s["catalog"], dict):
            raise ValueError("catalog is a dict of counts")
        self.catalog = gql.catalog_counts(s["catalog"])
        self.g_out_rps = float(s["graphql_outside_rps"] or 0.0)
        self.g_out_cost = float(s["graphql_outside_cost"])
        if self.g_out_cost <= 0:
            raise ValueError("graphql_outside_cost must be > 0")
        self.g_throttle_status = int(s["graphql_throttle_status"])
        if self.g_throttle_status not in (200, 429):
            raise ValueError("graphql_throttle_status is 200 or 429")


class ShopifyKey:
    """State of one (shop, token): the REST bucket, the GraphQL bucket, their counters."""

    __slots__ = (
        "lock",
        "shop",
        "token",
        "cfg",
        # REST
        "level",
        "t_last",
        "out_t0",
        "out_n",
        "accepted",
        "first_accept",
        "last_accept",
        "accept_times",
        "g_first",
        "g_last",
        "throttled",
        "resource_throttled",
        "peak_level",
        "peak_used",
        "out_accepted",
        "out_throttled",
        "day",
        "day_count",
        # GraphQL
        "g_avail",
        "g_t_last",
        "g_out_t0",
        "g_out_n",
        "g_accepted",
        "g_throttled",
        "g_max_cost",
        "g_invalid",
        "g_mutations",
        "g_points",
        "g_requested",
        "g_trace",
        "g_throttle_trace",
        "g_peak_used",
        "g_out_accepted",
        "g_out_throttled",
    )

    def __init__(self, shop: str, token: str, cfg: Resolved, now: float) -> None:
        self.lock = threading.Lock()
        self.shop = shop
        self.token = token
        self.cfg = cfg
        self.level = 0.0
        self.t_last = now
        self.out_t0 = now
        self.out_n = 1
        self.accepted = 0
        self.first_accept: float | None = None  # when the first request got a 200
        self.last_accept: float | None = None
        self.accept_times: list[float] = []  # when each of the first ACCEPT_TIMES got a 200
        self.throttled = 0
        self.resource_throttled = 0
        self.peak_level = 0.0
        self.peak_used = 0
        self.out_accepted = 0
        self.out_throttled = 0
        self.day = -1
        self.day_count = 0
        self.g_avail = cfg.g_capacity
        self.g_t_last = now
        self.g_out_t0 = now
        self.g_out_n = 1
        self.g_accepted = 0
        self.g_first: float | None = None  # when the first query got through
        self.g_last: float | None = None
        self.g_throttled = 0
        self.g_max_cost = 0
        self.g_invalid = 0
        self.g_mutations = 0
        self.g_points = 0  # actual cost of the accepted queries (after refunds)
        self.g_requested = 0  # their requested cost
        self.g_trace: list[tuple[float, int, int, int]] = []
        self.g_throttle_trace: list[tuple[float, int, int]] = []
        self.g_peak_used = 0.0
        self.g_out_accepted = 0
        self.g_out_throttled = 0

    def leak(self, now: float) -> None:
        """Bring the REST bucket to ``now``, running outside marbles in time order."""
        t = self.t_last
        if now <= t:
            return
        cfg = self.cfg
        r = cfg.rate
        lvl = self.level
        if cfg.out_rps > 0:
            c = cfg.capacity
            step = 1.0 / cfg.out_rps
            t0 = self.out_t0
            n = self.out_n
            nxt = t0 + n * step
            while nxt <= now:
                if nxt > t:
                    lvl = max(0.0, lvl - r * (nxt - t))
                    t = nxt
                if lvl + 1 > c + EPS:
                    self.out_throttled += 1
                else:
                    lvl += 1
                    self.out_accepted += 1
                    if lvl > self.peak_level:
                        self.peak_level = lvl
                n += 1
                nxt = t0 + n * step
            self.out_n = n
        self.level = max(0.0, lvl - r * (now - t))
        self.t_last = now

    def apply(self, cfg: Resolved, now: float) -> None:
        """Switch to new settings at ``now`` (the old ones rule up to ``now``)."""
        self.leak(now)
        gql.restore(self, now)
        old = self.cfg
        self.cfg = cfg
        if cfg.out_rps != old.out_rps:
            self.out_t0, self.out_n = now, 1
        if cfg.g_out_rps != old.g_out_rps or cfg.g_out_cost != old.g_out_cost:
            self.g_out_t0, self.g_out_n = now, 1
        self.g_avail = min(self.g_avail, cfg.g_capacity)

    def snapshot(self) -> dict[str, Any]:
        cfg = self.cfg
        c = cfg.capacity
        return {
            "shop": self.shop,
            "token": self.token,
            "rest": {
                "capacity": c,
                "leak_rate": cfg.rate,
                "level": self.level,
                "used": min(int(c), max(0, math.ceil(self.level - EPS))),
                "t_last": self.t_last,
                "accepted": self.accepted,
                "first_accept": self.first_accept,
                "last_accept": self.last_accept,
                "accept_times": list(self.accept_times),
                "throttled": self.throttled,
                "bucket_throttled": self.throttled - self.resource_throttled,
                "resource_throttled": self.resource_throttled,
                "peak_level": self.peak_level,
                "peak_used": self.peak_used,
                "outside_accepted": self.out_accepted,
                "outside_throttled": self.out_throttled,
            },
            "graphql": {
                "maximum_available": cfg.g_capacity,
                "restore_rate": cfg.g_rate,
                "available": self.g_avail,
                "t_last": self.g_t_last,
                "accepted": self.g_accepted,
                "throttled": self.g_throttled,
                "max_cost_exceeded": self.g_max_cost,
                "invalid": self.g_invalid,
                "mutations": self.g_mutations,
                "points_spent": self.g_points,
                "points_requested": self.g_requested,
                "points_refunded": self.g_requested - self.g_points,
                "first_accept": self.g_first,
                "last_accept": self.g_last,
                "peak_used": self.g_peak_used,
                "outside_accepted": self.g_out_accepted,
                "outside_throttled": self.g_out_throttled,
                # (time, requestedQueryCost, actualQueryCost, currentlyAvailable after) of
                # the first TRACE_LEN accepted queries
                "trace": [list(t) for t in self.g_trace],
                # (time, requestedQueryCost, currentlyAvailable) of the first THROTTLED ones
                "throttle_trace": [list(t) for t in self.g_throttle_trace],
            },
        }


def shop_of(req: Request) -> str:
    h = req.headers
    shop = h.get("x-mock-shop")
    if shop:
        return shop
    host = h.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.lower()
    if name.endswith(".myshopify.com"):
        return name[: -len(".myshopify.com")]
    sni = (req.sni or "").lower()
    if sni.endswith(".myshopify.com"):
        return sni[: -len(".myshopify.com")]
    return name or sni


class ShopifyAPI:
    """The app behind ``ShopifyMock``: REST and GraphQL on one server, state per key."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._defaults: dict[str, Any] = dict(DEFAULTS)
        self._shop_cfg: dict[str, dict[str, Any]] = {}
        self._key_cfg: dict[tuple[str, str], dict[str, Any]] = {}
        self._keys: dict[tuple[str, str], ShopifyKey] = {}
        self._catalogs: dict[tuple[str, tuple[tuple[str, int], ...]], gql.Catalog] = {}
        self.unauthorized = 0
        self.not_found = 0

    # -- config ----------------------------------------------------------------------------------

    def _settings(self, shop: str, token: str) -> dict[str, Any]:
        s = dict(self._defaults)
        s.update(self._shop_cfg.get(shop, {}))
        s.update(self._key_cfg.get((shop, token), {}))
        return s

    def configure(self, shop: str | None = None, token: str | None = None, **settings: Any) -> None:
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown Shopify mock settings: {sorted(unknown)}")
        if token is not None and shop is None:
            raise ValueError("a token needs its shop")
        with self._lock:
            if shop is None:
                layer = self._defaults
            elif token is None:
                layer = self._shop_cfg.setdefault(shop, {})
            else:
                layer = self._key_cfg.setdefault((shop, token), {})
            before = dict(layer)
            layer.update(settings)
            try:
                Resolved(self._settings(shop or "", token or ""))  # check now, not per request
                new = {k: Resolved(self._settings(*k)) for k in self._keys}
            except (TypeError, ValueError):
                layer.clear()
                layer.update(before)
                raise
            now = self.clock()
            for k, key in self._keys.items():
                with key.lock:
                    key.apply(new[k], now)
            if shop is not None and token is not None and (shop, token) not in self._keys:
                # a key configured by name starts its clocks (outside traffic) now
                self._keys[(shop, token)] = ShopifyKey(
                    shop, token, Resolved(self._settings(shop, token)), now
                )

    def reset(self) -> None:
        with self._lock:
            self._keys.clear()
            self.unauthorized = 0
            self.not_found = 0

    def key(self, shop: str, token: str) -> ShopifyKey:
        k = self._keys.get((shop, token))
        if k is None:
            with self._lock:
                k = self._keys.get((shop, token))
                if k is None:
                    k = ShopifyKey(shop, token, Resolved(self._settings(shop, token)), self.clock())
                    self._keys[(shop, token)] = k
        return k

    # -- state -----------------------------------------------------------------------------------

    def key_stats(self, shop: str, token: str) -> dict[str, Any]:
        """One key's state, brought to the current time (leak and outside traffic)."""
        k = self.key(shop, token)
        now = self.clock()
        with k.lock:
            k.leak(now)
            gql.restore(k, now)
            return k.snapshot()

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            keys = list(self._keys.values())
        out: dict[str, Any] = {}
        t = {
            "accepted": 0,
            "throttled": 0,
            "rest_accepted": 0,
            "rest_throttled": 0,
            "rest_bucket_throttled": 0,
            "rest_resource_throttled": 0,
            "rest_peak_used": 0,
            "graphql_accepted": 0,
            "graphql_throttled": 0,
            "graphql_max_cost_exceeded": 0,
            "graphql_invalid": 0,
            "outside_accepted": 0,
            "outside_throttled": 0,
            "unauthorized": self.unauthorized,
            "not_found": self.not_found,
        }
        for k in keys:
            with k.lock:
                k.leak(now)
                gql.restore(k, now)
                snap = k.snapshot()
            out[f"{k.shop}/{k.token}"] = snap
            r, g = snap["rest"], snap["graphql"]
            t["rest_accepted"] += r["accepted"]
            t["rest_throttled"] += r["throttled"]
            t["rest_bucket_throttled"] += r["bucket_throttled"]
            t["rest_resource_throttled"] += r["resource_throttled"]
            t["rest_peak_used"] = max(t["rest_peak_used"], r["peak_used"])
            t["graphql_accepted"] += g["accepted"]
            t["graphql_throttled"] += g["throttled"]
            t["graphql_max_cost_exceeded"] += g["max_cost_exceeded"]
            t["graphql_invalid"] += g["invalid"]
            t["outside_accepted"] += r["outside_accepted"] + g["outside_accepted"]
            t["outside_throttled"] += r["outside_throttled"] + g["outside_throttled"]
        t["accepted"] = t["rest_accepted"] + t["graphql_accepted"]
        t["throttled"] = t["rest_throttled"] + t["graphql_throttled"]
        return {"now": now, "totals": t, "keys": out}

    # -- requests --------------------------------------------------------------------------------

    def handle(self, req: Request) -> Reply | None:
        path = req.path
        if not (path.startswith("/admin/api/") and path.endswith(".json")):
            return None
        version, slash, rest = path[len("/admin/api/") :].partition("/")
        if not slash or not version or len(rest) <= len(".json"):
            return None
        token = req.headers.get("x-shopify-access-token")
        if not token:
            with self._lock:
                self.unauthorized += 1
            return 401, [_JSON], UNAUTHORIZED
        shop = shop_of(req)
        k = self.key(shop, token)
        if rest == "graphql.json" and req.method == "POST":
            try:
                query, variables, name = ge.read_body(req.body, req.headers.get("content-type", ""))
            except ValueError:
                return (
                    400,
                    [_JSON],
                    dumps({"errors": {"query": "Required parameter missing or invalid"}}),
                )
            debug = req.headers.get("shopify-graphql-cost-debug", "").strip() == "1"
            catalog = self.catalog(shop, k.cfg.catalog)
            return gql.handle(k, catalog, query, variables, name, debug, self.clock())
        return self._rest(k, rest[: -len(".json")], req)

    def catalog(self, shop: str, counts: tuple[tuple[str, int], ...]) -> gql.Catalog:
        """The shop's data for these counts, made once."""
        got = self._catalogs.get((shop, counts))
        if got is None:
            with self._lock:
                got = self._catalogs.get((shop, counts))
                if got is None:
                    got = gql.Catalog(shop, dict(counts))
                    self._catalogs[(shop, counts)] = got
        return got

    def _rest(self, k: ShopifyKey, resource: str, req: Request) -> Reply:
        now = self.clock()
        with k.lock:
            k.leak(now)
            cfg = k.cfg
            c = cfg.capacity
            lvl = k.level
            if lvl + 1 > c + EPS:
                k.throttled += 1
                k.peak_used = int(c)
                if cfg.exact:
                    wait = max(0.1, math.ceil((lvl + 1 - c) / cfg.rate * 10 - EPS) / 10)
                    retry = f"{wait:.1f}"
                else:
                    retry = "2.0"
                headers = [(LIMIT_HEADER, f"{int(c)}/{int(c)}"), ("Retry-After", retry), _JSON]
                return 429, headers, cfg.too_many_body
            lvl += 1
            k.level = lvl
            used = min(int(c), max(0, math.ceil(lvl - EPS)))
            if lvl > k.peak_level:
                k.peak_level = lvl
            if used > k.peak_used:
                k.peak_used = used
            limit = (LIMIT_HEADER, f"{used}/{int(c)}")
            if cfg.patterns and any(
                fnmatch.fnmatchcase(resource + ".json", p) for p in cfg.patterns
            ):
                day = math.floor(now / 86400)
                if day != k.day:
                    k.day, k.day_count = day, 0
                if cfg.daily_cap is None or k.day_count >= cfg.daily_cap:
                    k.throttled += 1
                    k.resource_throttled += 1
                    return 429, [limit, _JSON], cfg.resource_body
                k.day_count += 1
            k.accepted += 1
            if k.first_accept is None:
                k.first_accept = now
            k.last_accept = now
            if len(k.accept_times) < ACCEPT_TIMES:
                k.accept_times.append(now)
        body = b'{"ok":true,"method":%s,"path":%s}' % (
            dumps(req.method),
            dumps(req.path),
        )
        return 200, [limit, _JSON], body
