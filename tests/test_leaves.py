"""Leaf minting is bounded: only intercepted names at their glob's depth, one wildcard leaf
per glob, a rate limit per client address, and a capped disk cache.

The attack (issue 16): every distinct SNI inside the CA's name constraints
(``n1.deep.myshopify.com``, ``n2.deep.myshopify.com``, ...) minted a leaf and
wrote a file. Here real OpenSSL handshakes run over real sockets, against the
ServerTLS class (the stdlib client in a thread, as in test_tls) and through a
real elbasy subprocess; mints are counted by the authority and by /metrics,
files in the data dir.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import origins
import pytest
from conftest import Proxy
from test_pacing import metrics_total, scrape_metrics
from test_tls import (
    NOW,
    TIMEOUT,
    client_context,
    handshake,
    san_of,
    serve_one,
    ssl_write,
    stdlib_client,
)

from elbasy.ca import CertificateAuthority
from elbasy.ca.storage import prune_leaves
from elbasy.hostglob import covered, glob_covers, some_hosts
from elbasy.policy import Policy
from elbasy.rules import RuleSet
from elbasy.tls import MintLimiter, ServerTLS, TLSConfigError, free_ssl

INTERCEPT = ["*.myshopify.com", "api*.etsy.com", "api.github.com"]


# --------------------------------------------------------------------------- the depth rule


@pytest.mark.parametrize(
    ("glob", "name", "covers"),
    [
        ("*.myshopify.com", "shop.myshopify.com", True),
        ("*.myshopify.com", "Shop.MyShopify.com.", True),
        ("*.myshopify.com", "n1.deep.myshopify.com", False),  # fnmatch's * would cross the dot
        ("*.myshopify.com", "myshopify.com", False),
        ("*.myshopify.com", "shop.myshopify.com.evil.org", False),
        ("api.github.com", "api.github.com", True),
        ("api.github.com", "n2.api.github.com", False),
        ("api*.etsy.com", "api2.etsy.com", True),
        ("api*.etsy.com", "api.x.etsy.com", False),
        ("shop.*.example.com", "shop.eu.example.com", True),
        ("shop.*.example.com", "shop.eu.west.example.com", False),
        ("127.0.0.1", "127.0.0.1", True),
        ("::1", "[::1]", True),
        ("*", "localhost", True),
        ("*", "a.b", False),
    ],
)
def test_a_glob_covers_one_label_per_label(glob: str, name: str, covers: bool) -> None:
    assert glob_covers(glob, name) is covers
    assert covered(name, ["other.example.org", glob]) is covers


def test_a_connect_to_a_deeper_name_is_tunnelled_not_intercepted() -> None:
    policy = Policy(lambda: {}, intercept=["*.myshopify.com"])
    assert policy.intercepts("shop1.myshopify.com")
    assert not policy.intercepts("n1.deep.myshopify.com")
    assert not policy.intercepts("myshopify.com")


def test_rules_cover_the_names_interception_covers() -> None:
    """A rule's host glob covers a name at the depth interception does: a plain
    http:// request to a deeper name is not paced by a rule whose CONNECT would
    be tunnelled (fnmatch's * crossed the dot there)."""
    rules = RuleSet.builtin()
    head = [(b"X-Shopify-Access-Token", b"tok")]
    path = "/admin/api/2024-10/products.json"
    assert rules.covers("shop1.myshopify.com")
    assert rules.match("shop1.myshopify.com", "GET", path, head) is not None
    for name in ("n1.deep.myshopify.com", "myshopify.com", "x.openapi.etsy.com"):
        assert not rules.covers(name)
        assert rules.match(name, "GET", path, head) is None


# --------------------------------------------------------------------------- ServerTLS


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "ca", INTERCEPT, now=NOW, hostname="testhost")


def leaf_files(authority: CertificateAuthority) -> list[str]:
    if not authority.leaves_dir.exists():
        return []
    return sorted(p.name for p in authority.leaves_dir.iterdir())


def tcp_pair(source: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
    """(ours, theirs) over TCP on loopback, theirs bound to ``source``: a client address."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(
            listener.getsockname(), timeout=TIMEOUT, source_address=(source, 0)
        )
        ours, _ = listener.accept()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", TIMEOUT, 0))
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", TIMEOUT, 0))
    return ours, theirs


def shake(
    server: ServerTLS, ctx: ssl.SSLContext, sni: str, source: str = "127.0.0.1"
) -> str | None:
    """One handshake from ``source`` with ``sni``: None if it worked, else elbasy's reason
    (and the client must have seen it fail too)."""
    ours, theirs = tcp_pair(source)
    with ours, theirs:
        peer = stdlib_client(theirs, ctx, sni)
        s = server.new_ssl(ours.fileno(), "shop1.myshopify.com")
        try:
            try:
                handshake(s)
            except TLSConfigError as e:
                with pytest.raises((ssl.SSLError, OSError)):
                    peer.outcome()
                return str(e)
            ssl_write(s, b"hello")
            assert peer.outcome()["data"] == b"hello"
            return None
        finally:
            free_ssl(s)


def test_500_deep_names_mint_nothing_and_write_nothing(authority: CertificateAuthority) -> None:
    server = ServerTLS(authority, lambda: NOW)
    ctx = client_context(authority)
    before = os.times()
    try:
        for i in range(500):
            name = f"n{i}.deep.myshopify.com" if i % 2 else f"n{i}.api.github.com"
            reason = shake(server, ctx, name)
            assert reason is not None and "not an intercepted host" in reason
        used = os.times()
        assert server.refused == 500
        assert server.stats()["contexts"] == 0
    finally:
        server.close()
    assert authority.minted == 0
    assert leaf_files(authority) == []
    # refused before any key is made: a mint each was ~2 ms; the clients' threads and
    # handshakes are most of this, so the bound is generous
    assert (used.user + used.system) - (before.user + before.system) < 20


def test_200_shops_share_one_wildcard_leaf_and_one_file(authority: CertificateAuthority) -> None:
    server = ServerTLS(authority, lambda: NOW)
    ctx = client_context(authority)
    try:
        for i in range(200):
            _, theirs = serve_one(server, ctx, f"shop{i}.myshopify.com")
            assert san_of(theirs["cert"]) == ["*.myshopify.com"]  # verified by the stdlib
        assert server.stats()["sni_hits"] == 199  # found under *.myshopify.com in C
    finally:
        server.close()
    assert authority.minted == 1
    assert leaf_files(authority) == ["*.myshopify.com.pem"]


def test_new_leaves_are_rate_limited_per_client_address(authority: CertificateAuthority) -> None:
    limiter = MintLimiter(lambda: 0.0, per_minute=60, burst=3)  # the clock never moves
    server = ServerTLS(authority, lambda: NOW, limiter=limiter)
    ctx = client_context(authority)
    try:
        for i in range(3):
            assert shake(server, ctx, f"api{i}.etsy.com") is None
        reason = shake(server, ctx, "api3.etsy.com")
        assert reason is not None and "too many new leaves" in reason
        # what exists is still served: api0 from the C table
        assert shake(server, ctx, "api0.etsy.com") is None
        server.clear()  # and from the authority's cache once the C table forgot it
        assert shake(server, ctx, "api1.etsy.com") is None
        # another client address has its own bucket
        assert shake(server, ctx, "api3.etsy.com", source="127.0.0.2") is None
        assert server.refused == 1
        assert limiter.refused == 1
    finally:
        server.close()
    assert authority.minted == 4
    assert len(leaf_files(authority)) == 4


def test_the_limiter_refills_and_bounds_all_clients_together() -> None:
    now = [0.0]
    limiter = MintLimiter(lambda: now[0], per_minute=60, burst=2)
    assert [limiter.take("10.0.0.1") for _ in range(3)] == [True, True, False]
    now[0] = 1.0  # one a second
    assert [limiter.take("10.0.0.1") for _ in range(2)] == [True, False]
    # all clients together: 4 bursts' worth (8, refilled at 4 a second); 2 + 1 taken
    # of it so far, and the bucket was full again at 1 s, so 7 are left for new clients
    clients = [limiter.take(f"10.0.1.{i}") for i in range(10)]
    assert clients == [True] * 7 + [False] * 3
    # a client whose address is unknown has only that bucket
    assert not limiter.take(None)
    assert MintLimiter(lambda: 0.0, per_minute=0).take(None)  # 0: no limit
    with pytest.raises(ValueError):
        MintLimiter(lambda: 0.0, burst=0)


# --------------------------------------------------------------------------- the disk cache


def test_prune_keeps_the_most_recently_used_files(tmp_path: Path) -> None:
    for i in range(10):
        path = tmp_path / f"api{i}.etsy.com.pem"
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / ".api0.etsy.com.pem.x.tmp").write_bytes(b"")  # a write under way: not counted
    os.utime(tmp_path / "api0.etsy.com.pem", (5000, 5000))  # just used
    assert prune_leaves(tmp_path, 4, keep="api1.etsy.com") == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".api0.etsy.com.pem.x.tmp",
        "api0.etsy.com.pem",
        "api1.etsy.com.pem",  # kept: the one just written
        "api8.etsy.com.pem",
        "api9.etsy.com.pem",
    ]
    assert prune_leaves(tmp_path, 4) == 0
    assert prune_leaves(tmp_path / "missing", 4) == 0


def test_the_disk_cache_stays_under_its_cap(authority: CertificateAuthority) -> None:
    authority.leaf_files = 5
    for i in range(30):
        authority.leaf_for(f"api{i}.etsy.com", NOW)
        assert len(leaf_files(authority)) <= 5
    assert authority.minted == 30
    assert "api29.etsy.com.pem" in leaf_files(authority)
    assert len(authority.cached_names()) <= authority.cache_size  # memory: an LRU


# --------------------------------------------------------------------------- through elbasy

GLOB = "*.myshopify.com"


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[tuple[origins.HTTPOrigin, origins.TestCA]]:
    ca = origins.make_ca(tmp_path)
    cert, key = origins.make_leaf(ca, tmp_path, names=(GLOB, "localhost"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    o = origins.HTTPOrigin(tls=ctx)
    yield o, ca
    o.close()


def connect(p: Proxy, host: str) -> socket.socket:
    s = p.connect()
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = origins.Reader(s).read_head()
    assert head is not None and head.startswith(b"HTTP/1.1 200"), head
    return s


def test_through_elbasy_deep_names_get_no_leaf_and_shops_share_one(
    proxy: Callable[..., Proxy],
    shop: tuple[origins.HTTPOrigin, origins.TestCA],
    tmp_path: Path,
) -> None:
    origin, test_ca = shop
    data = tmp_path / "data"
    p = proxy(
        "--intercept",
        GLOB,
        "--data-dir",
        data,
        "--upstream-ca",
        test_ca.path,
        "--connect-to",
        f"{GLOB}:443:127.0.0.1:{origin.port}",
    )
    ctx = ssl.create_default_context(cafile=str(data / "ca.pem"))
    cpu = p.cpu_seconds()
    # the SNI differs from the CONNECT host: the TLS side checks it too
    for i in range(500):
        with (
            connect(p, "shop1.myshopify.com") as s,
            pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"),
        ):
            ctx.wrap_socket(s, server_hostname=f"n{i}.deep.myshopify.com")
    # a CONNECT to a deeper name is tunnelled to the origin, never handed a leaf
    for i in range(5):
        with connect(p, f"n{i}.deep.myshopify.com") as s:
            raw = ssl.create_default_context(cafile=str(test_ca.path))
            raw.check_hostname = False
            with raw.wrap_socket(s, server_hostname=f"n{i}.deep.myshopify.com") as tls:
                assert san_of(tls.getpeercert())[:2] == [GLOB, "localhost"]  # the origin's own
    assert not (data / "leaves").exists() or list((data / "leaves").iterdir()) == []
    for i in range(200):
        with (
            connect(p, f"shop{i}.myshopify.com") as s,
            ctx.wrap_socket(s, server_hostname=f"shop{i}.myshopify.com") as tls,
        ):
            assert san_of(tls.getpeercert()) == [GLOB]
    assert sorted(f.name for f in (data / "leaves").iterdir()) == ["*.myshopify.com.pem"]
    assert p.cpu_seconds() - cpu < 30  # 705 handshakes; was a mint and a file each
    samples = scrape_metrics(p)
    assert metrics_total(samples, "elbasy_tls_leaf_mints_total") == 1
    refused = metrics_total(samples, "elbasy_tls_leaf_refusals_total", reason="not_intercepted")
    assert refused == 500
    assert p.healthz()["connections"]["tunnels_total"] == 5


def test_some_hosts_names_the_first_and_counts_the_rest() -> None:
    hosts = ["a.example.com", "b.example.com", "c.example.com", "d.example.com"]
    assert some_hosts(hosts, 100) == ", ".join(hosts)
    assert some_hosts(hosts, 40) == "a.example.com, b.example.com +2 more"
    assert some_hosts(hosts, 5) == "a.example.com +3 more"  # one at least
    assert some_hosts(hosts[:1], 5) == "a.example.com"
    assert some_hosts([], 5) == ""
    for width in range(1, 80):
        text = some_hosts(hosts, width)
        assert len(text) <= width or text == "a.example.com +3 more", (width, text)
