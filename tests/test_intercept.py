"""TLS interception end to end: real clients, real handshakes, a local origin under a real name.

elbasy runs with ``--intercept '*.myshopify.com'``; ``--connect-to`` sends
``*.myshopify.com:443`` to a local TLS origin whose certificate (for
``*.myshopify.com``) comes from the test CA, which elbasy trusts through
``--upstream-ca``. Clients trust elbasy's own CA (made on first run in the
data dir) and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import origins
import pytest
from conftest import Proxy

SHOP = "shop1.myshopify.com"
GLOB = "*.myshopify.com"


@pytest.fixture(scope="module")
def shop_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[origins.TestCA, ssl.SSLContext]:
    """The test CA and an origin context serving ``*.myshopify.com``."""
    where = tmp_path_factory.mktemp("shop")
    ca = origins.make_ca(where)
    cert, key = origins.make_leaf(ca, where, names=(GLOB, "localhost"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ca, ctx


@pytest.fixture
def shop(shop_tls: tuple[origins.TestCA, ssl.SSLContext]) -> Iterator[origins.HTTPOrigin]:
    o = origins.HTTPOrigin(tls=shop_tls[1])
    yield o
    o.close()


class Mitm:
    """A running elbasy that intercepts *.myshopify.com, and how clients reach it."""

    def __init__(self, proxy: Proxy, data_dir: Path) -> None:
        self.proxy = proxy
        self.ca = data_dir / "ca.pem"
        self.url = proxy.url

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture
def mitm(
    proxy: Callable[..., Proxy],
    shop: origins.HTTPOrigin,
    shop_tls: tuple[origins.TestCA, ssl.SSLContext],
    tmp_path: Path,
) -> Mitm:
    data = tmp_path / "data"
    p = proxy(
        "--intercept",
        GLOB,
        "--data-dir",
        data,
        "--upstream-ca",
        shop_tls[0].path,
        "--connect-to",
        f"{GLOB}:443:127.0.0.1:{shop.port}",
    )
    return Mitm(p, data)


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "15", *args], capture_output=True, timeout=timeout
    )


def direct(shop: origins.HTTPOrigin, ca: origins.TestCA, path: str) -> bytes:
    """What the origin itself answers (body), for byte-for-byte comparison."""
    out = curl(
        "--cacert",
        str(ca.path),
        "--resolve",
        f"{SHOP}:{shop.port}:127.0.0.1",
        f"https://{SHOP}:{shop.port}{path}",
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def tls_through(m: Mitm, host: str = SHOP, timeout: float = 10.0) -> ssl.SSLSocket:
    """A TLS connection to host:443 through elbasy's CONNECT, trusting elbasy's CA."""
    s = socket.create_connection(("127.0.0.1", m.proxy.port), timeout=timeout)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = origins.Reader(s).read_head()
    assert head is not None and head.startswith(b"HTTP/1.1 200"), head
    return m.tls_context().wrap_socket(s, server_hostname=host)


def request(sock: ssl.SSLSocket, raw: bytes, method: str = "GET") -> origins.Response:
    sock.sendall(raw)
    return origins.read_response(origins.Reader(sock), method)


# ---------------------------------------------------------------------------------------------
# real clients


def test_curl_gets_the_origins_bytes(
    mitm: Mitm, shop: origins.HTTPOrigin, shop_tls: tuple[origins.TestCA, ssl.SSLContext]
) -> None:
    for path in ("/hello", "/download?n=300000", "/chunked?n=7", "/status?code=404"):
        out = curl("--cacert", str(mitm.ca), "-x", mitm.url, f"https://{SHOP}{path}")
        assert out.returncode == 0, out.stderr
        assert out.stdout == direct(shop, shop_tls[0], path), path
    h = mitm.proxy.healthz()
    assert h["tls"]["client_handshakes"] >= 4
    assert h["tls"]["upstream_handshakes"] >= 1
    assert h["connections"]["tunnels_total"] == 0  # intercepted, not tunnelled
    # the origin saw origin-form requests with the real Host and no proxy headers
    req = shop.requests_for("/hello")[0]
    assert req.target == "/hello"
    assert req.headers.get("Host") == SHOP
    assert "Proxy-Connection" not in req.headers


def test_curl_post_bodies_expect_and_head(mitm: Mitm) -> None:
    body = os.urandom(200_000)
    digest = hashlib.sha256(body).hexdigest()
    for extra in ([], ["-H", "Transfer-Encoding: chunked"], ["-H", "Expect: 100-continue"]):
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "15",
                "--cacert",
                str(mitm.ca),
                "-x",
                mitm.url,
                "--data-binary",
                "@-",
                *extra,
                f"https://{SHOP}/sha256",
            ],
            input=body,
            capture_output=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode() == f"{digest} {len(body)}", extra
    out = curl("--cacert", str(mitm.ca), "-x", mitm.url, "-I", f"https://{SHOP}/head-test")
    assert out.returncode == 0, out.stderr
    assert b"Content-Length: 1234" in out.stdout


def test_requests_with_requests_ca_bundle(mitm: Mitm, shop: origins.HTTPOrigin) -> None:
    code = (
        "import requests\n"
        "s = requests.Session()\n"
        f"rs = [s.get('https://{SHOP}/hello', timeout=10) for _ in range(5)]\n"
        "print(rs[0].status_code, rs[-1].text)\n"
    )
    env = {**os.environ, "HTTPS_PROXY": mitm.url, "REQUESTS_CA_BUNDLE": str(mitm.ca)}
    env.pop("CURL_CA_BUNDLE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "200 hello from origin"
    # five requests, one client connection, one upstream connection
    assert shop.connections == 1


def test_urllib_with_ssl_cert_file(mitm: Mitm) -> None:
    code = (
        "import urllib.request\n"
        f"print(urllib.request.urlopen('https://{SHOP}/hello', timeout=10).read().decode())\n"
    )
    env = {**os.environ, "HTTPS_PROXY": mitm.url, "SSL_CERT_FILE": str(mitm.ca)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "hello from origin"


def test_httpx(mitm: Mitm) -> None:
    with httpx.Client(proxy=mitm.url, verify=mitm.tls_context(), timeout=10) as client:
        for _ in range(3):
            r = client.get(f"https://{SHOP}/hello")
            assert r.status_code == 200
            assert r.text == "hello from origin"
        r = client.post(f"https://{SHOP}/echo", content=b"x" * 70_000)
        assert r.content == b"x" * 70_000


def test_hey_go_client(mitm: Mitm, shop: origins.HTTPOrigin) -> None:
    out = subprocess.run(
        ["hey", "-n", "300", "-c", "10", "-x", mitm.url, f"https://{SHOP}:443/hello"],
        capture_output=True,
        timeout=60,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "[200]\t300 responses" in out.stdout, out.stdout
    assert len(shop.requests_for("/hello")) == 300


# ---------------------------------------------------------------------------------------------
# the relay's HTTP/1.1 handling on one kept-alive TLS connection


def test_one_connection_many_exchanges(mitm: Mitm, shop: origins.HTTPOrigin) -> None:
    with tls_through(mitm) as s:
        assert s.version() in ("TLSv1.3", "TLSv1.2")
        r = request(s, f"GET /hello HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
        assert (r.status, r.body) == (200, b"hello from origin")
        r = request(s, f"GET /chunked?n=3 HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
        assert r.body == b"chunk-0;chunk-1;chunk-2;"
        r = request(s, f"HEAD /head-test HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode(), "HEAD")
        assert r.status == 200 and r.body == b""
        r = request(s, f"GET /204 HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
        assert r.status == 204
        r = request(s, f"GET /304 HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
        assert r.status == 304 and r.body == b""
        r = request(
            s,
            f"POST /echo HTTP/1.1\r\nHost: {SHOP}\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5\r\nhello\r\n0\r\n\r\n".encode(),
        )
        assert r.body == b"hello"
        r = request(s, f"GET /hello HTTP/1.1\r\nHost: {SHOP}\r\nConnection: close\r\n\r\n".encode())
        assert r.status == 200 and r.headers.get("Connection") == "close"
        assert s.recv(10) == b""  # elbasy closes after Connection: close
    assert shop.connections == 1  # every exchange rode one pooled upstream connection


def test_upgrade_is_refused_cleanly(mitm: Mitm, shop: origins.HTTPOrigin) -> None:
    with tls_through(mitm) as s:
        r = request(
            s,
            f"GET /ws HTTP/1.1\r\nHost: {SHOP}\r\nConnection: Upgrade\r\n"
            "Upgrade: websocket\r\n\r\n".encode(),
        )
        assert r.status == 501
        assert b"upgrade" in r.body.lower()
    assert shop.requests_for("/ws") == []


def test_no_sni_falls_back_to_the_connect_host(mitm: Mitm) -> None:
    s = socket.create_connection(("127.0.0.1", mitm.proxy.port), timeout=10)
    s.sendall(f"CONNECT {SHOP}:443 HTTP/1.1\r\n\r\n".encode())
    assert origins.Reader(s).read_head().startswith(b"HTTP/1.1 200")  # type: ignore[union-attr]
    ctx = mitm.tls_context()
    ctx.check_hostname = False  # no server_hostname: no SNI sent
    with ctx.wrap_socket(s) as t:
        cert = t.getpeercert()
        sans = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
        assert sans == [GLOB]
        r = request(t, f"GET /hello HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
        assert r.body == b"hello from origin"


def test_client_hello_sent_with_the_connect_head(mitm: Mitm) -> None:
    """A client that does not wait for "200" before its ClientHello loses nothing."""
    ctx = mitm.tls_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=SHOP)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    with socket.create_connection(("127.0.0.1", mitm.proxy.port), timeout=10) as s:
        s.sendall(f"CONNECT {SHOP}:443 HTTP/1.1\r\n\r\n".encode() + hello)
        reader = origins.Reader(s)
        assert reader.read_head().startswith(b"HTTP/1.1 200")  # type: ignore[union-attr]
        incoming.write(bytes(reader.buf))
        reader.buf.clear()

        def pump() -> None:
            if outgoing.pending:
                s.sendall(outgoing.read())

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
                incoming.write(s.recv(65536))
        pump()
        tls.write(f"GET /hello HTTP/1.1\r\nHost: {SHOP}\r\nConnection: close\r\n\r\n".encode())
        pump()
        got = b""
        while b"hello from origin" not in got:
            data = s.recv(65536)
            assert data, got
            incoming.write(data)
            try:
                got += tls.read(65536)
            except ssl.SSLWantReadError:
                pass
        assert got.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("with_finished", [True, False], ids=["with-finished", "after-it"])
def test_records_that_arrive_together_are_all_read(mitm: Mitm, with_finished: bool) -> None:
    """Requests that reach elbasy in one segment lose nothing: a head, its body
    in a record of its own and a pipelined request, sent in the flight of the
    client's Finished or in one write later. elbasy reads TLS ahead, so OpenSSL
    may hold all of them after the read that returns the first, where epoll
    never says they are there."""
    ctx = mitm.tls_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # its Finished may carry data after it
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=SHOP)
    with socket.create_connection(("127.0.0.1", mitm.proxy.port), timeout=10) as s:
        s.sendall(f"CONNECT {SHOP}:443 HTTP/1.1\r\n\r\n".encode())
        reader = origins.Reader(s)
        assert reader.read_head().startswith(b"HTTP/1.1 200")  # type: ignore[union-attr]
        origins.handshake_held(tls, incoming, outgoing, s.sendall, s.recv)
        if not with_finished:
            s.sendall(outgoing.read())
            time.sleep(0.2)  # elbasy has read the Finished and waits for a head
        body = b"x" * 300
        origins.write_echo_then_hello(tls, SHOP, body)
        s.sendall(outgoing.read())  # three records (after the Finished), in one write
        got = origins.read_until_closed(s.recv, incoming, tls)
    origins.check_echo_then_hello(got, body)


def test_an_answer_in_many_records_at_once_is_all_relayed(mitm: Mitm) -> None:
    """An origin that sends its head and then its body in records of their own,
    back to back: elbasy's upstream reads ahead too, and what OpenSSL holds
    after the head is relayed (three exchanges on one connection, so the pool's
    connection is reused between them)."""
    with tls_through(mitm) as sock:
        for _ in range(3):
            got = request(sock, f"GET /pieces?n=40 HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
            assert got.status == 200
            assert got.body == b"".join(f"piece-{i};".encode() for i in range(40))


def test_other_hosts_keep_the_spliced_tunnel(
    mitm: Mitm, shop: origins.HTTPOrigin, shop_tls: tuple[origins.TestCA, ssl.SSLContext]
) -> None:
    out = curl(
        "--cacert", str(shop_tls[0].path), "-x", mitm.url, f"https://localhost:{shop.port}/hello"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello from origin"
    h = mitm.proxy.healthz()
    assert h["connections"]["tunnels_total"] == 1
    assert h["tls"]["intercepts_total"] == 0


# ---------------------------------------------------------------------------------------------
# certificates, checked with the openssl command line


def test_openssl_sees_a_leaf_that_chains_to_the_ca(mitm: Mitm, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-proxy",
            f"127.0.0.1:{mitm.proxy.port}",
            "-connect",
            f"{SHOP}:443",
            "-servername",
            SHOP,
            "-CAfile",
            str(mitm.ca),
            "-verify_return_error",
            "-verify_hostname",
            SHOP,
            "-showcerts",
        ],
        input=b"",
        capture_output=True,
        timeout=30,
    )
    text = out.stdout.decode()
    assert "Verify return code: 0 (ok)" in text, text + out.stderr.decode()
    leaf_pem = text[text.index("-----BEGIN CERTIFICATE-----") :]
    leaf_pem = leaf_pem[: leaf_pem.index("-----END CERTIFICATE-----") + 25] + "\n"
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    info = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "leaf.pem"), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"DNS:{GLOB}" in info
    assert "id-ecPublicKey" in info and "prime256v1" in info
    ca_info = subprocess.run(
        ["openssl", "x509", "-in", str(mitm.ca), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "X509v3 Name Constraints: critical" in ca_info
    assert "DNS:.myshopify.com" in ca_info or "DNS:myshopify.com" in ca_info


def test_name_constraints_are_enforced(mitm: Mitm, tmp_path: Path) -> None:
    """A leaf the CA's key signs for a host outside its constraints does not verify."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_cert = x509.load_pem_x509_certificate(mitm.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((mitm.ca.parent / "ca-key.pem").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bank.example")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bank.example")]), False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path = tmp_path / "evil.pem"
    path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(mitm.ca), str(path)], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "permitted subtree violation" in out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# failures: each is clean, counted, and leaves no fd behind


def _untrusted_warnings(p: Proxy) -> list[str]:
    return [ln for ln in p.stderr_lines if "probably does not trust elbasy's CA" in ln]


def test_client_that_does_not_trust_the_ca(mitm: Mitm) -> None:
    before = mitm.proxy.fd_count()
    for _ in range(2):
        out = curl("-x", mitm.url, f"https://{SHOP}/hello")  # the system bundle only
        assert out.returncode == 60, out.stderr  # curl: peer certificate cannot be authenticated
    h = wait_for(mitm.proxy, lambda h: h["tls"]["client_handshake_failures"] >= 2)
    assert h["tls"]["client_handshake_failures"] == 2
    # one WARNING for the address, however many times it fails, naming the fix
    wait_for_log(mitm.proxy, "probably does not trust elbasy's CA")
    time.sleep(0.2)
    warnings = _untrusted_warnings(mitm.proxy)
    assert len(warnings) == 1, warnings
    line = warnings[0]
    assert " WARNING " in line and "client 127.0.0.1 " in line
    assert f"{SHOP}:443" in line
    # curl's alert, usually; a loaded machine may see the close or the reset first
    why = ("unknown ca", "once it had elbasy's certificate", "reset the connection")
    assert any(w in line for w in why), line
    assert f"the CA file {mitm.ca}" in line
    for fix in ("elbasy ca trust-help", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        assert fix in line, fix
    # and each failed handshake has its access line
    failed = mitm.proxy.lines_with(f"CONNECT {SHOP}:443 525 ", 2)
    assert len(failed) == 2, mitm.proxy.stderr[-3000:]
    assert_fds_back(mitm.proxy, before)


def test_python_client_that_does_not_trust_the_ca(mitm: Mitm) -> None:
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", mitm.proxy.port), timeout=10)
        with s:
            s.sendall(f"CONNECT {SHOP}:443 HTTP/1.1\r\nHost: {SHOP}:443\r\n\r\n".encode())
            head = origins.Reader(s).read_head()
            assert head is not None and head.startswith(b"HTTP/1.1 200"), head
            with pytest.raises(ssl.SSLCertVerificationError):
                ssl.create_default_context().wrap_socket(s, server_hostname=SHOP)
    wait_for(mitm.proxy, lambda h: h["tls"]["client_handshake_failures"] >= 2)
    wait_for_log(mitm.proxy, "probably does not trust elbasy's CA")
    time.sleep(0.2)
    assert len(_untrusted_warnings(mitm.proxy)) == 1


def test_a_reset_during_the_handshake_is_an_untrusting_client(mitm: Mitm) -> None:
    # a client that drops the connection with a RST once it has the leaf (some do
    # this instead of an alert when they reject the certificate)
    s = socket.create_connection(("127.0.0.1", mitm.proxy.port), timeout=10)
    s.sendall(f"CONNECT {SHOP}:443 HTTP/1.1\r\nHost: {SHOP}:443\r\n\r\n".encode())
    assert (origins.Reader(s).read_head() or b"").startswith(b"HTTP/1.1 200")
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=SHOP)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    s.sendall(outgoing.read())  # the ClientHello
    assert s.recv(65536)  # the ServerHello and the leaf (or its start)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST
    wait_for_log(mitm.proxy, "probably does not trust elbasy's CA")
    (line,) = _untrusted_warnings(mitm.proxy)
    # read as a close with no alert, or (seen first) as the socket's error
    why = ("closed the connection once it had elbasy's certificate", "reset the connection")
    assert any(w in line for w in why), line


def test_garbage_instead_of_a_client_hello(mitm: Mitm) -> None:
    before = mitm.proxy.fd_count()
    with socket.create_connection(("127.0.0.1", mitm.proxy.port), timeout=10) as s:
        s.sendall(f"CONNECT {SHOP}:443 HTTP/1.1\r\n\r\n".encode())
        reader = origins.Reader(s)
        assert reader.read_head().startswith(b"HTTP/1.1 200")  # type: ignore[union-attr]
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        assert b"HTTP/1.1" not in data  # at most a TLS alert, then the close
    h = wait_for(mitm.proxy, lambda h: h["tls"]["client_handshake_failures"] >= 1)
    assert h["tls"]["client_handshake_failures"] == 1
    assert h["counters"]["tls_client_failures"] == 1
    assert_fds_back(mitm.proxy, before)
    # not TLS at all is no sign of an untrusted CA: the INFO line only
    wait_for_log(mitm.proxy, "TLS with 127.0.0.1")
    assert _untrusted_warnings(mitm.proxy) == []


def wait_for_log(p: Proxy, text: str) -> None:
    deadline = time.monotonic() + 5
    while text not in p.stderr:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{p.stderr[-2000:]}"
        time.sleep(0.05)


def test_upstream_with_a_bad_certificate_gives_502(
    proxy: Callable[..., Proxy],
    shop_tls: tuple[origins.TestCA, ssl.SSLContext],
    tmp_path: Path,
    test_ca: origins.TestCA,
    server_ssl_ctx: ssl.SSLContext,
) -> None:
    # an origin whose certificate names localhost only: wrong host for the shop
    wrong = origins.HTTPOrigin(tls=server_ssl_ctx)
    try:
        p = proxy(
            "--intercept",
            GLOB,
            "--data-dir",
            tmp_path / "d",
            "--upstream-ca",
            test_ca.path,
            "--connect-to",
            f"{GLOB}:443:127.0.0.1:{wrong.port}",
        )
        m = Mitm(p, tmp_path / "d")
        before = p.fd_count()
        out = curl("--cacert", str(m.ca), "-x", m.url, "-i", f"https://{SHOP}/hello")
        assert out.returncode == 0, out.stderr
        assert answer(out.stdout).startswith(b"HTTP/1.1 502"), out.stdout
        # the client hears the one wording of upstream failures; elbasy's log the reason
        assert b"could not be reached" in out.stdout, out.stdout
        wait_for_log(p, "hostname mismatch")
        # the same origin but its CA not trusted by elbasy
        p2 = proxy(
            "--intercept",
            "localhost",
            "--data-dir",
            tmp_path / "d2",
            "--connect-to",
            f"localhost:443:127.0.0.1:{wrong.port}",
        )
        out = curl(
            "--cacert",
            str(tmp_path / "d2" / "ca.pem"),
            "-x",
            p2.url,
            "-i",
            "https://localhost/hello",
        )
        assert answer(out.stdout).startswith(b"HTTP/1.1 502"), out.stdout
        wait_for_log(p2, "unable to get local issuer certificate")
        # an upstream whose CA elbasy lacks: the warning names the way to give it one
        (line,) = [ln for ln in p2.stderr_lines if "unable to get local issuer" in ln]
        assert " WARNING " in line and "--upstream-ca" in line and "SSL_CERT_FILE" in line
        # a wrong name: no CA file mends it, so no such advice
        (line,) = [ln for ln in p.stderr_lines if "hostname mismatch" in ln]
        assert " WARNING " in line and "--upstream-ca" not in line
        h = p.healthz()
        assert h["tls"]["upstream_handshake_failures"] == 1
        assert_fds_back(p, before)
    finally:
        wrong.close()


def test_a_ca_that_does_not_cover_a_new_intercept_glob_stops_startup(
    mitm: Mitm, tmp_path: Path
) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "elbasy",
            "--listen",
            "127.0.0.1:0",
            "--intercept",
            "api.etsy.com",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "name-constrained" in out.stderr and "elbasy ca init --force" in out.stderr


# ---------------------------------------------------------------------------------------------
# helpers


def answer(curl_i: bytes) -> bytes:
    """The origin's (or elbasy's) response in ``curl -i`` output, after the CONNECT's "200"."""
    assert curl_i.startswith(b"HTTP/1.1 200 Connection established\r\n\r\n"), curl_i
    return curl_i.split(b"\r\n\r\n", 1)[1]


def wait_for(p: Proxy, ok: Callable[[dict], bool], timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = p.healthz()
        if ok(h) or time.monotonic() > deadline:
            return h
        time.sleep(0.05)


def assert_fds_back(p: Proxy, before: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while p.fd_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    # pooled upstream connections may stay open: at most one per origin here
    assert p.fd_count() <= before + 1, (p.fd_count(), before)
