"""What a GraphQL request will cost, read from its text before it leaves.

Shopify and GitHub both price a query statically, before running it, from
the query alone (Shopify charges the price up front and refunds what was not
used; GitHub charges it). elbasy does not ship their schemas, so
:func:`estimate` prices the text with the rules the vendors document, and
where the text alone cannot tell (is this field a connection? how big is a
page when ``first`` is missing?) it errs upward: a reservation too large is
refunded, one too small is a THROTTLED answer for the client.

``shopify`` (https://shopify.dev/docs/api/usage/limits)
    A scalar or enum field (in the text: a field without a selection set)
    costs 0, an object field 1 plus its selection, a connection (a field with
    ``first``/``last``, or one selecting ``edges``/``nodes``/``pageInfo``) 2
    plus ``n`` times one item: the node object (1) plus its selection,
    reached through ``edges { node }`` or ``nodes`` (both are counted when
    both are asked for; ``pageInfo`` and ``cursor`` add nothing). ``n`` is
    ``first`` or ``last``, a literal or a variable; missing or not an
    integer, it is 250, Shopify's largest page. A field with ``first`` that
    selects its items' fields directly is a list of ``n`` such objects: 2
    plus ``n`` times (1 plus the selection). Each root field of a mutation
    costs 10 plus its selection.
``github`` (https://docs.github.com/graphql/overview/rate-limits-and-query-limits-for-the-graphql-api)
    The requests needed to fulfil each connection are added up (a connection
    under a parent connection of ``first: m`` needs ``m`` requests, under two
    parents ``m1 * m2``, at the top 1), divided by 100 and rounded to the
    nearest whole number, at least 1. A missing or unknown page size is 100,
    GitHub's largest.

For both: selections under fragments with different type conditions are
alternatives (an interface or a union): the fields common to every type
count, plus the dearest alternative. Named fragments are expanded (each once
per place it is used; a cycle is cut). Aliased fields count separately,
root fields add up, and ``@skip``/``@include`` are honoured when their
condition is a literal or a supplied variable. The operation is the one
``operationName`` names; without one in a document of several, the dearest.

A repeated query costs a JSON decode, a digest of its text and two dict
lookups: query texts are kept (at most :data:`MAX_SHAPES`, with their shape
and sizing variables, not their syntax trees), and each one's estimates per
values of the variables that size it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from graphql.error import GraphQLError
from graphql.language import (
    BooleanValueNode,
    DirectiveNode,
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    TokenKind,
    ValueNode,
    VariableNode,
    parse,
)
from graphql.utilities import value_from_ast_untyped

__all__ = [
    "CALCULATORS",
    "MAX_SHAPES",
    "Estimate",
    "clear_cache",
    "estimate",
]

#: The documented cost models :func:`estimate` knows.
CALCULATORS: Final = ("shopify", "github")
#: Query texts kept (least recently used dropped first).
MAX_SHAPES = 4096
#: Estimates kept per query text, one per set of sizing variable values.
_MAX_PER_TEXT = 64
#: Tokens graphql-core reads before giving up on a body (a body is at most
#: the rule's ``body_bytes``; this only bounds the work on a hostile one).
_MAX_TOKENS = 50_000


@dataclass(frozen=True, slots=True)
class Estimate:
    """The requested cost of one GraphQL request, and what it is keyed by.

    ``shape`` names the query: the same for the same document (whatever its
    whitespace, commas and comments), operation and values of the variables
    that size connections or skip fields; a server's reported cost for one
    request holds for every request of its shape. ``cost`` is None when no
    calculator was asked for.
    """

    cost: float | None
    shape: str
    is_mutation: bool


@dataclass(frozen=True, slots=True)
class _Model:
    """A calculator's weights: object field, connection, page size when unknown."""

    object: float
    connection: float
    mutation_root: float
    default_page: float


_MODELS: Final = {
    # https://shopify.dev/docs/api/usage/limits: object 1, connection 2 + items,
    # mutation 10; 250 is the largest page a connection returns
    "shopify": _Model(object=1.0, connection=2.0, mutation_root=10.0, default_page=250.0),
    # https://docs.github.com/graphql/overview/rate-limits-and-query-limits-for-the-graphql-api:
    # one request per connection and parent item; first/last "must be within 1-100"
    "github": _Model(object=0.0, connection=1.0, mutation_root=0.0, default_page=100.0),
}

_CONNECTION = "connection"  # the selection of a connection
_EDGES = "edges"  # the selection of a connection's edges
_MUTATION = "mutation"  # the root selection of a mutation
_OBJECT = "object"  # any other selection
_LISTING: Final = frozenset({"edges", "nodes", "pageInfo"})


@dataclass(slots=True)
class _Text:
    """What is kept of one query text: its shape and which variables size it.

    Not its syntax tree (a tree per text would make 4,096 texts hundreds of
    MiB): a text seen again with new values of its sizing variables is
    parsed again, once per set of values.
    """

    digest: bytes  # of the document's tokens and the operation name
    is_mutation: bool
    key_variables: tuple[str, ...]  # the variables that size or skip something
    defaults: Mapping[str, Any]
    estimates: dict[tuple[str | None, str], Estimate] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Document:
    """The operation(s) a request runs and the fragments they may spread."""

    operations: tuple[OperationDefinitionNode, ...]
    fragments: Mapping[str, FragmentDefinitionNode]


_NOT_PARSED: Final = object()
_texts: OrderedDict[bytes, _Text | object] = OrderedDict()


def clear_cache() -> None:
    """Forget every query text seen (tests and benchmarks)."""
    _texts.clear()


def estimate(body: bytes, calculator: str | None) -> Estimate | None:
    """The requested cost of a GraphQL request body (JSON: ``query``,
    ``variables``, ``operationName``) under ``calculator`` (one of
    :data:`CALCULATORS`, or None for the shape alone).

    None when the body is not a GraphQL request or its query does not parse
    (or names an operation it does not hold): the server refuses those
    without running them, and the caller falls back to its default.
    """
    if calculator is not None and calculator not in _MODELS:
        raise ValueError(f"unknown GraphQL cost calculator {calculator!r}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    query = payload.get("query")
    if not isinstance(query, str) or not query.strip():
        return None
    name = payload.get("operationName")
    name = name if isinstance(name, str) and name else None
    variables = payload.get("variables")
    if not isinstance(variables, dict):
        variables = {}
    text_key = hashlib.blake2b(_utf8(name or "") + b"\0" + _utf8(query), digest_size=16).digest()
    document: _Document | None = None
    text = _texts.get(text_key)
    if text is None:
        first = _first_sight(query, name)
        if first is None:
            text = _NOT_PARSED
        else:
            text, document = first
        _texts[text_key] = text
        while len(_texts) > MAX_SHAPES:
            _texts.popitem(last=False)
    else:
        _texts.move_to_end(text_key)
    if not isinstance(text, _Text):
        return None
    values = {
        v: variables[v] if v in variables else text.defaults.get(v) for v in text.key_variables
    }
    values_key = json.dumps([values[v] for v in text.key_variables], default=str)
    found = text.estimates.get((calculator, values_key))
    if found is not None:
        return found
    cost = None
    if calculator is not None:
        if document is None:
            document = _document(query, name, keep_tokens=False)[0]
        if document is None:
            return None
        try:
            cost = _Pricer(_MODELS[calculator], document, values).total()
        except RecursionError:  # nested deeper than Python recurses: price it as unknown
            return None
        if calculator == "github":
            cost = max(1.0, float(math.floor(cost / 100.0 + 0.5)))
    shape = hashlib.blake2b(text.digest + values_key.encode(), digest_size=8).hexdigest()
    found = Estimate(cost=cost, shape=shape, is_mutation=text.is_mutation)
    if len(text.estimates) >= _MAX_PER_TEXT:
        text.estimates.clear()
    text.estimates[(calculator, values_key)] = found
    return found


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- parsing


def _document(
    query: str, name: str | None, *, keep_tokens: bool
) -> tuple[_Document | None, DocumentNode | None]:
    """The parsed document's operation(s) to run and its fragments, or (None, None)."""
    try:
        doc = parse(query, no_location=not keep_tokens, max_tokens=_MAX_TOKENS)
    except (GraphQLError, RecursionError):
        return None, None
    operations = [d for d in doc.definitions if isinstance(d, OperationDefinitionNode)]
    if name is not None:
        operations = [o for o in operations if o.name is not None and o.name.value == name]
    if not operations:
        return None, None
    fragments = {d.name.value: d for d in doc.definitions if isinstance(d, FragmentDefinitionNode)}
    return _Document(tuple(operations), fragments), doc


def _first_sight(query: str, name: str | None) -> tuple[_Text, _Document] | None:
    """A text not seen before: its shape, its sizing variables, its operations."""
    document, doc = _document(query, name, keep_tokens=True)
    if document is None or doc is None:
        return None
    defaults: dict[str, Any] = {}
    for op in document.operations:
        for definition in op.variable_definitions or ():
            var = definition.variable.name.value
            if definition.default_value is not None and var not in defaults:
                defaults[var] = value_from_ast_untyped(definition.default_value)
    try:
        keyed = sorted(_key_variables(doc))
    except RecursionError:
        return None
    # the shape is the document's tokens, so whitespace, commas and comments
    # do not count; read off the parser's own token list, not lexed again
    digest = hashlib.blake2b(digest_size=16)
    token = doc.loc.start_token if doc.loc is not None else None
    while token is not None:
        if token.kind is not TokenKind.COMMENT:
            value = token.value
            if value is None:
                digest.update(_utf8(token.kind.value) + b"\0")
            else:
                digest.update(b"%s%d:%s" % (_utf8(token.kind.value), len(value), _utf8(value)))
        token = token.next
    digest.update(b"\1" + _utf8(name or ""))
    text = _Text(
        digest=digest.digest(),
        is_mutation=any(o.operation == OperationType.MUTATION for o in document.operations),
        key_variables=tuple(keyed),
        defaults=defaults,
    )
    return text, document


def _key_variables(doc: DocumentNode) -> set[str]:
    """Variables used as ``first``/``last`` or as a ``@skip``/``@include`` condition."""
    found: set[str] = set()
    stack: list[SelectionSetNode] = [
        d.selection_set
        for d in doc.definitions
        if isinstance(d, OperationDefinitionNode | FragmentDefinitionNode)
    ]
    while stack:
        for sel in stack.pop().selections:
            for directive in sel.directives or ():
                if directive.name.value in ("skip", "include"):
                    found.update(_variables_of(directive.arguments, ("if",)))
            if isinstance(sel, FieldNode):
                found.update(_variables_of(sel.arguments, ("first", "last")))
            if isinstance(sel, FieldNode | InlineFragmentNode) and sel.selection_set:
                stack.append(sel.selection_set)
    return found


def _variables_of(arguments: Any, names: tuple[str, ...]) -> list[str]:
    return [
        a.value.name.value
        for a in arguments or ()
        if a.name.value in names and isinstance(a.value, VariableNode)
    ]


# --------------------------------------------------------------------------- pricing


class _Pricer:
    """One walk of an operation under one model and one set of variable values.

    Every value is the cost of one occurrence of a selection; a connection
    multiplies its items' costs by its page size. What a fragment costs (and
    whether it lists a connection's items) is remembered per name and mode,
    so fragments that spread each other many times cost linear work, not
    exponential.
    """

    __slots__ = ("model", "parsed", "values", "memo", "active", "listing")

    def __init__(self, model: _Model, parsed: _Document, values: Mapping[str, Any]) -> None:
        self.model = model
        self.parsed = parsed
        self.values = values
        self.memo: dict[tuple[str, str], float] = {}
        self.active: set[str] = set()
        self.listing: dict[str, bool] = {}  # fragment name -> whether it selects edges/nodes

    def total(self) -> float:
        return max(self._operation(op) for op in self.parsed.operations)

    def _operation(self, op: OperationDefinitionNode) -> float:
        mode = _MUTATION if op.operation == OperationType.MUTATION else _OBJECT
        return self._selection(op.selection_set, mode)

    def _included(self, directives: Any) -> bool:
        for directive in directives or ():
            which = directive.name.value
            if which not in ("skip", "include"):
                continue
            condition = self._condition(directive)
            if condition is None:
                continue  # unknown: keep the field (errs upward)
            if condition == (which == "skip"):
                return False
        return True

    def _condition(self, directive: DirectiveNode) -> bool | None:
        for argument in directive.arguments or ():
            if argument.name.value != "if":
                continue
            value = argument.value
            if isinstance(value, BooleanValueNode):
                return value.value
            if isinstance(value, VariableNode):
                got = self.values.get(value.name.value)
                return got if isinstance(got, bool) else None
        return None

    def _selection(self, selection: SelectionSetNode, mode: str, page: float = 0.0) -> float:
        """Fields every type has, plus the dearest of the type-conditioned alternatives."""
        common = 0.0
        alternatives: dict[str, float] = {}
        for sel in selection.selections:
            if not self._included(sel.directives):
                continue
            if isinstance(sel, FieldNode):
                common += self._field(sel, mode, page)
                continue
            condition: str | None
            if isinstance(sel, InlineFragmentNode):
                condition = sel.type_condition.name.value if sel.type_condition else None
                cost = self._selection(sel.selection_set, mode, page)
            else:
                assert isinstance(sel, FragmentSpreadNode)
                fragment = self.parsed.fragments.get(sel.name.value)
                if fragment is None:
                    continue  # the server refuses an unknown fragment
                condition = fragment.type_condition.name.value
                cost = self._fragment(fragment, mode, page)
            if condition is None:
                common += cost
            else:
                alternatives[condition] = alternatives.get(condition, 0.0) + cost
        return common + max(alternatives.values(), default=0.0)

    def _fragment(self, fragment: FragmentDefinitionNode, mode: str, page: float) -> float:
        name = fragment.name.value
        key = (name, f"{mode}:{page!r}")
        cost = self.memo.get(key)
        if cost is not None:
            return cost
        if name in self.active:
            return 0.0  # a cycle: the server refuses it
        self.active.add(name)
        try:
            cost = self._selection(fragment.selection_set, mode, page)
        finally:
            self.active.discard(name)
        self.memo[key] = cost
        return cost

    def _field(self, node: FieldNode, mode: str, page: float) -> float:
        name = node.name.value
        selection = node.selection_set
        if mode == _MUTATION:
            # each root field of a mutation is dearer than an object
            more = self._selection(selection, _OBJECT) if selection is not None else 0.0
            return self.model.mutation_root + more
        if mode == _CONNECTION:
            if name == "edges":
                return page * self._selection(selection, _EDGES) if selection else 0.0
            if name == "nodes":
                return page * self._item(selection)
            if name == "pageInfo":
                return 0.0
        elif mode == _EDGES:
            if name == "node":
                return self._item(selection)
            if name == "cursor":
                return 0.0
        if selection is None:
            return 0.0  # a scalar or an enum
        size = self._page(node)
        listing = self._lists_items(selection)
        if size is None and not listing:
            return self.model.object + self._selection(selection, _OBJECT)
        if size is None:
            size = self.model.default_page
        if listing:
            return self.model.connection + self._selection(selection, _CONNECTION, size)
        # sized, but no edges, nodes or pageInfo: a list whose every item is
        # the object the selection describes (Shopify's Order.fulfillments)
        return self.model.connection + size * self._item(selection)

    def _item(self, selection: SelectionSetNode | None) -> float:
        """One node of a connection: an object and its selection."""
        if selection is None:
            return 0.0
        return self.model.object + self._selection(selection, _OBJECT)

    def _page(self, node: FieldNode) -> float | None:
        """The page size ``first``/``last`` asks for (the larger if both), else None.

        An argument that is there but unknown (a variable not supplied, not an
        integer) is the model's largest page.
        """
        size: float | None = None
        for argument in node.arguments or ():
            if argument.name.value not in ("first", "last"):
                continue
            n = self._integer(argument.value)
            n = self.model.default_page if n is None else n
            size = n if size is None else max(size, n)
        return size

    def _integer(self, value: ValueNode) -> float | None:
        got: Any
        if isinstance(value, IntValueNode):
            got = int(value.value)
        elif isinstance(value, VariableNode):
            got = self.values.get(value.name.value)
        else:
            return None
        if isinstance(got, bool) or not isinstance(got, int | float):
            return None
        if got != got or got < 0 or got == float("inf") or got != int(got):
            return None
        return float(got)

    def _lists_items(self, selection: SelectionSetNode) -> bool:
        """Whether a selection reads like a connection's: ``edges``, ``nodes`` or
        ``pageInfo`` in it."""
        for sel in selection.selections:
            if isinstance(sel, FieldNode):
                if sel.name.value in _LISTING and sel.selection_set is not None:
                    return True
            elif isinstance(sel, InlineFragmentNode):
                if self._lists_items(sel.selection_set):
                    return True
            elif isinstance(sel, FragmentSpreadNode):
                name = sel.name.value
                fragment = self.parsed.fragments.get(name)
                if fragment is None or name in self.active:
                    continue
                found = self.listing.get(name)
                if found is None:
                    self.active.add(name)
                    try:
                        found = self._lists_items(fragment.selection_set)
                    finally:
                        self.active.discard(name)
                    self.listing[name] = found
                if found:
                    return True
        return False
