"""Mock GitHub GraphQL API: ``POST /graphql`` on ``api.github.com``, points per hour per token.

Follows https://docs.github.com/graphql/overview/rate-limits-and-query-limits-for-the-graphql-api
(the github/docs text, read 2024-2026).  The schema is ``github_schema.graphql`` (a small
part of GitHub's); queries are parsed and validated with graphql-core and run against
deterministic fake data (``catalog``: the viewer's repositories, their issues, pull
requests, labels and comments, the viewer's followers).

**Key**: the token of ``Authorization: bearer <token>`` (or ``token <token>``).  None:
401 ``{"message": "This endpoint requires you to be authenticated.", ...}``, no limit touched.

**Node limit** (checked before anything is charged; such a query is invalid, costs nothing):
every connection needs ``first`` or ``last`` (``MISSING_PAGINATION_BOUNDARIES``), each
within 1..100 (``EXCESSIVE_PAGINATION``), and the call may request at most 500,000
nodes (``MAX_NODE_LIMIT_EXCEEDED``).  Nodes: each connection's ``first``/``last`` times its
parents' (the docs' examples: 550 and 22,060).

**Primary cost**: the requests needed to fulfil every connection, each assumed to reach
its ``first``/``last`` -- a connection needs one request per parent object, i.e. the
product of its ancestor connections' sizes (1 at the top) -- divided by 100 and rounded
to the nearest integer (halves up), at least 1.  The docs' example: 1 + 100 + 5,000 =
5,101 requests, cost 51.  A mutation is priced the same way (usually 1).  A plain list of
objects multiplies by its length only for ``nodes(ids:)``; an interface or union counts its
most expensive possible type.  ``rateLimit(dryRun: true)`` answers the cost and charges
nothing.

**Primary limit**: ``limit`` points (5,000) per fixed window of ``window_seconds`` (3600)
that starts at the token's first request; ``x-ratelimit-reset`` is that start (floored to
a second) + 3600, and the window is new from the first request at or after it.  A query
whose cost is more than what remains is refused: HTTP 200 with ``{"errors": [{"type":
"RATE_LIMITED", "code": "graphql_rate_limit", "message": "API rate limit exceeded for user ID
<n>."}]}`` ("already exceeded" when nothing remained), nothing charged; the docs say
``x-ratelimit-remaining`` is then 0, and the mock sends 0 (``limited_remaining="actual"``
sends what truly remains, as some clients report seeing).

**Secondary limit**: ``secondary_points`` (2,000) per sliding ``secondary_window`` (60 s);
a request costs 1, or 5 if its operation is a mutation (docs: "GraphQL requests with
mutations").  Every authenticated request that is not itself refused counts, invalid and
RATE_LIMITED ones too (each is a request to the endpoint).  Over it: HTTP 403 (or
``secondary_status``) with ``{"message": "You have exceeded a secondary rate limit...",
"documentation_url": ...}`` and ``retry-after``: the whole seconds until enough points
leave the window.  Checked before the primary limit; refused requests count nowhere.

Every answer to a token carries ``x-ratelimit-limit``, ``-remaining``, ``-used``,
``-reset`` and ``x-ratelimit-resource: graphql``.  Invalid queries (syntax, validation,
variables, pagination) are HTTP 200 with ``errors`` and charge no points.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from graphql import GraphQLSchema

from . import graphql_engine as ge
from .server import Clock, Reply, Request, dumps

SCHEMA_FILE = "github_schema.graphql"
MAX_NODES = 500_000
MAX_PAGE = 100
TRACE_LEN = 4000

DEFAULTS: dict[str, Any] = {
    "limit": 5000,
    "window_seconds": 3600.0,
    "secondary_points": 2000,
    "secondary_window": 60.0,
    "query_points": 1,
    "mutation_points": 5,
    "secondary_status": 403,
    "limited_remaining": "zero",
    "catalog": None,
}

CATALOG_DEFAULTS: dict[str, int] = {
    "repositories": 30,  # the viewer's
    "issues": 20,  # per repository
    "pull_requests": 10,  # per repository
    "labels": 5,  # per repository; each issue carries the first two
    "comments": 3,  # per issue and per pull request
    "followers": 15,  # the viewer's
}

UNAUTHORIZED = dumps(
    {
        "message": "This endpoint requires you to be authenticated.",
        "documentation_url": "https://docs.github.com/graphql/guides/forming-calls-with-graphql"
        "#authenticating-with-graphql",
    }
)
SECONDARY_MESSAGE = (
    "You have exceeded a secondary rate limit. Please wait a few minutes before you try "
    "again. If you reach out to GitHub Support for help, please include the request ID {rid}."
)
SECONDARY_DOCS = (
    "https://docs.github.com/graphql/overview/rate-limits-and-node-limits-for-the-graphql-api"
    "#secondary-rate-limits"
)
_JSON = ("Content-Type", "application/json; charset=utf-8")


def schema() -> GraphQLSchema:
    return ge.load_schema(SCHEMA_FILE)


# -- cost --------------------------------------------------------------------------------------


def _walk(fields: list[ge.PField], mult: int) -> tuple[int, int]:
    requests = nodes = 0
    for f in fields:
        if f.kind == ge.LEAF:
            continue
        if f.conn:
            n = f.size()
            requests += mult
            nodes += mult * n
            r, m = _most(f.node, mult * n)
        else:
            ids = f.args.get("ids")
            r, m = _most(f, mult * (len(ids) if f.is_list and isinstance(ids, list) else 1))
        requests += r
        nodes += m
    return requests, nodes


def _most(f: ge.PField, mult: int) -> tuple[int, int]:
    got = [_walk(f.sub(t), mult) for t in f.possible()]
    return max((r for r, _ in got), default=0), max((n for _, n in got), default=0)


def requests_and_nodes(p: ge.Plan) -> tuple[int, int]:
    """(requests needed to fulfil every connection, nodes requested) of a plan."""
    got = p.memo.get("gh")
    if got is None:
        got = _walk(p.fields, 1)
        p.memo["gh"] = got
    return got  # type: ignore[no-any-return]


def points(requests: int) -> int:
    """GitHub's point value: requests / 100 rounded to the nearest whole number, at least 1."""
    return max(1, math.floor(requests / 100 + 0.5))


def limit_errors(p: ge.Plan) -> list[dict[str, Any]]:
    """The node limit's rules (first/last on every connection, 1..100, 500,000 nodes)."""
    got = p.memo.get("gh_errors")
    if got is not None:
        return got  # type: ignore[no-any-return]
    got = []
    for f in ge.connections(p.fields):
        first, last = f.args.get("first"), f.args.get("last")
        if first is None and last is None:
            e = ge.error_at(
                f"You must provide a `first` or `last` value to properly paginate the "
                f"`{f.name}` connection.",
                f.nodes,
                f.path,
            )
            got.append({"type": "MISSING_PAGINATION_BOUNDARIES", **e})
        for name, v in (("first", first), ("last", last)):
            if v is None or 1 <= v <= MAX_PAGE:
                continue
            if v > MAX_PAGE:
                msg = (
                    f"Requesting {v} records on the `{f.name}` connection exceeds the "
                    f"`{name}` limit of {MAX_PAGE} records."
                )
            else:
                msg = f"`{name}` on the `{f.name}` connection must be between 1 and {MAX_PAGE}."
            got.append({"type": "EXCESSIVE_PAGINATION", **ge.error_at(msg, f.nodes, f.path)})
    if not got:
        nodes = requests_and_nodes(p)[1]
        if nodes > MAX_NODES:
            msg = (
                f"This query requests up to {nodes:,} possible nodes which exceeds the maximum "
                f"limit of {MAX_NODES:,}."
            )
            got.append({"type": "MAX_NODE_LIMIT_EXCEEDED", "message": msg})
    p.memo["gh_errors"] = got
    return got


def query_cost(
    query: str, variables: dict[str, Any] | None = None, operation_name: str | None = None
) -> tuple[int, int, int]:
    """(points, requests, nodes) of a query; raises ``GraphQLFailure`` for one GitHub refuses."""
    p = ge.plan(schema(), query, operation_name, variables)
    errors = limit_errors(p)
    if errors:
        raise ge.GraphQLFailure(errors)
    requests, nodes = requests_and_nodes(p)
    return points(requests), requests, nodes


def _dry_run(p: ge.Plan) -> bool:
    return any(f.name == "rateLimit" and f.args.get("dryRun") for f in p.fields)


# -- the catalog -------------------------------------------------------------------------------

_BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)


def _time(hours: int) -> str:
    return (_BASE_TIME + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Catalog:
    """The data every token sees (the viewer is the token's user)."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.by_id: dict[str, dict[str, Any]] = {}
        c = counts
        viewer = self._user(1, "octocat")
        followers = [self._user(k + 2, f"follower{k + 1}") for k in range(c["followers"])]
        users = [viewer, *followers]
        viewer["followers"] = followers
        repos = [self._repo(r, c, viewer, users) for r in range(1, c["repositories"] + 1)]
        viewer["repositories"] = repos
        self.users = users
        self.repos = repos
        self.root: dict[str, Any] = {
            "viewer": viewer,
            "user": lambda args, ctx: next((u for u in users if u["login"] == args["login"]), None),
            "repository": lambda args, ctx: next(
                (
                    r
                    for r in repos
                    if r["name"] == args["name"] and r["owner"]["login"] == args["owner"]
                ),
                None,
            ),
            "node": lambda args, ctx: self.by_id.get(args["id"]),
            "nodes": lambda args, ctx: [self.by_id.get(i) for i in args["ids"]],
            "rateLimit": lambda args, ctx: ctx.rate_limit,
            "search": self._search,
        }
        self.mutation_root: dict[str, Any] = {
            "addComment": self._add_comment,
            "addStar": self._add_star,
        }

    def _add(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.by_id[obj["id"]] = obj
        return obj

    def _user(self, n: int, login: str) -> dict[str, Any]:
        user = {
            "__typename": "User",
            "id": f"U_{n}",
            "login": login,
            "name": login.capitalize(),
            "bio": None,
            "url": f"https://github.com/{login}",
            "createdAt": _time(n),
            "followers": [],
            "repositories": [],
        }
        user["repository"] = lambda args, ctx: next(
            (r for r in user["repositories"] if r["name"] == args["name"]), None
        )
        return self._add(user)

    def _comments(self, base: str, count: int, users: list[dict[str, Any]]) -> list[Any]:
        return [
            self._add(
                {
                    "__typename": "IssueComment",
                    "id": f"IC_{base}_{k}",
                    "body": f"comment {k}",
                    "bodyHTML": f"<p>comment {k}</p>",
                    "author": users[k % len(users)],
                    "createdAt": _time(k),
                }
            )
            for k in range(1, count + 1)
        ]

    def _repo(
        self, r: int, c: dict[str, int], owner: dict[str, Any], users: list[dict[str, Any]]
    ) -> dict[str, Any]:
        repo: dict[str, Any] = {
            "__typename": "Repository",
            "id": f"R_{r}",
            "name": f"repo-{r}",
            "nameWithOwner": f"{owner['login']}/repo-{r}",
            "description": f"Repository {r}",
            "url": f"https://github.com/{owner['login']}/repo-{r}",
            "stargazerCount": r * 3,
            "createdAt": _time(r),
            "owner": owner,
        }
        labels = [
            self._add(
                {
                    "__typename": "Label",
                    "id": f"L_{r}_{k}",
                    "name": ("bug", "enhancement", "docs", "question", "good first issue")[k % 5],
                    "color": "d73a4a",
                }
            )
            for k in range(1, c["labels"] + 1)
        ]
        issues = []
        for i in range(1, c["issues"] + 1):
            issues.append(
                self._add(
                    {
                        "__typename": "Issue",
                        "id": f"I_{r}_{i}",
                        "number": i,
                        "title": f"Issue {i} of repo-{r}",
                        "body": f"Body of issue {i}",
                        "bodyHTML": f"<p>Body of issue {i}</p>",
                        "state": "CLOSED" if i % 4 == 0 else "OPEN",
                        "createdAt": _time(r + i),
                        "author": users[i % len(users)],
                        "repository": repo,
                        "comments": self._comments(f"{r}_{i}", c["comments"], users),
                        "labels": labels[:2],
                    }
                )
            )
        pulls = []
        for j in range(1, c["pull_requests"] + 1):
            n = c["issues"] + j
            pulls.append(
                self._add(
                    {
                        "__typename": "PullRequest",
                        "id": f"PR_{r}_{n}",
                        "number": n,
                        "title": f"Pull request {n} of repo-{r}",
                        "bodyHTML": f"<p>Pull request {n}</p>",
                        "state": ("OPEN", "CLOSED", "MERGED")[j % 3],
                        "createdAt": _time(r + n),
                        "author": users[j % len(users)],
                        "repository": repo,
                        "comments": self._comments(f"{r}_{n}", c["comments"], users),
                    }
                )
            )
        repo["labels"] = labels
        repo["issues"] = lambda args, ctx: [
            i for i in issues if not args.get("states") or i["state"] in args["states"]
        ]
        repo["pullRequests"] = lambda args, ctx: [
            p for p in pulls if not args.get("states") or p["state"] in args["states"]
        ]
        repo["issue"] = lambda args, ctx: next(
            (i for i in issues if i["number"] == args["number"]), None
        )
        repo["_issues"] = issues
        repo["_pulls"] = pulls
        return self._add(repo)

    def _search(self, args: dict[str, Any], ctx: Any) -> ge.Items:
        words = [w.lower() for w in args["query"].split() if ":" not in w]

        def hit(text: str) -> bool:
            return all(w in text.lower() for w in words)

        kind = args["type"]
        items: list[dict[str, Any]] = []
        if kind == "REPOSITORY":
            items = [r for r in self.repos if hit(r["nameWithOwner"])]
        elif kind == "ISSUE":
            for r in self.repos:
                items.extend(x for x in r["_issues"] + r["_pulls"] if hit(x["title"]))
        elif kind == "USER":
            items = [u for u in self.users if hit(u["login"])]
        return ge.Items(
            items,
            issueCount=len(items) if kind == "ISSUE" else 0,
            repositoryCount=len(items) if kind == "REPOSITORY" else 0,
            userCount=len(items) if kind == "USER" else 0,
        )

    # -- mutations (answered, not stored) --------------------------------------------------------

    def _add_comment(self, args: dict[str, Any], ctx: Any) -> dict[str, Any]:
        inp = args["input"]
        subject = self.by_id.get(inp["subjectId"])
        if subject is None or subject["__typename"] not in ("Issue", "PullRequest"):
            raise ge.FieldError(
                f"Could not resolve to a node with the global id of '{inp['subjectId']}'"
            )
        comment = {
            "__typename": "IssueComment",
            "id": f"IC_new_{len(subject['comments']) + 1}",
            "body": inp["body"],
            "bodyHTML": f"<p>{inp['body']}</p>",
            "author": self.users[0],
            "createdAt": _time(0),
        }
        edge = {"__typename": "IssueCommentEdge", "cursor": ge.cursor_of(comment), "node": comment}
        return {
            "__typename": "AddCommentPayload",
            "clientMutationId": inp.get("clientMutationId"),
            "commentEdge": edge,
            "subject": subject,
        }

    def _add_star(self, args: dict[str, Any], ctx: Any) -> dict[str, Any]:
        inp = args["input"]
        repo = self.by_id.get(inp["starrableId"])
        if repo is None or repo["__typename"] != "Repository":
            raise ge.FieldError(
                f"Could not resolve to a node with the global id of '{inp['starrableId']}'"
            )
        starred = dict(repo)
        starred["stargazerCount"] = repo["stargazerCount"] + 1
        return {
            "__typename": "AddStarPayload",
            "clientMutationId": inp.get("clientMutationId"),
            "starrable": starred,
        }


def catalog_counts(overrides: dict[str, Any] | None) -> tuple[tuple[str, int], ...]:
    counts = dict(CATALOG_DEFAULTS)
    for k, v in (overrides or {}).items():
        if k not in counts:
            raise ValueError(f"unknown catalog entry {k!r} (known: {sorted(counts)})")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"catalog {k} must be an int >= 0")
        counts[k] = v
    return tuple(sorted(counts.items()))


# -- the limits --------------------------------------------------------------------------------


class Resolved:
    """One token's effective settings, checked."""

    __slots__ = (
        "limit",
        "window",
        "sec_points",
        "sec_window",
        "query_points",
        "mutation_points",
        "sec_status",
        "zero_remaining",
        "catalog",
        "raw",
    )

    def __init__(self, s: dict[str, Any]) -> None:
        self.raw = dict(s)
        self.limit = int(s["limit"])
        self.window = float(s["window_seconds"])
        self.sec_points = int(s["secondary_points"])
        self.sec_window = float(s["secondary_window"])
        self.query_points = int(s["query_points"])
        self.mutation_points = int(s["mutation_points"])
        self.sec_status = int(s["secondary_status"])
        if self.limit < 0 or self.window <= 0 or self.sec_points < 0 or self.sec_window <= 0:
            raise ValueError("limits must be >= 0 and windows > 0")
        if self.sec_status not in (200, 403, 429):
            raise ValueError("secondary_status is 200, 403 or 429")
        if s["limited_remaining"] not in ("zero", "actual"):
            raise ValueError("limited_remaining is 'zero' or 'actual'")
        self.zero_remaining = s["limited_remaining"] == "zero"
        if s["catalog"] is not None and not isinstance(s["catalog"], dict):
            raise ValueError("catalog is a dict of counts")
        self.catalog = catalog_counts(s["catalog"])


class RateContext:
    """What ``rateLimit`` answers for one request."""

    __slots__ = ("rate_limit",)

    def __init__(self, rate_limit: dict[str, Any]) -> None:
        self.rate_limit = rate_limit


class GitHubKey:
    """One token: its primary window, its secondary window, its counters."""

    def __init__(self, token: str, cfg: Resolved) -> None:
        self.lock = threading.Lock()
        self.token = token
        self.cfg = cfg
        self.user_id = 1000 + zlib.crc32(token.encode()) % 9_000_000
        self.window_start: float | None = None
        self.reset = 0
        self.used = 0
        self.sec: deque[tuple[float, int]] = deque()
        self.sec_sum = 0
        self.peak_secondary = 0
        self.accepted = 0
        self.rate_limited = 0
        self.secondary_limited = 0
        self.invalid = 0
        self.dry_runs = 0
        self.mutations = 0
        self.points_spent = 0  # over every window
        self.first_accept: float | None = None
        self.last_accept: float | None = None
        self.trace: list[tuple[float, int, int]] = []  # (time, cost, used after)

    def roll(self, now: float) -> None:
        """Start a new primary window at ``now`` if there is none running."""
        if self.window_start is None or now >= self.reset:
            self.window_start = now
            self.reset = math.floor(now) + int(math.ceil(self.cfg.window))
            self.used = 0

    def expire(self, now: float) -> None:
        edge = now - self.cfg.sec_window
        while self.sec and self.sec[0][0] <= edge:
            self.sec_sum -= self.sec.popleft()[1]

    def remaining(self) -> int:
        return max(0, self.cfg.limit - self.used)

    def headers(self, remaining: int | None = None) -> list[tuple[str, str]]:
        return [
            ("x-ratelimit-limit", str(self.cfg.limit)),
            ("x-ratelimit-remaining", str(self.remaining() if remaining is None else remaining)),
            ("x-ratelimit-used", str(self.used)),
            ("x-ratelimit-reset", str(self.reset)),
            ("x-ratelimit-resource", "graphql"),
        ]

    def snapshot(self, now: float) -> dict[str, Any]:
        running = self.window_start is not None and now < self.reset
        return {
            "token": self.token,
            "user_id": self.user_id,
            "limit": self.cfg.limit,
            "used": self.used if running else 0,
            "remaining": self.remaining() if running else self.cfg.limit,
            "reset": self.reset if running else None,
            "window_start": self.window_start if running else None,
            "accepted": self.accepted,
            "rate_limited": self.rate_limited,
            "secondary_limited": self.secondary_limited,
            "throttled": self.rate_limited + self.secondary_limited,
            "invalid": self.invalid,
            "dry_runs": self.dry_runs,
            "mutations": self.mutations,
            "points_spent": self.points_spent,
            "first_accept": self.first_accept,
            "last_accept": self.last_accept,
            "secondary_points": self.sec_sum,
            "secondary_limit": self.cfg.sec_points,
            "peak_secondary": self.peak_secondary,
            "trace": [list(t) for t in self.trace],
        }


def token_of(req: Request) -> str | None:
    auth = req.headers.get("authorization", "").strip()
    scheme, _, token = auth.partition(" ")
    if scheme.lower() in ("bearer", "token") and token.strip():
        return token.strip()
    return None


class GitHubAPI:
    """The app behind ``GitHubMock``: state per token."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._defaults: dict[str, Any] = dict(DEFAULTS)
        self._token_cfg: dict[str, dict[str, Any]] = {}
        self._keys: dict[str, GitHubKey] = {}
        self._catalogs: dict[tuple[tuple[str, int], ...], Catalog] = {}
        self._request_ids = 0
        self.unauthorized = 0
        self.not_found = 0

    def _settings(self, token: str) -> dict[str, Any]:
        s = dict(self._defaults)
        s.update(self._token_cfg.get(token, {}))
        return s

    def configure(self, token: str | None = None, **settings: Any) -> None:
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown GitHub mock settings: {sorted(unknown)}")
        with self._lock:
            layer = self._defaults if token is None else self._token_cfg.setdefault(token, {})
            before = dict(layer)
            layer.update(settings)
            try:
                Resolved(self._settings(token or ""))
                new = {t: Resolved(self._settings(t)) for t in self._keys}
            except (TypeError, ValueError):
                layer.clear()
                layer.update(before)
                raise
            for t, key in self._keys.items():
                with key.lock:
                    key.cfg = new[t]

    def reset(self) -> None:
        with self._lock:
            self._keys.clear()
            self.unauthorized = 0
            self.not_found = 0

    def key(self, token: str) -> GitHubKey:
        k = self._keys.get(token)
        if k is None:
            with self._lock:
                k = self._keys.get(token)
                if k is None:
                    k = GitHubKey(token, Resolved(self._settings(token)))
                    self._keys[token] = k
        return k

    def catalog(self, counts: tuple[tuple[str, int], ...]) -> Catalog:
        got = self._catalogs.get(counts)
        if got is None:
            with self._lock:
                got = self._catalogs.get(counts)
                if got is None:
                    got = Catalog(dict(counts))
                    self._catalogs[counts] = got
        return got

    def key_stats(self, token: str) -> dict[str, Any]:
        k = self.key(token)
        now = self.clock()
        with k.lock:
            k.expire(now)
            return k.snapshot(now)

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            keys = list(self._keys.values())
        out: dict[str, Any] = {}
        t = {
            "accepted": 0,
            "throttled": 0,
            "rate_limited": 0,
            "secondary_limited": 0,
            "invalid": 0,
            "points_spent": 0,
            "unauthorized": self.unauthorized,
            "not_found": self.not_found,
        }
        for k in keys:
            with k.lock:
                k.expire(now)
                snap = k.snapshot(now)
            out[k.token] = snap
            for name in ("accepted", "throttled", "rate_limited", "secondary_limited", "invalid"):
                t[name] += snap[name]
            t["points_spent"] += snap["points_spent"]
        return {"now": now, "totals": t, "keys": out}

    # -- requests --------------------------------------------------------------------------------

    def handle(self, req: Request) -> Reply | None:
        if req.path.rstrip("/") != "/graphql":
            return None
        if req.method != "POST":
            with self._lock:
                self.not_found += 1
            return None
        token = token_of(req)
        if token is None:
            with self._lock:
                self.unauthorized += 1
            return 401, [_JSON], UNAUTHORIZED
        k = self.key(token)
        try:
            query, variables, name = ge.read_body(req.body, req.headers.get("content-type", ""))
        except ValueError:
            return (
                400,
                [_JSON],
                dumps(
                    {
                        "message": "Problems parsing JSON",
                        "documentation_url": "https://docs.github.com/graphql",
                    }
                ),
            )
        failure: ge.GraphQLFailure | None = None
        p: ge.Plan | None = None
        try:
            p = ge.plan(schema(), query, name, variables)
            errors = limit_errors(p)
            if errors:
                raise ge.GraphQLFailure(errors)
            requests, nodes = requests_and_nodes(p)
        except ge.GraphQLFailure as e:
            failure = e
        mutation = p is not None and p.operation == "mutation"
        now = self.clock()
        with k.lock:
            cfg = k.cfg
            k.roll(now)
            k.expire(now)
            sec_cost = cfg.mutation_points if mutation else cfg.query_points
            if k.sec_sum + sec_cost > cfg.sec_points:
                k.secondary_limited += 1
                need = k.sec_sum + sec_cost - cfg.sec_points
                freed, when = 0, now + cfg.sec_window
                for t_i, pts in k.sec:
                    freed += pts
                    if freed >= need:
                        when = t_i + cfg.sec_window
                        break
                retry = max(1, math.ceil(when - now - 1e-9))
                with self._lock:
                    self._request_ids += 1
                    rid = f"0000:{self._request_ids:04X}:MOCK"
                body = {
                    "documentation_url": SECONDARY_DOCS,
                    "message": SECONDARY_MESSAGE.format(rid=rid),
                }
                headers = [("retry-after", str(retry)), *k.headers(), _JSON]
                return cfg.sec_status, headers, dumps(body)
            k.sec.append((now, sec_cost))
            k.sec_sum += sec_cost
            k.peak_secondary = max(k.peak_secondary, k.sec_sum)
            if failure is not None or p is None:
                k.invalid += 1
                errors = failure.errors if failure is not None else []
                return 200, [*k.headers(), _JSON], dumps({"errors": errors})
            cost = points(requests)
            dry = _dry_run(p)
            if not dry and cost > k.remaining():
                k.rate_limited += 1
                already = "already " if k.remaining() == 0 else ""
                body = {
                    "errors": [
                        {
                            "type": "RATE_LIMITED",
                            "code": "graphql_rate_limit",
                            "message": f"API rate limit {already}exceeded for user ID {k.user_id}.",
                        }
                    ]
                }
                shown = 0 if cfg.zero_remaining else k.remaining()
                return 200, [*k.headers(shown), _JSON], dumps(body)
            if dry:
                k.dry_runs += 1
            else:
                k.used += cost
                k.points_spent += cost
            k.accepted += 1
            if mutation:
                k.mutations += 1
            if k.first_accept is None:
                k.first_accept = now
            k.last_accept = now
            if len(k.trace) < TRACE_LEN:
                k.trace.append((now, 0 if dry else cost, k.used))
            rate = {
                "__typename": "RateLimit",
                "cost": cost,
                "limit": cfg.limit,
                "nodeCount": nodes,
                "remaining": k.remaining(),
                "used": k.used,
                "resetAt": _iso(k.reset),
            }
            catalog = self.catalog(cfg.catalog)
            root = catalog.mutation_root if mutation else catalog.root
            ex = ge.Executor(RateContext(rate))
            data = ex.fields(p.fields, root, [])
            headers = [*k.headers(), _JSON]
        body_out: dict[str, Any] = {"data": data}
        if ex.errors:
            body_out["errors"] = ex.errors
        return 200, headers, dumps(body_out)
