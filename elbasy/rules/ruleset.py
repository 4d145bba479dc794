"""The enabled rules and what they say about one request and one response.

:meth:`RuleSet.match` runs once per intercepted request, so it is cheap: the
regexes are compiled when the rules load and the rules that can apply to a
host are cached. It never reads a body; :meth:`RuleSet.cost_for` does, for the
GraphQL rules that ask for one (``Match.body_needed``), and prices the query
from its text (:mod:`elbasy.rules.graphql_cost`) until the server has said
what that query shape costs. After the response,
:meth:`RuleSet.read_response` turns it into a :class:`Report` (what the server
says is used and left, whether it throttled, how long to wait) and
:meth:`RuleSet.learn` keeps what outlives the request: the account's plan and
GraphQL query costs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeGuard

from elbasy.hostglob import covered
from elbasy.limits import Limit, ServerView
from elbasy.quota import Facts, LocalFacts
from elbasy.rules.graphql_cost import estimate
from elbasy.rules.schema import (
    Feedback,
    Marker,
    Part,
    Reader,
    Rule,
    RuleError,
    check_rules,
    parse_rule,
)
from elbasy.rules.wire import (
    Headers,
    decode_body,
    first_header,
    hash_secret,
    json_document,
    json_values,
    parse_http_date,
    parse_number,
)
from elbasy.toml import TomlFileError, parse_toml, read_toml

__all__ = ["BUILTIN_IDS", "Match", "Report", "RuleSet", "ServerView"]

#: The built-in rules, one data file each in ``elbasy/rules/data``.
BUILTIN_IDS: tuple[str, ...] = (
    "shopify-admin-graphql",
    "shopify-admin-rest",
    "etsy-v3",
    "amazon-sp-api",
    "bigcommerce",
    "github-rest",
    "github-graphql",
)

#: the names of learned facts in the quota store (elbasy.quota.Facts): an
#: account's tier (its index in the rule's tier names), a query shape's cost
TIER_FACT = "tier|"
COST_FACT = "cost|"
_MAX_HOSTS = 4096
_MAX_MATCHES = 65536
_HINT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:@-")


@dataclass(frozen=True, slots=True)
class Match:
    """What a rule says about one request. Immutable and cheap to copy.

    ``keys[i]`` is the bucket key of ``limits[i]``: the rule, the limit and
    the account parts in the limit's scope (plus the operation when scoped on
    it), and ``costs[i]`` what this request counts against it. ``account``
    is the whole account; neither holds a raw token.
    """

    rule: Rule
    account: str
    label: str
    operation: str | None
    tier: str
    limits: tuple[Limit, ...]
    keys: tuple[str, ...]
    cost: float
    body_needed: int
    strip_headers: tuple[bytes, ...]
    max_single: float | None
    retry_safe: bool
    cost_key: str | None = None
    mutation: bool = False
    # per limit: None when it counts ``cost``, else (request cost, mutation cost)
    counting: tuple[tuple[float, float] | None, ...] = ()

    @property
    def costs(self) -> tuple[float, ...]:
        """What this request counts against each of ``limits``, in their order.

        ``cost`` (the request's points: 1 for most REST rules, the priced
        query for GraphQL) for a limit that counts points; for one that
        counts requests (GitHub's secondary GraphQL limit), the limit's
        request cost, or its mutation cost for a GraphQL mutation.
        """
        if not self.counting:
            return (self.cost,) * len(self.limits)
        return tuple(
            self.cost if c is None else (c[1] if self.mutation else c[0]) for c in self.counting
        )


@dataclass(frozen=True, slots=True)
class Report:
    """What one response says about the quota."""

    throttled: bool = False
    resource_throttle: bool = False
    retry_after: float | None = None
    views: tuple[ServerView, ...] = ()
    tier: str | None = None
    requested_cost: float | None = None
    actual_cost: float | None = None

    def view(self, limit: str) -> ServerView | None:
        return next((v for v in self.views if v.limit == limit), None)


@dataclass(slots=True)
class _Response:
    """One response, decoded lazily, as the readers see it."""

    status: int
    headers: Headers
    raw: bytes | None
    now: float | None
    _doc: Any = None
    _text: str | None = None
    _decoded: bool = False
    cache: dict[str, Any] = field(default_factory=dict)

    def header(self, name: bytes) -> bytes | None:
        return first_header(self.headers, name)

    def _decode(self) -> None:
        if self._decoded:
            return
        self._decoded = True
        if not self.raw:
            return
        body, tail = decode_body(self.raw, self.headers)
        self._text = body.decode("utf-8", "replace") + (
            tail.decode("utf-8", "replace") if tail else ""
        )
        self._doc = json_document(body, tail)

    @property
    def doc(self) -> Any:
        self._decode()
        return self._doc

    @property
    def text(self) -> str:
        self._decode()
        return self._text or ""

    def wall(self) -> float:
        """The server's clock (its Date header), else the caller's, else ours."""
        date = parse_http_date(self.header(b"date"))
        if date is not None:
            return date
        return self.now if self.now is not None else time.time()


def _marks(marker: Marker, resp: _Response) -> bool:
    if marker.statuses is not None and resp.status not in marker.statuses:
        return False
    if marker.body is not None:
        return marker.body.search(resp.text) is not None
    if marker.header is not None:
        value = resp.header(marker.header)
        return value is not None and _holds(marker, value.decode("latin-1").strip())
    assert marker.json is not None
    return any(
        _holds(marker, _plain(v))
        for v in json_values(resp.doc, marker.json)
        if not isinstance(v, dict | list)
    )


def _holds(marker: Marker, text: str) -> bool:
    if marker.pattern is not None:
        return marker.pattern.search(text) is not None
    return text == marker.equals


def _plain(value: Any) -> str:
    """A JSON scalar as text: 100.0 and 100 both read "100"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _raw(reader: Reader, resp: _Response) -> str | None:
    if reader.only_if is not None and not _marks(reader.only_if, resp):
        return None
    text: str | None = None
    if reader.header is not None:
        value = resp.header(reader.header)
        text = value.decode("latin-1").strip() if value is not None else None
    elif reader.json is not None:
        values = [v for v in json_values(resp.doc, reader.json) if v is not None]
        text = _plain(values[0]) if values and not isinstance(values[0], dict | list) else None
    if text is not None and reader.pattern is not None:
        m = reader.pattern.search(text)
        text = m.group(1) if m else None
    return text


def _read(reader: Reader, resp: _Response) -> float | None:
    if reader.compute == "graphql_wait":
        return _graphql_wait(resp)
    text = _raw(reader, resp)
    value = parse_number(text)
    if reader.unit == "ms":
        return value / 1000.0 if value is not None else None
    if reader.unit == "epoch":
        return max(0.0, value - resp.wall()) if value is not None else None
    if reader.unit == "s" and value is None and text:
        when = parse_http_date(text)  # Retry-After: <HTTP-date>
        return max(0.0, when - resp.wall()) if when is not None else None
    return value


def _graphql_wait(resp: _Response) -> float | None:
    """(requestedQueryCost − currentlyAvailable) / restoreRate, from a throttled body."""
    costs = json_values(resp.doc, ("extensions", "cost"))
    cost = costs[0] if costs and isinstance(costs[0], dict) else None
    if cost is None:
        return None
    status = cost.get("throttleStatus")
    requested = cost.get("requestedQueryCost")
    if not isinstance(status, dict):
        return None
    available, rate = status.get("currentlyAvailable"), status.get("restoreRate")
    if not (_is_number(requested) and _is_number(available) and _is_number(rate)) or rate <= 0:
        return None
    return max(0.0, (float(requested) - float(available)) / float(rate))


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class RuleSet:
    """The enabled rules, in match order, and what was learned from responses."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        seen: set[str] = set()
        for rule in rules:
            if rule.id in seen:
                raise RuleError(f"rule {rule.id!r} is given twice")
            seen.add(rule.id)
        self._rules: tuple[Rule, ...] = tuple(rules)
        self._by_id = {rule.id: rule for rule in self._rules}
        self._hosts: dict[str, tuple[Rule, ...]] = {}
        #: what servers taught about accounts' tiers and query shapes' costs: the
        #: quota store's facts once a pacer shares them (every worker agrees)
        self.facts: Facts = LocalFacts()
        self._priced: dict[tuple[int, str, float], tuple[Match, Match]] = {}
        # (account, operation, learned tier, method) -> Match: Matches are immutable
        self._matches: dict[tuple[str, str | None, str | None, str], Match] = {}

    # ------------------------------------------------------------------ loading

    @staticmethod
    def builtin_rule_data(rule_id: str) -> tuple[str, str]:
        """(file name, TOML text) of a built-in rule."""
        name = f"{rule_id}.toml"
        text = resources.files("elbasy.rules").joinpath("data", name).read_text("utf-8")
        return name, text

    @classmethod
    def _builtin_rules(cls) -> list[Rule]:
        return list(_builtin_rules())

    @classmethod
    def builtin(cls) -> RuleSet:
        """Every built-in rule."""
        return cls(cls._builtin_rules())

    @classmethod
    def load(
        cls,
        enabled: Sequence[str] | None = None,
        extra: Sequence[Mapping[str, Any]] = (),
        *,
        origin: str = "config",
    ) -> RuleSet:
        """Built-in rules plus user rules (``extra``: rule tables, e.g. a config file's).

        A user rule with a built-in's id replaces it in place; new ones come
        first, so they win over the built-in globs. ``enabled`` picks rules by
        id (None: all); an unknown id raises :class:`RuleError` naming it.
        """
        rules = cls._builtin_rules()
        users = check_rules(extra, origin)
        replaced = {r.id: r for r in users}
        rules = [replaced.pop(r.id, r) for r in rules]
        rules = [r for r in users if r.id in replaced] + rules
        if enabled is not None:
            known = {r.id for r in rules}
            unknown = [i for i in enabled if i not in known]
            if unknown:
                raise RuleError(
                    f"unknown rule {', '.join(repr(i) for i in unknown)} "
                    f"(known: {', '.join(sorted(known))})"
                )
            wanted = set(enabled)
            rules = [r for r in rules if r.id in wanted]
        return cls(rules)

    @staticmethod
    def check_file(path: str | Path) -> list[Rule]:
        """Check a TOML file of rules (``[[rule]]`` tables, or one rule at the top level).

        Raises :class:`RuleError` naming the file, the rule and the field, one
        line per bad rule.
        """
        path = Path(path)
        try:
            data = read_toml(path)
        except TomlFileError as e:
            raise RuleError(str(e)) from None
        if "rule" in data:
            if set(data) != {"rule"} or not isinstance(data["rule"], list):
                raise RuleError(f"{path}: expected only [[rule]] tables")
            tables = data["rule"]
        elif "id" in data:
            tables = [data]
        else:
            raise RuleError(f"{path}: no rules: expected [[rule]] tables or one rule with an id")
        return list(check_rules(tables, path.name))

    # ------------------------------------------------------------------ queries

    def __iter__(self) -> Iterator[Rule]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def ids(self) -> list[str]:
        return [r.id for r in self._rules]

    def get(self, rule_id: str) -> Rule:
        try:
            return self._by_id[rule_id]
        except KeyError:
            raise RuleError(f"unknown rule {rule_id!r}") from None

    def intercept_globs(self) -> list[str]:
        """The host globs of the enabled rules, each once, in rule order."""
        out: list[str] = []
        for rule in self._rules:
            out += [h for h in rule.hosts if h not in out]
        return out

    # ------------------------------------------------------------------ match

    def _candidates(self, host: str) -> tuple[Rule, ...]:
        found = self._hosts.get(host)
        if found is None:
            found = tuple(r for r in self._rules if covered(host, r.hosts))
            if len(self._hosts) >= _MAX_HOSTS:
                self._hosts.clear()
            self._hosts[host] = found
        return found

    def covers(self, host: str) -> bool:
        """Whether any enabled rule is about ``host`` (cheap: one cached lookup)."""
        return bool(self._candidates(host.lower()))

    def match(self, host: str, method: str, target: str, headers: Headers) -> Match | None:
        """The first enabled rule covering this request, with its account and limits."""
        name = host.lower()
        if name.startswith("["):
            name = name.split("]", 1)[0] + "]"
        else:
            name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
        name = name.rstrip(".")
        rules = self._candidates(name)
        if not rules:
            return None
        path = target
        if "://" in path[:8]:
            slash = path.find("/", path.find("://") + 3)
            path = path[slash:] if slash != -1 else "/"
        path = path.split("?", 1)[0].split("#", 1)[0] or "/"
        method = method.upper()
        for rule in rules:
            if rule.methods is not None and method not in rule.methods:
                continue
            if rule.path is not None and rule.path.search(path) is None:
                continue
            if any(x.search(path) for x in rule.exclude_paths):
                continue
            return self._match(rule, name, method, path, headers)
        return None

    def _part(self, part: Part, host: str, path: str, headers: Headers) -> tuple[str, bool] | None:
        """(value, hashed) of one key part, or None when the request does not carry it."""
        source: Part | None = part
        while source is not None:
            text: str | None
            if source.source == "static":
                text = source.value
            elif source.source == "host":
                text = host
            elif source.source == "path":
                text = path
            else:
                assert source.header is not None
                raw = first_header(headers, source.header)
                text = raw.decode("latin-1").strip() if raw else None
            if text and source.pattern is not None:
                m = source.pattern.search(text)
                text = (m.group("v") if "v" in m.groupdict() else m.group(1)) if m else None
            if text:
                if source.hash:
                    return hash_secret(text), True
                if source.source == "hint" and not (len(text) <= 64 and set(text) <= _HINT_CHARS):
                    return hash_secret(text), True
                return text, False
            source = source.fallback
        return (part.default, False) if part.default else None

    def _match(self, rule: Rule, host: str, method: str, path: str, headers: Headers) -> Match:
        values: list[str] = []
        hashed: list[bool] = []
        for part in rule.parts:
            got = self._part(part, host, path, headers)
            value, was_hashed = got if got is not None else ("-", False)
            values.append(value)
            hashed.append(was_hashed)
        account = "|".join([rule.id, *values])
        operation = None
        for op in rule.operations:
            if op.methods is not None and method not in op.methods:
                continue
            if op.path is not None and op.path.search(path) is None:
                continue
            operation = op.id
            break
        tier = self.tier_of(account)
        cache_key = (account, operation, tier, method)
        found = self._matches.get(cache_key)
        if found is not None:
            return found
        named = dict(zip((p.name for p in rule.parts), values, strict=True))
        if tier is None:
            tier = rule.default_tier
            for part_name, value, by_tier in rule.tier_by_part:
                if named.get(part_name) == value:
                    tier = by_tier
                    break
        limits: list[Limit] = []
        keys: list[str] = []
        counting: list[tuple[float, float] | None] = []
        for spec in rule.limits:
            if not spec.applies(operation):
                continue
            limits.append(spec.by_tier[tier if tier in spec.by_tier else rule.default_tier])
            counting.append(
                None if spec.counts == "points" else (spec.request_cost, spec.mutation_cost)
            )
            scoped = [named[s] if s != "operation" else (operation or "-") for s in spec.scope]
            keys.append("|".join([rule.id, spec.name, *scoped]))
        shown = [
            f"{p.name}={'#' if h else ''}{v}"
            for p, v, h in zip(rule.parts, values, hashed, strict=True)
        ]
        label = " ".join([rule.id, *shown] + ([f"op={operation}"] if operation else []))
        cost = rule.cost
        match = Match(
            rule=rule,
            account=account,
            label=label,
            operation=operation,
            tier=tier,
            limits=tuple(limits),
            keys=tuple(keys),
            cost=cost.default if cost.kind == "graphql" else cost.value,
            body_needed=cost.body_bytes,
            strip_headers=rule.strip_headers,
            max_single=cost.max_single,
            retry_safe=method in rule.throttle.retry_methods,
            counting=tuple(counting),
        )
        if len(self._matches) >= _MAX_MATCHES:
            self._matches.clear()
        self._matches[cache_key] = match
        return match

    # ------------------------------------------------------------------ cost

    def cost_for(self, match: Match, body: bytes) -> Match:
        """``match`` with the cost of this request body.

        A GraphQL query shape the server has priced costs what it said
        (``requestedQueryCost``, learned by :meth:`learn`); an unseen one
        what the rule's estimator makes of its text, at most the rule's
        ``max_single``; a body that does not parse, the rule's ``default``.
        A shape the server priced above ``max_single`` costs nothing: the
        server refuses it before running it, without touching the bucket.
        """
        rule_cost = match.rule.cost
        if rule_cost.kind != "graphql":
            return match
        priced = estimate(
            body[: match.body_needed] if match.body_needed else body, rule_cost.estimator
        )
        if priced is None:
            return match
        mutation = priced.is_mutation
        cost_key = f"{match.rule.id}|{priced.shape}"
        cap = match.max_single
        known_cost = self.facts.fact(COST_FACT + cost_key)
        cost = known_cost[0] if known_cost is not None else None
        if cost is not None:
            if cap is not None and cost > cap:
                cost = 0.0
        else:
            cost = priced.cost if priced.cost is not None else rule_cost.default
            if cap is not None:
                cost = min(cost, cap)
        # a throttled query was not executed; a throttled mutation neither, but
        # a mutation cut off by a resource throttle may have been: leave those alone
        retry_safe = match.retry_safe and not mutation
        # one priced Match per (account's match, shape, cost): a queued query keeps
        # its Match, and an account's queries repeat a few shapes
        memo = (id(match), cost_key, cost)
        known = self._priced.get(memo)
        if known is not None and known[0] is match:
            return known[1]
        priced_match = replace(
            match, cost=cost, cost_key=cost_key, mutation=mutation, retry_safe=retry_safe
        )
        if len(self._priced) >= _MAX_MATCHES:
            self._priced.clear()
        self._priced[memo] = (match, priced_match)
        return priced_match

    # ------------------------------------------------------------------ responses

    def read_response(
        self,
        match: Match,
        status: int,
        headers: Headers,
        body: bytes | None,
        *,
        now: float | None = None,
    ) -> Report:
        """What the response says about the quota.

        ``body`` is the raw response body as received (chunked and gzip or
        deflate coded bodies are decoded here, within bounds), or None.
        ``now`` (epoch seconds) turns epoch resets into delays when the
        response has no Date header.
        """
        rule = match.rule
        resp = _Response(status, headers, body if rule.needs_body else None, now)
        views = tuple(v for f in rule.feedback for v in self._views(f, match, resp))
        th = rule.throttle
        marks = [m for m in th.markers if _marks(m, resp)]
        marked = bool(marks)
        # a marker with statuses of its own was checked against them already
        by_marker = any(
            m.statuses is not None or not th.marker_statuses or status in th.marker_statuses
            for m in marks
        )
        throttled = status in th.statuses or by_marker
        resource = False
        if throttled:
            if th.resource_without_marker and th.markers and not marked:
                resource = True
            if th.resource_below_capacity is not None:
                view = next((v for v in views if v.limit == th.resource_below_capacity), None)
                if view is not None and view.capacity is not None:
                    used = view.used
                    if used is None and view.remaining is not None:
                        used = view.capacity - view.remaining
                    resource = used is not None and used < view.capacity
        retry_after = None
        if throttled:
            for reader in th.retry_after:
                retry_after = _read(reader, resp)
                if retry_after is not None:
                    break
            if retry_after is None:
                retry_after = th.default_retry_after
        tier = None
        for detect in rule.tier_detect:
            text = _raw(detect.reader, resp)
            if text is not None:
                number = parse_number(text)
                key = _plain(number) if number is not None else text
                tier = detect.map.get(key)
                if tier is not None:
                    break
        requested = actual = None
        if rule.cost.requested is not None:
            requested = _first_number(resp.doc, rule.cost.requested)
        if rule.cost.actual is not None:
            actual = _first_number(resp.doc, rule.cost.actual)
            if actual is None and not throttled and _all_null(resp.doc, rule.cost.actual):
                # answered, but nothing ran (MAX_COST_EXCEEDED, a validation
                # error): nothing was spent, the whole reservation comes back
                actual = 0.0
        return Report(
            throttled=throttled,
            resource_throttle=resource,
            retry_after=retry_after,
            views=views,
            tier=tier,
            requested_cost=requested,
            actual_cost=actual,
        )

    def _views(self, feedback: Feedback, match: Match, resp: _Response) -> list[ServerView]:
        values = {name: _read(reader, resp) for name, reader in feedback.readers.items()}
        if all(v is None for v in values.values()):
            return []
        if feedback.limit == "*":
            names = [limit.name for limit in match.limits]
        elif feedback.limit is not None:
            names = [feedback.limit]
        else:
            assert feedback.limit_header is not None
            raw = resp.header(feedback.limit_header)
            target = feedback.limit_map.get(raw.decode("latin-1").strip()) if raw else None
            names = [target] if target else []
        return [
            ServerView(
                limit=name,
                used=values.get("used"),
                remaining=values.get("remaining"),
                capacity=values.get("capacity"),
                rate=values.get("rate"),
                reset_after=values.get("reset_after"),
            )
            for name in names
        ]

    # ------------------------------------------------------------------ learning

    def learn(self, match: Match, report: Report) -> None:
        """Remember the account's plan and the query's cost for later matches."""
        rule = match.rule
        if report.tier is not None and report.tier in rule.tier_names:
            tier = rule.tier_names.index(report.tier)
            self.facts.put_fact(TIER_FACT + match.account, tier, 0.0)
        if match.cost_key is not None:
            cost = report.requested_cost
            if rule.cost.requested is None:
                # a rule that reads the spent cost only; never an answer of
                # nothing spent (a refused query, its actual 0) standing for the price
                cost = report.actual_cost if report.actual_cost else None
            if cost is not None and cost >= 0:
                self.facts.put_fact(COST_FACT + match.cost_key, cost, 0.0)

    def tier_of(self, account: str) -> str | None:
        """The plan learned for ``account``, if any."""
        known = self.facts.fact(TIER_FACT + account)
        if known is None:
            return None
        rule = self._by_id.get(account.split("|", 1)[0])
        index = int(known[0])
        if rule is None or not 0 <= index < len(rule.tier_names):
            return None
        return rule.tier_names[index]


@functools.cache
def _builtin_rules() -> tuple[Rule, ...]:
    """The built-in rules, parsed once (rules are immutable)."""
    rules = []
    for rule_id in BUILTIN_IDS:
        name, text = RuleSet.builtin_rule_data(rule_id)
        try:
            data = parse_toml(text, name)
        except TomlFileError as e:  # a packaging bug, not the user's
            raise RuleError(str(e)) from None
        rules.append(parse_rule(data, f"builtin:{name}"))
    return tuple(rules)


def _all_null(doc: Any, path: tuple[str, ...]) -> bool:
    """Whether ``path`` is in ``doc`` and null wherever it is."""
    values = json_values(doc, path)
    return bool(values) and all(v is None for v in values)


def _first_number(doc: Any, path: tuple[str, ...]) -> float | None:
    for value in json_values(doc, path):
        if _is_number(value):
            return float(value)
    return None
