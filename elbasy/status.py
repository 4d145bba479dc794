"""The data of the status page: what ``GET /status.json`` answers.

:func:`document` assembles the JSON object from one reading of the
instance's metrics (:class:`elbasy.metrics.InstanceView`, every worker's
slot summed), so the page shows the same numbers as ``/metrics`` whichever
worker a poll lands on: the rules enabled, the busiest accounts with what
is held for them and what the server last said of their quota, wait
percentiles (from the wait histograms: since start per rule and account,
per 5 s for the chart), 429s and sheds, workers and uptime. Plain Python:
no sockets, and ``now`` (the wall clock, unix seconds) is an argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from elbasy.metrics import HISTORY_POINTS, HISTORY_STEP, InstanceView, quantile

if TYPE_CHECKING:
    from elbasy.rules.schema import Rule

__all__ = ["document", "proxy_url"]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _quantiles(buckets: list[float], *qs: float) -> list[float | None]:
    return [_rounded(quantile(q, buckets)) for q in qs]


def _by_rule(view: InstanceView, family: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, values in view.family(family):
        out[labels[0]] = out.get(labels[0], 0.0) + values[0]
    return out


def history(view: InstanceView, now: float) -> list[dict[str, Any]]:
    """The wait chart: one entry per closed 5 s interval of the last ten minutes,
    from the oldest that saw a request on (empty ones included), oldest first.
    ``t`` is the end of its interval."""
    current = int(now // HISTORY_STEP)  # the interval still open
    first = current - HISTORY_POINTS + 1
    seen = [n for n in view.history if first <= n < current]
    if not seen:
        return []
    out = []
    for n in range(min(seen), current):
        buckets = view.history.get(n)
        count = int(sum(buckets)) if buckets else 0
        p50, p90, p99 = _quantiles(buckets, 0.5, 0.9, 0.99) if buckets else (None,) * 3
        out.append(
            {"t": (n + 1) * HISTORY_STEP, "count": count, "p50": p50, "p90": p90, "p99": p99}
        )
    return out


def document(
    view: InstanceView,
    now: float,
    *,
    version: str,
    proxy_url: str,
    rules: Iterable[Rule],
    top: int,
) -> dict[str, Any]:
    """``/status.json``: the contract's object (README, Status page) from one reading."""
    requests = _by_rule(view, "requests")
    queued = _by_rule(view, "queue_depth")
    throttled = _by_rule(view, "upstream_throttled")
    shed = _by_rule(view, "requests_shed")
    waits = {labels[0]: values for labels, values in view.family("quota_wait_seconds")}
    out_rules = []
    for rule in rules:
        p50, p90, p99 = _quantiles(waits.get(rule.id, [])[:-1], 0.5, 0.9, 0.99)
        out_rules.append(
            {
                "id": rule.id,
                "hosts": list(rule.hosts),
                "requests": int(requests.get(rule.id, 0)),
                "queue_depth": int(queued.get(rule.id, 0)),
                "throttled": int(throttled.get(rule.id, 0)),
                "shed": int(shed.get(rule.id, 0)),
                "wait_p50": p50,
                "wait_p90": p90,
                "wait_p99": p99,
            }
        )
    accounts = []
    for a in view.busiest(top):
        a50, a99 = _quantiles(a.buckets, 0.5, 0.99)
        accounts.append(
            {
                "rule": a.rule,
                "account": a.account,
                "queue_depth": int(a.queued),
                "requests": int(a.requests),
                "wait_seconds_total": round(a.wait_total, 6),
                "wait_p50": a50,
                "wait_p99": a99,
                "server_remaining": a.server_remaining,
                "server_limit": a.server_limit,
                "reported_at": a.reported_at,
            }
        )
    loop = view.loop
    return {
        "version": version,
        "uptime_seconds": round(max(0.0, now - view.started), 3) if view.started else 0.0,
        "workers": view.workers,
        "proxy_url": proxy_url,
        "rules": out_rules,
        "accounts": accounts,
        "throttled_total": int(sum(throttled.values())),
        "shed_total": int(sum(shed.values())),
        "requests_total": int(sum(requests.values())),
        "connections_open": int(loop["open"]),
        "tunnels_open": int(loop["tunnels_open"]),
        "bytes_up": int(loop["bytes_up"]),
        "bytes_down": int(loop["bytes_down"]),
        "wait_history": history(view, now),
    }


def proxy_url(host: str, port: int, hostname: Callable[[], str]) -> str:
    """The address clients use: the listening one, or this machine's name when
    elbasy listens on every address (0.0.0.0, ::)."""
    if host in ("0.0.0.0", "::", ""):
        host = hostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
