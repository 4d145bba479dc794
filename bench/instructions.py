#!/usr/bin/env python3
"""Instructions elbasy executes per request, counted by callgrind.

CPU time per request on a shared two-core machine moves with whatever else
runs there; the instructions one process executes for a fixed number of
requests do not. This starts the nginx origin of bench/run.py, then, for
each checkout given (each with its extensions built in place), one elbasy
worker (``server.Worker`` in the foreground: the supervisor's forked worker
is out of callgrind's reach) under ``valgrind --tool=callgrind`` and one
keep-alive client per cell:

- ``plain``: absolute-form ``GET http://127.0.0.1:PORT/100b`` to an origin
  no rule covers (the forwarded request of the plain-HTTP cell);
- ``intercept``: ``GET /100b`` inside one intercepted TLS session to
  ``localhost`` (the interception keep-alive cell);
- ``intercept-new``: the same request on a CONNECT and a TLS session of
  its own each time (the new-connection cell; ``--requests`` / 10 of them,
  a handshake costing some twenty requests).

Each cell sends ``--warmup`` uncounted requests, zeroes the counters
(``callgrind_control --zero``), sends ``--requests`` more and dumps; the
figure is the dump's instruction total divided by the requests. Checkouts
alternate for ``--repeats`` rounds, so before and after share one run.

    python3 bench/instructions.py --tree /tmp/elbasy-base --tree . --repeats 3

``--keep DIR`` keeps each cell's dump, to see where the instructions go
(``callgrind_annotate --inclusive=yes DIR/…-intercept-….callgrind``).

Needs valgrind (Debian's ``valgrind``, which brings ``callgrind_control``)
and the nginx that bench/run.py installs; a run of 3 rounds of two
checkouts takes about five minutes.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: the origin and its CA)

HEADERS = {
    "User-Agent": "elbasy-bench/1",
    "Accept": "*/*",
    "Accept-Encoding": "gzip",
    "Authorization": "Bearer 0123456789abcdef",
}


#: one worker in the foreground, without the supervisor: callgrind follows
#: neither a fork nor callgrind_control a forked child, so the process
#: measured must be the one that serves
WORKER = """
import sys
from elbasy.cli import build_config
from elbasy.logs import configure
from elbasy.server import Worker
data, ca, host = sys.argv[1:4]
# the origins are on loopback, on ports of their own: allowed, as bench/run.py does
config = build_config(listen="127.0.0.1:0", log_level="warning", intercept=[host],
                      data_dir=data, upstream_ca=ca,
                      allow_internal=["127.0.0.1", "localhost"], allow_ports=["1-65535"])
configure(config.log_level, config.log_format, config.log_file)
worker = Worker(config)
sys.stderr.write(f"listening on 127.0.0.1:{worker.address[1]}\\n")
sys.stderr.flush()
worker.serve()
"""


def totals(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {path}")


def counted(pid: int, out: Path, send, keep: Path | None = None) -> int:
    """Instructions of process ``pid`` while ``send()`` runs; the dump is
    copied to ``keep`` (a file name) for ``callgrind_annotate`` when given."""
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
    before = set(out.parent.glob(out.name + "*"))
    send()
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = set(out.parent.glob(out.name + "*")) - before
        if new:
            time.sleep(0.5)  # let the dump finish writing
            dump = new.pop()
            if keep is not None:
                shutil.copyfile(dump, keep)
            return totals(dump)
        time.sleep(0.1)
    raise SystemExit("callgrind wrote no dump")


def plain_cell(port: int, origin: int, n: int) -> None:
    conn = http.client.HTTPConnection(bench.LOOPBACK, port, timeout=60)
    url = f"http://{bench.LOOPBACK}:{origin}/100b"
    for _ in range(n):
        conn.request("GET", url, headers=HEADERS)
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status


def intercept_conn(port: int, origin: int, ca: Path) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection(bench.LOOPBACK, port, timeout=60, context=ctx)
    conn.set_tunnel(bench.TLS_HOST, origin)
    return conn


def intercept_cell(conn: http.client.HTTPSConnection, n: int) -> None:
    for _ in range(n):
        conn.request("GET", "/100b", headers=HEADERS)
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status


def intercept_new_cell(port: int, origin: int, ca: Path, n: int) -> None:
    for _ in range(n):
        conn = intercept_conn(port, origin, ca)
        intercept_cell(conn, 1)
        conn.close()


def measure(tree: Path, origins, work: Path, args) -> dict[str, float]:
    data = work / f"data-{os.getpid()}-{time.monotonic_ns()}"
    out = work / f"callgrind-{time.monotonic_ns()}.out"
    log = open(work / "elbasy.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(tree), "XDG_DATA_HOME": str(data)}
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    # each dump after the first names its functions by numbers defined in
    # the first: written out whole, a kept dump reads on its own
    cmd += ["--compress-strings=no", "--compress-pos=no"]
    cmd += [sys.executable, "-c", WORKER, str(data), str(origins.ca_file), bench.TLS_HOST]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        port = 0
        while time.monotonic() < deadline and proc.poll() is None:
            m = re.search(rb"listening on [0-9.]+:(\d+)", (work / "elbasy.log").read_bytes())
            if m:
                port = int(m[1])
                break
            time.sleep(0.2)
        if not port:
            raise SystemExit((work / "elbasy.log").read_text(errors="replace"))
        result = {}
        def kept(cell: str) -> Path | None:
            if args.keep is None:
                return None
            args.keep.mkdir(parents=True, exist_ok=True)
            return args.keep / f"{tree.name or 'tree'}-{cell}-{time.monotonic_ns()}.callgrind"

        plain_cell(port, origins.plain_port, args.warmup)
        ir = counted(
            proc.pid,
            out,
            lambda: plain_cell(port, origins.plain_port, args.requests),
            kept("plain"),
        )
        result["plain"] = ir / args.requests
        conn = intercept_conn(port, origins.tls_port, data / "ca.pem")
        intercept_cell(conn, args.warmup)
        ir = counted(
            proc.pid, out, lambda: intercept_cell(conn, args.requests), kept("intercept")
        )
        result["intercept"] = ir / args.requests
        conn.close()
        ca, fresh = data / "ca.pem", max(1, args.requests // 10)
        intercept_new_cell(port, origins.tls_port, ca, max(1, args.warmup // 10))
        ir = counted(
            proc.pid,
            out,
            lambda: intercept_new_cell(port, origins.tls_port, ca, fresh),
            kept("intercept-new"),
        )
        result["intercept-new"] = ir / fresh
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--keep",
        type=Path,
        help="copy each cell's callgrind dump here (read it with callgrind_annotate)",
    )
    args = ap.parse_args()
    socket.setdefaulttimeout(60)
    with tempfile.TemporaryDirectory(prefix="elbasy-ir-") as tmp:
        work = Path(tmp)
        origins = bench.start_origins(work, 1 << 20)
        runs: dict[Path, list[dict[str, float]]] = {t: [] for t in args.tree}
        try:
            for r in range(args.repeats):
                for tree in args.tree:
                    got = measure(tree.resolve(), origins, work, args)
                    runs[tree].append(got)
                    print(
                        f"round {r + 1} {tree}: "
                        + ", ".join(f"{k} {v:,.0f} Ir/req" for k, v in got.items()),
                        flush=True,
                    )
        finally:
            bench.stop_all()
        cells = ("plain", "intercept", "intercept-new")
        print(
            "\n| checkout | plain forward (Ir/req) | intercepted keep-alive (Ir/req) "
            "| intercepted, new connection each (Ir/req) |"
        )
        print("|---|---|---|---|")
        for tree, got in runs.items():
            row = [
                f"{statistics.median(g[c] for g in got):,.0f} "
                f"({min(g[c] for g in got):,.0f}–{max(g[c] for g in got):,.0f})"
                for c in cells
            ]
            print(f"| {tree} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
