"""Mock Etsy Open API v3 (docs/api-limits.md part 4.2).

Route: ``ANY /v3/application/{anything}`` (host ``openapi.etsy.com``; the Host is not checked).
Key: the ``x-api-key`` header up to the first ``:``; missing -> ``401 {"error":"Missing API key"}``,
not limited.

Per key: a calendar-second window (``sec_window_start = floor(now)``, ``sec_count``) and a
24 h window of ``sub_buckets`` fixed sub-buckets (``B = 86400 / sub_buckets``, bucket index
``floor(now / B)``, the window is the current bucket and the ``sub_buckets - 1`` before it).
QPS is checked first, then QPD.  A 429 has ``retry-after`` (integer seconds), ``x-mock-limit``
(``qps`` | ``qpd``; elbasy must ignore it) and none of the ``x-limit-*`` / ``x-remaining-*``
headers.  With ``count_rejected`` a 429 also counts in both windows.

Settings (``configure(key=None, **settings)``; key None = every key):
``qps`` (10), ``qpd`` (10000), ``sub_buckets`` (12), ``count_rejected`` (False),
``outside_traffic_rps`` (0: requests per second another process sends on the same key; they
arrive at ``t0 + n/x`` and go through the same algorithm, counted separately).
"""

from __future__ import annotations

import math
import threading
from typing import Any

from .server import Clock, Reply, Request, dumps

DEFAULTS: dict[str, Any] = {
    "qps": 10,
    "qpd": 10000,
    "sub_buckets": 12,
    "count_rejected": False,
    "outside_traffic_rps": 0.0,
}
PREFIX = "/v3/application/"
TOO_MANY = dumps({"error": "You have exceeded your rate limit. Please try again later."})
MISSING_KEY = dumps({"error": "Missing API key"})
_JSON = ("Content-Type", "application/json")


class EtsyConfig:
    __slots__ = ("qps", "qpd", "sub_buckets", "bucket_seconds", "count_rejected", "out_rps")

    def __init__(self, s: dict[str, Any]) -> None:
        self.qps = int(s["qps"])
        self.qpd = int(s["qpd"])
        self.sub_buckets = int(s["sub_buckets"])
        if self.qps < 0 or self.qpd < 0 or self.sub_buckets < 1:
            raise ValueError("qps, qpd >= 0 and sub_buckets >= 1")
        self.bucket_seconds = 86400 / self.sub_buckets
        self.count_rejected = bool(s["count_rejected"])
        self.out_rps = float(s["outside_traffic_rps"] or 0.0)


class EtsyKey:
    __slots__ = (
        "lock",
        "key",
        "cfg",
        "sec_start",
        "sec_count",
        "day",
        "t_last",
        "out_t0",
        "out_n",
        "accepted",
        "throttled_qps",
        "throttled_qpd",
        "out_accepted",
        "out_throttled",
        "peak_sec",
        "peak_day",
    )

    def __init__(self, key: str, cfg: EtsyConfig, now: float) -> None:
        self.lock = threading.Lock()
        self.key = key
        self.cfg = cfg
        self.sec_start = math.floor(now)
        self.sec_count = 0
        self.day: dict[int, int] = {}
        self.t_last = now
        self.out_t0 = now
        self.out_n = 1
        self.accepted = 0
        self.throttled_qps = 0
        self.throttled_qpd = 0
        self.out_accepted = 0
        self.out_throttled = 0
        self.peak_sec = 0
        self.peak_day = 0

    def _window(self, now: float) -> tuple[int, int]:
        """Roll both windows to ``now``; return (current bucket index, day_used)."""
        cfg = self.cfg
        s = math.floor(now)
        if s != self.sec_start:
            self.sec_start = s
            self.sec_count = 0
        cur = math.floor(now / cfg.bucket_seconds)
        day = self.day
        low = cur - cfg.sub_buckets
        for j in [j for j in day if j <= low]:
            del day[j]
        return cur, sum(day.values())

    def decide(self, now: float) -> tuple[str | None, int, int]:
        """One request at ``now``: (None | "qps" | "qpd", retry_after or remaining_today, _)."""
        cfg = self.cfg
        cur, used = self._window(now)
        if self.sec_count + 1 > cfg.qps:
            retry = max(1, math.ceil((self.sec_start + 1) - now))
            limit = "qps"
        elif used + 1 > cfg.qpd:
            live = [j for j, n in self.day.items() if n > 0]
            if live:
                retry = math.ceil((min(live) + cfg.sub_buckets) * cfg.bucket_seconds - now)
            else:  # qpd == 0: nothing will ever leave; say "the next bucket"
                retry = math.ceil((cur + 1) * cfg.bucket_seconds - now)
            retry = max(1, retry)
            limit = "qpd"
        else:
            self.sec_count += 1
            self.day[cur] = self.day.get(cur, 0) + 1
            if self.sec_count > self.peak_sec:
                self.peak_sec = self.sec_count
            if used + 1 > self.peak_day:
                self.peak_day = used + 1
            return None, self.sec_count, used + 1
        if cfg.count_rejected:
            self.sec_count += 1
            self.day[cur] = self.day.get(cur, 0) + 1
        return limit, retry, 0

    def advance(self, now: float) -> None:
        """Run outside requests that arrived up to ``now``, in time order."""
        cfg = self.cfg
        if cfg.out_rps > 0 and now > self.t_last:
            step = 1.0 / cfg.out_rps
            n = self.out_n
            nxt = self.out_t0 + n * step
            while nxt <= now:
                if self.decide(nxt)[0] is None:
                    self.out_accepted += 1
                else:
                    self.out_throttled += 1
                n += 1
                nxt = self.out_t0 + n * step
            self.out_n = n
        if now > self.t_last:
            self.t_last = now

    def snapshot(self, now: float) -> dict[str, Any]:
        cfg = self.cfg
        _, used = self._window(now)
        return {
            "key": self.key,
            "qps": cfg.qps,
            "qpd": cfg.qpd,
            "sub_buckets": cfg.sub_buckets,
            "count_rejected": cfg.count_rejected,
            "sec_window_start": self.sec_start,
            "sec_count": self.sec_count,
            "day_used": used,
            "day_buckets": {str(j): n for j, n in sorted(self.day.items())},
            "accepted": self.accepted,
            "throttled": self.throttled_qps + self.throttled_qpd,
            "throttled_qps": self.throttled_qps,
            "throttled_qpd": self.throttled_qpd,
            "peak_sec_count": self.peak_sec,
            "peak_day_used": self.peak_day,
            "outside_accepted": self.out_accepted,
            "outside_throttled": self.out_throttled,
        }


class EtsyAPI:
    """The app behind ``EtsyMock``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._defaults: dict[str, Any] = dict(DEFAULTS)
        self._key_cfg: dict[str, dict[str, Any]] = {}
        self._keys: dict[str, EtsyKey] = {}
        self.unauthorized = 0

    def _config(self, key: str) -> EtsyConfig:
        s = dict(self._defaults)
        s.update(self._key_cfg.get(key, {}))
        return EtsyConfig(s)

    def configure(self, key: str | None = None, **settings: Any) -> None:
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown Etsy mock settings: {sorted(unknown)}")
        with self._lock:
            layer = self._defaults if key is None else self._key_cfg.setdefault(key, {})
            before = dict(layer)
            layer.update(settings)
            try:
                self._config(key or "")
                new = {name: self._config(name) for name in self._keys}
            except (TypeError, ValueError):
                layer.clear()
                layer.update(before)
                raise
            now = self.clock()
            for name, k in self._keys.items():
                with k.lock:
                    k.advance(now)
                    old = k.cfg
                    k.cfg = new[name]
                    if new[name].sub_buckets != old.sub_buckets:
                        k.day.clear()
                    if new[name].out_rps != old.out_rps:
                        k.out_t0, k.out_n = now, 1
            if key is not None and key not in self._keys:
                self._keys[key] = EtsyKey(key, self._config(key), now)

    def reset(self) -> None:
        with self._lock:
            self._keys.clear()
            self.unauthorized = 0

    def key(self, name: str) -> EtsyKey:
        k = self._keys.get(name)
        if k is None:
            with self._lock:
                k = self._keys.get(name)
                if k is None:
                    k = EtsyKey(name, self._config(name), self.clock())
                    self._keys[name] = k
        return k

    def key_stats(self, name: str) -> dict[str, Any]:
        k = self.key(name)
        now = self.clock()
        with k.lock:
            k.advance(now)
            return k.snapshot(now)

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            keys = list(self._keys.values())
        out: dict[str, Any] = {}
        t = {
            "accepted": 0,
            "throttled": 0,
            "throttled_qps": 0,
            "throttled_qpd": 0,
            "outside_accepted": 0,
            "outside_throttled": 0,
            "unauthorized": self.unauthorized,
        }
        for k in keys:
            with k.lock:
                k.advance(now)
                snap = k.snapshot(now)
            out[k.key] = snap
            for name in ("accepted", "throttled", "throttled_qps", "throttled_qpd"):
                t[name] += snap[name]
            t["outside_accepted"] += snap["outside_accepted"]
            t["outside_throttled"] += snap["outside_throttled"]
        return {"now": now, "totals": t, "keys": out}

    def handle(self, req: Request) -> Reply | None:
        if not req.path.startswith(PREFIX):
            return None
        api_key = req.headers.get("x-api-key", "").split(":", 1)[0].strip()
        if not api_key:
            with self._lock:
                self.unauthorized += 1
            return 401, [_JSON], MISSING_KEY
        k = self.key(api_key)
        now = self.clock()
        with k.lock:
            k.advance(now)
            limit, a, b = k.decide(now)
            if limit is None:
                k.accepted += 1
            elif limit == "qps":
                k.throttled_qps += 1
            else:
                k.throttled_qpd += 1
            cfg = k.cfg
        if limit is not None:
            return 429, [("retry-after", str(a)), ("x-mock-limit", limit), _JSON], TOO_MANY
        headers = [
            ("x-limit-per-second", str(cfg.qps)),
            ("x-remaining-this-second", str(cfg.qps - a)),
            ("x-limit-per-day", str(cfg.qpd)),
            ("x-remaining-today", str(cfg.qpd - b)),
            _JSON,
        ]
        body = b'{"ok":true,"method":%s,"path":%s}' % (dumps(req.method), dumps(req.path))
        return 200, headers, body
