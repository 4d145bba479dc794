"""What the GraphQL mocks share: schema, parsed documents, field plans, a small executor.

A request's query text is parsed and validated against the mock's schema once
(``prepare``, cached by text).  For one operation and one set of variables the
fields are then collected the way GraphQL execution collects them (fragments
spread, ``@skip``/``@include`` applied, fields of the same response key merged)
into a tree of ``PField`` (``plan``, cached by text, operation and variables).
The mocks price that tree (``shopify_graphql``, ``github_graphql``) and the
executor here builds the ``data`` of the answer from plain Python objects:

* an object is a ``dict`` holding ``__typename`` and its fields' values;
* a value may be a callable ``f(args, ctx)`` (fields with arguments, lookups);
* a connection field's value is the full ordered list of its items: ``page``
  applies ``reverse``, ``after``/``before`` and ``first``/``last`` (Relay's
  algorithm), and ``edges { cursor node }``, ``nodes`` and ``pageInfo`` are made
  from the page.  A connection is a field returning an object type named
  ``...Connection`` that takes ``first`` or ``last``.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLField,
    GraphQLNamedType,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    NameNode,
    OperationDefinitionNode,
    SchemaMetaFieldDef,
    SelectionSetNode,
    TypeMetaFieldDef,
    TypeNameMetaFieldDef,
    build_schema,
    execute_sync,
    get_named_type,
    get_nullable_type,
    is_abstract_type,
    is_leaf_type,
    is_list_type,
    is_object_type,
    parse,
    validate,
)
from graphql.execution.values import get_argument_values, get_variable_values

HERE = Path(__file__).resolve().parent
LEAF, OBJECT, ABSTRACT = 0, 1, 2
CACHE_SIZE = 2048

_schemas: dict[str, GraphQLSchema] = {}
_schemas_lock = threading.Lock()


def load_schema(name: str) -> GraphQLSchema:
    """The schema of ``tests/mockapis/<name>`` (SDL), built once per process."""
    with _schemas_lock:
        schema = _schemas.get(name)
        if schema is None:
            schema = build_schema((HERE / name).read_text())
            _schemas[name] = schema
        return schema


class GraphQLFailure(Exception):
    """A request that does not run: ``errors`` are the answer's ``errors``."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["message"] if errors else "error")
        self.errors = errors


class FieldError(Exception):
    """A field that fails while the answer is built: null, and an entry in ``errors``."""


_UNDEFINED_FIELD = re.compile(r"^Cannot query field '([^']+)' on type '([^']+)'\.")


def format_error(err: GraphQLError) -> dict[str, Any]:
    """A graphql-core error in the shape Shopify's and GitHub's servers give (graphql-ruby)."""
    out = dict(err.formatted)
    m = _UNDEFINED_FIELD.match(err.message)
    if m:
        field, type_name = m.groups()
        out["message"] = f"Field '{field}' doesn't exist on type '{type_name}'"
        out["extensions"] = {"code": "undefinedField", "typeName": type_name, "fieldName": field}
    return out


def error_at(message: str, nodes: list[FieldNode], path: list[Any]) -> dict[str, Any]:
    locations = []
    for n in nodes[:1]:
        if n.loc is not None:
            loc = n.loc.source.get_location(n.loc.start)
            locations.append({"line": loc.line, "column": loc.column})
    return {"message": message, "locations": locations, "path": list(path)}


# -- documents ---------------------------------------------------------------------------------


class Prepared:
    """A parsed and validated document: its operations and fragments, or its errors."""

    __slots__ = ("document", "errors", "operations", "fragments")

    def __init__(self, schema: GraphQLSchema, text: str) -> None:
        self.document: DocumentNode | None = None
        self.errors: list[dict[str, Any]] = []
        self.operations: dict[str | None, OperationDefinitionNode] = {}
        self.fragments: dict[str, FragmentDefinitionNode] = {}
        try:
            doc = parse(text)
        except GraphQLError as e:
            self.errors = [format_error(e)]
            return
        errors = validate(schema, doc)
        if errors:
            self.errors = [format_error(e) for e in errors]
            return
        self.document = doc
        for d in doc.definitions:
            if isinstance(d, OperationDefinitionNode):
                self.operations[d.name.value if d.name else None] = d
            elif isinstance(d, FragmentDefinitionNode):
                self.fragments[d.name.value] = d


class _Cache:
    """A bounded map shared by the server's threads (emptied when full: the mocks see few
    distinct documents)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self.data: dict[Any, Any] = {}
        self.lock = threading.Lock()

    def get_or_make(self, key: Any, make: Callable[[], Any]) -> Any:
        got = self.data.get(key)
        if got is None:
            got = make()
            with self.lock:
                if len(self.data) >= self.size:
                    self.data.clear()
                self.data[key] = got
        return got


_documents = _Cache()
_plans = _Cache()


def prepare(schema: GraphQLSchema, text: str) -> Prepared:
    prepared: Prepared = _documents.get_or_make((id(schema), text), lambda: Prepared(schema, text))
    return prepared


# -- plans -------------------------------------------------------------------------------------


class Plan:
    """One operation of a document with its variables: the root fields, collected."""

    __slots__ = (
        "schema",
        "fragments",
        "variables",
        "variable_values",
        "operation",
        "definition",
        "root",
        "fields",
        "memo",
    )

    def __init__(
        self,
        schema: GraphQLSchema,
        prepared: Prepared,
        operation: OperationDefinitionNode,
        variables: Any,
    ) -> None:
        self.schema = schema
        self.fragments = prepared.fragments
        # graphql-core 3.2 coerces variables to a dict; 3.3 to a VariableValues
        # tuple holding that dict as ``coerced``, which get_argument_values wants
        self.variable_values = variables
        self.variables: dict[str, Any] = getattr(variables, "coerced", variables)
        self.operation: str = operation.operation.value  # "query" | "mutation" | "subscription"
        self.definition = operation
        root = {
            "query": schema.query_type,
            "mutation": schema.mutation_type,
            "subscription": schema.subscription_type,
        }[self.operation]
        assert root is not None  # validation checked the schema has it
        self.root: GraphQLObjectType = root
        self.memo: dict[str, Any] = {}  # what a mock computes once per plan (its costs)
        self.fields = self.collect(root, [operation.selection_set], [])

    def collect(
        self, t: GraphQLObjectType, selection_sets: list[SelectionSetNode], path: list[Any]
    ) -> list[PField]:
        grouped: dict[str, list[FieldNode]] = {}
        visited: set[str] = set()
        for s in selection_sets:
            self._collect(t, s, grouped, visited)
        return [PField(self, t, key, nodes, path) for key, nodes in grouped.items()]

    def _collect(
        self,
        t: GraphQLObjectType,
        selection_set: SelectionSetNode,
        out: dict[str, list[FieldNode]],
        visited: set[str],
    ) -> None:
        for sel in selection_set.selections:
            if not self._included(sel):
                continue
            if isinstance(sel, FieldNode):
                key = sel.alias.value if sel.alias else sel.name.value
                out.setdefault(key, []).append(sel)
            elif isinstance(sel, InlineFragmentNode):
                cond = sel.type_condition.name.value if sel.type_condition else None
                if self._applies(cond, t):
                    self._collect(t, sel.selection_set, out, visited)
            elif isinstance(sel, FragmentSpreadNode):
                name = sel.name.value
                if name in visited:
                    continue
                visited.add(name)
                frag = self.fragments.get(name)
                if frag is not None and self._applies(frag.type_condition.name.value, t):
                    self._collect(t, frag.selection_set, out, visited)

    def _applies(self, cond: str | None, t: GraphQLObjectType) -> bool:
        if cond is None or cond == t.name:
            return True
        ct = self.schema.get_type(cond)
        return ct is not None and is_abstract_type(ct) and self.schema.is_sub_type(ct, t)  # type: ignore[arg-type]

    def _included(self, sel: Any) -> bool:
        for d in sel.directives or ():
            name = d.name.value
            if name not in ("skip", "include"):
                continue
            arg = next((a for a in d.arguments if a.name.value == "if"), None)
            if arg is None:
                continue
            v = arg.value
            value = (
                self.variables.get(v.name.value)
                if v.kind == "variable"
                else getattr(v, "value", False)
            )
            if (name == "skip") == bool(value):
                return False
        return True


class PField:
    """One field of a plan: its response key, definition, coerced arguments, sub-fields."""

    __slots__ = (
        "plan",
        "parent",
        "key",
        "name",
        "nodes",
        "fdef",
        "named",
        "kind",
        "is_list",
        "args",
        "path",
        "conn",
        "meta",
        "_subs",
        "_node",
    )

    def __init__(
        self,
        plan: Plan,
        parent: GraphQLObjectType,
        key: str,
        nodes: list[FieldNode],
        path: list[Any],
    ) -> None:
        self.plan = plan
        self.parent = parent
        self.key = key
        self.nodes = nodes
        self.name = nodes[0].name.value
        self.path = [*path, key]
        meta = {
            "__typename": TypeNameMetaFieldDef,
            "__schema": SchemaMetaFieldDef,
            "__type": TypeMetaFieldDef,
        }
        fdef: GraphQLField = meta.get(self.name) or parent.fields[self.name]
        self.fdef = fdef
        named: GraphQLNamedType = get_named_type(fdef.type)
        self.named = named
        self.kind = LEAF if is_leaf_type(named) else ABSTRACT if is_abstract_type(named) else OBJECT
        # introspection (__schema, __type): answered by graphql-core, priced as a leaf (0)
        self.meta = self.name in ("__schema", "__type")
        if self.meta:
            self.kind = LEAF
        self.is_list = is_list_type(get_nullable_type(fdef.type))  # type: ignore[arg-type]
        try:
            self.args: dict[str, Any] = get_argument_values(fdef, nodes[0], plan.variable_values)
        except GraphQLError as e:
            raise GraphQLFailure([format_error(e)]) from None
        self.conn = (
            self.kind == OBJECT
            and named.name.endswith("Connection")
            and ("first" in fdef.args or "last" in fdef.args)
        )
        self._subs: dict[str, list[PField]] = {}
        self._node: PField | None = None

    def possible(self) -> list[GraphQLObjectType]:
        """The object types this field's value can be."""
        if self.kind == OBJECT:
            return [self.named]  # type: ignore[list-item]
        if self.kind == ABSTRACT:
            return list(self.plan.schema.get_possible_types(self.named))  # type: ignore[arg-type]
        return []

    def runtime_type(self, obj: dict[str, Any]) -> GraphQLObjectType:
        if self.kind == OBJECT:
            return self.named  # type: ignore[return-value]
        t = self.plan.schema.get_type(obj["__typename"])
        assert is_object_type(t), obj.get("__typename")
        return t  # type: ignore[return-value]

    def sub(self, t: GraphQLObjectType) -> list[PField]:
        """The fields selected on this field's value when it is a ``t``."""
        got = self._subs.get(t.name)
        if got is None:
            sets = [n.selection_set for n in self.nodes if n.selection_set is not None]
            got = self.plan.collect(t, sets, self.path)
            self._subs[t.name] = got
        return got

    @property
    def node(self) -> PField:
        """For a connection: one item, with what ``edges { node }`` and ``nodes`` select."""
        if self._node is None:
            conn_t: GraphQLObjectType = self.named  # type: ignore[assignment]
            items: list[FieldNode] = []
            for f in self.sub(conn_t):
                if f.name == "nodes":
                    items.extend(f.nodes)
                elif f.name == "edges":
                    items.extend(
                        n
                        for e in f.sub(f.named)
                        for n in e.nodes
                        if e.name == "node"  # type: ignore[arg-type]
                    )
            if "nodes" in conn_t.fields:
                fdef_name = "nodes"
            else:
                fdef_name = "edges"  # pragma: no cover - every connection here has nodes
            synthetic = FieldNode(
                name=NameNode(value=fdef_name),
                selection_set=SelectionSetNode(
                    selections=tuple(
                        s for n in items if n.selection_set for s in n.selection_set.selections
                    )
                ),
                arguments=(),
                directives=(),
                loc=self.nodes[0].loc,
            )
            self._node = PField(self.plan, conn_t, fdef_name, [synthetic], [*self.path, "edges"])
            self._node.path = [*self.path, "edges", "node"]
        return self._node

    def size(self) -> int:
        """A connection's page size as requested: the larger of ``first`` and ``last``."""
        sizes = [v for v in (self.args.get("first"), self.args.get("last")) if v is not None]
        return max(sizes) if sizes else 0


def plan(
    schema: GraphQLSchema,
    text: str,
    operation_name: str | None = None,
    variables: dict[str, Any] | None = None,
) -> Plan:
    """The plan of one request; raises ``GraphQLFailure`` when it cannot run."""
    key = (
        id(schema),
        text,
        operation_name,
        json.dumps(variables, sort_keys=True) if variables else "",
    )

    def make() -> Plan | GraphQLFailure:
        prepared = prepare(schema, text)
        if prepared.errors:
            return GraphQLFailure(prepared.errors)
        ops = prepared.operations
        if operation_name is None:
            if len(ops) != 1:
                return GraphQLFailure([{"message": "An operation name is required"}])
            op = next(iter(ops.values()))
        else:
            found = ops.get(operation_name)
            if found is None:
                return GraphQLFailure([{"message": f'No operation named "{operation_name}"'}])
            op = found
        if op.operation.value == "subscription":
            return GraphQLFailure([{"message": "Subscriptions are not supported"}])
        coerced = get_variable_values(schema, op.variable_definitions or (), variables or {})
        if isinstance(coerced, list):
            return GraphQLFailure([format_error(e) for e in coerced])
        try:
            return Plan(schema, prepared, op, coerced)
        except GraphQLFailure as e:
            return e

    got = _plans.get_or_make(key, make)
    if isinstance(got, GraphQLFailure):
        raise got
    return got  # type: ignore[no-any-return]


def connections(fields: list[PField]) -> Iterator[PField]:
    """Every connection in ``fields`` and below, for every type a field's value can be."""
    for f in fields:
        if f.kind == LEAF:
            continue
        if f.conn:
            yield f
            for t in f.node.possible():
                yield from connections(f.node.sub(t))
            continue
        for t in f.possible():
            yield from connections(f.sub(t))


# -- requests ----------------------------------------------------------------------------------


def read_body(body: bytes, content_type: str) -> tuple[str, dict[str, Any] | None, str | None]:
    """(query, variables, operationName) of a POST body: JSON, or ``application/graphql``."""
    if content_type.split(";")[0].strip().lower() == "application/graphql":
        return body.decode("utf-8", "replace"), None, None
    try:
        obj = json.loads(body)
    except ValueError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("query"), str):
        raise ValueError("no query")
    variables = obj.get("variables")
    if isinstance(variables, str) and variables.strip():  # some clients send them encoded
        try:
            variables = json.loads(variables)
        except ValueError:
            raise ValueError("variables are not JSON") from None
    if variables is not None and not isinstance(variables, dict):
        variables = None
    name = obj.get("operationName")
    return obj["query"], variables or None, name if isinstance(name, str) and name else None


# -- execution ---------------------------------------------------------------------------------


class Items(list):  # type: ignore[type-arg]
    """A connection's items with more fields of the connection itself (``totalCount``...)."""

    def __init__(self, items: list[dict[str, Any]], **extra: Any) -> None:
        super().__init__(items)
        self.extra = extra


def cursor_of(item: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps({"last_id": item["id"]}).encode()).decode()


def _index_of(items: list[dict[str, Any]], cursor: str) -> int:
    try:
        wanted = json.loads(base64.b64decode(cursor.encode(), validate=True))["last_id"]
    except (ValueError, TypeError, KeyError):
        raise FieldError(f"Invalid cursor: {cursor!r}") from None
    for i, it in enumerate(items):
        if it["id"] == wanted:
            return i
    raise FieldError(f"Invalid cursor: {cursor!r}")


def page(
    items: list[dict[str, Any]], args: dict[str, Any]
) -> tuple[list[dict[str, Any]], bool, bool]:
    """(the page, hasNextPage, hasPreviousPage) of a connection's items under its arguments."""
    if args.get("reverse"):
        items = items[::-1]
    start, end = 0, len(items)
    if args.get("after") is not None:
        start = _index_of(items, args["after"]) + 1
    if args.get("before") is not None:
        end = min(end, _index_of(items, args["before"]))
    start = min(start, end)
    first, last = args.get("first"), args.get("last")
    lo, hi = start, end
    if first is not None:
        hi = min(hi, lo + max(0, first))
    if last is not None:
        lo = max(lo, hi - max(0, last))
    return items[lo:hi], hi < len(items), lo > 0


def _introspect(f: PField) -> Any:
    p = f.plan
    op = OperationDefinitionNode(
        operation=p.definition.operation,
        variable_definitions=p.definition.variable_definitions,
        directives=(),
        selection_set=SelectionSetNode(selections=tuple(f.nodes)),
    )
    doc = DocumentNode(definitions=(op, *p.fragments.values()))
    result = execute_sync(p.schema, doc, variable_values=p.variables)
    if result.errors:
        raise FieldError(result.errors[0].message)
    return (result.data or {}).get(f.key)


def resolve(obj: dict[str, Any], f: PField, ctx: Any) -> Any:
    if f.name == "__typename":
        return f.parent.name
    if f.meta:
        return _introspect(f)
    v = obj.get(f.name)
    if callable(v):
        v = v(f.args, ctx)
    return v


def connection_object(f: PField, items: list[dict[str, Any]]) -> dict[str, Any]:
    """A connection's value as the executor sees it: edges, nodes and pageInfo of one page."""
    got, has_next, has_prev = page(items, f.args)
    conn_t: GraphQLObjectType = f.named  # type: ignore[assignment]
    edge_t = get_named_type(conn_t.fields["edges"].type).name
    edges = [
        {"__typename": edge_t, "id": it["id"], "cursor": cursor_of(it), "node": it} for it in got
    ]
    conn = {
        "__typename": conn_t.name,
        "edges": edges,
        "nodes": got,
        "pageInfo": {
            "__typename": "PageInfo",
            "hasNextPage": has_next,
            "hasPreviousPage": has_prev,
            "startCursor": edges[0]["cursor"] if edges else None,
            "endCursor": edges[-1]["cursor"] if edges else None,
        },
        "totalCount": len(items),
    }
    if isinstance(items, Items):
        conn.update(items.extra)
    return conn


class Executor:
    """Builds ``data`` for a plan; ``errors`` collects the fields that failed."""

    def __init__(self, ctx: Any = None) -> None:
        self.ctx = ctx
        self.errors: list[dict[str, Any]] = []

    def fields(self, fields: list[PField], obj: dict[str, Any], path: list[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields:
            here = [*path, f.key]
            try:
                v = resolve(obj, f, self.ctx)
                out[f.key] = self.value(f, v, here)
            except FieldError as e:
                self.errors.append(error_at(str(e), f.nodes, here))
                out[f.key] = None
        return out

    def value(self, f: PField, v: Any, path: list[Any]) -> Any:
        if v is None or f.kind == LEAF:
            return v
        if f.conn:
            return self.object(f, connection_object(f, v), path)
        if f.is_list:
            return [None if x is None else self.object(f, x, [*path, i]) for i, x in enumerate(v)]
        return self.object(f, v, path)

    def object(self, f: PField, obj: dict[str, Any], path: list[Any]) -> dict[str, Any]:
        return self.fields(f.sub(f.runtime_type(obj)), obj, path)
