"""Reservations per second of the Redis quota store, blocking and pipelined.

Run it as::

    python bench/redis_store.py              # starts its own redis-server
    python bench/redis_store.py --url redis://127.0.0.1:6379/0 --n 50000

One reservation is one ``reserve`` script call (elbasy/lua/reserve.lua) with
the server's clock (TIME), round robin over 10,000 Shopify REST accounts, as
one worker would make them. Measured:

* ``blocking``: RedisStore.reserve, one call and one round trip at a time
  (redis-py, hiredis parsing): what a first wiring into the loop would do;
* ``socket B``: elbasy.redis_pipe.SocketPipe, B calls sent, one write, the
  answers read when the socket is readable (select here, epoll in the loop);
* ``thread B``: elbasy.redis_pipe.ThreadPipe, B calls queued, the thread's
  redis-py pipeline, answers through its eventfd.

B = 1 is a lone request on an idle proxy (the latency case); 8/32/128 are
the reservations a busy loop has in one turn. It also prints the memory one
account's records take in Redis (MEMORY USAGE).
"""

from __future__ import annotations

import argparse
import select
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import redis  # noqa: E402

from elbasy.limits import Limit  # noqa: E402
from elbasy.quota import Reservation  # noqa: E402
from elbasy.redis_pipe import SocketPipe, ThreadPipe  # noqa: E402
from elbasy.redis_store import RedisStore, answer  # noqa: E402

ACCOUNTS = 10_000
SHOPIFY = Limit("shopify-rest", "bucket", capacity=40, rate=2)
QPS = Limit("etsy-qps", "window", capacity=10, window=1)
QPD = Limit("etsy-qpd", "rolling", capacity=10_000, window=86400, sub_buckets=12)
KEYS = [(f"shopify-admin-rest|rest|shop{i}.myshopify.com|app1",) for i in range(ACCOUNTS)]


def blocking(store: RedisStore, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        r = store.reserve(KEYS[i % ACCOUNTS], (SHOPIFY,), 1, time.time(), 600.0)
        assert isinstance(r, Reservation)
    return n / (time.perf_counter() - started)


def pipelined(store: RedisStore, pipe: SocketPipe | ThreadPipe, n: int, batch: int) -> float:
    started = time.perf_counter()
    i = 0
    while i < n:
        size = min(batch, n - i)
        now = time.time()
        for k in range(size):
            name, keys, blob = store.request(
                "reserve", KEYS[(i + k) % ACCOUNTS], (SHOPIFY,), now, 1.0, 600.0
            )
            pipe.send(i + k, name, keys, blob)
        pipe.flush()
        got = 0
        while got < size:
            if pipe.wants_write():
                select.select([], [pipe.fileno()], [], 1.0)
                pipe.flush()
            select.select([pipe.fileno()], [], [], 1.0)
            for _, reply in pipe.completed():
                assert isinstance(reply, bytes), reply
                answer(reply)
                got += 1
        i += size
    return n / (time.perf_counter() - started)


def memory(store: RedisStore) -> dict[str, int]:
    """Bytes Redis holds for one account's records (MEMORY USAGE, key and value)."""
    now = time.time()
    store.reserve(["shopify-admin-rest|rest|mem.myshopify.com|app1"], [SHOPIFY], 1, now, 60)
    store.reserve(["etsy-v3|qps|memkey", "etsy-v3|qpd|memkey"], [QPS, QPD], 1, now, 60)
    c = store.client
    return {
        "bucket (Shopify REST)": c.memory_usage(
            store.key_of("shopify-admin-rest|rest|mem.myshopify.com|app1", "shopify-rest")
        ),
        "window (Etsy qps)": c.memory_usage(store.key_of("etsy-v3|qps|memkey", "etsy-qps")),
        "rolling (Etsy qpd)": c.memory_usage(store.key_of("etsy-v3|qpd|memkey", "etsy-qpd")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a Redis server to use (default: start one)")
    ap.add_argument("--n", type=int, default=20_000, help="reservations per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="runs per measurement (best kept)")
    args = ap.parse_args()
    server = None
    url = args.url
    if url is None:
        from redis_server import RedisServer

        server = RedisServer()
        url = server.url
    try:
        store = RedisStore(url)
        store.client.flushdb()
        port = store.client.connection_pool.connection_kwargs["port"]
        host = store.client.connection_pool.connection_kwargs["host"]
        info = store.client.info("server")
        print(f"redis-server {info['redis_version']} at {host}:{port}; {args.n} reservations")
        print(f"{'transport':<14} {'batch':>5} {'reservations/s':>15}")
        rows: list[tuple[str, int, float]] = []
        rows.append(("blocking", 1, max(blocking(store, args.n) for _ in range(args.rounds))))
        for kind in ("socket", "thread"):
            for batch in (1, 8, 32, 128):
                pipe: SocketPipe | ThreadPipe
                if kind == "socket":
                    pipe = SocketPipe(host, port)
                else:
                    pipe = ThreadPipe(redis.Redis(host=host, port=port))
                try:
                    best = max(pipelined(store, pipe, args.n, batch) for _ in range(args.rounds))
                finally:
                    pipe.close()
                rows.append((kind, batch, best))
        for kind, batch, rate in rows:
            print(f"{kind:<14} {batch:>5} {rate:>15,.0f}")
        print("memory per record (bytes):", memory(store))
        store.close()
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
