#!/usr/bin/env python3
"""How evenly do elbasy's workers share a burst of keep-alive clients?

Starts ``elbasy --workers N`` on a free loopback port, opens ``--clients``
connections at once (each held open, the way an SDK's pool or a worker
fleet keeps its connections), then asks ``/healthz`` on each one which
worker answers (its ``worker`` slot). A kept-alive connection stays with
the worker that accepted it, so this is how the load will be split. Every
loop is bounded; all traffic is on 127.0.0.1.

    python3 bench/spread.py --workers 2 --clients 200 --repeats 3
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def start(workers: int, data_dir: str) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "elbasy", "--listen", "127.0.0.1:0", "--workers", str(workers)]
    cmd += ["--data-dir", data_dir, "--rules", "", "--log-level", "info"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise SystemExit("elbasy did not start")


def ask(sock: socket.socket) -> int:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return int(json.loads(body[:length])["worker"])


def burst(port: int, clients: int) -> collections.Counter[int]:
    with ThreadPoolExecutor(clients) as pool:
        socks = list(
            pool.map(lambda _: socket.create_connection(("127.0.0.1", port), 10), range(clients))
        )
    try:
        return collections.Counter(ask(s) for s in socks)
    finally:
        for s in socks:
            s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as data:
        proc, port = start(args.workers, data)
        try:
            for _ in range(args.repeats):
                got = burst(port, args.clients)
                counts = [got.get(w, 0) for w in range(args.workers)]
                top = max(counts) * args.workers / sum(counts)
                print(
                    f"{args.clients} clients at once: per worker {counts}, busiest/mean {top:.2f}"
                )
                time.sleep(0.5)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
