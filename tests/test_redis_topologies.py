"""The Redis quota store on a Sentinel-watched master and on a Redis Cluster.

Real servers, started here: a master, its replica and one Sentinel (the
``redis-server`` binary in sentinel mode); three cluster nodes joined with
``redis-cli --cluster create``. What a user of ``redis+sentinel://`` and
``redis+cluster://`` needs: every step works there, a Sentinel failover is
followed (the store falls back to the local share for the switch, then
shares again on the new master), and on a cluster each account's keys sit
in one slot while accounts spread over the nodes.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer
from test_piped_store import EXACT, START, LoopWithoutSockets

from elbasy.fleet_store import FleetStore
from elbasy.pacing import Pacer
from elbasy.piped_store import PipedStore
from elbasy.quota import LocalStore
from elbasy.redis_store import RedisStore, connect
from elbasy.rules import RuleSet

SERVICE = "elbasy-quota"


def wait_for(what: str, check: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # noqa: BLE001 - not up yet: asked again
            pass
        assert time.monotonic() < deadline, f"{what} within {seconds:g} s"
        time.sleep(0.1)


@pytest.fixture
def sentinel() -> Iterator[tuple[RedisServer, RedisServer, RedisServer]]:
    """(master, replica, sentinel), the Sentinel watching the master as SERVICE."""
    import redis

    master = RedisServer()
    servers = [master]
    try:
        replica = RedisServer(extra=("--replicaof", "127.0.0.1", str(master.port)))
        servers.append(replica)
        conf = (
            f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
        )
        watcher = RedisServer(config=conf, extra=("--sentinel",))
        servers.append(watcher)
        client = redis.Redis(port=replica.port)
        wait_for(
            "the replica in sync", lambda: client.info("replication")["master_link_status"] == "up"
        )
        client.close()
        s = redis.Redis(port=watcher.port)
        wait_for(
            "the Sentinel to see the replica",
            lambda: s.sentinel_master(SERVICE)["num-slaves"] >= 1,
        )
        s.close()
        yield master, replica, watcher
    finally:
        for server in servers:
            server.stop()


def test_the_piped_store_follows_a_sentinel_failover(
    sentinel: tuple[RedisServer, RedisServer, RedisServer],
) -> None:
    """``redis+sentinel://``: steps go over the pipe to the master the Sentinel
    names; after a failover the store notices within a second or two (it asks
    the Sentinels), answers from the local share meanwhile and then shares
    again, on the new master."""
    import redis

    master, replica, watcher = sentinel
    clock = {"t": START}
    url = f"redis+sentinel://127.0.0.1:{watcher.port}/{SERVICE}/0"
    fleet = FleetStore(
        lambda: RedisStore(url, EXACT, clock="caller", timeout=0.5),
        LocalStore(EXACT),
        backoff=0.2,
        backoff_max=0.5,
        relearn=0.0,
    )
    store = PipedStore(fleet, timeout=0.5)
    pacer = Pacer(RuleSet.builtin(), store, wall=lambda: clock["t"], mono=lambda: clock["t"])
    loop = LoopWithoutSockets(pacer, store, clock)
    # who asks the Sentinels where the master is, from here on: never the
    # loop (this thread); the master watch and the reconnect attempts do
    assert fleet.shared is not None
    pool = fleet.shared.client.connection_pool
    asked_by: list[int] = []
    ask = pool.get_master_address

    def asked() -> tuple[str, int]:
        asked_by.append(threading.get_ident())
        return ask()  # type: ignore[no-any-return]

    pool.get_master_address = asked
    try:
        loop.arrive(1, "acme")
        loop.run(lambda: loop.sent == [1])
        assert store.stats()["transport"] == "socket pipe"
        on_master = redis.Redis(port=master.port)
        assert on_master.keys("elbasy:{shopify-admin-rest|acme*"), "the step is in the master"
        on_master.close()
        s = redis.Redis(port=watcher.port)
        s.execute_command("SENTINEL", "FAILOVER", SERVICE)
        wait_for(
            "the replica promoted",
            lambda: (
                int(s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1])
                == replica.port
            ),
        )
        s.close()
        promoted = time.monotonic()
        k = 2
        deadline = time.monotonic() + 20.0
        while not (fleet.recoveries >= 1 and not fleet.down and store.stats()["pipes"] >= 2):
            assert time.monotonic() < deadline, store.stats()
            loop.arrive(k, f"shop{k}")
            loop.run(lambda: k in loop.sent)  # noqa: B023 - this turn's k
            k += 1
            time.sleep(0.05)
        # the master watch asks every second: the old master (which takes writes
        # until the Sentinels reconfigure it, ~10 s here) is left within about that
        assert time.monotonic() - promoted < 4.0, store.stats()
        paced = loop.arrive(k, "after")
        assert paced.pending == "reserve"  # to Redis again, over a new pipe
        loop.run(lambda: k in loop.sent)
        on_new = redis.Redis(port=replica.port)
        assert on_new.keys("elbasy:{shopify-admin-rest|after*"), "the step is in the new master"
        on_new.close()
        assert len(loop.sent) == k  # every request went: none failed over the switch
        assert asked_by and threading.get_ident() not in asked_by
    finally:
        store.close()


def cluster_port() -> int:
    """A free port p <= 55535 whose cluster bus port (p + 10000) is free too."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture
def cluster() -> Iterator[list[RedisServer]]:
    """Three cluster nodes, every slot assigned (no replicas)."""
    import redis

    cli = shutil.which("redis-cli")
    assert cli, "redis-cli is missing (it comes with redis-server; .ci/run installs it)"
    nodes: list[RedisServer] = []
    try:
        for _ in range(3):
            port = cluster_port()
            nodes.append(
                RedisServer(
                    port,
                    extra=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                    ),
                )
            )
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        first = redis.Redis(port=nodes[0].port)
        wait_for("the cluster up", lambda: first.cluster("info")["cluster_state"] == "ok")
        first.close()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def cluster_pacer(
    cluster: list[RedisServer],
) -> tuple[RedisStore, PipedStore, LoopWithoutSockets, dict[str, float]]:
    """A pacer on a PipedStore over ``redis+cluster://`` (its first node named),
    played by LoopWithoutSockets on a clock the test moves."""
    url = f"redis+cluster://127.0.0.1:{cluster[0].port}"
    clock = {"t": START}
    store = RedisStore(connect(url), EXACT, clock="caller")
    piped = PipedStore(FleetStore(store, LocalStore(EXACT)), timeout=0.5)
    pacer = Pacer(RuleSet.builtin(), piped, wall=lambda: clock["t"], mono=lambda: clock["t"])
    return store, piped, LoopWithoutSockets(pacer, piped, clock), clock


def test_the_piped_store_on_a_redis_cluster(cluster: list[RedisServer]) -> None:
    """``redis+cluster://``: a pipe per node, each step sent to its account's
    node; each account's limits in one slot (every script touches one),
    accounts spread over the nodes, facts shared."""
    import redis

    store, piped, loop, clock = cluster_pacer(cluster)
    try:
        for k in range(30):
            paced = loop.arrive(k, f"shop{k}")
            assert paced.pending == "reserve"  # on a pipe, answered later
        loop.run(lambda: len(loop.sent) == 30)
        stats = piped.stats()
        assert stats["transport"] == "socket pipe" and stats["pipes"] == 3, stats
        assert stats["late_answers"] == 0 and stats["fallbacks"] == 0, stats
        assert piped.put_fact("plan|x|y", 400.0, 20.0) and store.fact("plan|x|y") == (400.0, 20.0)
        holding = 0
        for node in cluster:
            c = redis.Redis(port=node.port)
            holding += bool(c.keys("elbasy:{shopify-admin-rest|*"))
            c.close()
        assert holding == 3, "accounts spread over every node"
    finally:
        piped.close()


def test_the_piped_store_follows_a_slot_resharded_under_it(cluster: list[RedisServer]) -> None:
    """An account's slot moves to another node while its requests come, the
    way ``redis-cli --cluster reshard`` moves it: while the slot migrates, the
    old node answers ASK for the keys already moved and the call is sent on
    after ASKING (to a node that has not loaded the scripts yet); once the
    slot is the new node's, the old one answers MOVED, the map moves and the
    account's later steps go to the new node. Nothing falls back, and the
    account's bucket moved whole: 40 requests go at once over the three
    stages, and the 41st waits for the drip."""
    import redis

    store, piped, loop, clock = cluster_pacer(cluster)
    nodes = [redis.Redis(port=node.port) for node in cluster]
    try:
        for k in range(5):
            loop.arrive(k, "moving")
        loop.run(lambda: len(loop.sent) == 5)
        (src,) = [c for c in nodes if c.keys("elbasy:{shopify-admin-rest|*")]
        keys = src.keys("elbasy:{shopify-admin-rest|*")
        slot = src.cluster("keyslot", keys[0].decode())
        dst, third = [c for c in nodes if c is not src]
        dst_id, src_id = dst.cluster("myid"), src.cluster("myid")
        dst.script_flush()  # the new node has never run a script of elbasy's
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        src.execute_command(
            "MIGRATE", "127.0.0.1", cluster[nodes.index(dst)].port, "", 0, 5000, "KEYS", *moved
        )
        for k in range(5, 10):  # asked of the old node: ASK, then the new one
            loop.arrive(k, "moving")
        loop.run(lambda: len(loop.sent) == 10)
        asked = piped.stats()["redirects"]
        assert asked, piped.stats()
        for c in (dst, src, third):
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for k in range(10, 40):  # the first asks the old node: MOVED, and the map moves
            loop.arrive(k, "moving")
        loop.run(lambda: len(loop.sent) == 40)
        stats = piped.stats()
        assert stats["redirects"] > asked, stats
        assert stats["fallbacks"] == 0 and stats["late_answers"] == 0, stats
        assert stats["lost_answers"] == 0, stats
        assert src.keys("elbasy:{shopify-admin-rest|*") == []
        assert dst.keys("elbasy:{shopify-admin-rest|*")
        # the bucket came along: the 41st waits for its drip (2/s)
        loop.arrive(40, "moving")
        loop.run(lambda: len(loop.sent) == 41)
        assert clock["t"] == pytest.approx(START + 0.5, abs=1e-6)
        assert piped.stats()["redirects"] == stats["redirects"]  # sent to the new node at once
    finally:
        piped.close()
        for c in nodes:
            c.close()


def tls_redis(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """A redis-server speaking only TLS, with a certificate for 127.0.0.1."""
    cert, key = tmp_path / "redis.crt", tmp_path / "redis.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    port = cluster_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert)]
        + ["--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)]
        + ["--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, port, cert


@pytest.mark.parametrize("kind", ["rediss", "unix"])
def test_the_piped_store_over_tls_and_a_unix_socket(tmp_path: Path, kind: str) -> None:
    """``rediss://`` (the server's certificate verified against the URL's CA)
    and ``unix://``: the steps go over a pipe of that kind, answered later."""
    import socket
    import ssl

    if kind == "rediss":
        proc, port, cert = tls_redis(tmp_path)
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}&ssl_check_hostname=true"
    else:
        sock_path = tmp_path / "redis.sock"
        proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(sock_path)]
            + ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"unix://{sock_path}?db=0"
    try:
        wait_for("the server up", lambda: connect(url).ping(), seconds=10)
        clock = {"t": START}
        fleet = FleetStore(lambda: RedisStore(url, EXACT, clock="caller"), LocalStore(EXACT))
        store = PipedStore(fleet, timeout=0.5)
        pacer = Pacer(RuleSet.builtin(), store, wall=lambda: clock["t"], mono=lambda: clock["t"])
        loop = LoopWithoutSockets(pacer, store, clock)
        try:
            for k in range(5):
                assert loop.arrive(k, f"shop{k}").pending == "reserve"
            loop.run(lambda: len(loop.sent) == 5)
            stats = store.stats()
            assert stats["fallbacks"] == 0 and int(stats["steps_sent"]) >= 15, stats
            ((pipe, _),) = store._pipes.values()
            if kind == "rediss":
                assert isinstance(pipe.sock, ssl.SSLSocket)
            else:
                assert pipe.sock.family == socket.AF_UNIX
        finally:
            store.close()
    finally:
        proc.kill()
        proc.wait(10)
