#!/usr/bin/env python3
"""How should elbasy's workers share the port? Measures the two ways on loopback.

* ``shared``: one listening socket opened before the fork, in every worker's
  epoll with EPOLLEXCLUSIVE (the kernel wakes one waiting worker per
  connection);
* ``reuseport``: one SO_REUSEPORT socket per worker (the kernel hashes each
  new connection to one socket's own accept queue).

Two measurements for each, with worker processes that do what elbasy's
loop does with a listener (epoll, accept a batch, answer a small HTTP
response, close):

1. **balance**: ``--clients`` client processes each open ``--conns``
   connections one after another (a request and its answer on each); the
   connections each worker accepted are counted.
2. **reload**: the old workers stop taking connections (they are busy, as a
   loaded worker is) while ``--queued`` clients connect and wait in the
   accept queue; then new workers start and the old ones are retired the
   way each scheme must retire them (shared: leave epoll, the socket stays
   open; reuseport: close the old sockets). Each waiting client reports
   whether it got its answer or a reset.

Every loop is bounded in count and time; all traffic is on 127.0.0.1.
``python3 bench/listeners.py`` prints a table; ``--json`` the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import time

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def listener(port: int, reuseport: bool) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(4096)
    s.setblocking(False)
    return s


def worker(sock: socket.socket, exclusive: bool, report: int, pause_r: int | None) -> None:
    """Accept and answer until SIGTERM; write how many connections it took to ``report``."""
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLIN | (select.EPOLLEXCLUSIVE if exclusive else 0))
    if pause_r is not None:
        ep.register(pause_r, select.EPOLLIN)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    taken = 0
    deadline = time.monotonic() + 120
    while not stop and time.monotonic() < deadline:
        try:
            events = ep.poll(0.2)
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == pause_r:
                # retire: leave the shared socket's epoll (reuseport: close ours)
                ep.unregister(sock.fileno())
                os.read(pause_r, 1)
                if not exclusive:
                    sock.close()
                stop.append(1)
                break
            for _ in range(64):
                try:
                    c, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                taken += 1
                c.setblocking(True)
                c.settimeout(2)
                try:
                    c.recv(4096)
                    c.sendall(ANSWER)
                except OSError:
                    pass
                c.close()
    os.write(report, f"{taken}\n".encode())
    os._exit(0)


def start_workers(
    n: int, port: int, scheme: str, shared: socket.socket | None, pause: bool = False
) -> list[tuple[int, int, int | None]]:
    out = []
    for _ in range(n):
        r, w = os.pipe()
        pr, pw = os.pipe() if pause else (None, None)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            sock = shared if scheme == "shared" else listener(port, True)
            assert sock is not None
            worker(sock, scheme == "shared", w, pr)
        os.close(w)
        out.append((pid, r, pw))
    return out


def collect(workers: list[tuple[int, int, int | None]]) -> list[int]:
    counts = []
    for pid, r, _ in workers:
        os.kill(pid, signal.SIGTERM)
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(r, 64)
            if not chunk:
                break
            data += chunk
        os.waitpid(pid, 0)
        os.close(r)
        counts.append(int(data or b"0"))
    return counts


def client(port: int, conns: int, out: int) -> None:
    ok = failed = 0
    deadline = time.monotonic() + 60
    for _ in range(conns):
        if time.monotonic() > deadline:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                ok += s.recv(4096).startswith(b"HTTP/1.1 200")
        except OSError:
            failed += 1
    os.write(out, f"{ok} {failed}\n".encode())
    os._exit(0)


def run_clients(port: int, clients: int, conns: int) -> tuple[int, int]:
    procs = []
    for _ in range(clients):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            client(port, conns, w)
        os.close(w)
        procs.append((pid, r))
    ok = failed = 0
    for pid, r in procs:
        a, b = os.read(r, 64).split()
        ok, failed = ok + int(a), failed + int(b)
        os.waitpid(pid, 0)
        os.close(r)
    return ok, failed


def balance(scheme: str, workers: int, clients: int, conns: int) -> dict:
    shared: socket.socket | None = listener(0, scheme == "reuseport")
    assert shared is not None
    port = shared.getsockname()[1]
    if scheme == "reuseport":
        # it only found a free port: closed before the fork, or the kernel
        # would hash connections to its queue too (inherited, never polled)
        shared.close()
        shared = None
    procs = start_workers(workers, port, scheme, shared)
    time.sleep(0.3)
    start = time.monotonic()
    ok, failed = run_clients(port, clients, conns)
    took = time.monotonic() - start
    counts = collect(procs)
    if shared is not None:
        shared.close()
    return {
        "per_worker": counts,
        "ok": ok,
        "failed": failed,
        "seconds": round(took, 2),
        "max_over_mean": round(max(counts) * len(counts) / sum(counts), 3) if sum(counts) else None,
    }


def waiting_client(port: int, out: int) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = s.recv(4096)
            result = "ok" if data.startswith(b"HTTP/1.1 200") else "closed"
    except ConnectionResetError:
        result = "reset"
    except OSError as e:
        result = type(e).__name__
    os.write(out, f"{result}\n".encode())
    os._exit(0)


def reload(scheme: str, workers: int, queued: int) -> dict:
    """Old workers hold connections in their queues; new workers come, old ones go."""
    shared = listener(0, scheme == "reuseport")
    port = shared.getsockname()[1]
    if scheme == "reuseport":
        shared.close()
        shared = None
    # old workers that take nothing: a pause pipe they wait on stands for "busy"
    old = []
    for _ in range(workers):
        r, w = os.pipe()
        pr, pw = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            sock = shared if shared is not None else listener(port, True)
            # busy: not polling the listener until told to retire
            ep = select.epoll()
            ep.register(pr, select.EPOLLIN)
            ep.poll(30)
            os.read(pr, 1)
            if shared is None:
                sock.close()  # a reuseport socket leaves the group only by closing
            os.write(w, b"0\n")
            os._exit(0)
        os.close(w)
        old.append((pid, r, pw))
    time.sleep(0.3)
    waiting = []
    for _ in range(queued):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            waiting_client(port, w)
        os.close(w)
        waiting.append((pid, r))
    time.sleep(0.5)  # every one is in some queue now
    new = start_workers(workers, port, scheme, shared)
    time.sleep(0.3)  # the new workers are ready
    for _, _, pw in old:  # retire the old ones
        assert pw is not None
        os.write(pw, b"x")
    for pid, r, _ in old:
        os.read(r, 64)
        os.waitpid(pid, 0)
        os.close(r)
    results: dict[str, int] = {}
    for pid, r in waiting:
        got = os.read(r, 64).decode().strip() or "none"
        results[got] = results.get(got, 0) + 1
        os.waitpid(pid, 0)
        os.close(r)
    collect(new)
    if shared is not None:
        shared.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--conns", type=int, default=1000, help="connections per client")
    ap.add_argument("--queued", type=int, default=40, help="clients waiting across a reload")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict = {"args": vars(args), "balance": {}, "reload": {}}
    for scheme in ("shared", "reuseport"):
        out["balance"][scheme] = [
            balance(scheme, args.workers, args.clients, args.conns) for _ in range(args.repeats)
        ]
        out["reload"][scheme] = [
            reload(scheme, args.workers, args.queued) for _ in range(args.repeats)
        ]
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
        return
    print(f"{args.workers} workers, {args.clients} clients x {args.conns} connections")
    for scheme in ("shared", "reuseport"):
        for b in out["balance"][scheme]:
            print(
                f"balance {scheme:9} per worker {b['per_worker']} max/mean {b['max_over_mean']}"
                f" failed {b['failed']} in {b['seconds']} s"
            )
    for scheme in ("shared", "reuseport"):
        for r in out["reload"][scheme]:
            print(f"reload  {scheme:9} {args.queued} queued clients: {r}")


if __name__ == "__main__":
    main()
