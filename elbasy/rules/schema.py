"""The rule schema: a rule as TOML data, checked and compiled into plain values.

One rule describes one API. Its tables (the built-in data files in
``elbasy/rules/data/`` are the worked examples):

``id``, ``provider``, ``description``, ``docs`` (URLs)
    Who it is and where its numbers come from.
``[match]``: ``hosts`` (globs), ``path`` (regex, searched in the path
    without the query), ``exclude_paths``, ``methods``
    Which requests it covers. The first enabled rule that matches wins.
``[[account.parts]]``: ``name``, ``from`` (``host``, ``path``, ``header``,
    ``hint``, ``static``), ``header``, ``pattern`` (group ``v`` or the first
    group), ``hash`` (sha256, first 8 bytes, hex: for tokens), ``value``
    (static), ``default``, ``fallback`` (another part source)
    The quota account's key parts. ``account.strip_headers`` are removed
    before egress (``X-Elbasy-Account``, the caller's hint, always is).
``[[operations]]``: ``id``, ``methods``, ``path``
    Per-operation classification; the first that matches names the operation.
``[tiers]``: ``default``, ``[[tiers.detect]]`` (a reader plus ``map`` from
    the value read to a tier), ``[[tiers.by_part]]`` (``part``, ``value``,
    ``tier``: a tier known from the key, e.g. an anonymous caller)
``[[limits]]``: ``name``, ``kind`` (bucket/window/rolling), ``unit``,
    ``capacity``, ``rate``, ``window``, ``sub_buckets``, ``source``,
    ``scope`` (account parts, and ``operation``, the limit's bucket is keyed
    on; default: every part), ``operations`` / ``except_operations``,
    ``[limits.tiers.NAME]`` (numbers and ``source`` per tier), ``counts``
    (``points``: the request's cost, the default; ``requests``: each request
    counts ``request_cost``, a GraphQL mutation ``mutation_cost``)
``[cost]``: ``kind`` (``constant`` or ``graphql``), ``value``, ``default``
    (a GraphQL body that does not parse), ``estimator`` (``shopify`` or
    ``github``: price an unseen query from its text; without one, unseen
    queries cost ``default``), ``max_single``, ``body_bytes``,
    ``requested``, ``actual`` (JSON paths)
``[[feedback]]``: ``limit`` (a name, or ``*`` for every limit of the
    request) or ``limit_header`` + ``limit_map``; then readers for ``used``,
    ``remaining``, ``capacity``, ``rate``, ``reset_after``
``[throttle]``: ``statuses`` (throttled by status alone), ``markers`` and
    ``marker_statuses`` (throttled when a marker matches, on these statuses;
    empty: any), ``retry_after`` (readers, first wins),
    ``default_retry_after``, ``resource_below_capacity`` (a limit name:
    a throttle while its view shows used < capacity is a resource throttle),
    ``resource_without_marker``, ``retry_methods``

A *reader* is a table: ``header`` or ``json`` (a path like
``extensions.cost.throttleStatus.restoreRate``) or ``compute =
"graphql_wait"``; optional ``pattern`` (regex, first group) and ``unit``
(``s``, ``ms``, ``epoch``; ``s`` also reads an HTTP-date), and ``only_if``
(a marker). A *marker* is ``header`` or ``json`` with ``equals`` (the
whole value) or ``pattern`` (a regex searched in it), or ``body`` (a regex
searched in the body); ``statuses`` limits a marker to those statuses (in
place of the throttle's ``marker_statuses``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from elbasy.limits import Limit
from elbasy.rules.graphql_cost import CALCULATORS
from elbasy.rules.wire import JSONPath, parse_json_path
from elbasy.toml import toml_key, toml_value

__all__ = [
    "HINT_HEADER",
    "Cost",
    "Feedback",
    "LimitSpec",
    "Marker",
    "Operation",
    "Part",
    "Reader",
    "Rule",
    "RuleError",
    "Throttle",
    "TierDetect",
    "check_rules",
    "parse_rule",
    "rule_to_toml",
]

#: The header an internal caller may set to name its quota account where the
#: API's requests carry none; always stripped before egress.
HINT_HEADER = b"x-elbasy-account"

_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_UNITS = ("", "s", "ms", "epoch")
_VIEW_FIELDS = ("used", "remaining", "capacity", "rate", "reset_after")


class RuleError(ValueError):
    """A rule is invalid, or a rule id unknown. The message names file, rule and field."""


class _FieldError(Exception):
    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def _fail(where: str, reason: str) -> NoReturn:
    raise _FieldError(where, reason)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Marker:
    """A sign in a response: a header or JSON value equal to ``equals`` or
    matching ``pattern``, or a body regex; on ``statuses`` only, when given."""

    header: bytes | None = None
    json: JSONPath | None = None
    body: re.Pattern[str] | None = None
    equals: str | None = None
    pattern: re.Pattern[str] | None = None
    statuses: frozenset[int] | None = None


@dataclass(frozen=True, slots=True)
class Reader:
    """Where one number of the server's view is read from."""

    header: bytes | None = None
    json: JSONPath | None = None
    compute: str | None = None  # "graphql_wait"
    pattern: re.Pattern[str] | None = None
    unit: str = ""  # "", "s", "ms", "epoch"
    only_if: Marker | None = None


@dataclass(frozen=True, slots=True)
class Part:
    """One part of the quota account key and where its value comes from."""

    name: str
    source: str  # host, path, header, hint, static
    header: bytes | None = None
    pattern: re.Pattern[str] | None = None
    hash: bool = False
    value: str | None = None
    default: str | None = None
    fallback: Part | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    id: str
    methods: frozenset[str] | None
    path: re.Pattern[str] | None


@dataclass(frozen=True, slots=True)
class TierDetect:
    reader: Reader
    map: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A limit of a rule: its ``Limit`` for each tier, and what it applies to."""

    name: str
    by_tier: Mapping[str, Limit]  # every tier of the rule, "" when the rule has none
    scope: tuple[str, ...]  # part names, maybe "operation"
    operations: frozenset[str] | None  # None: every request
    except_operations: frozenset[str]
    counts: str = "points"  # or "requests"
    request_cost: float = 1.0  # counts = "requests": what one request counts
    mutation_cost: float = 1.0  # ... and one GraphQL mutation

    def applies(self, operation: str | None) -> bool:
        if operation is not None and operation in self.except_operations:
            return False
        return self.operations is None or operation in self.operations


@dataclass(frozen=True, slots=True)
class Cost:
    kind: str = "constant"  # or "graphql"
    value: float = 1.0
    default: float = 50.0  # a GraphQL body that does not parse, or no estimator
    estimator: str | None = None  # "shopify" or "github" (elbasy.rules.graphql_cost)
    max_single: float | None = None
    body_bytes: int = 0
    requested: JSONPath | None = None
    actual: JSONPath | None = None


@dataclass(frozen=True, slots=True)
class Feedback:
    limit: str | None  # a limit name or "*"; None: from limit_header
    limit_header: bytes | None
    limit_map: Mapping[str, str]
    readers: Mapping[str, Reader]  # view field -> reader


@dataclass(frozen=True, slots=True)
class Throttle:
    statuses: frozenset[int] = frozenset({429})
    marker_statuses: frozenset[int] = frozenset()
    markers: tuple[Marker, ...] = ()
    retry_after: tuple[Reader, ...] = ()
    default_retry_after: float | None = None
    resource_below_capacity: str | None = None
    resource_without_marker: bool = False
    retry_methods: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    """One compiled rule. ``data`` is the rule as written (for ``elbasy rules show``)."""

    id: str
    provider: str
    description: str
    docs: tuple[str, ...]
    hosts: tuple[str, ...]
    path: re.Pattern[str] | None
    exclude_paths: tuple[re.Pattern[str], ...]
    methods: frozenset[str] | None
    parts: tuple[Part, ...]
    strip_headers: tuple[bytes, ...]
    operations: tuple[Operation, ...]
    tier_names: tuple[str, ...]
    default_tier: str
    tier_detect: tuple[TierDetect, ...]
    tier_by_part: tuple[tuple[str, str, str], ...]
    limits: tuple[LimitSpec, ...]
    cost: Cost
    feedback: tuple[Feedback, ...]
    throttle: Throttle
    origin: str
    data: Mapping[str, Any] = field(repr=False)

    @property
    def needs_body(self) -> bool:
        """Whether reading a response of this rule looks into the body."""
        readers = [r for f in self.feedback for r in f.readers.values()]
        readers += [d.reader for d in self.tier_detect] + list(self.throttle.retry_after)
        markers = list(self.throttle.markers) + [r.only_if for r in readers if r.only_if]
        return (
            self.cost.kind == "graphql"
            or any(r.json is not None or r.compute is not None for r in readers)
            or any(m.json is not None or m.body is not None for m in markers)
        )


# --------------------------------------------------------------------------- checking


def _table(data: Any, where: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        _fail(where, "must be a table")
    for key in data:
        if key not in allowed:
            _fail(f"{where}.{key}" if where else key, f"unknown key (known: {', '.join(allowed)})")
    return data


def _str(data: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or (not value and default is None):
        _fail(_at(where, key), "must be a non-empty string")
    return value


def _opt_str(data: Mapping[str, Any], key: str, where: str) -> str | None:
    if key not in data:
        return None
    return _str(data, key, where)


def _strs(data: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        _fail(_at(where, key), "must be a list of non-empty strings")
    return tuple(value)


def _number(
    data: Mapping[str, Any], key: str, where: str, *, positive: bool = True
) -> float | None:
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        _fail(_at(where, key), "must be a number > 0" if positive else "must be a number >= 0")
    if (positive and value <= 0) or value < 0 or value == float("inf"):
        _fail(_at(where, key), "must be a number > 0" if positive else "must be a number >= 0")
    return float(value)


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _regex(data: Mapping[str, Any], key: str, where: str) -> re.Pattern[str] | None:
    text = _opt_str(data, key, where)
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as e:
        _fail(_at(where, key), f"not a valid regex: {e}")


def _methods(data: Mapping[str, Any], key: str, where: str) -> frozenset[str] | None:
    if key not in data:
        return None
    names = frozenset(m.upper() for m in _strs(data, key, where))
    unknown = sorted(names - _METHODS)
    if unknown:
        _fail(_at(where, key), f"unknown method {unknown[0]!r}")
    return names


def _header(data: Mapping[str, Any], key: str, where: str) -> bytes | None:
    text = _opt_str(data, key, where)
    if text is None:
        return None
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", text):
        _fail(_at(where, key), f"{text!r} is not a header name")
    return text.lower().encode("ascii")


def _json_path(data: Mapping[str, Any], key: str, where: str) -> JSONPath | None:
    text = _opt_str(data, key, where)
    if text is None:
        return None
    try:
        return parse_json_path(text)
    except ValueError as e:
        _fail(_at(where, key), str(e))


def _marker(data: Any, where: str) -> Marker:
    t = _table(data, where, ("header", "json", "body", "equals", "pattern", "statuses"))
    marker = Marker(
        header=_header(t, "header", where),
        json=_json_path(t, "json", where),
        body=_regex(t, "body", where),
        equals=_opt_str(t, "equals", where) if "equals" in t else None,
        pattern=_regex(t, "pattern", where),
        statuses=_statuses(t, "statuses", where, set()) if "statuses" in t else None,
    )
    sources = [marker.header, marker.json, marker.body]
    if sum(s is not None for s in sources) != 1:
        _fail(where, "needs exactly one of header, json, body")
    tests = (marker.equals is not None) + (marker.pattern is not None)
    if marker.body is None and tests != 1:
        _fail(where, "a header or json marker needs exactly one of equals, pattern")
    if marker.body is not None and tests:
        _fail(where, "a body marker is its regex: no equals or pattern")
    return marker


def _reader(data: Any, where: str) -> Reader:
    t = _table(data, where, ("header", "json", "compute", "pattern", "unit", "only_if"))
    unit = _str(t, "unit", where, "")
    if unit not in _UNITS:
        _fail(_at(where, "unit"), f"must be one of s, ms, epoch; got {unit!r}")
    compute = _opt_str(t, "compute", where)
    if compute not in (None, "graphql_wait"):
        _fail(_at(where, "compute"), "the only computation is 'graphql_wait'")
    reader = Reader(
        header=_header(t, "header", where),
        json=_json_path(t, "json", where),
        compute=compute,
        pattern=_regex(t, "pattern", where),
        unit=unit,
        only_if=_marker(t["only_if"], _at(where, "only_if")) if "only_if" in t else None,
    )
    if sum(s is not None for s in (reader.header, reader.json, reader.compute)) != 1:
        _fail(where, "needs exactly one of header, json, compute")
    if reader.pattern is not None and reader.pattern.groups < 1:
        _fail(_at(where, "pattern"), "needs a group around the number")
    return reader


_SOURCES = ("host", "path", "header", "hint", "static")


def _part(data: Any, where: str, named: bool = True) -> Part:
    keys = ("from", "header", "pattern", "hash", "value", "default", "fallback")
    t = _table(data, where, (("name",) if named else ()) + keys)
    name = _str(t, "name", where) if named else ""
    source = _str(t, "from", where)
    if source not in _SOURCES:
        _fail(_at(where, "from"), f"must be one of {', '.join(_SOURCES)}; got {source!r}")
    pattern = _regex(t, "pattern", where)
    if pattern is not None and pattern.groups < 1:
        _fail(_at(where, "pattern"), "needs a group (?P<v>...) around the value")
    if source in ("host", "path") and pattern is None:
        _fail(_at(where, "pattern"), f"a part from {source} needs a pattern")
    header = _header(t, "header", where)
    if source == "header" and header is None:
        _fail(_at(where, "header"), "a part from header needs a header name")
    if source == "hint":
        header = HINT_HEADER
    value = _opt_str(t, "value", where)
    if source == "static" and value is None:
        _fail(_at(where, "value"), "a static part needs a value")
    hashed = t.get("hash", False)
    if not isinstance(hashed, bool):
        _fail(_at(where, "hash"), "must be true or false")
    fallback = _part(t["fallback"], _at(where, "fallback"), False) if "fallback" in t else None
    return Part(
        name=name,
        source=source,
        header=header,
        pattern=pattern,
        hash=hashed,
        value=value,
        default=_opt_str(t, "default", where),
        fallback=fallback,
    )


def _list(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        _fail(_at(where, key), "must be an array")
    return value


_LIMIT_NUMBERS = ("capacity", "rate", "window", "sub_buckets")


def _limit(
    data: Any, where: str, tiers: Sequence[str], parts: Sequence[str], ops: Sequence[str]
) -> LimitSpec:
    keys = ("name", "kind", "unit", "scope", "operations", "except_operations", "source", "note")
    counting = ("counts", "request_cost", "mutation_cost")
    t = _table(data, where, keys + counting + _LIMIT_NUMBERS + ("tiers",))
    name = _str(t, "name", where)
    kind = _str(t, "kind", where)
    if kind not in ("bucket", "window", "rolling"):
        _fail(_at(where, "kind"), f"must be bucket, window or rolling; got {kind!r}")
    unit = _str(t, "unit", where, "requests")
    scope = _strs(t, "scope", where) if "scope" in t else tuple(parts)
    for s in scope:
        if s not in parts and s != "operation":
            _fail(_at(where, "scope"), f"{s!r} is not an account part or 'operation'")
    operations = frozenset(_strs(t, "operations", where)) if "operations" in t else None
    excepted = frozenset(_strs(t, "except_operations", where))
    for op in sorted((operations or frozenset()) | excepted):
        if op not in ops:
            _fail(_at(where, "operations"), f"unknown operation {op!r}")
    counts = _str(t, "counts", where, "points")
    if counts not in ("points", "requests"):
        _fail(_at(where, "counts"), f"must be points or requests; got {counts!r}")
    if counts == "points":
        for key in ("request_cost", "mutation_cost"):
            if key in t:
                _fail(_at(where, key), 'only a limit with counts = "requests" has one')
    request_cost = _number(t, "request_cost", where, positive=False)
    request_cost = 1.0 if request_cost is None else request_cost
    mutation_cost = _number(t, "mutation_cost", where, positive=False)
    mutation_cost = request_cost if mutation_cost is None else mutation_cost
    base = {k: _number(t, k, where) for k in _LIMIT_NUMBERS if k in t}
    per_tier = _table(t.get("tiers", {}), _at(where, "tiers"), tiers)
    by_tier: dict[str, Limit] = {}
    for tier in tiers or ("",):
        numbers = dict(base)
        tier_where = _at(where, f"tiers.{tier}")
        if tier in per_tier:
            tt = _table(per_tier[tier], tier_where, _LIMIT_NUMBERS + ("source", "note"))
            numbers.update({k: _number(tt, k, tier_where) for k in _LIMIT_NUMBERS if k in tt})
        else:
            tier_where = where
        if numbers.get("capacity") is None:
            _fail(_at(tier_where, "capacity"), "must be a number > 0")
        if kind == "bucket" and numbers.get("rate") is None:
            _fail(_at(tier_where, "rate"), "must be a number > 0 (a bucket needs a rate)")
        if kind != "bucket" and numbers.get("window") is None:
            _fail(_at(tier_where, "window"), "must be a number > 0 (seconds)")
        sub = numbers.get("sub_buckets", 1.0) or 1.0
        if sub != int(sub):
            _fail(_at(tier_where, "sub_buckets"), "must be a whole number")
        try:
            by_tier[tier] = Limit(
                name=name,
                kind=kind,  # type: ignore[arg-type]  # checked above
                capacity=numbers["capacity"] or 0.0,
                rate=numbers.get("rate") or 0.0,
                window=numbers.get("window") or 0.0,
                sub_buckets=int(sub),
                unit=unit,
            )
        except ValueError as e:
            _fail(tier_where, str(e))
    return LimitSpec(
        name=name,
        by_tier=by_tier,
        scope=scope,
        operations=operations,
        except_operations=excepted,
        counts=counts,
        request_cost=request_cost,
        mutation_cost=mutation_cost,
    )


def _feedback(data: Any, where: str, limits: Sequence[str]) -> Feedback:
    t = _table(data, where, ("limit", "limit_header", "limit_map", *_VIEW_FIELDS))
    limit = _opt_str(t, "limit", where)
    limit_header = _header(t, "limit_header", where)
    if (limit is None) == (limit_header is None):
        _fail(where, "needs exactly one of limit, limit_header")
    if limit is not None and limit != "*" and limit not in limits:
        _fail(_at(where, "limit"), f"no limit named {limit!r}")
    raw_map = _table(t.get("limit_map", {}), _at(where, "limit_map"), list(t.get("limit_map", {})))
    limit_map: dict[str, str] = {}
    for key, value in raw_map.items():
        if value not in limits:
            _fail(_at(where, f"limit_map.{key}"), f"no limit named {value!r}")
        limit_map[str(key)] = value
    readers = {k: _reader(t[k], _at(where, k)) for k in _VIEW_FIELDS if k in t}
    if not readers:
        _fail(where, f"needs at least one of {', '.join(_VIEW_FIELDS)}")
    return Feedback(limit=limit, limit_header=limit_header, limit_map=limit_map, readers=readers)


def _statuses(data: Mapping[str, Any], key: str, where: str, default: set[int]) -> frozenset[int]:
    value = data.get(key, sorted(default))
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599 for v in value
    ):
        _fail(_at(where, key), "must be a list of HTTP status codes")
    return frozenset(value)


def _throttle(data: Any, where: str, limits: Sequence[str]) -> Throttle:
    keys = (
        "statuses",
        "marker_statuses",
        "markers",
        "retry_after",
        "default_retry_after",
        "resource_below_capacity",
        "resource_without_marker",
        "retry_methods",
        "source",
        "note",
    )
    t = _table(data, where, keys)
    below = _opt_str(t, "resource_below_capacity", where)
    if below is not None and below not in limits:
        _fail(_at(where, "resource_below_capacity"), f"no limit named {below!r}")
    without = t.get("resource_without_marker", False)
    if not isinstance(without, bool):
        _fail(_at(where, "resource_without_marker"), "must be true or false")
    return Throttle(
        statuses=_statuses(t, "statuses", where, {429}),
        marker_statuses=_statuses(t, "marker_statuses", where, set()),
        markers=tuple(
            _marker(m, _at(where, f"markers[{i}]"))
            for i, m in enumerate(_list(t, "markers", where))
        ),
        retry_after=tuple(
            _reader(r, _at(where, f"retry_after[{i}]"))
            for i, r in enumerate(_list(t, "retry_after", where))
        ),
        default_retry_after=_number(t, "default_retry_after", where),
        resource_below_capacity=below,
        resource_without_marker=without,
        retry_methods=_methods(t, "retry_methods", where) or frozenset(),
    )


def _cost(data: Any, where: str) -> Cost:
    keys = ("kind", "value", "default", "estimator", "max_single", "body_bytes")
    t = _table(data, where, keys + ("requested", "actual", "source", "note"))
    kind = _str(t, "kind", where, "constant")
    if kind not in ("constant", "graphql"):
        _fail(_at(where, "kind"), f"must be constant or graphql; got {kind!r}")
    estimator = _opt_str(t, "estimator", where)
    if estimator is not None and kind != "graphql":
        _fail(_at(where, "estimator"), 'only a cost of kind = "graphql" has one')
    if estimator is not None and estimator not in CALCULATORS:
        _fail(
            _at(where, "estimator"), f"must be one of {', '.join(CALCULATORS)}; got {estimator!r}"
        )
    body_bytes = t.get("body_bytes", 65536 if kind == "graphql" else 0)
    if not isinstance(body_bytes, int) or isinstance(body_bytes, bool) or body_bytes < 0:
        _fail(_at(where, "body_bytes"), "must be an integer >= 0")
    return Cost(
        kind=kind,
        value=_number(t, "value", where, positive=False) or (1.0 if "value" not in t else 0.0),
        default=_number(t, "default", where) or 50.0,
        estimator=estimator,
        max_single=_number(t, "max_single", where),
        body_bytes=body_bytes if kind == "graphql" else 0,
        requested=_json_path(t, "requested", where),
        actual=_json_path(t, "actual", where),
    )


_RULE_KEYS = (
    "id",
    "provider",
    "description",
    "docs",
    "version",
    "match",
    "account",
    "operations",
    "tiers",
    "limits",
    "cost",
    "feedback",
    "throttle",
)


def _compile(data: Mapping[str, Any], origin: str) -> Rule:
    t = _table(data, "", _RULE_KEYS)
    rule_id = t.get("id")
    if not isinstance(rule_id, str) or not _ID.match(rule_id):
        _fail("id", "must be lower-case letters, digits, '.', '_' or '-' (at most 63)")
    m = _table(t.get("match"), "match", ("hosts", "path", "exclude_paths", "methods"))
    hosts = tuple(h.lower().rstrip(".") for h in _strs(m, "hosts", "match"))
    if not hosts:
        _fail("match.hosts", "must list at least one host glob")
    exclude = tuple(
        re.compile(p) if _valid_regex(p, f"match.exclude_paths[{i}]") else re.compile("")
        for i, p in enumerate(_strs(m, "exclude_paths", "match"))
    )
    a = _table(t.get("account", {}), "account", ("parts", "strip_headers"))
    parts = tuple(
        _part(p, f"account.parts[{i}]") for i, p in enumerate(_list(a, "parts", "account"))
    )
    names = [p.name for p in parts]
    if len(set(names)) != len(names) or "operation" in names:
        _fail("account.parts", "part names must be unique and not 'operation'")
    strip = {HINT_HEADER}
    for i, name in enumerate(_strs(a, "strip_headers", "account")):
        header = _header({"h": name}, "h", f"account.strip_headers[{i}]")
        assert header is not None
        strip.add(header)
    operations = []
    for i, o in enumerate(_list(t, "operations", "")):
        where = f"operations[{i}]"
        ot = _table(o, where, ("id", "methods", "path", "source", "note"))
        operations.append(
            Operation(
                _str(ot, "id", where), _methods(ot, "methods", where), _regex(ot, "path", where)
            )
        )
    op_ids = [o.id for o in operations]
    tt = _table(t.get("tiers", {}), "tiers", ("default", "names", "detect", "by_part"))
    tier_names = _strs(tt, "names", "tiers")
    default_tier = _str(tt, "default", "tiers", tier_names[0] if tier_names else "")
    if tier_names and default_tier not in tier_names:
        _fail("tiers.default", f"{default_tier!r} is not one of tiers.names")
    detect = []
    for i, d in enumerate(_list(tt, "detect", "tiers")):
        where = f"tiers.detect[{i}]"
        dt = _table(d, where, ("map", "header", "json", "pattern", "unit", "only_if"))
        mapping = _table(dt.get("map"), _at(where, "map"), list(dt.get("map") or {}))
        for key, tier in mapping.items():
            if tier not in tier_names:
                _fail(_at(where, f"map.{key}"), f"{tier!r} is not one of tiers.names")
        detect.append(
            TierDetect(_reader({k: v for k, v in dt.items() if k != "map"}, where), mapping)
        )
    by_part = []
    for i, b in enumerate(_list(tt, "by_part", "tiers")):
        where = f"tiers.by_part[{i}]"
        bt = _table(b, where, ("part", "value", "tier"))
        part, value, tier = (_str(bt, k, where) for k in ("part", "value", "tier"))
        if part not in names:
            _fail(_at(where, "part"), f"no account part {part!r}")
        if tier not in tier_names:
            _fail(_at(where, "tier"), f"{tier!r} is not one of tiers.names")
        by_part.append((part, value, tier))
    limits = tuple(
        _limit(x, f"limits[{i}]", tier_names, names, op_ids)
        for i, x in enumerate(_list(t, "limits", ""))
    )
    limit_names = [x.name for x in limits]
    if len(set(limit_names)) != len(limit_names):
        _fail("limits", "limit names must be unique within a rule")
    return Rule(
        id=rule_id,
        provider=_str(t, "provider", "", rule_id),
        description=_str(t, "description", "", ""),
        docs=_strs(t, "docs", ""),
        hosts=hosts,
        path=_regex(m, "path", "match"),
        exclude_paths=exclude,
        methods=_methods(m, "methods", "match"),
        parts=parts,
        strip_headers=tuple(sorted(strip)),
        operations=tuple(operations),
        tier_names=tier_names,
        default_tier=default_tier,
        tier_detect=tuple(detect),
        tier_by_part=tuple(by_part),
        limits=limits,
        cost=_cost(t.get("cost", {}), "cost"),
        feedback=tuple(
            _feedback(f, f"feedback[{i}]", limit_names)
            for i, f in enumerate(_list(t, "feedback", ""))
        ),
        throttle=_throttle(t.get("throttle", {}), "throttle", limit_names),
        origin=origin,
        data=data,
    )


def _valid_regex(text: str, where: str) -> bool:
    try:
        re.compile(text)
    except re.error as e:
        _fail(where, f"not a valid regex: {e}")
    return True


def parse_rule(data: Any, origin: str) -> Rule:
    """Check and compile one rule; ``origin`` (a file name) starts every error message.

    Raises :class:`RuleError`, e.g. ``rules.toml: rule 'my-api': limits[0].rate:
    must be a number > 0``.
    """
    rule_id = data.get("id") if isinstance(data, Mapping) else None
    who = f"rule {rule_id!r}" if isinstance(rule_id, str) else "a rule without an id"
    try:
        return _compile(data, origin)
    except _FieldError as e:
        raise RuleError(f"{origin}: {who}: {e.where}: {e.reason}") from None


def check_rules(tables: Iterable[Any], origin: str) -> tuple[Rule, ...]:
    """Check and compile user rules: the one validation of rule tables,
    whatever brings them (a config file's ``[[rule]]`` tables, ``Config(rule=...)``,
    ``elbasy rules check FILE``, a reload, which reads the command line again).

    Raises :class:`RuleError`: one line per bad rule and per id given twice,
    each starting with ``origin``.
    """
    rules: list[Rule] = []
    errors: list[str] = []
    for table in tables:
        try:
            rule = parse_rule(table, origin)
        except RuleError as e:
            errors.append(str(e))
            continue
        if any(r.id == rule.id for r in rules):
            errors.append(f"{origin}: rule {rule.id!r} is given twice")
        rules.append(rule)
    if errors:
        raise RuleError("\n".join(errors))
    return tuple(rules)


# --------------------------------------------------------------------------- TOML out


def rule_to_toml(data: Mapping[str, Any], table: str | None = None) -> str:
    """A rule's data as TOML: top-level keys, or an ``[[table]]`` entry when ``table`` is set."""
    lines = [f"[[{table}]]"] if table else []
    lines += [f"{toml_key(str(k))} = {toml_value(v)}" for k, v in data.items()]
    return "\n".join(lines) + "\n"
