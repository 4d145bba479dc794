"""The data of the status page: what ``GET /status.json`` answers.

One :class:`StatusBoard` per worker records what the worker's paced
requests did (each one's wait, rule and account; sheds; the server's
refusals and its last report of each account's quota) and keeps the wait
history: one entry per 5 s interval, the last ten minutes.
:meth:`StatusBoard.document` assembles the JSON object from that record,
the enabled rules, the pacer's lines (what waits now) and the loop's
counters. Plain Python: no sockets, and ``now`` (the wall clock, unix
seconds) is always an argument.

The document is one worker's view. With ``--workers N`` each worker
answers with its own; the instance-wide sum over shared memory replaces
it (the status callable handed to the policy is the seam).
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from elbasy.limits import ServerView

if TYPE_CHECKING:
    from elbasy.pacing import Paced
    from elbasy.rules import Match, Report, RuleSet
    from elbasy.rules.schema import Rule

#: the wait history's interval, seconds (entries end on multiples of it)
INTERVAL = 5.0
#: how many intervals the history keeps: ten minutes
HISTORY = 120
#: waits kept per interval for its percentiles (the interval's last ones)
INTERVAL_SAMPLES = 4096
#: recent waits kept per rule, and per account, for their percentiles
RULE_SAMPLES = 1024
ACCOUNT_SAMPLES = 128
#: accounts the board remembers; past twice this, the least busy half is forgotten
ACCOUNTS_KEPT = 1024
#: accounts in the document, busiest first
TOP_ACCOUNTS = 10


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of sorted values, nearest rank; None when empty."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class _Samples:
    """The last ``size`` values of a stream (a ring of doubles; sorted only when asked)."""

    __slots__ = ("values", "size", "n")

    def __init__(self, size: int) -> None:
        self.values = array("d")
        self.size = size
        self.n = 0

    def add(self, value: float) -> None:
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            self.values[self.n % self.size] = value
        self.n += 1

    def quantiles(self, *qs: float) -> list[float | None]:
        ordered = sorted(self.values)
        return [_rounded(percentile(ordered, q)) for q in qs]


class _RuleRecord:
    __slots__ = ("requests", "throttled", "shed", "waits")

    def __init__(self) -> None:
        self.requests = 0
        self.throttled = 0
        self.shed = 0
        self.waits = _Samples(RULE_SAMPLES)


class _AccountRecord:
    __slots__ = ("rule", "account", "requests", "wait_total", "waits", "view", "reported_at")

    def __init__(self, rule: str, account: str) -> None:
        self.rule = rule
        self.account = account
        self.requests = 0
        self.wait_total = 0.0
        self.waits = _Samples(ACCOUNT_SAMPLES)
        # the server's last word on the account: (remaining, limit), and when
        self.view: tuple[float | None, float | None] = (None, None)
        self.reported_at: float | None = None


def tightest(views: Iterable[ServerView]) -> tuple[float, float | None] | None:
    """(remaining, limit) of the limit a server report shows fullest; None when it
    states no remaining count (a report with only a capacity, or none)."""
    best: tuple[float, float | None] | None = None
    best_share = math.inf
    for v in views:
        remaining = v.remaining
        if remaining is None and v.used is not None and v.capacity is not None:
            remaining = v.capacity - v.used
        if remaining is None:
            continue
        share = remaining / v.capacity if v.capacity else math.inf
        if best is None or share < best_share:
            best, best_share = (remaining, v.capacity), share
    return best


class StatusBoard:
    """What one worker saw of its paced requests, and the wait history."""

    def __init__(self) -> None:
        self._rules: dict[str, _RuleRecord] = {}
        self._accounts: dict[str, _AccountRecord] = {}
        # the history: closed intervals (oldest first), and the open one
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._open_end = 0.0  # the open interval ends here (0: none yet)
        self._open = _Samples(INTERVAL_SAMPLES)
        #: requests for elbasy's own pages (the status page's polls among them)
        self.own_pages = 0

    # ------------------------------------------------------------------ recording

    def _rule(self, rule_id: str) -> _RuleRecord:
        r = self._rules.get(rule_id)
        if r is None:
            r = self._rules[rule_id] = _RuleRecord()
        return r

    def _account(self, match: Match) -> _AccountRecord:
        a = self._accounts.get(match.account)
        if a is None:
            if len(self._accounts) >= 2 * ACCOUNTS_KEPT:
                self._forget_accounts()
            a = self._accounts[match.account] = _AccountRecord(match.rule.id, match.account)
        return a

    def _forget_accounts(self) -> None:
        """Keep the busiest half: memory stays bounded whatever the accounts' churn."""
        kept = sorted(self._accounts.values(), key=lambda a: (a.wait_total, a.requests))
        for a in kept[: len(kept) - ACCOUNTS_KEPT]:
            del self._accounts[a.account]

    def finished(self, match: Match, waited: float, now: float) -> None:
        """A paced request's exchange ended after waiting ``waited`` seconds for quota."""
        self.advance(now)
        r = self._rule(match.rule.id)
        r.requests += 1
        r.waits.add(waited)
        a = self._account(match)
        a.requests += 1
        a.wait_total += waited
        a.waits.add(waited)
        self._open.add(waited)

    def shed(self, match: Match) -> None:
        """elbasy answered a paced request itself (429: beyond the max wait; 503: no room)."""
        r = self._rule(match.rule.id)
        r.requests += 1
        r.shed += 1
        self._account(match).requests += 1

    def reported(self, match: Match, report: Report, counted: bool, now: float) -> None:
        """A server's answer, as the rule read it. ``counted``: a refusal in it counts
        (the pacer's rule: a rule that reads bodies decides on the body, and a
        resource's own limit is not the account's)."""
        if counted and report.throttled and not report.resource_throttle:
            self._rule(match.rule.id).throttled += 1
        view = tightest(report.views)
        if view is not None:
            a = self._account(match)
            a.view = view
            a.reported_at = now

    def watch(self, rules: RuleSet, wall: Callable[[], float]) -> None:
        """See every report the pacer reads through ``rules`` (each answer of a covered
        API passes there once, or twice for a rule that reads bodies: head, then body),
        dated by ``wall``."""
        read = rules.read_response

        def read_response(
            match: Match, status: int, headers: Any, body: bytes | None, *, now: float | None = None
        ) -> Report:
            report = read(match, status, headers, body, now=now)
            counted = body is not None or not match.body_needed
            self.reported(match, report, counted, wall())
            return report

        rules.read_response = read_response  # type: ignore[method-assign]

    # ------------------------------------------------------------------ history

    def advance(self, now: float) -> None:
        """Close every interval that ended by ``now``; the empty ones are kept too."""
        if now < self._open_end:
            return
        end = self._open_end
        if end:
            self._history.append(self._entry(end, self._open))
            self._open = _Samples(INTERVAL_SAMPLES)
            # the intervals since, with no request in them (only the last ten minutes')
            empty = int((now - end) // INTERVAL)
            for k in range(max(0, empty - HISTORY) + 1, empty + 1):
                self._history.append(self._entry(end + k * INTERVAL, None))
        self._open_end = (math.floor(now / INTERVAL) + 1) * INTERVAL

    @staticmethod
    def _entry(end: float, samples: _Samples | None) -> dict[str, Any]:
        if samples is None or not samples.n:
            return {"t": end, "count": 0, "p50": None, "p90": None, "p99": None}
        p50, p90, p99 = samples.quantiles(0.5, 0.9, 0.99)
        return {"t": end, "count": samples.n, "p50": p50, "p90": p90, "p99": p99}

    def history(self, now: float) -> list[dict[str, Any]]:
        """The closed intervals of the last ten minutes, oldest first."""
        self.advance(now)
        return [dict(e) for e in self._history]

    # ------------------------------------------------------------------ the document

    def document(
        self,
        now: float,
        *,
        version: str,
        workers: int,
        proxy_url: str,
        rules: Iterable[Rule],
        lines: Iterable[Sequence[Paced]],
        loop: Mapping[str, Any],
        top: int = TOP_ACCOUNTS,
    ) -> dict[str, Any]:
        """``/status.json``: the contract's object, from this worker's record.

        ``lines``: the pacer's lines, each the requests waiting on one account
        (first in line first; every one of a line has the same match account);
        ``loop``: the loop's ``stats()``.
        """
        queued_rule: dict[str, int] = {}
        queued_account: dict[str, tuple[Match, int]] = {}
        for line in lines:
            if not line:
                continue
            m = line[0].match
            queued_rule[m.rule.id] = queued_rule.get(m.rule.id, 0) + len(line)
            got = queued_account.get(m.account)
            queued_account[m.account] = (m, len(line) + (got[1] if got else 0))
        out_rules = []
        for rule in rules:
            rec = self._rules.get(rule.id) or _RuleRecord()
            p50, p90, p99 = rec.waits.quantiles(0.5, 0.9, 0.99)
            out_rules.append(
                {
                    "id": rule.id,
                    "hosts": list(rule.hosts),
                    "requests": rec.requests,
                    "queue_depth": queued_rule.get(rule.id, 0),
                    "throttled": rec.throttled,
                    "shed": rec.shed,
                    "wait_p50": p50,
                    "wait_p90": p90,
                    "wait_p99": p99,
                }
            )
        busy: list[tuple[int, float, int, str]] = []
        for key in set(self._accounts) | set(queued_account):
            a = self._accounts.get(key)
            got = queued_account.get(key)
            depth = got[1] if got else 0
            busy.append((depth, a.wait_total if a else 0.0, a.requests if a else 0, key))
        # busiest first: the most held now, then the most waited, then the most sent
        busy.sort(key=lambda b: (-b[0], -b[1], -b[2], b[3]))
        accounts = []
        for depth, _, _, key in busy[:top]:
            a = self._accounts.get(key)
            if a is None:
                a = _AccountRecord(queued_account[key][0].rule.id, key)
            a50, a99 = a.waits.quantiles(0.5, 0.99)
            remaining, limit = a.view
            accounts.append(
                {
                    "rule": a.rule,
                    "account": a.account,
                    "queue_depth": depth,
                    "requests": a.requests,
                    "wait_seconds_total": round(a.wait_total, 6),
                    "wait_p50": a50,
                    "wait_p99": a99,
                    "server_remaining": remaining,
                    "server_limit": limit,
                    "reported_at": a.reported_at,
                }
            )
        conns = loop.get("connections", {})
        # every request head the loop read, less the CONNECTs (tunnels and
        # interceptions) and the requests for elbasy's own pages: what clients
        # sent through elbasy
        heads = int(conns.get("requests_total", 0))
        connects = int(conns.get("tunnels_total", 0)) + int(
            loop.get("tls", {}).get("intercepts_total", 0)
        )
        return {
            "version": version,
            "uptime_seconds": float(loop.get("uptime_seconds", 0.0)),
            "workers": workers,
            "proxy_url": proxy_url,
            "rules": out_rules,
            "accounts": accounts,
            "throttled_total": sum(r.throttled for r in self._rules.values()),
            "shed_total": sum(r.shed for r in self._rules.values()),
            "requests_total": max(0, heads - connects - self.own_pages),
            "connections_open": int(conns.get("open", 0)),
            "tunnels_open": int(conns.get("tunnels_open", 0)),
            "bytes_up": int(loop.get("bytes_up", 0)),
            "bytes_down": int(loop.get("bytes_down", 0)),
            "wait_history": self.history(now),
        }


def proxy_url(host: str, port: int, hostname: Callable[[], str]) -> str:
    """The address clients use: the listening one, or this machine's name when
    elbasy listens on every address (0.0.0.0, ::)."""
    if host in ("0.0.0.0", "::", ""):
        host = hostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
