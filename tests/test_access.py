"""Who may use elbasy: proxy credentials, client networks, the open-listener warning.

Real elbasy subprocesses and real clients (curl, requests, raw sockets) on
loopback; the checker's own tests (elbasy.access) feed it values alone.
"""

from __future__ import annotations

import base64
import hmac
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import origins
import pytest
import requests
from conftest import REPO, Proxy, _clean_env, _start_factory, _stop_all

from elbasy import access as access_mod
from elbasy.access import ClientNetworks, Credentials, is_loopback, parse_credentials
from elbasy.config import ConfigError, build_config

USER, PASSWORD = "alice", "s3cret"
TOKEN = "tok-123"
ENV_TOKENS = "env-tok-1 env-tok-2"
AUTH_FILE = f"# who may use this elbasy\n{USER}:{PASSWORD}\n\n  {TOKEN}  \nbob:other\n"
BODY = b"hello from origin"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def write_auth(directory: Path, text: str = AUTH_FILE) -> Path:
    path = directory / "elbasy.auth"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One elbasy asking for credentials from a file and the environment."""
    path = write_auth(tmp_path_factory.mktemp("auth"))
    start, started = _start_factory()
    yield start("--auth-file", path, "--auth-env", "EXTRA_TOKENS", env={"EXTRA_TOKENS": ENV_TOKENS})
    _stop_all(started)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("curl")
    assert exe, "curl is required (CI installs it)"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.run(
        [exe, "--silent", "--show-error", "--max-time", "10", *args],
        capture_output=True,
        env=env,
        timeout=20,
    )


def exchange(p: Proxy, raw: bytes, source: str | None = None) -> tuple[origins.Response, bool]:
    """Send ``raw``, read one response; True: elbasy closed the connection after it."""
    s = socket.socket()
    s.settimeout(10)
    try:
        if source is not None:
            s.bind((source, 0))
        s.connect(("127.0.0.1", p.port))
        s.sendall(raw)
        reader = origins.Reader(s)
        resp = origins.read_response(reader)
        closed = reader.read_to_eof() == b""
        return resp, closed
    finally:
        s.close()


def get(origin: origins.HTTPOrigin, header: str | None = None, path: str = "/hello") -> bytes:
    """An absolute-form GET for ``origin`` with an optional Proxy-Authorization."""
    line = f"Proxy-Authorization: {header}\r\n" if header is not None else ""
    return (
        f"GET {origin.base}{path} HTTP/1.1\r\nHost: {origin.hostport}\r\n{line}"
        "Connection: close\r\n\r\n"
    ).encode()


def assert_challenge(resp: origins.Response, closed: bool, status: int, header: str) -> None:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers.get_all(header) == ['Basic realm="elbasy"', 'Bearer realm="elbasy"']
    assert resp.body.count(b"\n") == 1 and resp.body.startswith(b"elbasy: ")
    assert closed


# -- proxy credentials, real clients -------------------------------------------------------------


def test_curl_with_credentials_in_the_proxy_url_and_proxy_user(
    guarded: Proxy, http_origin: origins.HTTPOrigin, tls_origin: origins.HTTPOrigin, test_ca
) -> None:
    url = f"http://{USER}:{PASSWORD}@127.0.0.1:{guarded.port}"
    r = curl("-x", url, f"{http_origin.base}/hello")
    assert r.returncode == 0 and r.stdout == BODY, r.stderr
    r = curl(
        "-x",
        guarded.url,
        "--proxy-user",
        f"{USER}:{PASSWORD}",
        "--cacert",
        str(test_ca.path),
        f"{tls_origin.base}/hello",
    )
    assert r.returncode == 0 and r.stdout == BODY, r.stderr
    # the credentials stop at elbasy
    for origin in (http_origin, tls_origin):
        [seen] = origin.requests
        assert "Proxy-Authorization" not in seen.headers
        assert b"s3cret" not in origin.all_raw()


def test_requests_http_and_https_through_connect(
    guarded: Proxy, http_origin: origins.HTTPOrigin, tls_origin: origins.HTTPOrigin, test_ca
) -> None:
    url = f"http://{USER}:{PASSWORD}@127.0.0.1:{guarded.port}"
    with requests.Session() as s:
        s.trust_env = False
        s.proxies = {"http": url, "https": url}
        r = s.get(f"{http_origin.base}/hello", timeout=10)
        assert r.status_code == 200 and r.content == BODY
        r = s.get(f"{tls_origin.base}/hello", timeout=10, verify=str(test_ca.path))
        assert r.status_code == 200 and r.content == BODY
    assert "Proxy-Authorization" not in http_origin.requests[0].headers
    assert b"Proxy-Authorization" not in http_origin.all_raw()
    # a wrong password: requests shows the 407 of an http:// request, and fails the CONNECT
    bad = f"http://{USER}:wrong@127.0.0.1:{guarded.port}"
    with requests.Session() as s:
        s.trust_env = False
        s.proxies = {"http": bad, "https": bad}
        r = s.get(f"{http_origin.base}/hello", timeout=10)
        assert r.status_code == 407
        assert r.headers["Proxy-Authenticate"].startswith('Basic realm="elbasy"')
        with pytest.raises(requests.exceptions.ProxyError, match="407"):
            s.get(f"{tls_origin.base}/hello", timeout=10, verify=str(test_ca.path))
    assert len(http_origin.requests) == 1 and len(tls_origin.requests) == 1


def test_no_or_wrong_credentials_get_407_and_nothing_leaves(
    guarded: Proxy, http_origin: origins.HTTPOrigin, tls_origin: origins.HTTPOrigin
) -> None:
    for header in (
        None,
        basic(USER, "wrong"),
        basic("mallory", PASSWORD),
        basic(USER, PASSWORD + "x"),
        "Bearer nope",
        f"Bearer {USER}:{PASSWORD}",  # a pair is no token
        f"Digest {basic(USER, PASSWORD)[6:]}",
        "Basic !!!not-base64",
    ):
        resp, closed = exchange(guarded, get(http_origin, header))
        assert_challenge(resp, closed, 407, "Proxy-Authenticate")
    # a CONNECT too, and one with the header twice (the second one valid)
    resp, closed = exchange(
        guarded,
        f"CONNECT {tls_origin.hostport} HTTP/1.1\r\nHost: {tls_origin.hostport}\r\n\r\n".encode(),
    )
    assert_challenge(resp, closed, 407, "Proxy-Authenticate")
    twice = get(http_origin, basic(USER, "wrong")).replace(
        b"\r\n\r\n", f"\r\nProxy-Authorization: {basic(USER, PASSWORD)}\r\n\r\n".encode()
    )
    resp, closed = exchange(guarded, twice)
    assert_challenge(resp, closed, 407, "Proxy-Authenticate")
    r = curl(
        "-x",
        f"http://{USER}:wrong@127.0.0.1:{guarded.port}",
        "-w",
        "%{http_connect}",
        "-o",
        os.devnull,
        f"https://{tls_origin.hostport}/hello",
    )
    assert r.stdout == b"407" and r.returncode != 0
    assert http_origin.requests == [] and tls_origin.requests == []


def test_bearer_and_tokens_in_basic(guarded: Proxy, http_origin: origins.HTTPOrigin) -> None:
    for header in (
        f"Bearer {TOKEN}",
        f"bearer {TOKEN}",
        "Bearer env-tok-2",  # from --auth-env
        basic(USER, PASSWORD),
        basic("bob", "other"),
        basic("any-name", TOKEN),  # a token as the password
        basic(TOKEN, ""),  # or as the user name: http://TOKEN@host:port
    ):
        resp, _ = exchange(guarded, get(http_origin, header))
        assert resp.status == 200 and resp.body == BODY, (header, resp.status)
    r = curl("-x", f"http://env-tok-1@127.0.0.1:{guarded.port}", f"{http_origin.base}/hello")
    assert r.returncode == 0 and r.stdout == BODY, r.stderr
    assert len(http_origin.requests) == 8
    assert not any("Proxy-Authorization" in q.headers for q in http_origin.requests)


def test_own_pages_take_the_same_credentials(guarded: Proxy) -> None:
    for path in ("/", "/healthz", "/metrics", "/status.json", "/ca.pem"):
        raw = f"GET {path} HTTP/1.1\r\nHost: elbasy\r\n\r\n".encode()
        resp, closed = exchange(guarded, raw)
        assert_challenge(resp, closed, 401, "WWW-Authenticate")
    base = f"http://127.0.0.1:{guarded.port}"
    # curl -u (and a browser after the dialog), Prometheus' basic_auth: Authorization Basic
    r = curl("-u", f"{USER}:{PASSWORD}", f"{base}/healthz")
    assert r.returncode == 0 and r.stdout.startswith(b"{"), r.stderr
    r = curl("-u", f"{USER}:wrong", "-o", os.devnull, "-w", "%{http_code}", f"{base}/healthz")
    assert r.stdout == b"401"
    # Prometheus' authorization (bearer) and a proxy client's own header
    r = requests.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200 and "elbasy_errors_total" in r.text
    r = requests.get(
        f"{base}/status.json", headers={"Proxy-Authorization": basic(USER, PASSWORD)}, timeout=10
    )
    assert r.status_code == 200 and r.json()


def test_refusals_are_counted_and_logged(guarded: Proxy, http_origin: origins.HTTPOrigin) -> None:
    def refused() -> int:
        r = requests.get(
            f"http://127.0.0.1:{guarded.port}/healthz",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        return int(r.json()["counters"]["auth_refused"])

    before = refused()
    for _ in range(3):
        resp, _ = exchange(guarded, get(http_origin, basic(USER, "guess"), "/counted"))
        assert resp.status == 407
    assert refused() == before + 3
    r = requests.get(f"http://127.0.0.1:{guarded.port}/metrics", auth=(USER, PASSWORD), timeout=10)
    assert 'elbasy_errors_total{kind="auth_refused"}' in r.text
    assert len(guarded.lines_with("/counted 407 ", 3)) == 3
    # a URL with credentials in it is refused without them reaching the log
    leaky = get(http_origin, path="/leaky").replace(b"http://", b"http://mallory:hunter2@")
    assert exchange(guarded, leaky)[0].status == 407
    assert len(guarded.lines_with("/leaky 407 ", 1)) == 1
    assert "guess" not in guarded.stderr and PASSWORD not in guarded.stderr
    assert "hunter2" not in guarded.stderr
    assert http_origin.requests == []


def test_intercepted_session_needs_no_header(
    proxy, tls_origin: origins.HTTPOrigin, test_ca, tmp_path: Path
) -> None:
    """The CONNECT is authenticated; the requests inside the TLS session are not asked."""
    data = tmp_path / "data"
    p = proxy(
        "--auth-file",
        write_auth(tmp_path),
        "--intercept",
        "localhost",
        "--data-dir",
        data,
        "--upstream-ca",
        test_ca.path,
    )
    target = f"https://localhost:{tls_origin.port}/hello"
    args = ("-x", p.url, "--cacert", str(data / "ca.pem"))
    r = curl(*args, "--proxy-user", f"{USER}:{PASSWORD}", target, target)
    assert r.returncode == 0 and r.stdout == BODY * 2, r.stderr
    assert len(tls_origin.requests) == 2
    assert not any("Proxy-Authorization" in q.headers for q in tls_origin.requests)
    r = curl(*args, "-w", "%{http_connect}", "-o", os.devnull, target)
    assert r.stdout == b"407"
    assert len(tls_origin.requests) == 2


def test_reload_reads_the_auth_file_again(
    proxy, http_origin: origins.HTTPOrigin, tmp_path: Path
) -> None:
    path = write_auth(tmp_path)
    p = proxy("--auth-file", path)
    assert exchange(p, get(http_origin, f"Bearer {TOKEN}"))[0].status == 200
    path.write_text("new-token\n", encoding="utf-8")
    os.kill(p.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded:" not in p.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reloaded:" in p.stderr, p.stderr
    assert exchange(p, get(http_origin, "Bearer new-token"))[0].status == 200
    assert exchange(p, get(http_origin, f"Bearer {TOKEN}"))[0].status == 407
    # a file that cannot be read changes nothing
    path.unlink()
    os.kill(p.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload failed" not in p.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "cannot read --auth-file" in p.stderr
    assert exchange(p, get(http_origin, "Bearer new-token"))[0].status == 200


# -- client networks ------------------------------------------------------------------------------


def _refused_at_accept(p: Proxy, raw: bytes, source: str) -> str:
    """What a client from ``source`` sees after sending ``raw``: "reset" when
    elbasy closed without reading it (unread bytes make the close a reset)."""
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", p.port))
        s.sendall(raw)
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return "reset"
        return "eof" if not data else repr(data[:40])


def test_allow_clients_closes_other_addresses_at_accept(
    proxy, http_origin: origins.HTTPOrigin
) -> None:
    p = proxy("--allow-clients", "127.0.0.1,10.0.0.0/8", "--log-level", "info")
    resp, _ = exchange(p, get(http_origin), source="127.0.0.1")
    assert resp.status == 200 and resp.body == BODY
    seen = [
        _refused_at_accept(p, raw, source)
        for source in ("127.0.0.2", "127.0.0.3")
        for raw in (get(http_origin), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"x")
    ]
    # no answer, and nothing read: the close is a reset
    assert seen == ["reset"] * 6, seen
    assert len(http_origin.requests) == 1
    h = p.healthz()
    assert h["counters"]["clients_refused"] == 6
    assert h["connections"]["requests_total"] == 2  # the allowed GET and this /healthz
    # one line per refused address, not per connection
    lines = p.lines_with("outside --allow-clients", 2)
    assert len(lines) == 2, lines
    assert "127.0.0.2" in lines[0] and "127.0.0.3" in lines[1]
    assert 'elbasy_errors_total{kind="clients_refused"} 6.0' in _metrics_text(p)
    assert len(p.lines_with("outside --allow-clients", 3, timeout=0.0)) == 2, p.stderr_lines


def _metrics_text(p: Proxy) -> str:
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return origins.Reader(s).read_to_eof().decode()


def test_refused_clients_cost_no_memory_per_connection(proxy) -> None:
    """A flood from one refused address: counted, one log line, elbasy's memory flat."""
    p = proxy("--allow-clients", "127.0.0.1,10.0.0.0/8", "--log-level", "info")

    def rss() -> int:
        with open(f"/proc/{p.worker_pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    for _ in range(200):
        _refused_at_accept(p, b"GET / HTTP/1.1\r\n\r\n", "127.0.0.5")
    before = rss()
    for _ in range(2000):
        _refused_at_accept(p, b"GET / HTTP/1.1\r\n\r\n", "127.0.0.5")
    assert rss() - before < 2048, (before, rss())  # KiB
    lines = p.lines_with("outside --allow-clients", 1)
    assert p.healthz()["counters"]["clients_refused"] == 2200
    assert len(lines) == 1 and len(p.lines_with("outside --allow-clients", 2, 0.0)) == 1, lines


def test_client_networks() -> None:
    nets = ClientNetworks(("10.0.0.0/8", "2001:db8::/32"))
    assert nets.allows("10.1.2.3:5000")
    assert nets.allows("[::ffff:10.9.9.9]:1")  # a dual-stack listener's IPv4 client
    assert nets.allows("[2001:db8::1]:443")
    assert not nets.allows("11.0.0.1:5000")
    assert not nets.allows("[2001:db9::1]:443")
    assert not nets.allows("-") and not nets.allows("nonsense:1") and not nets.allows("")
    # the loop's keys: the family, then the packed address
    assert nets.allows_key(b"\x04" + bytes([10, 1, 2, 3]))
    assert not nets.allows_key(b"\x04" + bytes([11, 0, 0, 1]))
    assert nets.allows_key(b"\x06" + socket.inet_pton(socket.AF_INET6, "::ffff:10.9.9.9"))
    assert nets.allows_key(b"\x06" + socket.inet_pton(socket.AF_INET6, "2001:db8::1"))
    assert not nets.allows_key(b"\x06" + socket.inet_pton(socket.AF_INET6, "2001:db9::1"))
    assert not nets.allows_key(b"") and not nets.allows_key(b"\x04\x01")
    assert not nets.allows_key(b"\x06" + bytes(4))
    assert build_config(allow_clients="10.0.0.1, ::1").allow_clients == ("10.0.0.1/32", "::1/128")
    with pytest.raises(ConfigError, match="not a network"):
        build_config(allow_clients="10.0.0.0/33")
    with pytest.raises(ConfigError, match="environment variable"):
        build_config(auth_env="NOT-A-NAME")


# -- the checker ----------------------------------------------------------------------------------


def test_every_credential_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A match stops nothing: each presented value is compared, by hmac.compare_digest,
    with every credential of its kind, as fixed-length digests."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(access_mod.hmac, "compare_digest", counting)
    creds = Credentials(["a:1", "b:2", "c:3", "t1", "t2"])
    assert creds.check(basic("a", "1").encode())  # the first pair
    assert len(calls) == 3 + 2  # every pair, then every token (the password as one)
    assert {n for pair in calls for n in pair} == {32}
    calls.clear()
    assert not creds.check(basic("z", "9").encode())
    assert len(calls) == 5
    calls.clear()
    assert creds.check(b"Bearer t1") and len(calls) == 2
    calls.clear()
    assert not creds.check(b"Bearer a:1") and len(calls) == 2
    assert not creds.check(None) and not creds.check(b"") and not creds.check(b"Basic")


def test_credentials_file_syntax(tmp_path: Path) -> None:
    assert parse_credentials(AUTH_FILE, "f") == [f"{USER}:{PASSWORD}", TOKEN, "bob:other"]
    assert parse_credentials("# only a comment\n\n", "f") == []
    with pytest.raises(access_mod.AccessError, match="f, line 2: .*no user name"):
        parse_credentials("ok\n:pw\n", "f")
    with pytest.raises(access_mod.AccessError, match="control character"):
        parse_credentials("to\x01ken\n", "f")
    creds = Credentials(parse_credentials("user:pass word\n", "f"))
    assert creds.check(basic("user", "pass word").encode())
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        (["--auth-file", "/nonexistent/elbasy.auth"], {}, "cannot read --auth-file"),
        (["--auth-env", "ELBASY_TEST_UNSET"], {}, "ELBASY_TEST_UNSET is not set"),
        (["--auth-env", "EMPTY_TOKENS"], {"EMPTY_TOKENS": " "}, "no credentials in"),
    ],
)
def test_unusable_credentials_stop_elbasy_at_start(
    args: list[str], env: dict[str, str], error: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "elbasy", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        env={**_clean_env(), **env},
        cwd=str(REPO),
        timeout=30,
    )
    assert out.returncode != 0
    last = out.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("Error: ") and error in last, out.stderr


# -- the warning ----------------------------------------------------------------------------------


def test_warning_when_listening_beyond_loopback_unguarded(proxy) -> None:
    warning = "beyond loopback, with no proxy authentication"
    p = proxy("--listen", "0.0.0.0:0")
    [line] = [line for line in p.stderr_lines if warning in line]
    assert " WARNING " in line and f"0.0.0.0:{p.port}" in line
    p.stopped_by_test = True
    p.stop()
    guarded = proxy("--listen", "0.0.0.0:0", "--allow-clients", "127.0.0.0/8")
    resp, _ = exchange(guarded, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert resp.status == 200
    assert warning not in guarded.stderr
    assert warning not in proxy().stderr  # loopback: nothing to warn of


def test_docker_healthcheck_sends_the_credentials(guarded: Proxy, tmp_path: Path) -> None:
    """The image's HEALTHCHECK answers elbasy's 401 with the first credential it is given."""
    env = {k: v for k, v in _clean_env().items() if not k.startswith("ELBASY_")}
    env["ELBASY_LISTEN"] = f"0.0.0.0:{guarded.port}"

    def check(**more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(REPO / "deploy" / "docker" / "healthcheck.py")],
            capture_output=True,
            text=True,
            timeout=30,
            env={**env, **more},
        )

    refused = check()
    assert refused.returncode == 1 and "401" in refused.stderr
    assert check(ELBASY_AUTH_FILE=str(write_auth(tmp_path))).returncode == 0
    assert check(ELBASY_AUTH_ENV="T", T=TOKEN).returncode == 0
    assert check(ELBASY_AUTH_ENV="T", T="wrong").returncode == 1


def test_load_access_reads_the_file_and_the_environment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_auth(tmp_path)
    config = build_config(auth_file=str(path), auth_env="T", allow_clients=["10.0.0.0/8"])
    with caplog.at_level("WARNING", logger="elbasy.auth"):
        got = access_mod.load_access(config, {"T": "x y:z"})
    assert got.credentials is not None and got.credentials.count == 3 + 2
    assert got.clients is not None and got.clients.allows("10.0.0.1:1")
    assert got.guarded and not access_mod.OPEN.guarded
    assert "readable by every user" not in caplog.text
    path.chmod(0o644)
    with caplog.at_level("WARNING", logger="elbasy.auth"):
        access_mod.load_access(build_config(auth_file=str(path)))
    assert "readable by every user" in caplog.text
    assert access_mod.load_access(build_config()) == access_mod.OPEN
