#!/usr/bin/env python3
"""elbasy with many requests queued: memory per queued request, departure lateness.

Standard-library Python. Starts a tiny origin (asyncio, in a process of its
own) and elbasy with a user rule for the made-up host ``api.bench.test``
(one bucket per account, read from ``X-Bench-Account``), then:

1. warm-up: one request per account, which the origin answers 429 with a
   Retry-After that ends at a common start time T0 (staggered by account
   over one interval of the bucket). elbasy holds every account until then,
   so nothing the clients send next can leave before T0, and the buckets,
   rule caches and pools exist before the baseline;
2. baseline: elbasy's RSS (``VmRSS`` of its one process) after the warm-up;
3. queue: N client connections (one request each, ``--accounts`` accounts
   round robin), from source addresses 127.0.0.2..127.0.0.9, until
   ``/healthz`` shows ``held.waiting == N`` (or T0 comes): RSS again;
4. drain: from T0 every account sends at its bucket's rate; each client
   closes on its answer. ``pacing.late_ms_p50/p99`` (how long after its
   scheduled time each held request left) is read from ``/healthz`` every
   two seconds and at the end.

Run as root (RLIMIT_NOFILE is raised past the hard limit for both ends)::

    sudo python3 bench/queue.py                    # 100,000 requests, 10,000 accounts
    sudo python3 bench/queue.py --requests 20000 --accounts 2000

Results: a markdown table on stdout, saved with the raw data as
``bench/results/<date>-queue.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import platform
import re
import resource
import select
import shlex
import socket
import subprocess
import sys
import tempfile
import time
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
description = "bench/queue.py: a made-up API, one slow bucket per account"
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


def serve_origin() -> None:
    async def main() -> None:
        server = await asyncio.start_server(_origin_client, LOOPBACK, 0, backlog=4096)
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


def healthz(port: int) -> dict:
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: elbasy\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


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


def run_clients(
    clients: Clients,
    requests: list[bytes],
    deadline: float,
    max_connecting: int,
    max_pending: int = 1 << 30,
    until=None,
    tick=None,
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000, help="queued requests (N)")
    ap.add_argument("--accounts", type=int, default=10_000, help="quota accounts")
    ap.add_argument(
        "--rate", type=float, default=0.2, help="bucket rate per account, requests/s (capacity 1)"
    )
    ap.add_argument(
        "--hold",
        type=float,
        default=None,
        help="seconds from the end of the warm-up to T0, the first departure "
        "[default: 10 + requests / 2000]",
    )
    ap.add_argument("--max-connecting", type=int, default=256, help="connects in flight at most")
    ap.add_argument("--elbasy-python", default=sys.executable)
    ap.add_argument("--json", type=Path, default=None, help="raw results (default bench/results/)")
    ap.add_argument("--origin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.origin:
        serve_origin()
        return 0
    if args.requests < 1 or args.accounts < 1 or args.rate <= 0:
        ap.error("--requests, --accounts and --rate must be > 0")
    command = shlex.join(["python3", "bench/queue.py", *(sys.argv[1:] if argv is None else argv)])
    nofile = raise_nofile(args.requests + 1024)
    started = time.strftime("%Y-%m-%d-%H%M%S")
    interval = 1.0 / (args.rate * 0.99)  # elbasy's default quota margin: 1 %
    # elbasy holds one fd per queued request (its client connection), the
    # clients one each: both processes need N plus a few (listener, epoll,
    # upstream connections, /healthz)
    asked = args.requests
    limited = ""
    if args.requests > nofile - FD_SPARE:
        args.requests = nofile - FD_SPARE
        limited = (
            f"RLIMIT_NOFILE: hard limit {nofile} and no CAP_SYS_RESOURCE to raise it, "
            f"so at most {args.requests:,} of the {asked:,} requests asked for"
        )
        log(f"LIMITED: {limited}")
    per_account = -(-args.requests // args.accounts)
    hold = args.hold if args.hold is not None else 10 + args.requests / 2000
    procs: list[Proc] = []
    results: dict = {"command": command, "started": started, "args": vars(args) | {"json": None}}
    results.update(requests_asked=asked, nofile=nofile, limited_by=limited or None)
    results["args"]["hold"] = hold
    with tempfile.TemporaryDirectory(prefix="elbasy-queue-") as tmp:
        work = Path(tmp)
        try:
            origin = Proc(
                "origin",
                [sys.executable, str(Path(__file__).resolve()), "--origin"],
                work,
                preexec_fn=_child_nofile,
            )
            procs.append(origin)
            oport = int(origin.wait_line(r"origin listening on (\d+)", 20).group(1))
            config = work / "elbasy.toml"
            config.write_text(
                f'connect_to = ["{HOST}:80:{LOOPBACK}:{oport}"]\n'
                "max_wait = 600\n"
                'log_level = "warning"\n'
                f'data_dir = "{work / "elbasy-data"}"\n\n'
                + RULE.format(host=HOST, header=ACCOUNT_HEADER, rate=args.rate)
            )
            (work / "rule.toml").write_text(
                RULE.format(host=HOST, header=ACCOUNT_HEADER, rate=args.rate)
            )
            chk = subprocess.run(
                [args.elbasy_python, "-m", "elbasy", "rules", "check", str(work / "rule.toml")],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if chk.returncode != 0:
                raise SystemExit(f"the bench rule does not check:\n{chk.stdout}{chk.stderr}")
            cmd = [args.elbasy_python, "-m", "elbasy", "--config", str(config)]
            cmd += ["--listen", f"{LOOPBACK}:0", "--max-wait", "600", "--log-level", "warning"]
            elbasy = Proc("elbasy", cmd, work, preexec_fn=_child_nofile)
            procs.append(elbasy)
            m = elbasy.wait_line(r"elbasy (\S+) listening on [0-9.]+:(\d+)", 30)
            version, port = m.group(1), int(m.group(2))
            log(f"elbasy {version} on {port} (pid {elbasy.pid}), origin on {oport}")
            results["elbasy"] = {"version": version, "pid": elbasy.pid, "cmd": cmd}
            results["load_start"] = loadavg()

            # 1. warm-up: every account held until its share of T0
            t0 = time.time() + 5 + args.accounts / 1000 + hold
            clients = Clients(port)
            warm = [
                request(
                    a,
                    "/warmup",
                    f"{UNTIL_HEADER}: {t0 + (a / args.accounts) * interval:.3f}\r\n"
                    "Connection: close\r\n",
                )
                for a in range(args.accounts)
            ]
            w0 = time.monotonic()
            # few at a time: elbasy keeps the upstream connections they opened in its pool
            run_clients(clients, warm, time.monotonic() + 120, 16, max_pending=16)
            log(
                f"warm-up: {clients.answered} answers {clients.statuses} in "
                f"{time.monotonic() - w0:.1f} s, errors {clients.errors or 'none'}"
            )
            results["warmup"] = {"statuses": clients.statuses, "errors": clients.errors}
            if clients.statuses.get(429, 0) != args.accounts:
                raise SystemExit(f"warm-up: expected {args.accounts} 429s, got {clients.statuses}")
            time.sleep(1.0)
            base_rss = rss_kib(elbasy.pid)
            base_cpu = tree_cpu_s(elbasy.pid)
            h0 = healthz(port)
            log(f"baseline RSS {base_rss} KiB; T0 in {t0 - time.time():.1f} s")

            # 2. the queue: N connections, one request each
            reqs = [request(i % args.accounts, "/x") for i in range(args.requests)]
            clients = Clients(port)
            state: dict = {"peak": 0, "polled": 0.0, "full": None}
            q0 = time.monotonic()

            def watch(opened: int) -> bool:
                now = time.monotonic()
                if now - state["polled"] < 0.5 and opened < len(reqs):
                    return False
                state["polled"] = now
                waiting = healthz(port)["held"]["waiting"]
                if waiting > state["peak"]:
                    state["peak"] = waiting
                    state["peak_rss"] = rss_kib(elbasy.pid)
                if waiting >= args.requests:
                    state["full"] = now - q0
                    return True
                return time.time() >= t0

            run_clients(
                clients, reqs, time.monotonic() + hold + 60, args.max_connecting, until=watch
            )
            queued_rss = rss_kib(elbasy.pid)
            hq = healthz(port)
            queued_cpu = tree_cpu_s(elbasy.pid)
            waiting = hq["held"]["waiting"]
            if waiting < state["peak"]:  # departures began: memory at the peak instead
                waiting, queued_rss = state["peak"], state["peak_rss"]
            log(
                f"queued: held.waiting {waiting} of {args.requests} "
                f"({'all' if state['full'] else 'not all'}, {time.monotonic() - q0:.1f} s), "
                f"RSS {queued_rss} KiB, client errors {clients.errors or 'none'}"
            )

            # holding them: what N idle queued requests cost until T0
            hold_start, hold_cpu0 = time.monotonic(), queued_cpu
            while time.time() < t0 - 0.5:
                clients.poll(0.1)
            hold_s = time.monotonic() - hold_start
            drain_cpu0 = tree_cpu_s(elbasy.pid)
            log(f"holding {waiting} for {hold_s:.1f} s took {drain_cpu0 - hold_cpu0:.2f} s CPU")

            # 3. drain: every account at its rate from T0
            polls: list[dict] = []
            last = {"t": 0.0}

            def tick() -> None:
                now = time.monotonic()
                if now - last["t"] >= 2.0:
                    last["t"] = now
                    p = healthz(port)["pacing"]
                    polls.append({"t": round(time.time() - t0, 1), **p})

            drain_budget = max(0.0, t0 - time.time()) + per_account * interval + 60
            run_clients(clients, [], time.monotonic() + drain_budget, 1, tick=tick)
            end = healthz(port)
            end_cpu = tree_cpu_s(elbasy.pid)
            end_rss = rss_kib(elbasy.pid)
            drained = time.time() - t0
            log(f"drained {clients.answered} answers {clients.statuses} {drained:.1f} s after T0")
            results["load_end"] = loadavg()
        finally:
            for p in reversed(procs):
                p.stop()
            logs = {p.name: p.log_tail(10) for p in procs}

    pacing = end["pacing"]
    worst = max((p.get("late_ms_p99", 0.0) for p in polls), default=0.0)
    per_req = (queued_rss - base_rss) / waiting if waiting else 0.0
    connect_s = state["full"]
    departed = pacing.get("departures_timed", 0)
    cpu_q, cpu_d = queued_cpu - base_cpu, end_cpu - drain_cpu0
    cpu_h = drain_cpu0 - hold_cpu0
    results.update(
        baseline_rss_kib=base_rss,
        queued_rss_kib=queued_rss,
        end_rss_kib=end_rss,
        queued=waiting,
        queued_all=bool(state["full"]),
        queue_seconds=state["full"],
        kib_per_queued=per_req,
        cpu_connect_s=queued_cpu - base_cpu,
        cpu_hold_s=cpu_h,
        hold_seconds=hold_s,
        cpu_drain_s=cpu_d,
        cpu_total_s=end_cpu,
        answers=clients.statuses,
        client_errors=clients.errors,
        drain_seconds=drained,
        healthz_before=h0,
        healthz_queued=hq,
        healthz_end=end,
        lateness_polls=polls,
        logs=logs,
    )
    rows = [
        ["requests queued (held.waiting)", f"{waiting:,} of {args.requests:,}"],
        ["accounts × requests each", f"{args.accounts:,} × {per_account}"],
        [
            "bucket per account",
            f"capacity 1, rate {args.rate:g}/s (elbasy aims at {1 / interval:.3f}/s)",
        ],
        ["time to queue them all", f"{connect_s:.1f} s" if connect_s else "not all queued"],
        ["elbasy RSS baseline → queued", f"{base_rss / 1024:.1f} → {queued_rss / 1024:.1f} MiB"],
        ["**memory per queued request**", f"**{per_req:.2f} KiB** (target ≤ 4 KiB)"],
        ["departures timed (pacing)", f"{departed:,}"],
        [
            "**departure lateness p50 / p99** (last ≤10,000)",
            f"**{pacing.get('late_ms_p50', '-')} / {pacing.get('late_ms_p99', '-')} ms**",
        ],
        ["worst p99 seen during the drain (2 s polls)", f"{worst} ms"],
        [
            "answers to the clients",
            ", ".join(f"{k}: {v:,}" for k, v in sorted(clients.statuses.items())),
        ],
        ["drain: T0 → last answer", f"{drained:.1f} s (schedule: {per_account * interval:.1f} s)"],
        [
            "elbasy CPU: queueing them",
            f"{cpu_q:.1f} s ({1e6 * cpu_q / max(1, waiting):.0f} µs per request)",
        ],
        [
            "elbasy CPU: holding them (queue full → T0)",
            f"{cpu_h:.2f} s in {hold_s:.1f} s",
        ],
        [
            "elbasy CPU: the drain (T0 → end)",
            f"{cpu_d:.1f} s ({1e6 * cpu_d / max(1, departed):.0f} µs per departure)",
        ],
        ["elbasy CPU, whole run", f"{end_cpu:.1f} s"],
        ["client errors", ", ".join(f"{k}: {v}" for k, v in clients.errors.items()) or "none"],
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    text = "\n".join(
        [
            f"# elbasy queue benchmark, {started}",
            "",
            table,
            "",
            *([f"**Fewer requests than asked:** {limited}.", ""] if limited else []),
            "Memory per queued request: (VmRSS with every request held − VmRSS after the "
            "warm-up) / held.waiting, elbasy's one process: its connection object and buffers, "
            "the policy's Python objects (request head, exchange, pacing state, reservation, "
            "verdict), its timer entry. Kernel memory (socket buffers, the socket and file "
            "objects, epoll entries) is not in RSS. Lateness: how long after its scheduled "
            "time a held request left (the loop's timer, epoll's millisecond timeout "
            "included), over the last 10,000 departures.",
            "",
            *machine_lines(),
            f"- load average at start {results['load_start']}, at end {results['load_end']}",
            f"- elbasy {version}: `{shlex.join(cmd)}`",
            f"- command: `{command}`",
        ]
    )
    print(text)
    out = args.json or RESULTS_DIR / f"{started}-queue.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    log(f"results in {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
