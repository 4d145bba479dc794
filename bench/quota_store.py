#!/usr/bin/env python3
"""What the quota store costs a paced request, end to end: shm beside Redis.

Run it as::

    python3 bench/quota_store.py                  # 3 rounds, 5 s cells
    python3 bench/quota_store.py --rounds 2 --seconds 4
    python3 bench/quota_store.py --quick          # 1 round, 2 s cells

Everything runs on 127.0.0.1: an nginx origin over TLS (one worker, a
100-byte answer from ``return 200``), a ``redis-server`` of its own on a
free port, and elbasy intercepting every request of the load. A rule of the
bench's own (``bench-api``, given in a config file as a user's ``[[rule]]``)
covers ``*.api.bench.test`` with a bucket per tenant (the first label of
the host) of 10 million requests refilled at a million a second: every
request takes the whole quota path (a reservation, its confirmation at the
departure, the landing when its answer comes) and none waits for its quota, so
what the cells differ by is the store, not the pacing. ``*.plain.bench.test`` is
intercepted too (``--intercept``) but no rule covers it: the same TLS hops
and relaying with no quota step at all.

Cells, each with the same load and the same elbasy options but these:

* ``plain``: the uncovered hosts, ``--workers 2`` (no quota step);
* ``shm``: the covered hosts, ``--workers 2``, the default store (one table
  in shared memory);
* ``redis``: the covered hosts, ``--workers 2``, ``--quota-store
  redis://127.0.0.1:PORT/0``;
* ``redis-w1`` and ``shm-w1``: the same two stores with one worker.

The load is ``--accounts`` hey processes at once, one per tenant, with
``--concurrency`` keep-alive clients in all (50 and 50 by default: one
client per tenant), each ``hey -z SECONDS -x http://ELBASY
https://tI.api.bench.test/100b`` (hey does not verify the leaf elbasy mints,
so the client's TLS costs the same in every cell). One client per tenant is
the store's cost alone: elbasy keeps one line per account, and with Redis a
request behind another of its account waits for that one to leave, then
asks when it may go (``earliest``) and confirms (two round trips, one after
the other), so ``--accounts 10`` (five clients a tenant) measures those
lines too; ``steps/req`` above 3 (reserve, confirm, landed) and ``timed``
(the pacer's ``departures_timed``) show them.

Requests per second are the requests elbasy took (its workers'
``requests_total`` in ``/healthz``) in a window of ``--seconds`` that opens
a second after the last hey process started and closes at least a
second before they stop; CPU is user + system time of elbasy's process tree (the
supervisor and its workers) over that window, divided by those requests,
and for the Redis cells the same for ``redis-server``. p50 and p99 are over
every request of hey's runs, merged from each hey's percentiles by their
counts; errors are hey's (any non-2xx or failed request) and the counters'
(shed, late or lost answers, fallbacks, requests not paced). The window's
counters are sums over the workers, each read before and after it (new
connections to ``/healthz`` until every worker has answered): paced, held
(requests the loop held: with Redis, each one waits for its store's
answer), timed (the pacer's ``departures_timed``) and, with Redis, the
store's ``steps_sent``, ``writes``, ``late_answers``, ``fallbacks`` and
``lost_answers``.

Each round starts every cell afresh (its own elbasy, a new data dir, an
empty Redis database), with one uncounted second of load first
(``--warmup``), in an order that rotates round by round. The table shows the
median over the rounds and their range. Every process started is stopped at
the end, also on Ctrl-C or SIGTERM; every wait is bounded (hey's ``-z`` and
a subprocess timeout, deadlines for the start of each process, a count for
the ``/healthz`` connections).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import origins  # noqa: E402  (tests/origins.py: the test CA and leaf)
from redis_server import RedisServer  # noqa: E402

LOOPBACK = "127.0.0.1"
PACED_DOMAIN = "api.bench.test"
PLAIN_DOMAIN = "plain.bench.test"
BODY = "elbasy quota store bench: 100 bytes".ljust(99, ".") + "\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: the bench's own rule: a bucket per tenant far beyond any load two cores
#: can offer, so every request is paced and none waits for its quota
RULE = f"""\
[[rule]]
id = "bench-api"
provider = "elbasy bench"
description = "one bucket per tenant, far above the load: every request paced, none waits for quota"
version = 1

[rule.match]
hosts = ["*.{PACED_DOMAIN}"]
path = '^/'

[[rule.account.parts]]
name = "tenant"
from = "host"
pattern = '^(?P<v>[^.]+)\\.api\\.bench\\.test$'

[[rule.limits]]
name = "bench-bucket"
kind = "bucket"
unit = "requests"
capacity = 10000000
rate = 1000000
source = "bench/quota_store.py: far above the offered load"
"""


@dataclass(frozen=True)
class Cell:
    name: str
    covered: bool
    store: str  # "shm" or "redis"
    workers: int
    what: str


CELLS = {
    c.name: c
    for c in (
        Cell("plain", False, "shm", 2, "not covered: interception only, no quota step"),
        Cell("shm", True, "shm", 2, "covered, shared-memory store"),
        Cell("redis", True, "redis", 2, "covered, Redis store"),
        Cell("redis-w1", True, "redis", 1, "covered, Redis store"),
        Cell("shm-w1", True, "shm", 1, "covered, shared-memory store"),
    )
}
DEFAULT_CELLS = "plain,shm,redis,redis-w1,shm-w1"


class Stop(Exception):
    """SIGTERM: leave through the finally blocks, which stop every process."""


def _on_term(signum: int, _frame: object) -> None:
    raise Stop(f"signal {signum}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


# --------------------------------------------------------------------------
# processes: each in a session of its own, stopped with everything it forked


class Child:
    def __init__(self, name: str, cmd: list[str], workdir: Path) -> None:
        self.name = name
        self.logpath = workdir / f"{name}.log"
        self._log = open(self.logpath, "wb")  # closed in stop()
        self.popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.logpath.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to its process group (elbasy drains its workers), SIGKILL after 10 s."""
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for 10 s: SIGKILL")
        try:
            os.killpg(self.pid, signal.SIGKILL)  # whatever of the group is left
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log(f"{self.name} (pid {self.pid}) did not exit after SIGKILL")
        self._log.close()


def tree_cpu_s(root: int) -> float:
    """User + system seconds of a process and its descendants (threads included),
    plus the root's reaped children, so a worker that was replaced still counts."""
    parent: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        stats[int(entry)] = fields
    ticks = 0
    for pid, fields in stats.items():
        p = pid
        for _ in range(64):  # bounded walk up to the root
            if p == root:
                ticks += int(fields[11]) + int(fields[12])
                if pid == root:
                    ticks += int(fields[13]) + int(fields[14])
                break
            p = parent.get(p, 0)
            if p <= 1:
                break
    return ticks / CLK_TCK


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def cpu_idle() -> tuple[int, int]:
    """(idle ticks, all ticks) of the machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    return parts[3] + parts[4], sum(parts)


# --------------------------------------------------------------------------
# the origin


def start_origin(workdir: Path) -> tuple[Child, int, Path]:
    """nginx over TLS for both domains, one worker, a 100-byte answer; (child, port, CA)."""
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if nginx is None:
        raise SystemExit("nginx not found (apt-get install nginx): it is the bench's origin")
    ca = origins.make_ca(workdir)
    cert, key = origins.make_leaf(
        ca, workdir, names=(f"*.{PACED_DOMAIN}", f"*.{PLAIN_DOMAIN}"), ips=(LOOPBACK,)
    )
    port = free_port()
    ngx = workdir / "nginx"
    ngx.mkdir()
    conf = ngx / "nginx.conf"
    temp = "\n".join(
        f"    {kind}_temp_path {ngx}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf.write_text(f"""\
worker_processes 1;
daemon off;
master_process on;
pid {ngx}/nginx.pid;
error_log {ngx}/error.log crit;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 600s;
    keepalive_requests 100000000;
{temp}
    server {{
        listen {LOOPBACK}:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        default_type text/plain;
        location / {{ return 200 "{BODY.rstrip()}\\n"; }}
    }}
}}
""")
    child = Child("nginx-origin", [nginx, "-c", str(conf), "-p", str(ngx)], workdir)
    if not wait_port(port, 15):
        child.stop()
        raise SystemExit(f"the nginx origin did not start:\n{child.tail()}")
    return child, port, ca.path


# --------------------------------------------------------------------------
# elbasy


LISTENING = re.compile(r"elbasy (\S+) listening on 127\.0\.0\.1:(\d+)")


def start_elbasy(
    cell: Cell, workdir: Path, tag: str, origin_port: int, origin_ca: Path, redis_url: str
) -> tuple[Child, int, str]:
    """elbasy for one cell, on a free port, with a data dir of its own; (child, port, version)."""
    config = workdir / "elbasy.toml"
    if not config.exists():
        config.write_text(RULE)
    cmd = [sys.executable, "-m", "elbasy", "--listen", f"{LOOPBACK}:0"]
    cmd += ["--log-level", "warning", "--config", str(config), "--rules", "bench-api"]
    cmd += ["--intercept", f"*.{PLAIN_DOMAIN}", "--upstream-ca", str(origin_ca)]
    cmd += ["--data-dir", str(workdir / f"data-{tag}"), "--workers", str(cell.workers)]
    for domain in (PACED_DOMAIN, PLAIN_DOMAIN):
        cmd += ["--connect-to", f"*.{domain}:443:{LOOPBACK}:{origin_port}"]
    if cell.store == "redis":
        cmd += ["--quota-store", redis_url]
    child = Child(f"elbasy-{tag}", cmd, workdir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and child.alive():
        m = LISTENING.search(child.logpath.read_text(errors="replace"))
        if m:
            return child, int(m.group(2)), m.group(1)
        time.sleep(0.05)
    child.stop()
    raise RuntimeError(f"elbasy ({cell.name}) printed no 'listening on' line:\n{child.tail()}")


def _healthz_once(port: int) -> dict[str, Any]:
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: elbasy\r\nConnection: close\r\n\r\n")
        buf = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got = s.recv(65536)
            if not got:
                break
            buf += got
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"/healthz answered {head[:80]!r}")
    return dict(json.loads(body))


def healthz_all(port: int, workers: int) -> dict[int, dict[str, Any]]:
    """Every worker's /healthz: new connections (the kernel spreads them over the
    workers' SO_REUSEPORT sockets) until each slot has answered, 400 at most."""
    seen: dict[int, dict[str, Any]] = {}
    asked: dict[int, int] = {}
    for _ in range(400):
        h = _healthz_once(port)
        slot = int(h["worker"])
        asked[slot] = asked.get(slot, 0) + 1
        seen.setdefault(slot, h)
        if len(seen) >= workers:
            for slot, n in asked.items():
                seen[slot]["asked"] = n
            return seen
    raise RuntimeError(f"only workers {sorted(seen)} of {workers} answered /healthz")


#: the counters of each worker's /healthz the bench takes the difference of
PACING_KEYS = ("paced", "shed", "woken_early", "store_full", "departures_timed")
QUOTA_KEYS = (
    "steps_sent",
    "writes",
    "late_answers",
    "lost_answers",
    "fallbacks",
    "local_steps",
    "script_reloads",
)


def counters(health: dict[int, dict[str, Any]]) -> dict[str, float]:
    """The sums over the workers of the counters the bench reads, and how many
    /healthz requests it took to reach them all (``healthz_asked``)."""
    out: dict[str, float] = {"healthz_asked": float(sum(h["asked"] for h in health.values()))}
    for h in health.values():
        out["requests"] = out.get("requests", 0) + float(h["connections"]["requests_total"])
        out["held"] = out.get("held", 0) + float(h.get("held", {}).get("total", 0))
        for k in PACING_KEYS:
            out[k] = out.get(k, 0) + float(h.get("pacing", {}).get(k, 0))
        for k in QUOTA_KEYS:
            v = h.get("quota", {}).get(k)
            if isinstance(v, int | float):
                out[k] = out.get(k, 0) + float(v)
    return out


# --------------------------------------------------------------------------
# the load


HEY_PCT = re.compile(r"^\s+(\d+)% in ([0-9.]+) secs", re.M)


def parse_hey(text: str) -> dict[str, Any]:
    codes = {
        int(c): int(n) for c, n in re.findall(r"^\s+\[(\d{3})\]\s+(\d+) responses", text, re.M)
    }
    errors: list[tuple[int, str]] = []
    m = re.search(r"Error distribution:\n(.*)", text, re.S)
    if m:
        errors = [(int(n), t[:200]) for n, t in re.findall(r"^\s+\[(\d+)\]\s+(.*)$", m[1], re.M)]
    pct = {int(p): float(v) for p, v in HEY_PCT.findall(text)}
    fastest = re.search(r"Fastest:\s+([0-9.]+) secs", text)
    slowest = re.search(r"Slowest:\s+([0-9.]+) secs", text)
    total = re.search(r"Total:\s+([0-9.]+) secs", text)
    return {
        "ok": sum(n for c, n in codes.items() if 200 <= c < 300),
        "codes": codes,
        "errors": errors,
        "total_s": float(total[1]) if total else 0.0,
        # the CDF's points this hey printed: (latency, fraction of its requests)
        "cdf": ([(float(fastest[1]), 0.0)] if fastest else [])
        + [(v, p / 100) for p, v in sorted(pct.items())]
        + ([(float(slowest[1]), 1.0)] if slowest else []),
    }


def merged_quantile(runs: list[dict[str, Any]], q: float) -> float:
    """The q-quantile of all the runs' requests together: each run's CDF is
    linear between the points hey printed, and weighs by its 2xx count."""
    parts = [(r["ok"], r["cdf"]) for r in runs if r["ok"] and len(r["cdf"]) >= 2]
    if not parts:
        return float("nan")
    total = sum(n for n, _ in parts)

    def below(x: float) -> float:
        got = 0.0
        for n, cdf in parts:
            if x >= cdf[-1][0]:
                got += n
                continue
            for (x0, f0), (x1, f1) in zip(cdf, cdf[1:], strict=False):
                if x < x1:
                    frac = 0.0 if x <= x0 else (x - x0) / (x1 - x0) if x1 > x0 else 1.0
                    got += n * (f0 + (f1 - f0) * frac) if x >= x0 else 0.0
                    break
        return float(got / total)

    lo = float(min(cdf[0][0] for _, cdf in parts))
    hi = float(max(cdf[-1][0] for _, cdf in parts))
    for _ in range(60):  # bisection: 60 halvings are below any hey step
        mid = (lo + hi) / 2
        if below(mid) < q:
            lo = mid
        else:
            hi = mid
    return hi


class Load:
    """``accounts`` hey processes at once, one tenant each, ``concurrency``
    keep-alive clients in all, each running ``seconds``; :meth:`finish` reads
    their results (and kills any that overran), :meth:`kill` is the net."""

    def __init__(
        self, port: int, domain: str, accounts: int, concurrency: int, seconds: float
    ) -> None:
        self.seconds = seconds
        self.procs: list[subprocess.Popen[str]] = []
        per = [concurrency // accounts + (i < concurrency % accounts) for i in range(accounts)]
        try:
            for i, c in enumerate(per):
                cmd = ["hey", "-z", f"{seconds:g}s", "-c", str(c), "-t", "10"]
                cmd += ["-x", f"http://{LOOPBACK}:{port}", f"https://t{i}.{domain}/100b"]
                self.procs.append(
                    subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                )
        except BaseException:
            self.kill()
            raise
        self.started = time.monotonic()  # when the last one was started

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def finish(self) -> list[dict[str, Any]]:
        out = []
        deadline = self.started + self.seconds + 30
        try:
            for p in self.procs:
                try:
                    stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    stdout, stderr = p.communicate(timeout=5)
                    stderr += " (hey did not finish in time: killed)"
                res = parse_hey(stdout)
                if not res["ok"]:
                    res["errors"].append((1, f"no 2xx (hey exit {p.returncode}): {stderr[:200]}"))
                out.append(res)
        finally:
            self.kill()
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)


# --------------------------------------------------------------------------
# one cell


@dataclass
class Run:
    cell: str
    round: int
    rps: float = 0.0
    ok: int = 0  # 2xx answers hey counted over its whole run
    requests: int = 0  # requests elbasy took in the measured window
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    cpu_us: float = float("nan")  # elbasy's tree, per request of the window
    redis_cpu_us: float | None = None
    errors: list[str] = field(default_factory=list)
    delta: dict[str, float] = field(default_factory=dict)
    idle: float = float("nan")  # the machine's idle share during the run
    load: str = ""
    version: str = ""


#: the load runs this long before the measured window opens (after the last
#: hey process has started) and after it closes, so the window sees every
#: client at work and none of hey's ramp-up or ending
SETTLE_S = 1.0


def run_cell(
    cell: Cell,
    rnd: int,
    args: argparse.Namespace,
    workdir: Path,
    origin: tuple[int, Path],
    redis: RedisServer,
) -> Run:
    tag = f"{cell.name}-r{rnd}"
    elbasy, port, version = start_elbasy(cell, workdir, tag, *origin, redis.url)
    run = Run(cell.name, rnd, version=version)
    domain = PACED_DOMAIN if cell.covered else PLAIN_DOMAIN
    load: Load | None = None
    try:
        if cell.store == "redis":
            import redis as redis_client

            with redis_client.Redis.from_url(redis.url) as r:
                r.flushdb()  # every Redis cell starts from the same empty store
        if args.warmup > 0:  # leaves minted, upstream pools full, scripts loaded
            Load(port, domain, args.accounts, args.concurrency, args.warmup).finish()
        load = Load(port, domain, args.accounts, args.concurrency, args.seconds + 2 * SETTLE_S + 1)
        time.sleep(SETTLE_S)
        before = counters(healthz_all(port, cell.workers))
        cpu0, rcpu0, idle0 = tree_cpu_s(elbasy.pid), tree_cpu_s(redis.proc.pid), cpu_idle()
        t0 = time.monotonic()
        time.sleep(args.seconds)
        cpu1, rcpu1, idle1 = tree_cpu_s(elbasy.pid), tree_cpu_s(redis.proc.pid), cpu_idle()
        t1 = time.monotonic()
        after = counters(healthz_all(port, cell.workers))
        whole = load.running()  # every client was still at work when the window closed
        runs = load.finish()
        if not elbasy.alive():
            raise RuntimeError(f"elbasy exited during the run:\n{elbasy.tail()}")
        run.delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        # the window's requests, less the /healthz ones the first reading took
        # after each worker's answer (a count off by one per worker at most)
        run.requests = int(run.delta.get("requests", 0) - before.get("healthz_asked", 0))
        run.rps = run.requests / (t1 - t0)
        run.ok = sum(r["ok"] for r in runs)
        run.p50_ms = merged_quantile(runs, 0.50) * 1000
        run.p99_ms = merged_quantile(runs, 0.99) * 1000
        if run.requests > 0:
            run.cpu_us = (cpu1 - cpu0) / run.requests * 1e6
            if cell.store == "redis":
                run.redis_cpu_us = (rcpu1 - rcpu0) / run.requests * 1e6
        run.idle = (idle1[0] - idle0[0]) / max(1, idle1[1] - idle0[1])
        run.load = loadavg()
        if not whole:
            run.errors.append("a hey process ended before the window closed")
        for r in runs:
            for code, n in r["codes"].items():
                if not 200 <= code < 300:
                    run.errors.append(f"{n} × HTTP {code}")
            run.errors += [f"{n} × {text}" for n, text in r["errors"]]
        # what the counters must say when nothing went wrong
        paced = run.delta.get("paced", 0)
        if cell.covered and abs(paced - run.requests) > args.concurrency + 10:
            run.errors.append(f"paced {paced:.0f} against {run.requests} requests")
        if not cell.covered and paced:
            run.errors.append(f"paced {paced:.0f} in the uncovered cell")
        for k in ("shed", "store_full", "late_answers", "lost_answers", "fallbacks"):
            if run.delta.get(k):
                run.errors.append(f"{k} {run.delta[k]:.0f}")
    finally:
        if load is not None:
            load.kill()
        elbasy.stop()
    return run


# --------------------------------------------------------------------------
# the report


def med(values: list[float]) -> float:
    vals = [v for v in values if v == v]  # NaN out
    return statistics.median(vals) if vals else float("nan")


def span(values: list[float], fmt: str) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "—"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(med(vals), fmt)} [{format(min(vals), fmt)}–{format(max(vals), fmt)}]"


def report(runs: list[Run], args: argparse.Namespace, cells: list[Cell], redis_version: str) -> str:
    lines = []
    version = next((r.version for r in runs if r.version), "?")
    lines.append(
        f"elbasy {version}, redis-server {redis_version}, {os.cpu_count()} cores; "
        f"{args.rounds} round(s) of {args.seconds:g} s cells, {args.accounts} tenants × "
        f"{args.concurrency} keep-alive clients in all (hey), warm-up {args.warmup:g} s"
    )
    lines.append("")
    head = "| cell | workers | store | req/s | p50 ms | p99 ms | elbasy CPU µs/req"
    head += " | redis CPU µs/req | steps/req | steps/write | errors |"
    lines += [head, "|" + "---|" * 11]
    by = {c.name: [r for r in runs if r.cell == c.name] for c in cells}
    for c in cells:
        rs = by[c.name]
        if not rs:
            continue
        store = "none (uncovered)" if not c.covered else c.store
        steps = per_req = "—"
        if c.store == "redis" and c.covered:
            deltas = [r.delta for r in rs]
            steps = span(
                [x.get("steps_sent", 0) / x["writes"] for x in deltas if x.get("writes")], ".2f"
            )
            per_req = span(
                [x.get("steps_sent", 0) / x["paced"] for x in deltas if x.get("paced")], ".2f"
            )
        rcpu = span([r.redis_cpu_us for r in rs if r.redis_cpu_us is not None], ".1f")
        nerr = sum(len(r.errors) for r in rs)
        lines.append(
            f"| {c.name} | {c.workers} | {store} | {span([r.rps for r in rs], ',.0f')} | "
            f"{span([r.p50_ms for r in rs], '.2f')} | {span([r.p99_ms for r in rs], '.2f')} | "
            f"{span([r.cpu_us for r in rs], '.1f')} | {rcpu if c.store == 'redis' else '—'} | "
            f"{per_req} | {steps} | {nerr} |"
        )
    lines.append("")
    for num, den in (("redis", "shm"), ("redis-w1", "shm-w1"), ("shm", "plain")):
        if by.get(num) and by.get(den):
            rps = med([r.rps for r in by[num]]) / med([r.rps for r in by[den]])
            cpu = med([r.cpu_us for r in by[num]]) / med([r.cpu_us for r in by[den]])
            gap = med([r.cpu_us for r in by[num]]) - med([r.cpu_us for r in by[den]])
            text = (
                f"{num} / {den}: throughput ×{rps:.2f}, elbasy CPU per request ×{cpu:.2f} "
                f"({gap:+.1f} µs)"
            )
            if CELLS[num].store == "redis":
                both = med([r.cpu_us + (r.redis_cpu_us or 0.0) for r in by[num]])
                base = med([r.cpu_us for r in by[den]])
                text += f", elbasy + redis-server ×{both / base:.2f} ({both - base:+.1f} µs)"
            lines.append(text)
    lines.append("")
    lines.append("Per run (the Redis store's counters are the sums over the workers' /healthz):")
    for r in runs:
        d = r.delta
        extra = ""
        if CELLS[r.cell].store == "redis" and CELLS[r.cell].covered:
            extra = (
                f"; steps_sent {d.get('steps_sent', 0):.0f}, writes {d.get('writes', 0):.0f}, "
                f"late_answers {d.get('late_answers', 0):.0f}, "
                f"fallbacks {d.get('fallbacks', 0):.0f}, lost {d.get('lost_answers', 0):.0f}"
            )
        lines.append(
            f"- round {r.round} {r.cell}: {r.requests} requests in the window, {r.rps:,.0f}/s, "
            f"{r.ok} × 2xx over hey's run; paced "
            f"{d.get('paced', 0):.0f}, held {d.get('held', 0):.0f}, timed "
            f"{d.get('departures_timed', 0):.0f}, "
            f"shed {d.get('shed', 0):.0f}{extra}; machine idle "
            f"{r.idle:.0%}, load {r.load}"
            + (f"; ERRORS: {'; '.join(r.errors[:5])}" if r.errors else "")
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, help="load per cell and round (default 5)")
    ap.add_argument("--rounds", type=int, help="rounds of every cell (default 3)")
    ap.add_argument("--warmup", type=float, help="uncounted load before each cell (default 1)")
    ap.add_argument("--quick", action="store_true", help="1 round, 2 s cells, 0.5 s warm-up")
    ap.add_argument("--concurrency", type=int, default=50, help="hey clients in all")
    ap.add_argument("--accounts", type=int, default=50, help="tenants: one hey process each")
    ap.add_argument("--cells", default=DEFAULT_CELLS, help=f"subset of {','.join(CELLS)}")
    ap.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = ap.parse_args(argv)
    quick = args.quick
    args.seconds = args.seconds if args.seconds is not None else 2.0 if quick else 5.0
    args.rounds = args.rounds if args.rounds is not None else 1 if quick else 3
    args.warmup = args.warmup if args.warmup is not None else 0.5 if quick else 1.0
    if not (0 < args.seconds <= 120 and 1 <= args.rounds <= 20 and 0 <= args.warmup <= 30):
        ap.error("--seconds in (0, 120], --rounds in [1, 20], --warmup in [0, 30]")
    if not 1 <= args.accounts <= args.concurrency <= 2000:
        ap.error("1 <= --accounts <= --concurrency <= 2000")
    unknown = [c for c in args.cells.split(",") if c not in CELLS]
    if unknown:
        ap.error(f"unknown cells {unknown}; known: {','.join(CELLS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("hey") is None:
        raise SystemExit("hey not found (apt-get install hey): it is the bench's client")
    cells = [CELLS[c] for c in args.cells.split(",")]
    signal.signal(signal.SIGTERM, _on_term)
    runs: list[Run] = []
    redis_version = "?"
    workdir = Path(tempfile.mkdtemp(prefix="elbasy-quota-bench-"))
    origin: Child | None = None
    redis: RedisServer | None = None
    try:
        origin, origin_port, origin_ca = start_origin(workdir)
        redis = RedisServer()
        import redis as redis_client

        with redis_client.Redis.from_url(redis.url) as r:
            redis_version = str(r.info("server")["redis_version"])
        log(f"origin nginx on :{origin_port}, redis-server {redis_version} on :{redis.port}")
        for rnd in range(1, args.rounds + 1):
            shift = (rnd - 1) % len(cells)
            for cell in cells[shift:] + cells[:shift]:
                log(f"round {rnd}: {cell.name} ({cell.what}, --workers {cell.workers})")
                try:
                    run = run_cell(cell, rnd, args, workdir, (origin_port, origin_ca), redis)
                except RuntimeError as exc:  # this cell is out this round; the rest go on
                    log(f"  {cell.name} failed: {exc}")
                    run = Run(cell.name, rnd, rps=float("nan"), errors=[str(exc)[:300]])
                log(
                    f"  {run.rps:,.0f} req/s, p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms, "
                    f"{run.cpu_us:.1f} µs CPU/req"
                    + (f", errors: {run.errors[:3]}" if run.errors else "")
                )
                runs.append(run)
    except (KeyboardInterrupt, Stop) as exc:
        log(f"interrupted ({exc or 'Ctrl-C'}): the table has what was measured so far")
    finally:
        if redis is not None:
            redis.stop()
        if origin is not None:
            origin.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if runs:
        print(report(runs, args, cells, redis_version))
        if args.json:
            args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1, default=str))
    return 0 if runs and not any(r.errors for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
