#!/usr/bin/env python3
"""elbasy with many requests queued: memory per queued request, departure lateness.

Standard-library Python. Starts a tiny origin (asyncio, in a process of its
own) and K elbasy processes with a user rule for the made-up host
``api.bench.test`` (one bucket per account, read from ``X-Bench-Account``).
The accounts are partitioned: account a belongs to elbasy process a % K only,
so each is paced by one process, and each elbasy process has a client process
of its own. Then:

1. warm-up: one request per account, which the origin answers 429 with a
   Retry-After that ends at a common start time T0 (staggered by account
   over one interval of the bucket). elbasy holds every account until then,
   so nothing the clients send next can leave before T0, and the buckets,
   rule caches and pools exist before the baseline;
2. baseline: every elbasy process's RSS (``VmRSS``) once all are warm;
3. queue: N client connections (one request each, ``--accounts`` accounts
   round robin, each to the process of its account), from source addresses
   127.0.0.2..127.0.0.9, until every process's ``/healthz`` shows its share
   in ``held.waiting`` (or T0 comes): RSS again;
4. drain: from T0 every account sends at its bucket's rate; each client
   closes on its answer. ``pacing.late_ms_p50/p99`` (how long after its
   scheduled time each held request left) is read from each process's
   ``/healthz`` every two seconds and at the end.

Why K processes: each queued request is one fd in elbasy and one in the
client, and a process holds at most RLIMIT_NOFILE fds. K is by default the
fewest processes whose shares fit under the limit (1 where it can be raised,
which needs CAP_SYS_RESOURCE; 6 for 100,000 requests at a hard limit of 20000)::

    python3 bench/queued.py                         # 100,000 requests, 10,000 accounts
    python3 bench/queued.py --requests 20000 --accounts 2000
    python3 bench/queued.py --processes 1 --requests 2000 --accounts 200

``--graphql``: the same with GraphQL queries (``POST /graphql``) under a
cost-based rule (``[cost] kind = "graphql"``, Shopify's estimator, a bucket of
``--capacity`` points restored at ``--rate`` points/s per account, the bucket
read back from ``extensions.cost.throttleStatus``). The origin keeps the same
bucket per account as Shopify documents it: a query's requested cost must be
available before it runs (else a THROTTLED body with HTTP 200, counted), and
requested − actual comes back after it ran, so elbasy's refunds move each
account's line; the origin's per-account trace gives the points spent
against what the bucket allowed::

    python3 bench/queued.py --graphql              # 100,000 queries, 10,000 accounts

Results: a markdown table on stdout, saved with the raw data as
``bench/results/<date>-queue.{json,md}`` (``-queue-graphql`` with ``--graphql``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Proc, rss_kib, tree_cpu_s  # noqa: E402 - the peer benchmark's helpers

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
LOOPBACK = "127.0.0.1"
HOST = "api.bench.test"
ACCOUNT_HEADER = "X-Bench-Account"
UNTIL_HEADER = "X-Bench-Until"
GRAPHQL_PATH = "/graphql"
STATS_PATH = "/bench-stats"  # the origin's own counts (asked directly, not through elbasy)
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
NOFILE = 262_144
FD_SPARE = 200  # fds kept for elbasy's listener, epoll, upstream connections, /healthz
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

RULE = """\
[[rule]]
id = "bench-queue"
provider = "elbasy bench"
description = "bench/queued.py: a made-up API, one slow bucket per account"
version = 1

[rule.match]
hosts = ["{host}"]
path = '^/'

[[rule.account.parts]]
name = "account"
from = "header"
header = "{header}"

[[rule.limits]]
name = "bench-bucket"
kind = "bucket"
unit = "requests"
capacity = 1
rate = {rate!r}

[rule.throttle]
statuses = [429]
retry_after = [{{ header = "Retry-After", unit = "s" }}]
"""


GRAPHQL_RULE = """\
[[rule]]
id = "bench-graphql"
provider = "elbasy bench"
description = "bench/queued.py --graphql: a made-up GraphQL API, a bucket of points per account"
version = 1

[rule.match]
hosts = ["{host}"]
path = '^{path}$'
methods = ["POST"]

[[rule.account.parts]]
name = "account"
from = "header"
header = "{header}"

[[rule.limits]]
name = "bench-points"
kind = "bucket"
unit = "points"
capacity = {capacity!r}
rate = {rate!r}

[rule.cost]
kind = "graphql"
estimator = "shopify"
default = 50
max_single = 1000
requested = "extensions.cost.requestedQueryCost"
actual = "extensions.cost.actualQueryCost"

[[rule.feedback]]
limit = "bench-points"
remaining = {{ json = "extensions.cost.throttleStatus.currentlyAvailable" }}
capacity = {{ json = "extensions.cost.throttleStatus.maximumAvailable" }}
rate = {{ json = "extensions.cost.throttleStatus.restoreRate" }}

[rule.throttle]
statuses = [429]
markers = [{{ json = "errors[*].extensions.code", equals = "THROTTLED" }}]
retry_after = [
  {{ header = "Retry-After", unit = "s" }},
  {{ compute = "graphql_wait" }},
]
default_retry_after = 1.0
"""

# The queries the clients send, with the requested cost the documented calculation
# (https://shopify.dev/docs/api/usage/limits) gives, worked by hand: a scalar field 0,
# an object 1 plus its selection, a connection 2 plus first x (its node: 1 plus its
# selection), root fields added up. E.g. { products(first: 10) { edges { node { id } } } }
# is 2 + 10 x 1 = 12. The costs here are multiples of 5, so that the actual cost, a
# fixed ACTUAL_PERCENT of the requested one, is a whole number as Shopify reports it.
SHAPES: tuple[tuple[str, int], ...] = (
    # 2 + 8 x (1 + 0) = 10
    ("{ products(first: 8) { edges { node { id } } } }", 10),
    # 2 + 18 x (1 + 0 + 0) = 20
    ("{ products(first: 18) { edges { node { id title } } } }", 20),
    # shop 1 + 0; customers 2 + 27 x 1 = 29 (nodes lists the items as edges.node does): 30
    ("{ shop { name } customers(first: 27) { nodes { id email } } }", 30),
    # 2 + 4 x (1 + lineItems: 2 + 9 x 1) = 2 + 4 x 12 = 50
    (
        "{ orders(first: 4) { edges { node { id lineItems(first: 9)"
        " { edges { node { id } } } } } } }",
        50,
    ),
)
ACTUAL_PERCENT = 40  # of the requested cost: what the origin says each query really cost


def actual_cost(requested: int) -> int:
    return requested * ACTUAL_PERCENT // 100


def shape_of(account: int, position: int) -> int:
    """Which of SHAPES the ``position``-th request of ``account`` sends (a mix per account)."""
    return (account + position) % len(SHAPES)


def log(msg: str) -> None:
    print(f"[queue {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# the origin: 200 at once; 429 with Retry-After until X-Bench-Until


async def _origin_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"(?im)^x-bench-until:\s*([0-9.]+)", head)
            if m:
                wait = max(0.0, float(m.group(1)) - time.time())
                writer.write(
                    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: %.3f\r\n"
                    b"Content-Length: 5\r\n\r\nslow\n" % wait
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            if re.search(rb"(?im)^connection:\s*close", head):
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


class GraphQLOrigin:
    """A GraphQL API with a bucket of points per account, as Shopify documents its own.

    ``currentlyAvailable`` points per account, at most ``capacity``, restored
    continuously at ``rate`` per second (full when an account is first seen).
    A query's requested cost (SHAPES) must be available when it arrives: if
    it is not, nothing is taken and the answer is the THROTTLED body with
    HTTP 200 (counted). Otherwise the requested cost is taken, the query
    "runs", and requested − actual is given back before the answer, whose
    ``extensions.cost`` says requested, actual and the bucket after the
    refund (``currentlyAvailable`` floored to an integer, as Shopify shows it).
    """

    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.costs = dict(SHAPES)
        self.buckets: dict[str, list[float]] = {}  # account -> [available, as of (wall)]
        # account -> [[wall time, requested, actual, available before], ...] per accepted query
        self.trace: dict[str, list[list[float]]] = {}
        self.counts: Counter[str] = Counter()

    def status(self, bucket: list[float]) -> dict:
        return {
            "maximumAvailable": float(self.capacity),
            "currentlyAvailable": int(math.floor(bucket[0] + 1e-9)),
            "restoreRate": float(self.rate),
        }

    def query(self, account: str, body: bytes) -> bytes:
        try:
            requested = self.costs.get(json.loads(body).get("query"))
        except (ValueError, AttributeError, TypeError):  # not JSON, not an object
            requested = None
        if requested is None:
            self.counts["unknown_query"] += 1
            return b'{"errors":[{"message":"bench origin: not one of the bench queries"}]}'
        now = time.time()
        bucket = self.buckets.get(account)
        if bucket is None:
            bucket = self.buckets[account] = [float(self.capacity), now]
        bucket[0] = min(self.capacity, bucket[0] + self.rate * max(0.0, now - bucket[1]))
        bucket[1] = now
        if bucket[0] + 1e-9 < requested:
            self.counts["throttled"] += 1
            errors = [
                {
                    "message": "Throttled",
                    "extensions": {
                        "code": "THROTTLED",
                        "documentation": "https://shopify.dev/api/usage/rate-limits",
                    },
                }
            ]
            cost = {"requestedQueryCost": requested, "actualQueryCost": None}
            cost["throttleStatus"] = self.status(bucket)
            return json.dumps({"errors": errors, "extensions": {"cost": cost}}).encode()
        before = bucket[0]
        actual = actual_cost(requested)
        bucket[0] -= actual  # requested taken, requested - actual given back after the run
        self.counts["accepted"] += 1
        self.trace.setdefault(account, []).append([round(now, 4), requested, actual, before])
        cost = {"requestedQueryCost": requested, "actualQueryCost": actual}
        cost["throttleStatus"] = self.status(bucket)
        return json.dumps({"data": {}, "extensions": {"cost": cost}}).encode()

    def stats(self) -> bytes:
        return json.dumps(
            {
                "capacity": self.capacity,
                "rate": self.rate,
                "counts": dict(self.counts),
                "trace": self.trace,
            }
        ).encode()

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                body = await reader.readexactly(int(m.group(1))) if m else b""
                status = b"200 OK"
                extra = b""
                if head.startswith(b"GET " + STATS_PATH.encode()):
                    data = self.stats()
                elif until := re.search(rb"(?im)^x-bench-until:\s*([0-9.]+)", head):
                    # the warm-up: held until T0 by a 429, the bucket untouched
                    self.counts["warmup_429"] += 1
                    wait = max(0.0, float(until.group(1)) - time.time())
                    status, extra = b"429 Too Many Requests", b"Retry-After: %.3f\r\n" % wait
                    data = b'{"errors":[{"message":"bench warm-up: wait for T0"}]}'
                else:
                    who = re.search(rb"(?im)^x-bench-account:\s*(\S+)", head)
                    data = self.query(who.group(1).decode() if who else "-", body)
                writer.write(
                    b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n%s"
                    b"Content-Length: %d\r\n\r\n%s" % (status, extra, len(data), data)
                )
                if re.search(rb"(?im)^connection:\s*close", head):
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()


def serve_origin(graphql: GraphQLOrigin | None = None) -> None:
    handler = graphql.client if graphql is not None else _origin_client

    async def main() -> None:
        server = await asyncio.start_server(handler, LOOPBACK, 0, backlog=4096)
        print(f"origin listening on {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    asyncio.run(main())


# --------------------------------------------------------------------------
# processes


def raise_nofile(n: int = NOFILE, quiet: bool = False) -> int:
    """Raise this process's fd limit to n (soft and hard), else the soft one to the hard one.

    Raising the hard limit needs CAP_SYS_RESOURCE (root, in most places);
    returns the limit reached.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in ((max(n, soft), max(n, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, want)
            return want[0]
        except (ValueError, OSError) as e:
            if not quiet and want[1] != hard:
                log(f"cannot raise the RLIMIT_NOFILE hard limit {hard} to {n} ({e})")
    return soft


def _child_nofile() -> None:
    raise_nofile(quiet=True)


def healthz(port: int, path: str = "/healthz") -> dict:
    """GET ``path`` from 127.0.0.1:port (elbasy's /healthz, or the origin's own counts)."""
    with socket.create_connection((LOOPBACK, port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: elbasy\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(1 << 20):
            chunks.append(chunk)
    return json.loads(b"".join(chunks).split(b"\r\n\r\n", 1)[1])


# --------------------------------------------------------------------------
# the clients: one request per connection, on one epoll


class Clients:
    """Non-blocking client connections to elbasy, one request each."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ep = select.epoll()
        self.conns: dict[int, list] = {}  # fd -> [sock, request, received, state]
        self.connecting = 0
        self.opened = 0
        self.answered = 0
        self.statuses: dict[int, int] = {}
        self.throttled = 0  # answers with a THROTTLED body (GraphQL: HTTP 200)
        self.errors: dict[str, int] = {}

    def _error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def open(self, request: bytes, source: str) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((source, 0))
            rc = s.connect_ex((LOOPBACK, self.port))
        except OSError as e:
            s.close()
            self._error(f"connect: {errno.errorcode.get(e.errno, e.errno)}")
            return
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            self._error(f"connect: {errno.errorcode.get(rc, rc)}")
            return
        fd = s.fileno()
        self.conns[fd] = [s, request, b"", 0]
        self.ep.register(fd, select.EPOLLOUT)
        self.connecting += 1
        self.opened += 1

    def _close(self, fd: int) -> None:
        c = self.conns.pop(fd)
        if c[3] == 0:
            self.connecting -= 1
        self.ep.unregister(fd)
        c[0].close()

    def poll(self, timeout: float) -> None:
        for fd, _ev in self.ep.poll(timeout, 4096):
            c = self.conns.get(fd)
            if c is None:
                continue
            s = c[0]
            if c[3] == 0:  # connected (or failed): send the request
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._error(f"connect: {errno.errorcode.get(err, err)}")
                    self._close(fd)
                    continue
                try:
                    s.send(c[1])
                except OSError as e:
                    self._error(f"send: {errno.errorcode.get(e.errno, e.errno)}")
                    self._close(fd)
                    continue
                c[3] = 1
                self.connecting -= 1
                self.ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                self._error(f"recv: {errno.errorcode.get(e.errno, e.errno)}")
                self._close(fd)
                continue
            if data:
                c[2] += data
            if not self._complete(c[2], closed=not data):
                continue
            if c[2]:
                status = int(c[2][9:12])
                self.statuses[status] = self.statuses.get(status, 0) + 1
                self.throttled += b'"THROTTLED"' in c[2]
                self.answered += 1
            else:
                self._error("closed without an answer")
            self._close(fd)

    @staticmethod
    def _complete(buf: bytes, closed: bool) -> bool:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return closed
        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", buf[:end])
        return closed or (m is not None and len(buf) - end - 4 >= int(m.group(1)))

    def pending(self) -> int:
        return len(self.conns)


def request(account: int, path: str, extra: str = "") -> bytes:
    return (
        f"GET http://{HOST}{path} HTTP/1.1\r\nHost: {HOST}\r\n"
        f"{ACCOUNT_HEADER}: a{account:06d}\r\n{extra}\r\n"
    ).encode()


def graphql_request(account: int, shape: int, extra: str = "") -> bytes:
    body = json.dumps({"query": SHAPES[shape][0]})
    return (
        f"POST http://{HOST}{GRAPHQL_PATH} HTTP/1.1\r\nHost: {HOST}\r\n"
        f"{ACCOUNT_HEADER}: a{account:06d}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n{body}"
    ).encode()


def run_clients(
    clients: Clients,
    requests: list[bytes],
    deadline: float,
    max_connecting: int,
    max_pending: int = 1 << 30,
    until: Callable[[int], bool] | None = None,
    tick: Callable[[], None] | None = None,
) -> None:
    """Open a connection per request (bounded in-flight connects), poll until done or deadline."""
    i = 0
    while time.monotonic() < deadline:
        while (
            i < len(requests)
            and clients.connecting < max_connecting
            and clients.pending() < max_pending
        ):
            clients.open(requests[i], SOURCES[i % len(SOURCES)])
            i += 1
        clients.poll(0.05)
        if tick is not None:
            tick()
        if until is not None and until(i):
            return
        if i == len(requests) and not clients.pending():
            return


# --------------------------------------------------------------------------
# the processes: account a in elbasy process a % K, each with a client process


def shares(requests: int, accounts: int, processes: int) -> list[int]:
    """Requests held by each process: request i is for account i % accounts."""
    each, extra = divmod(requests, accounts)
    return [
        sum(each + (a < extra) for a in range(i, accounts, processes)) for i in range(processes)
    ]


def processes_needed(requests: int, accounts: int, room: int) -> int:
    """The fewest processes whose shares of the requests each fit in ``room`` fds."""
    k = 1
    while k < accounts and max(shares(requests, accounts, k)) > room:
        k += 1
    return k


def most_that_fit(requests: int, accounts: int, processes: int, room: int) -> int:
    """The largest number of requests, at most ``requests``, whose shares fit in ``room``."""
    lo, hi = 0, requests
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if max(shares(mid, accounts, processes)) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def add_counts(counts: Iterable[dict]) -> dict:
    return dict(sorted(sum((Counter(c) for c in counts), Counter()).items()))


@dataclass(frozen=True)
class Plan:
    """What every client process is told: the run's shape and the common T0."""

    requests: int
    accounts: int
    processes: int
    per_account: int  # requests per account, at most
    t0: float  # wall clock
    interval: float  # seconds between an account's departures (REST)
    max_connecting: int
    graphql: bool = False
    spread: float = 0.0  # account a starts at t0 + (a / accounts) * spread
    schedule: float = 0.0  # seconds from t0 to the last departure, as elbasy aims


def until_for(plan: Plan, account: int) -> float:
    """When account ``account``'s warm-up hold ends: its share of T0."""
    return plan.t0 + (account / plan.accounts) * plan.spread


def client_process(conn: Connection, plan: Plan, index: int, port: int, pid: int) -> None:
    """The clients of elbasy process ``index`` (its accounts only): warm-up, queue, drain.

    Sends the parent a report at the end of each phase, and waits for its
    word before queueing, so that every elbasy's baseline comes before any queue.
    """
    # 1. warm-up: every account held until its share of T0
    clients = Clients(port)
    warm = [
        (
            graphql_request(a, shape_of(a, 0), extra)
            if plan.graphql
            else request(a, "/warmup", extra)
        )
        for a in range(index, plan.accounts, plan.processes)
        for extra in [f"{UNTIL_HEADER}: {until_for(plan, a):.3f}\r\nConnection: close\r\n"]
    ]
    w0 = time.monotonic()
    # few at a time: elbasy keeps the upstream connections they opened in its pool
    run_clients(clients, warm, time.monotonic() + 120, 16, max_pending=16)
    conn.send(
        {
            "answered": clients.answered,
            "statuses": clients.statuses,
            "throttled": clients.throttled,
            "errors": clients.errors,
            "seconds": time.monotonic() - w0,
        }
    )
    if not conn.poll(300):
        raise SystemExit(f"clients {index}: no word to queue from the parent")
    conn.recv()

    # 2. the queue: a connection per request of its accounts, one request each
    reqs = [
        graphql_request(i % plan.accounts, shape_of(i % plan.accounts, i // plan.accounts))
        if plan.graphql
        else request(i % plan.accounts, "/x")
        for i in range(plan.requests)
        if i % plan.accounts % plan.processes == index
    ]
    clients = Clients(port)
    state: dict = {"peak": 0, "peak_rss": 0, "polled": 0.0, "full": None}
    q0 = time.monotonic()

    def watch(opened: int) -> bool:
        now = time.monotonic()
        if now - state["polled"] < 0.5 and opened < len(reqs):
            return False
        state["polled"] = now
        waiting = healthz(port)["held"]["waiting"]
        if waiting > state["peak"]:
            state["peak"] = waiting
            state["peak_rss"] = rss_kib(pid)
        if waiting >= len(reqs):
            state["full"] = now - q0
            return True
        return time.time() >= plan.t0

    deadline = time.monotonic() + max(0.0, plan.t0 - time.time()) + 60
    run_clients(clients, reqs, deadline, plan.max_connecting, until=watch)
    conn.send(
        {
            "full": state["full"],
            "peak": state["peak"],
            "peak_rss": state["peak_rss"],
            "seconds": time.monotonic() - q0,
            "errors": dict(clients.errors),
        }
    )

    # holding them until T0 (the parent measures what that costs elbasy)
    while time.time() < plan.t0 - 0.5:
        clients.poll(0.1)

    # 3. drain: every account at its rate from T0
    polls: list[dict] = []
    last = {"t": 0.0}

    def tick() -> None:
        now = time.monotonic()
        if now - last["t"] >= 2.0:
            last["t"] = now
            p = healthz(port)["pacing"]
            polls.append({"t": round(time.time() - plan.t0, 1), **p})

    budget = max(0.0, plan.t0 - time.time()) + plan.schedule + 60
    run_clients(clients, [], time.monotonic() + budget, 1, tick=tick)
    conn.send(
        {
            "answered": clients.answered,
            "statuses": clients.statuses,
            "throttled": clients.throttled,
            "unanswered": clients.pending(),
            "errors": clients.errors,
            "polls": polls,
            "drained": time.time() - plan.t0,
        }
    )


@dataclass
class Instance:
    """One elbasy process (the accounts a with a % K == index) and its client process."""

    index: int
    proc: Proc
    port: int
    accounts: int
    share: int  # the requests it is to hold
    conn: Connection | None = None
    client: BaseProcess | None = None
    reports: dict[str, dict] = field(default_factory=dict)  # its client process's, by phase
    rss: dict[str, int] = field(default_factory=dict)  # VmRSS KiB, by phase
    cpu: dict[str, float] = field(default_factory=dict)  # CPU s of its tree, by phase
    health: dict[str, dict] = field(default_factory=dict)  # /healthz, by phase
    waiting: int = 0  # held.waiting when queued (at the peak, if departures had begun)

    def start_client(self, plan: Plan) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child_end = ctx.Pipe()
        self.client = ctx.Process(
            target=client_process,
            args=(child_end, plan, self.index, self.port, self.proc.pid),
            name=f"clients-{self.index}",
            daemon=True,
        )
        self.client.start()
        child_end.close()  # so that the client process's exit reads as EOF here

    def report(self, phase: str, timeout: float) -> dict:
        """Wait for the client process's report at the end of ``phase``."""
        assert self.conn is not None and self.client is not None
        if not self.conn.poll(timeout):
            raise SystemExit(f"clients {self.index}: no report of the {phase} in {timeout:.0f} s")
        try:
            self.reports[phase] = self.conn.recv()
        except EOFError:
            self.client.join(5)
            raise SystemExit(
                f"clients {self.index}: exited in the {phase} (code {self.client.exitcode})"
            ) from None
        return self.reports[phase]

    def measure(self, phase: str, health: bool = True) -> None:
        self.rss[phase] = rss_kib(self.proc.pid)
        self.cpu[phase] = tree_cpu_s(self.proc.pid)
        if health:
            self.health[phase] = healthz(self.port)

    def stop_client(self) -> None:
        if self.client is not None and self.client.pid is not None:
            if self.client.is_alive():
                self.client.kill()
            self.client.join(5)

    def kib_per_queued(self) -> float:
        return (self.rss["queued"] - self.rss["baseline"]) / self.waiting if self.waiting else 0.0

    def lateness(self) -> dict:
        return self.health["end"]["pacing"]


def lateness_summary(pacings: list[dict]) -> tuple[float | str, float | str]:
    """The median of the processes' p50s and the max of their p99s ('-' with no departures)."""
    timed = [p for p in pacings if "late_ms_p50" in p]
    if not timed:
        return "-", "-"
    p50 = round(statistics.median(p["late_ms_p50"] for p in timed), 3)
    return p50, max(p["late_ms_p99"] for p in timed)


# --------------------------------------------------------------------------
# GraphQL: one account's line against its bucket of points


def line_departures(costs: Iterable[int], start: float, room: float, rate: float) -> list[float]:
    """When each query of one account's line leaves, in order, if each leaves the
    moment a bucket restored at ``rate`` points/s has its requested cost free within
    ``room`` points, and requested − actual comes back at once (nothing in use at
    ``start``)."""
    t, level, out = start, 0.0, []
    for q in costs:
        need = room - min(q, room)  # the level the bucket must be down to
        if level > need:
            wait = (level - need) / rate
            t += wait
            level = need
        out.append(t)
        level += actual_cost(q)
    return out


def graphql_schedule(plan: Plan, capacity: float, rate: float) -> float:
    """Seconds from T0 to the last departure, as elbasy aims (quota.Safety's defaults:
    1 % of the rate and max(2, rate x 0.05) points of the bucket left unused)."""
    room = max(1.0, capacity - max(2.0, math.ceil(rate * 0.05 - 1e-9)))
    last = 0.0
    each, extra = divmod(plan.requests, plan.accounts)
    for a in range(plan.accounts):
        n = each + (a < extra)
        if n:
            costs = [SHAPES[shape_of(a, j)][1] for j in range(n)]
            start = until_for(plan, a) - plan.t0
            last = max(last, line_departures(costs, start, room, rate * 0.99)[-1])
    return last


def points_report(stats: dict, t0: float) -> dict:
    """What the origin's per-account trace says: points spent against what the bucket
    allowed between each account's first and last accepted query, beside the same for
    the best any pacer could do with the same queries in the same order (each sent the
    moment the origin's bucket holds it); the points left in the bucket beyond a query's
    cost when it arrived after a wait; the fullest each bucket got."""
    capacity, rate = stats["capacity"], stats["rate"]
    ratios, best, spent, allowed, slack, peak, lag = [], [], [], [], [], [], []
    tightest: list[tuple[float, str, list]] = []  # the least left free after a query
    for account, trace in stats["trace"].items():
        trace.sort()
        for i, e in enumerate(trace):
            tightest.append((e[3] - e[1], account, trace[max(0, i - 3) : i + 1]))
        tightest = sorted(tightest, key=lambda x: x[0])[:5]
        first, last = trace[0][0], trace[-1][0]
        points = sum(e[2] for e in trace)
        ideal = line_departures([int(e[1]) for e in trace], first, capacity, rate)[-1]
        spent.append(points)
        allowed.append(capacity + rate * (last - first))
        ratios.append(points / allowed[-1])
        best.append(points / (capacity + rate * (ideal - first)))
        lag.append(last - ideal)
        peak.append(max(capacity - (e[3] - e[1]) for e in trace))
        slack += [
            b[3] - b[1] for a, b in zip(trace, trace[1:], strict=False) if b[0] - a[0] >= 0.05
        ]
    if not ratios:
        return {}

    def q(values: list[float], f: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(f * len(values)))]

    return {
        "accounts": len(ratios),
        "accepted": sum(len(t) for t in stats["trace"].values()),
        "first_accept_after_t0_s": min(t[0][0] for t in stats["trace"].values()) - t0,
        "last_accept_after_t0_s": max(t[-1][0] for t in stats["trace"].values()) - t0,
        "spent_median": statistics.median(spent),
        "allowed_median": statistics.median(allowed),
        "used_of_allowed_median": statistics.median(ratios),
        "used_of_allowed_min": min(ratios),
        "used_of_allowed_max": max(ratios),
        "ideal_used_of_allowed_median": statistics.median(best),
        "ideal_used_of_allowed_min": min(best),
        "last_accept_behind_ideal_s_median": statistics.median(lag),
        "last_accept_behind_ideal_s_p99": q(lag, 0.99),
        "last_accept_behind_ideal_s_max": max(lag),
        "slack_after_wait_n": len(slack),
        "slack_after_wait_min": min(slack, default=None),
        "slack_after_wait_median": statistics.median(slack) if slack else None,
        "slack_after_wait_p99": q(slack, 0.99) if slack else None,
        "peak_used_max": max(peak),
        "peak_used_median": statistics.median(peak),
        # [free after it, account, [[t - t0, requested, actual, available before], ...]]
        "tightest": [
            [round(free, 3), who, [[round(e[0] - t0, 4), *e[1:3], round(e[3], 3)] for e in near]]
            for free, who, near in tightest
        ],
    }


def estimator_check(python: str) -> tuple[dict, str | None]:
    """Where the elbasy that runs comes from, and its estimate of each of SHAPES
    (a disagreement with the hand-worked costs is reported: the origin's are the truth)."""
    code = (
        "import json, sys, elbasy, elbasy._loop\n"
        "from elbasy.rules.graphql_cost import estimate\n"
        "shapes = json.load(sys.stdin)\n"
        "print(json.dumps({'elbasy': elbasy.__file__, 'loop': elbasy._loop.__file__,\n"
        "  'costs': [estimate(json.dumps({'query': q}).encode(), 'shopify').cost\n"
        "            for q, _ in shapes]}))\n"
    )
    out = subprocess.run(
        [python, "-c", code],
        input=json.dumps(SHAPES),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tempfile.gettempdir(),
    )
    if out.returncode != 0:
        raise SystemExit(f"elbasy does not import with {python}:\n{out.stderr}")
    found = json.loads(out.stdout)
    wrong = [
        f"{q!r}: by hand {c}, elbasy {e}"
        for (q, c), e in zip(SHAPES, found["costs"], strict=True)
        if e != c
    ]
    return found, "; ".join(wrong) or None


# --------------------------------------------------------------------------
# the run


def percent(a: float, b: float) -> str:
    return f"{100 * a / b:.1f} %" if b else "-"


def machine_lines() -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1048576:.1f} GiB"
    return [
        f"- machine: {os.cpu_count()} cores ({cpu}), {mem} RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}",
    ]


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that the processes started are stopped too


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000, help="queued requests (N)")
    ap.add_argument("--accounts", type=int, default=10_000, help="quota accounts")
    ap.add_argument(
        "--rate",
        type=float,
        default=None,
        help="bucket rate per account: requests/s (capacity 1) [0.2], with --graphql points/s [2]",
    )
    ap.add_argument(
        "--graphql",
        action="store_true",
        help="GraphQL queries under a cost-based rule; the origin keeps a bucket of points "
        "per account and refunds requested - actual",
    )
    ap.add_argument(
        "--capacity",
        type=float,
        default=60.0,
        help="with --graphql: the bucket of points per account [60]",
    )
    ap.add_argument(
        "--hold",
        type=float,
        default=None,
        help="seconds from the end of the warm-up to T0, the first departure "
        "[default: 10 + requests / 2000]",
    )
    ap.add_argument(
        "--processes",
        type=int,
        default=None,
        help="elbasy processes K, each with its own client process; account a belongs to "
        "process a %% K [default: the fewest whose share of the requests fits under "
        "RLIMIT_NOFILE]",
    )
    ap.add_argument("--max-connecting", type=int, default=256, help="connects in flight at most")
    ap.add_argument("--elbasy-python", default=sys.executable)
    ap.add_argument("--json", type=Path, default=None, help="raw results (default bench/results/)")
    ap.add_argument("--origin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rate is None:
        args.rate = 2.0 if args.graphql else 0.2
    if args.origin:
        serve_origin(GraphQLOrigin(args.capacity, args.rate) if args.graphql else None)
        return 0
    if args.requests < 1 or args.accounts < 1 or args.rate <= 0:
        ap.error("--requests, --accounts and --rate must be > 0")
    if args.graphql and args.capacity < max(c for _, c in SHAPES) + 2:
        ap.error(f"--capacity must hold the dearest query and 2 points: >= {SHAPES[-1][1] + 2}")
    if args.processes is not None and not 1 <= args.processes <= args.accounts:
        ap.error("--processes must be between 1 and --accounts")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    command = shlex.join(["python3", "bench/queued.py", *(sys.argv[1:] if argv is None else argv)])
    nofile = raise_nofile(args.requests + 1024)
    started = time.strftime("%Y-%m-%d-%H%M%S")
    interval = 1.0 / (args.rate * 0.99)  # elbasy's default quota margin: 1 %
    # elbasy holds one fd per queued request (its client connection), the
    # clients one each: every elbasy process and its client process need
    # their share of N plus a few (listener, epoll, upstream connections, /healthz)
    room = nofile - FD_SPARE
    asked = args.requests
    needed = processes_needed(asked, args.accounts, room)
    k = args.processes = args.processes or needed
    limited = ""
    args.requests = most_that_fit(asked, args.accounts, k, room)
    if args.requests < asked:
        limited = (
            f"RLIMIT_NOFILE: hard limit {nofile} and no CAP_SYS_RESOURCE to raise it, "
            f"so at most {args.requests:,} of the {asked:,} requests asked for"
            + (f" in {k} processes" if k > 1 else "")
        )
        log(f"LIMITED: {limited}")
    split = ""
    if k > 1:
        why = (
            f"because one process holds at most RLIMIT_NOFILE fds (hard limit {nofile} here"
            + (", without CAP_SYS_RESOURCE to raise it" if nofile < asked + 1024 else "")
            + ") and a queued request is an fd in elbasy and one in its client"
            if needed > 1
            else "as asked (--processes; one would have held them all here)"
        )
        split = (
            f"Split over {k} elbasy processes, each with a client process of its own, {why}; "
            f"the accounts are partitioned (account a in process a mod {k}), so each is paced "
            "by one process."
        )
        log(split)
    per_account = -(-args.requests // args.accounts)
    hold = args.hold if args.hold is not None else 10 + args.requests / 2000
    procs: list[Proc] = []
    instances: list[Instance] = []
    results: dict = {"command": command, "started": started, "args": vars(args) | {"json": None}}
    results.update(requests_asked=asked, nofile=nofile, limited_by=limited or None)
    results["args"]["hold"] = hold
    mode = "GraphQL queries" if args.graphql else "requests"
    # which elbasy runs (PYTHONPATH, a checkout built in place) and, for GraphQL, whether
    # its estimate of each query agrees with the cost worked by hand (the origin's)
    found, disagree = estimator_check(args.elbasy_python)
    log(f"elbasy from {found['elbasy']}, its loop {found['loop']}")
    results["elbasy_from"] = {"package": found["elbasy"], "loop": found["loop"]}
    if args.graphql:
        results["shapes"] = [
            {"query": q, "requested": c, "actual": actual_cost(c), "elbasy_estimate": e}
            for (q, c), e in zip(SHAPES, found["costs"], strict=True)
        ]
        if disagree:
            log(f"elbasy's estimate differs from the documented cost: {disagree}")
        if args.capacity / args.rate > hold:
            log("the bucket takes longer to fill than the hold: the warm-up's 429 may still count")
    with tempfile.TemporaryDirectory(prefix="elbasy-queue-") as tmp:
        work = Path(tmp)
        try:
            # one origin for all: it sees the warm-up and, in the drain, elbasy's
            # upstream connections (at most 256 idle per process, plus those in use)
            ocmd = [sys.executable, str(Path(__file__).resolve()), "--origin"]
            if args.graphql:
                ocmd += ["--graphql", "--capacity", repr(args.capacity), "--rate", repr(args.rate)]
            origin = Proc("origin", ocmd, work, preexec_fn=_child_nofile)
            procs.append(origin)
            oport = int(origin.wait_line(r"origin listening on (\d+)", 20).group(1))
            if args.graphql:
                rule = GRAPHQL_RULE.format(
                    host=HOST,
                    path=GRAPHQL_PATH,
                    header=ACCOUNT_HEADER,
                    capacity=args.capacity,
                    rate=args.rate,
                )
            else:
                rule = RULE.format(host=HOST, header=ACCOUNT_HEADER, rate=args.rate)
            (work / "rule.toml").write_text(rule)
            chk = subprocess.run(
                [args.elbasy_python, "-m", "elbasy", "rules", "check", str(work / "rule.toml")],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if chk.returncode != 0:
                raise SystemExit(f"the bench rule does not check:\n{chk.stdout}{chk.stderr}")
            cmds = []
            for i in range(k):
                config = work / f"elbasy-{i}.toml"
                config.write_text(
                    f'connect_to = ["{HOST}:80:{LOOPBACK}:{oport}"]\n'
                    "max_wait = 600\n"
                    'log_level = "warning"\n'
                    f'data_dir = "{work / f"elbasy-{i}-data"}"\n\n' + rule
                )
                cmd = [args.elbasy_python, "-m", "elbasy", "--config", str(config)]
                cmd += ["--listen", f"{LOOPBACK}:0", "--max-wait", "600", "--log-level", "warning"]
                cmds.append(cmd)
                procs.append(Proc(f"elbasy-{i}", cmd, work, preexec_fn=_child_nofile))
            share = shares(args.requests, args.accounts, k)
            for i, proc in enumerate(procs[1:]):
                m = proc.wait_line(r"elbasy (\S+) listening on [0-9.]+:(\d+)", 30)
                version, port = m.group(1), int(m.group(2))
                mine = len(range(i, args.accounts, k))
                instances.append(Instance(i, proc, port, mine, share[i]))
                log(f"elbasy {version} on {port} (pid {proc.pid}), {mine:,} accounts")
            log(f"origin on {oport}")
            results["elbasy"] = {"version": version, "processes": k}
            results["load_start"] = loadavg()

            # 1. warm-up: every account held until its share of T0
            t0 = time.time() + 5 + args.accounts / 1000 + hold
            plan = Plan(
                args.requests,
                args.accounts,
                k,
                per_account,
                t0,
                interval,
                args.max_connecting,
                graphql=args.graphql,
                spread=args.capacity / args.rate if args.graphql else interval,
            )
            # accounts start spread over the time their bucket takes to fill (one
            # interval of a capacity-1 bucket), so the first departures are not all at T0
            schedule = (
                graphql_schedule(plan, args.capacity, args.rate)
                if args.graphql
                else per_account * interval
            )
            plan = replace(plan, schedule=schedule)
            results["schedule_s"] = schedule
            w0 = time.monotonic()
            for inst in instances:
                inst.start_client(plan)
            warmups = [inst.report("warm-up", 180) for inst in instances]
            warm_statuses = add_counts(w["statuses"] for w in warmups)
            warm_errors = add_counts(w["errors"] for w in warmups)
            log(
                f"warm-up: {sum(w['answered'] for w in warmups)} answers {warm_statuses} in "
                f"{time.monotonic() - w0:.1f} s, errors {warm_errors or 'none'}"
            )
            results["warmup"] = {"statuses": warm_statuses, "errors": warm_errors}
            if warm_statuses.get(429, 0) != args.accounts:
                raise SystemExit(f"warm-up: expected {args.accounts} 429s, got {warm_statuses}")
            time.sleep(1.0)
            for inst in instances:
                inst.measure("baseline")
            base_rss = sum(inst.rss["baseline"] for inst in instances)
            log(f"baseline RSS {base_rss} KiB; T0 in {t0 - time.time():.1f} s")

            # 2. the queue: N connections, one request each, every process at once
            q0 = time.monotonic()
            for inst in instances:
                assert inst.conn is not None
                inst.conn.send("queue")
            for inst in instances:
                inst.report("queue", max(0.0, t0 - time.time()) + 90)
            for inst in instances:
                inst.measure("queued")
                inst.waiting = inst.health["queued"]["held"]["waiting"]
                peak = inst.reports["queue"]
                if inst.waiting < peak["peak"]:  # departures began: memory at the peak instead
                    inst.waiting, inst.rss["queued"] = peak["peak"], peak["peak_rss"]
            waiting = sum(inst.waiting for inst in instances)
            queued_rss = sum(inst.rss["queued"] for inst in instances)
            full = [inst.reports["queue"]["full"] for inst in instances]
            connect_s = max(full) if all(full) else None
            client_errors = add_counts(inst.reports["queue"]["errors"] for inst in instances)
            log(
                f"queued: held.waiting {waiting} of {args.requests} "
                f"({'all' if connect_s else 'not all'}, {time.monotonic() - q0:.1f} s), "
                f"RSS {queued_rss} KiB, client errors {client_errors or 'none'}"
            )

            # holding them: what N idle queued requests cost until T0
            hold_start = time.monotonic()
            time.sleep(max(0.0, t0 - 0.5 - time.time()))
            hold_s = time.monotonic() - hold_start
            for inst in instances:
                inst.measure("drain", health=args.graphql)
            cpu_h = sum(inst.cpu["drain"] - inst.cpu["queued"] for inst in instances)
            log(f"holding {waiting} for {hold_s:.1f} s took {cpu_h:.2f} s CPU")

            # 3. drain: every account at its rate from T0
            for inst in instances:
                inst.report("drain", max(0.0, t0 - time.time()) + schedule + 90)
                inst.measure("end")
            answers = add_counts(inst.reports["drain"]["statuses"] for inst in instances)
            drained = max(inst.reports["drain"]["drained"] for inst in instances)
            log(f"drained {sum(answers.values())} answers {answers} {drained:.1f} s after T0")
            results["load_end"] = loadavg()
            if args.graphql:
                ostats = healthz(oport, STATS_PATH)
                results["origin"] = {"counts": ostats["counts"]}
                results["points"] = points_report(ostats, t0)
                log(f"origin: {ostats['counts']}; points {results['points']}")
        finally:
            for inst in instances:
                inst.stop_client()
            for p in reversed(procs):
                p.stop()
            logs = {p.name: p.log_tail(10) for p in procs}

    def total(phase: str) -> tuple[int, float]:
        return (
            sum(inst.rss[phase] for inst in instances),
            sum(inst.cpu[phase] for inst in instances),
        )

    (base_rss, base_cpu), (queued_rss, queued_cpu) = total("baseline"), total("queued")
    (_, drain_cpu0), (end_rss, end_cpu) = total("drain"), total("end")
    p50, p99 = lateness_summary([inst.lateness() for inst in instances])
    polls = [p for inst in instances for p in inst.reports["drain"]["polls"]]
    worst = max((p.get("late_ms_p99", 0.0) for p in polls), default=0.0)
    per_req = (queued_rss - base_rss) / waiting if waiting else 0.0
    departed = sum(inst.lateness().get("departures_timed", 0) for inst in instances)
    client_errors = add_counts(inst.reports["drain"]["errors"] for inst in instances)
    cpu_q, cpu_d = queued_cpu - base_cpu, end_cpu - drain_cpu0
    counters = ("woken_early", "server_throttled", "shed", "retried", "returned")
    pacing = {c: sum(inst.lateness().get(c, 0) for inst in instances) for c in counters}
    unanswered = sum(inst.reports["drain"]["unanswered"] for inst in instances)
    throttled_seen = sum(inst.reports["drain"]["throttled"] for inst in instances)
    results.update(
        pacing_counters=pacing,
        unanswered=unanswered,
        clients_saw_throttled=throttled_seen,
        baseline_rss_kib=base_rss,
        queued_rss_kib=queued_rss,
        end_rss_kib=end_rss,
        queued=waiting,
        queued_all=bool(connect_s),
        queue_seconds=connect_s,
        kib_per_queued=per_req,
        late_ms_p50_median=p50,
        late_ms_p99_max=p99,
        late_ms_p99_worst_poll=worst,
        cpu_connect_s=cpu_q,
        cpu_hold_s=cpu_h,
        hold_seconds=hold_s,
        cpu_drain_s=cpu_d,
        cpu_total_s=end_cpu,
        answers=answers,
        client_errors=client_errors,
        drain_seconds=drained,
        instances=[
            {
                "index": inst.index,
                "pid": inst.proc.pid,
                "port": inst.port,
                "cmd": cmds[inst.index],
                "accounts": inst.accounts,
                "share": inst.share,
                "queued": inst.waiting,
                "kib_per_queued": inst.kib_per_queued(),
                "rss_kib": inst.rss,
                "cpu_s": inst.cpu,
                "client": inst.reports,
                "healthz": inst.health,
            }
            for inst in instances
        ],
        logs=logs,
    )
    # with K processes: sums over them, and lateness from each one's /healthz
    of = f", sum of {k}" if k > 1 else ""
    late = (
        f"median of the {k} p50s / max of the {k} p99s, each over its last ≤10,000"
        if k > 1
        else "last ≤10,000"
    )
    if args.graphql:
        headroom = max(2, math.ceil(args.rate * 0.05 - 1e-9))
        bucket = [
            [
                "bucket per account (elbasy's rule and the origin)",
                f"{args.capacity:g} points, restored at {args.rate:g}/s (elbasy aims at "
                f"{0.99 * args.rate:.3f}/s and keeps {headroom} free); accounts start "
                f"spread over {plan.spread:.0f} s",
            ],
            [
                "queries (a mix per account)",
                f"{len(SHAPES)} shapes, requested "
                + " / ".join(str(c) for _, c in SHAPES)
                + " (worked by hand; elbasy's estimate "
                + (f"differs: {disagree}" if disagree else "agrees")
                + f"), actual {ACTUAL_PERCENT} %",
            ],
        ]
    else:
        bucket = [
            [
                "bucket per account",
                f"capacity 1, rate {args.rate:g}/s (elbasy aims at {1 / interval:.3f}/s)",
            ]
        ]
    rows = [
        [f"{mode} queued (held.waiting{of})", f"{waiting:,} of {args.requests:,}"],
        ["accounts × requests each", f"{args.accounts:,} × {per_account}"],
        *(
            [["elbasy processes (account a in process a mod K)", f"{k}, a client process each"]]
            if k > 1
            else []
        ),
        *bucket,
        ["time to queue them all", f"{connect_s:.1f} s" if connect_s else "not all queued"],
        [
            f"elbasy RSS baseline → queued{of}",
            f"{base_rss / 1024:.1f} → {queued_rss / 1024:.1f} MiB",
        ],
        ["**memory per queued request**", f"**{per_req:.2f} KiB** (target ≤ 4 KiB)"],
        [f"departures timed (pacing{of})", f"{departed:,}"],
        [f"**departure lateness p50 / p99** ({late})", f"**{p50} / {p99} ms**"],
        [
            "worst p99 seen during the drain (2 s polls"
            + (f" of each of the {k})" if k > 1 else ")"),
            f"{worst} ms",
        ],
        ["answers to the clients", ", ".join(f"{s}: {n:,}" for s, n in answers.items())],
        ["left unanswered at the end of the drain", f"{unanswered:,}"],
        ["drain: T0 → last answer", f"{drained:.1f} s (schedule: {schedule:.1f} s)"],
        [
            f"elbasy CPU{of}: queueing them",
            f"{cpu_q:.1f} s ({1e6 * cpu_q / max(1, waiting):.0f} µs per request)",
        ],
        [
            f"elbasy CPU{of}: holding them (queue full → T0)",
            f"{cpu_h:.2f} s in {hold_s:.1f} s",
        ],
        [
            f"elbasy CPU{of}: the drain (T0 → end)",
            f"{cpu_d:.1f} s ({1e6 * cpu_d / max(1, departed):.0f} µs per departure)",
        ],
        [f"elbasy CPU, whole run{of}", f"{end_cpu:.1f} s"],
        ["client errors", ", ".join(f"{e}: {n}" for e, n in client_errors.items()) or "none"],
    ]
    if args.graphql:
        pts, oc = results.get("points", {}), results.get("origin", {}).get("counts", {})
        rows += [
            [
                f"**woken early by a refund** (pacing.woken_early{of})",
                f"**{pacing['woken_early']:,}**",
            ],
            [
                "**THROTTLED at the origin** (answers with a THROTTLED body the clients saw)",
                f"**{oc.get('throttled', 0):,}** ({throttled_seen:,})",
            ],
            [
                f"elbasy's pacing.server_throttled{of} (the warm-up's 429s count here)",
                f"{pacing['server_throttled']:,} (warm-up 429s: {oc.get('warmup_429', 0):,})",
            ],
            [
                "queries the origin ran (unknown queries)",
                f"{oc.get('accepted', 0):,} ({oc.get('unknown_query', 0):,})",
            ],
        ]
        if pts:
            rows += [
                [
                    "**points spent / allowed per account**: Σ actual ÷ (capacity + rate × "
                    "(last − first accepted query)), median [min–max]",
                    f"**{100 * pts['used_of_allowed_median']:.1f} %** "
                    f"[{100 * pts['used_of_allowed_min']:.1f}–"
                    f"{100 * pts['used_of_allowed_max']:.1f} %] "
                    f"({pts['spent_median']:g} of {pts['allowed_median']:.1f} points)",
                ],
                [
                    "the same for an ideal pacer (each query sent the moment the origin's "
                    "bucket holds it), median [min]",
                    f"{100 * pts['ideal_used_of_allowed_median']:.1f} % "
                    f"[{100 * pts['ideal_used_of_allowed_min']:.1f} %]",
                ],
                [
                    "each account's last query, behind the ideal pacer's: median / p99 / max",
                    f"{pts['last_accept_behind_ideal_s_median']:.2f} / "
                    f"{pts['last_accept_behind_ideal_s_p99']:.2f} / "
                    f"{pts['last_accept_behind_ideal_s_max']:.2f} s",
                ],
                [
                    "points free beyond its cost when a query arrived after a wait "
                    "(≥ 50 ms after the account's previous): median [min–p99]",
                    f"{pts['slack_after_wait_median']:.2f} "
                    f"[{pts['slack_after_wait_min']:.2f}–{pts['slack_after_wait_p99']:.2f}] "
                    f"over {pts['slack_after_wait_n']:,} queries"
                    if pts["slack_after_wait_n"]
                    else "none waited",
                ],
                [
                    "fullest bucket (points in use at most, of the capacity): max / median",
                    f"{pts['peak_used_max']:.1f} / {pts['peak_used_median']:.1f}",
                ],
                [
                    "origin's first / last accepted query after T0",
                    f"{pts['first_accept_after_t0_s']:.2f} / {pts['last_accept_after_t0_s']:.1f} s",
                ],
            ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    if k > 1:
        table += (
            "\n\n| elbasy process | accounts | queued (held.waiting) | RSS baseline → queued "
            "| per queued request | lateness p50 / p99 | departures timed |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        table += "\n".join(
            f"| {inst.index} | {inst.accounts:,} | {inst.waiting:,} of {inst.share:,} "
            f"| {inst.rss['baseline'] / 1024:.1f} → {inst.rss['queued'] / 1024:.1f} MiB "
            f"| {inst.kib_per_queued():.2f} KiB "
            f"| {inst.lateness().get('late_ms_p50', '-')} / "
            f"{inst.lateness().get('late_ms_p99', '-')} ms "
            f"| {inst.lateness().get('departures_timed', 0):,} |"
            for inst in instances
        )
    whose = f"summed over the {k} elbasy processes" if k > 1 else "elbasy's one process"
    first = f", {k} processes, each its own config, data dir and port; the first" if k > 1 else ""
    text = "\n".join(
        [
            f"# elbasy queue benchmark{', GraphQL' if args.graphql else ''}, {started}",
            "",
            table,
            "",
            *([f"**Fewer requests than asked:** {limited}.", ""] if limited else []),
            "Memory per queued request: (VmRSS with every request held − VmRSS after the "
            f"warm-up) / held.waiting, {whose}: its connection object and buffers, "
            "the policy's Python objects (request head, exchange, pacing state, reservation, "
            "verdict), its timer entry. Kernel memory (socket buffers, the socket and file "
            "objects, epoll entries) is not in RSS. Lateness: how long after its scheduled "
            "time a held request left (the loop's timer, epoll's millisecond timeout "
            "included), over the last 10,000 departures.",
            *(
                [
                    "",
                    "GraphQL: each query's body is read before it is priced and held, and "
                    "stays in its connection's read buffer until it leaves. The origin keeps "
                    "the bucket per account as Shopify documents it (requested must be "
                    "available before the query runs, requested − actual comes back after "
                    "it) and answers each query with extensions.cost (requestedQueryCost, "
                    "actualQueryCost, throttleStatus); elbasy reads the refund and the "
                    "server's view from that body. Points allowed: what the bucket let "
                    "through between an account's first and last accepted query (its "
                    "capacity, full at the first, plus rate × the time between); the ideal "
                    "pacer's figure is the most any pacer could spend of it with the same "
                    "queries in the same order.",
                ]
                if args.graphql
                else []
            ),
            *(["", split] if split else []),
            "",
            *machine_lines(),
            f"- load average at start {results['load_start']}, at end {results['load_end']}",
            f"- elbasy {version}{first}: `{shlex.join(cmds[0])}`",
            f"- elbasy from `{found['elbasy']}`, its loop `{found['loop']}`",
            f"- command: `{command}`",
        ]
    )
    print(text)
    out = args.json or RESULTS_DIR / f"{started}-queue{'-graphql' if args.graphql else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    log(f"results in {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
