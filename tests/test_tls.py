"""elbasy.tls and elbasy._tls: real OpenSSL handshakes over real sockets.

elbasy's side runs in the test's thread, driven through the cffi lib the way
the loop drives it (SSL_do_handshake, SSL_read, SSL_write on an SSL* held as
an int); the peer is the stdlib ssl module in a thread. No SSL* ever crosses
to the stdlib. The CAs are made by elbasy.ca at the real time, because the
stdlib peer verifies against the real clock; every test passes its CA
explicitly (these machines export SSL_CERT_FILE pointing at the system bundle).
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from elbasy._tls import ffi, lib
from elbasy.ca import CertificateAuthority
from elbasy.errors import ElbasyError
from elbasy.tls import (
    CertificateVerifyError,
    ClientTLS,
    HandshakeError,
    ServerTLS,
    TLSConfigError,
    TLSError,
    alpn_selected,
    error_for,
    free_ssl,
    session_reused,
    tls_version,
)

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
INTERCEPT = ["*.myshopify.com", "api.etsy.com", "127.0.0.1", "::1"]
TIMEOUT = 10


# --------------------------------------------------------------------------- helpers


class Peer(threading.Thread):
    """The stdlib side of one connection, in a thread; `result` or `error` after join()."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as e:  # reported by the test
            self.error = e

    def outcome(self) -> Any:
        self.join(TIMEOUT)
        assert not self.is_alive(), "the stdlib peer hung"
        if self.error is not None:
            raise self.error
        return self.result


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): ours stays blocking, with a receive timeout so no test can hang."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", TIMEOUT, 0))
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", TIMEOUT, 0))
    theirs.settimeout(TIMEOUT)
    return ours, theirs


def handshake(ssl_int: int, fd: int | None = None) -> None:
    """Drive SSL_do_handshake to the end; with `fd`, swap a drained memory rbio for the socket
    (what the loop does after handing over early bytes). Raises error_for's exception."""
    p = ffi.cast("SSL *", ssl_int)
    while True:
        ret = lib.SSL_do_handshake(p)
        if ret == 1:
            return
        err = lib.SSL_get_error(p, ret)
        rbio = lib.SSL_get_rbio(p)
        if (
            err == lib.SSL_ERROR_WANT_READ
            and fd is not None
            and lib.BIO_ctrl_pending(rbio) == 0
            and lib.SSL_get_fd(p) != fd
        ):
            lib.SSL_set0_rbio(p, lib.BIO_new_socket(fd, lib.BIO_NOCLOSE))
            continue
        raise error_for(ssl_int)


def ssl_write(ssl_int: int, data: bytes) -> None:
    p = ffi.cast("SSL *", ssl_int)
    assert lib.SSL_write(p, data, len(data)) == len(data)


def ssl_read(ssl_int: int, size: int = 4096) -> bytes:
    p = ffi.cast("SSL *", ssl_int)
    buf = ffi.new("char[]", size)
    n = lib.SSL_read(p, buf, size)
    if n <= 0:
        err = lib.SSL_get_error(p, n)
        if err == lib.SSL_ERROR_ZERO_RETURN:
            return b""
        raise AssertionError(f"SSL_read failed: {err} {error_for(ssl_int)}")
    return bytes(ffi.buffer(buf, n))


def close_ssl(ssl_int: int) -> None:
    p = ffi.cast("SSL *", ssl_int)
    if lib.SSL_is_init_finished(p):
        lib.SSL_shutdown(p)  # send close_notify, do not wait for the peer's
    free_ssl(ssl_int)


def client_context(ca: CertificateAuthority, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca.cert_path))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


def stdlib_client(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    server_hostname: str | None,
    session: ssl.SSLSession | None = None,
    want_session: bool = False,
) -> Peer:
    """Handshake as a client, read one message (so TLS 1.3 tickets arrive), then close."""

    def run() -> dict[str, Any]:
        with ctx.wrap_socket(sock, server_hostname=server_hostname, session=session) as tls:
            data = tls.recv(100)
            info = {
                "data": data,
                "alpn": tls.selected_alpn_protocol(),
                "reused": tls.session_reused,
                # the stdlib leaks the copy SSLSocket.session makes: only when needed
                "session": tls.session if want_session else None,
                "cert": tls.getpeercert(),
                "version": tls.version(),
            }
            return info

    peer = Peer(run)
    peer.start()
    return peer


def serve_one(
    server: ServerTLS,
    ctx: ssl.SSLContext,
    sni: str | None,
    fallback: str = "api.etsy.com",
    session: ssl.SSLSession | None = None,
    want_session: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One full connection: the stdlib client against a ServerTLS SSL. (ours, theirs)."""
    ours, theirs = socket_pair()
    with ours, theirs:
        peer = stdlib_client(theirs, ctx, sni, session, want_session)
        s = server.new_ssl(ours.fileno(), fallback)
        try:
            handshake(s)
            ssl_write(s, b"hello")
            mine = {
                "alpn": alpn_selected(s),
                "reused": session_reused(s),
                "version": tls_version(s),
                "sni": lib.SSL_get_servername(ffi.cast("SSL *", s), lib.TLSEXT_NAMETYPE_host_name),
            }
            theirs_info = peer.outcome()
        finally:
            close_ssl(s)
    return mine, theirs_info


def san_of(cert: dict[str, Any]) -> list[str]:
    return [
        value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")
    ]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "ca", INTERCEPT, now=NOW, hostname="testhost")


@pytest.fixture
def server(authority: CertificateAuthority) -> Iterator[ServerTLS]:
    tls = ServerTLS(authority, lambda: NOW)
    yield tls
    tls.close()


@pytest.fixture
def ctx(authority: CertificateAuthority) -> ssl.SSLContext:
    return client_context(authority)


# --------------------------------------------------------------------------- server side


def test_sni_miss_mints_once_and_the_wildcard_serves_the_next_shop_in_c(
    server: ServerTLS, authority: CertificateAuthority, ctx: ssl.SSLContext
) -> None:
    mine, theirs = serve_one(server, ctx, "shop1.myshopify.com")
    assert theirs["data"] == b"hello"
    assert san_of(theirs["cert"]) == ["*.myshopify.com"]  # and it verified against the CA
    assert server.stats() == {"sni_hits": 0, "sni_misses": 1, "contexts": 1, "capacity": 1024}
    assert authority.minted == 1

    _, theirs = serve_one(server, ctx, "Shop2.MyShopify.com")
    assert san_of(theirs["cert"]) == ["*.myshopify.com"]
    assert server.stats()["sni_hits"] == 1
    assert server.stats()["sni_misses"] == 1
    assert authority.minted == 1  # served from the C table, no Python

    _, theirs = serve_one(server, ctx, "api.etsy.com")
    assert san_of(theirs["cert"]) == ["api.etsy.com"]
    assert server.stats() == {"sni_hits": 1, "sni_misses": 2, "contexts": 2, "capacity": 1024}
    assert authority.minted == 2


def test_a_deeper_name_is_not_intercepted_and_gets_no_leaf(
    server: ServerTLS, authority: CertificateAuthority, ctx: ssl.SSLContext
) -> None:
    serve_one(server, ctx, "shop1.myshopify.com")
    ours, theirs = socket_pair()
    with ours, theirs:
        peer = stdlib_client(theirs, ctx, "a.b.myshopify.com")
        s = server.new_ssl(ours.fileno(), "shop1.myshopify.com")
        try:
            with pytest.raises(TLSConfigError, match="not an intercepted host"):
                handshake(s)
        finally:
            free_ssl(s)
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
            peer.outcome()
    assert server.stats()["sni_misses"] == 2
    assert server.refused == 1
    assert authority.minted == 1
    assert sorted(p.name for p in authority.leaves_dir.iterdir()) == ["*.myshopify.com.pem"]


def test_without_sni_the_connect_host_picks_the_leaf(
    server: ServerTLS, authority: CertificateAuthority
) -> None:
    ctx = client_context(authority)
    ctx.check_hostname = False  # no SNI: the stdlib cannot check a name, we look at the SAN
    mine, theirs = serve_one(server, ctx, None, fallback="API.etsy.com")
    assert mine["sni"] == ffi.NULL
    assert san_of(theirs["cert"]) == ["api.etsy.com"]
    _, theirs = serve_one(server, ctx, None, fallback="127.0.0.1")
    assert san_of(theirs["cert"]) == ["127.0.0.1"]
    assert server.stats()["sni_misses"] == 2


def test_bracketed_ipv6_connect_host_is_served_from_the_table(
    server: ServerTLS, authority: CertificateAuthority
) -> None:
    ctx = client_context(authority)
    ctx.check_hostname = False
    for _ in range(2):
        _, theirs = serve_one(server, ctx, None, fallback="[::1]")
        assert san_of(theirs["cert"]) == ["0:0:0:0:0:0:0:1"]
    assert server.stats()["sni_hits"] == 1
    assert server.stats()["sni_misses"] == 1


def test_ip_literal_leaf_verifies_for_an_ip_client(
    server: ServerTLS, authority: CertificateAuthority
) -> None:
    ctx = client_context(authority)
    _, theirs = serve_one(server, ctx, "127.0.0.1", fallback="127.0.0.1")  # stdlib: no SNI for IPs
    assert san_of(theirs["cert"]) == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [(["h2", "http/1.1"], "http/1.1"), (["http/1.1"], "http/1.1"), (["h2"], None), (None, None)],
)
def test_alpn_is_http11_or_nothing(
    server: ServerTLS,
    authority: CertificateAuthority,
    offered: list[str] | None,
    chosen: str | None,
) -> None:
    mine, theirs = serve_one(server, client_context(authority, offered), "shop1.myshopify.com")
    assert mine["alpn"] == chosen
    assert theirs["alpn"] == chosen
    assert theirs["data"] == b"hello"  # an h2-only client is not failed


def test_alpn_applies_after_a_c_table_hit_too(
    server: ServerTLS, authority: CertificateAuthority
) -> None:
    serve_one(server, client_context(authority), "shop1.myshopify.com")
    mine, _ = serve_one(server, client_context(authority, ["h2", "http/1.1"]), "x.myshopify.com")
    assert server.stats()["sni_hits"] == 1
    assert mine["alpn"] == "http/1.1"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_server_session_resumption(
    server: ServerTLS, authority: CertificateAuthority, version: ssl.TLSVersion
) -> None:
    ctx = client_context(authority)
    ctx.maximum_version = version
    mine, theirs = serve_one(server, ctx, "shop1.myshopify.com", want_session=True)
    assert not mine["reused"] and not theirs["reused"]
    session = theirs["session"]
    assert session is not None

    mine, theirs = serve_one(server, ctx, "shop1.myshopify.com", session=session)
    assert theirs["reused"]
    assert mine["reused"]
    assert mine["version"] == {"TLSv1_3": "TLSv1.3", "TLSv1_2": "TLSv1.2"}[version.name]


def test_hello_retry_request_keeps_the_chosen_leaf(
    server: ServerTLS, authority: CertificateAuthority
) -> None:
    """The client's key share is for X25519, the server takes only P-256: a HelloRetryRequest,
    and a second ClientHello that reaches the servername callback on a switched SSL."""
    ctx = client_context(authority)
    for name in ("shop1.myshopify.com", "shop2.myshopify.com"):  # a miss, then a hit
        ours, theirs = socket_pair()
        with ours, theirs:
            peer = stdlib_client(theirs, ctx, name)
            s = server.new_ssl(ours.fileno(), "api.etsy.com")
            try:
                assert lib.SSL_set1_groups_list(ffi.cast("SSL *", s), b"P-256") == 1
                handshake(s)
                ssl_write(s, b"hello")
                info = peer.outcome()
            finally:
                close_ssl(s)
        assert info["data"] == b"hello"
        assert san_of(info["cert"]) == ["*.myshopify.com"]
    assert server.stats()["sni_hits"] == 1
    assert server.stats()["sni_misses"] == 1


def test_tls_below_1_2_is_refused(server: ServerTLS, authority: CertificateAuthority) -> None:
    ctx = client_context(authority)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with pytest.warns(DeprecationWarning):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ours, theirs = socket_pair()
    with ours, theirs:
        peer = stdlib_client(theirs, ctx, "shop1.myshopify.com")
        s = server.new_ssl(ours.fileno(), "shop1.myshopify.com")
        try:
            with pytest.raises(HandshakeError):
                handshake(s)
        finally:
            free_ssl(s)
        with pytest.raises((ssl.SSLError, OSError)):
            peer.outcome()


def test_stale_leaf_is_a_miss_and_is_renewed(authority: CertificateAuthority) -> None:
    now = [NOW]
    server = ServerTLS(authority, lambda: now[0])
    ctx = client_context(authority)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the renewed leaf starts in the (fake) future
    try:
        serve_one(server, ctx, "shop1.myshopify.com")
        first = authority.leaf_for("shop1.myshopify.com", NOW)
        server.set_time(first.renew_at() - dt.timedelta(seconds=1))
        serve_one(server, ctx, "shop2.myshopify.com")
        assert server.stats()["sni_hits"] == 1

        now[0] = first.renew_at() + dt.timedelta(seconds=1)
        server.set_time(now[0])
        serve_one(server, ctx, "shop3.myshopify.com")
        assert server.stats() == {
            "sni_hits": 1,
            "sni_misses": 2,
            "contexts": 1,
            "capacity": 1024,
        }
        assert authority.minted == 2
        serve_one(server, ctx, "shop4.myshopify.com")
        assert server.stats()["sni_hits"] == 2  # the renewed entry is fresh
    finally:
        server.close()


def test_a_full_table_drops_its_oldest_entry(authority: CertificateAuthority) -> None:
    server = ServerTLS(authority, lambda: NOW, table_size=2)
    ctx = client_context(authority)
    ctx.check_hostname = False
    try:
        for name in ("a.myshopify.com", "api.etsy.com", "127.0.0.1"):
            serve_one(server, ctx, None, fallback=name)
        assert server.stats()["contexts"] == 2
        serve_one(server, ctx, None, fallback="api.etsy.com")  # still there
        assert server.stats()["sni_hits"] == 1
        serve_one(server, ctx, None, fallback="b.myshopify.com")  # the oldest went
        assert server.stats() == {"sni_hits": 1, "sni_misses": 4, "contexts": 2, "capacity": 2}
        assert authority.minted == 3  # the CA's own cache answered the re-miss
    finally:
        server.close()


def test_name_the_ca_cannot_serve_fails_the_handshake_with_the_reason(
    authority: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    # intercepted (a glob covers it) but outside the CA's name constraints
    server = ServerTLS(authority, lambda: NOW, intercept=[*INTERCEPT, "evil.example.org"])
    ctx = client_context(authority)
    ours, theirs = socket_pair()
    with ours, theirs, caplog.at_level(logging.WARNING, logger="elbasy"):
        peer = stdlib_client(theirs, ctx, "evil.example.org")
        s = server.new_ssl(ours.fileno(), "shop1.myshopify.com")
        try:
            with pytest.raises(TLSConfigError, match="evil.example.org") as info:
                handshake(s)
        finally:
            free_ssl(s)
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
            peer.outcome()
    assert "name constraints" in str(info.value)
    assert not info.value.peer_fault
    assert "evil.example.org" in caplog.text
    assert server.stats()["contexts"] == 0
    assert server.refused == 0  # refused by the CA, not before it
    server.close()
    assert lib.ERR_peek_error() == 0  # the queue is left clean


def test_an_exception_in_the_miss_handler_never_reaches_c(
    authority: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_clock() -> dt.datetime:
        raise RuntimeError("the clock is broken")

    server = ServerTLS(authority, broken_clock)
    ours, theirs = socket_pair()
    try:
        with ours, theirs, caplog.at_level(logging.WARNING, logger="elbasy"):
            peer = stdlib_client(theirs, client_context(authority), "shop1.myshopify.com")
            s = server.new_ssl(ours.fileno(), "shop1.myshopify.com")
            try:
                with pytest.raises(TLSConfigError, match="the clock is broken"):
                    handshake(s)
            finally:
                free_ssl(s)
            with pytest.raises(ssl.SSLError):
                peer.outcome()
        assert "the clock is broken" in caplog.text
        assert isinstance(server.last_failure, TLSConfigError)
    finally:
        server.close()
    with pytest.raises(ValueError):
        ServerTLS(authority, broken_clock, table_size=0)


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: shop1.myshopify.com\r\n\r\n", "http request"),
        (b"\x16\x03\x01\x00\x05hello", ""),
        (b"\x00" * 64, ""),
    ],
)
def test_garbage_instead_of_a_client_hello_is_a_handshake_error(
    server: ServerTLS, garbage: bytes, reason: str
) -> None:
    ours, theirs = socket_pair()
    with ours, theirs:
        theirs.sendall(garbage)
        theirs.shutdown(socket.SHUT_WR)
        s = server.new_ssl(ours.fileno(), "shop1.myshopify.com")
        try:
            with pytest.raises(HandshakeError) as info:
                handshake(s)
        finally:
            free_ssl(s)
    err = info.value
    assert isinstance(err, TLSError) and isinstance(err, ElbasyError)
    assert err.peer_fault
    assert reason in err.reason
    assert err.reason  # OpenSSL's text, never empty
    assert lib.ERR_peek_error() == 0


def test_client_closing_mid_handshake_is_a_handshake_error(server: ServerTLS) -> None:
    ours, theirs = socket_pair()
    with ours:
        theirs.close()
        s = server.new_ssl(ours.fileno(), "shop1.myshopify.com")
        try:
            with pytest.raises(HandshakeError):
                handshake(s)
        finally:
            free_ssl(s)


@pytest.mark.parametrize("early_size", [None, 5, 1])
def test_client_hello_delivered_as_early_bytes(
    server: ServerTLS, authority: CertificateAuthority, early_size: int | None
) -> None:
    """The client sent its ClientHello before reading "200 Connection established": the loop
    read some or all of it with the CONNECT head and hands it over as `early`."""
    ours, theirs = socket_pair()
    with ours, theirs:
        peer = stdlib_client(theirs, client_context(authority, ["http/1.1"]), "shop9.myshopify.com")
        if early_size is None:
            early = ours.recv(65536)  # everything that has arrived
        else:
            early = ours.recv(early_size, socket.MSG_WAITALL)  # the rest stays in the socket
        assert early[:1] == b"\x16"
        s = server.new_ssl(ours.fileno(), "shop9.myshopify.com", early=early)
        try:
            assert lib.BIO_ctrl_pending(lib.SSL_get_rbio(ffi.cast("SSL *", s))) == len(early)
            handshake(s, fd=ours.fileno())
            assert lib.SSL_get_fd(ffi.cast("SSL *", s)) == ours.fileno()  # the rbio was swapped
            ssl_write(s, b"hello")
            info = peer.outcome()
            assert alpn_selected(s) == "http/1.1"
        finally:
            close_ssl(s)
    assert info["data"] == b"hello"
    assert san_of(info["cert"]) == ["*.myshopify.com"]


def test_openssl_never_closes_the_fd(server: ServerTLS) -> None:
    ours, theirs = socket_pair()
    with ours, theirs:
        for early in (b"", b"\x16"):
            s = server.new_ssl(ours.fileno(), "api.etsy.com", early=early)
            free_ssl(s)
        ours.getsockname()  # still open: the loop owns and closes fds
        theirs.sendall(b"x")
        assert ours.recv(1) == b"x"


def test_closed_server_refuses_new_ssls_and_live_ones_survive(
    authority: CertificateAuthority,
) -> None:
    server = ServerTLS(authority, lambda: NOW)
    ctx = client_context(authority)
    serve_one(server, ctx, "shop1.myshopify.com")
    ours, theirs = socket_pair()
    with ours, theirs:
        peer = stdlib_client(theirs, ctx, "shop2.myshopify.com")
        s = server.new_ssl(ours.fileno(), "api.etsy.com")
        server.close()
        server.close()  # idempotent
        try:
            handshake(s)  # the SSL holds its own references to the contexts
            ssl_write(s, b"hello")
            assert peer.outcome()["data"] == b"hello"
        finally:
            close_ssl(s)
    with pytest.raises(TLSConfigError):
        server.new_ssl(0, "api.etsy.com")
    assert server.stats()["contexts"] == 0


def test_leaf_that_does_not_load_is_a_config_error(
    server: ServerTLS, authority: CertificateAuthority
) -> None:
    leaf = authority.leaf_for("api.etsy.com", NOW)
    other = authority.leaf_for("shop1.myshopify.com", NOW)
    from dataclasses import replace

    with pytest.raises(TLSConfigError, match="does not load") as info:
        server.add_leaf(replace(leaf, key_pem=other.key_pem))
    assert "values mismatch" in info.value.reason
    with pytest.raises(TLSConfigError, match="does not load"):
        server.add_leaf(replace(leaf, cert_chain_pem=b"not a certificate"))
    assert lib.ERR_peek_error() == 0
    server.add_leaf(leaf)
    assert server.stats()["contexts"] == 1


# --------------------------------------------------------------------------- client side


@pytest.fixture
def upstream_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(
        tmp_path / "upstream-ca", ["api.upstream.test", "127.0.0.1"], now=NOW, hostname="origin"
    )


@pytest.fixture
def upstream_ctx(upstream_ca: CertificateAuthority, tmp_path: Path) -> ssl.SSLContext:
    """A stdlib server context with a leaf for api.upstream.test (and one for 127.0.0.1 by SNI)."""
    contexts = {}
    for name in ("api.upstream.test", "127.0.0.1"):
        leaf = upstream_ca.leaf_for(name, NOW)
        chain = tmp_path / f"{name}.pem"
        chain.write_bytes(leaf.cert_chain_pem + leaf.key_pem)
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        c.load_cert_chain(chain)
        c.set_alpn_protocols(["h2", "http/1.1"])
        contexts[name] = c
    main = contexts["api.upstream.test"]

    def pick(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        if name is None:
            sock.context = contexts["127.0.0.1"]

    main.sni_callback = pick  # type: ignore[assignment]
    return main


def stdlib_server(sock: socket.socket, ctx: ssl.SSLContext) -> Peer:
    def run() -> dict[str, Any]:
        with ctx.wrap_socket(sock, server_side=True) as tls:
            tls.sendall(b"hello from upstream")
            info = {"reused": tls.session_reused, "alpn": tls.selected_alpn_protocol()}
            try:
                tls.recv(10)
            except (OSError, ssl.SSLError):
                pass
            return info

    peer = Peer(run)
    peer.start()
    return peer


def connect_upstream(
    client: ClientTLS, ctx: ssl.SSLContext, host: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    ours, theirs = socket_pair()
    with ours, theirs:
        peer = stdlib_server(theirs, ctx)
        s = client.new_ssl(ours.fileno(), host)
        try:
            try:
                handshake(s)
            except TLSError:
                ours.shutdown(socket.SHUT_RDWR)
                peer.join(TIMEOUT)
                raise
            data = ssl_read(s)
            mine = {
                "data": data,
                "alpn": alpn_selected(s),
                "reused": session_reused(s),
                "version": tls_version(s),
            }
        finally:
            close_ssl(s)
        return mine, peer.outcome()


def test_client_verifies_with_the_extra_ca(
    upstream_ca: CertificateAuthority, upstream_ctx: ssl.SSLContext
) -> None:
    with ClientTLS(extra_ca=str(upstream_ca.cert_path)) as client:
        mine, theirs = connect_upstream(client, upstream_ctx, "API.upstream.test.")
    assert mine["data"] == b"hello from upstream"
    assert mine["alpn"] == "http/1.1" == theirs["alpn"]
    assert mine["version"] == "TLSv1.3"


def test_client_verifies_an_ip_literal(
    upstream_ca: CertificateAuthority, upstream_ctx: ssl.SSLContext
) -> None:
    with ClientTLS(extra_ca=str(upstream_ca.cert_path)) as client:
        mine, _ = connect_upstream(client, upstream_ctx, "127.0.0.1")  # no SNI: the IP leaf
        assert mine["data"] == b"hello from upstream"
        with pytest.raises(CertificateVerifyError, match="IP address mismatch"):
            connect_upstream(client, upstream_ctx, "127.0.0.2")


def test_client_hostname_mismatch(
    upstream_ca: CertificateAuthority, upstream_ctx: ssl.SSLContext
) -> None:
    with ClientTLS(extra_ca=str(upstream_ca.cert_path)) as client:
        with pytest.raises(CertificateVerifyError, match="hostname mismatch") as info:
            connect_upstream(client, upstream_ctx, "other.upstream.test")
    err = info.value
    assert str(err) == "certificate verify failed: hostname mismatch"
    assert err.reason == "hostname mismatch"
    assert err.verify_result == lib.X509_V_ERR_HOSTNAME_MISMATCH
    assert err.peer_fault
    assert lib.ERR_peek_error() == 0


def test_client_without_the_ca_does_not_trust_the_upstream(
    upstream_ctx: ssl.SSLContext,
) -> None:
    with ClientTLS() as client:
        with pytest.raises(CertificateVerifyError) as info:
            connect_upstream(client, upstream_ctx, "api.upstream.test")
    # the upstream sends its CA along: OpenSSL names that (no CA sent: "unable to get
    # local issuer certificate", X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY)
    assert info.value.reason == "self-signed certificate in certificate chain"
    assert info.value.verify_result == lib.X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN


def test_client_without_the_ca_and_a_leaf_only_upstream(
    upstream_ca: CertificateAuthority, tmp_path: Path
) -> None:
    leaf = upstream_ca.leaf_for("api.upstream.test", NOW)
    pem = tmp_path / "leaf-only.pem"
    pem.write_bytes(
        leaf.cert_chain_pem.split(b"-----END CERTIFICATE-----")[0]
        + b"-----END CERTIFICATE-----\n"
        + leaf.key_pem
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)
    with ClientTLS() as client:
        with pytest.raises(CertificateVerifyError, match="unable to get local issuer") as info:
            connect_upstream(client, ctx, "api.upstream.test")
    assert info.value.verify_result == lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    with ClientTLS(extra_ca=str(upstream_ca.cert_path)) as client:
        mine, _ = connect_upstream(client, ctx, "api.upstream.test")
    assert mine["data"] == b"hello from upstream"


def test_client_session_resumption(
    upstream_ca: CertificateAuthority, upstream_ctx: ssl.SSLContext
) -> None:
    with ClientTLS(extra_ca=str(upstream_ca.cert_path)) as client:
        mine, theirs = connect_upstream(client, upstream_ctx, "api.upstream.test")
        assert not mine["reused"]
        assert client.sessions() == 1
        mine, theirs = connect_upstream(client, upstream_ctx, "api.upstream.test")
        assert mine["reused"] and theirs["reused"]
        assert client.sessions() == 1  # the fresh ticket from the resumed connection
        mine, _ = connect_upstream(client, upstream_ctx, "api.upstream.test")
        assert mine["reused"]


def test_client_session_is_per_host(
    upstream_ca: CertificateAuthority, upstream_ctx: ssl.SSLContext
) -> None:
    with ClientTLS(extra_ca=str(upstream_ca.cert_path)) as client:
        connect_upstream(client, upstream_ctx, "api.upstream.test")
        mine, _ = connect_upstream(client, upstream_ctx, "127.0.0.1")
        assert not mine["reused"]
        assert client.sessions() == 2


def test_client_tls12_session_resumption(
    upstream_ca: CertificateAuthority, upstream_ctx: ssl.SSLContext
) -> None:
    upstream_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with ClientTLS(extra_ca=str(upstream_ca.cert_path)) as client:
        mine, _ = connect_upstream(client, upstream_ctx, "api.upstream.test")
        assert mine["version"] == "TLSv1.2"
        mine, theirs = connect_upstream(client, upstream_ctx, "api.upstream.test")
        assert mine["reused"] and theirs["reused"]


def test_bad_extra_ca_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad-ca.pem"
    bad.write_text("this is not a certificate\n")
    with pytest.raises(TLSConfigError, match="bad-ca.pem") as info:
        ClientTLS(extra_ca=str(bad))
    assert not info.value.peer_fault
    assert info.value.reason
    with pytest.raises(TLSConfigError, match="missing.pem"):
        ClientTLS(extra_ca=str(tmp_path / "missing.pem"))
    assert lib.ERR_peek_error() == 0


def test_an_upstream_that_is_not_tls_is_a_handshake_error() -> None:
    ours, theirs = socket_pair()
    with ours, theirs, ClientTLS() as client:
        theirs.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        theirs.shutdown(socket.SHUT_WR)
        s = client.new_ssl(ours.fileno(), "api.upstream.test")
        try:
            with pytest.raises(HandshakeError, match="wrong version number"):
                handshake(s)
        finally:
            free_ssl(s)


def test_client_sends_sni_for_names_only(upstream_ca: CertificateAuthority) -> None:
    seen: list[str | None] = []
    leaf = upstream_ca.leaf_for("api.upstream.test", NOW)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    key = Path(upstream_ca.data_dir) / "sni-test.pem"
    key.write_bytes(leaf.cert_chain_pem + leaf.key_pem)
    ctx.load_cert_chain(key)

    def record(_sock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    ctx.sni_callback = record  # type: ignore[assignment]
    with ClientTLS(extra_ca=str(upstream_ca.cert_path)) as client:
        connect_upstream(client, ctx, "api.upstream.test")
        with pytest.raises(CertificateVerifyError):
            connect_upstream(client, ctx, "[::1]")
    assert seen == ["api.upstream.test", None]
