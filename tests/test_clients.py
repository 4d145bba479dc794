"""Real clients through the proxy: curl, requests, httpx, urllib; and the access log."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request

import httpx
import origins
import pytest
import requests

BODY = b"hello from origin"


def _env_without_proxies() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    curl = shutil.which("curl")
    assert curl, "curl is required (CI installs it)"
    return subprocess.run(
        [curl, "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        env=_env_without_proxies(),
        timeout=30,
    )


def _tunnels_total(p) -> int:
    return p.healthz()["connections"]["tunnels_total"]


# -- curl ------------------------------------------------------------------------------------


def test_curl_https_through_tunnel(proxy, tls_origin, test_ca):
    p = proxy()
    r = _curl("-x", p.url, "--cacert", str(test_ca.path), f"{tls_origin.base}/hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout == BODY
    assert _tunnels_total(p) == 1
    assert [q.request_line for q in tls_origin.requests] == ["GET /hello HTTP/1.1"]


def test_curl_https_localhost_through_tunnel(proxy, tls_origin, test_ca):
    p = proxy()
    r = _curl(
        "-x",
        p.url,
        "--cacert",
        str(test_ca.path),
        f"https://localhost:{tls_origin.port}/echo",
        "--data-binary",
        "curl-upload",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"curl-upload"


def test_curl_http_forward(proxy, http_origin):
    p = proxy()
    r = _curl("-x", p.url, f"{http_origin.base}/hello?from=curl")
    assert r.returncode == 0, r.stderr
    assert r.stdout == BODY
    [q] = http_origin.requests
    assert q.request_line == "GET /hello?from=curl HTTP/1.1"
    assert q.headers.get("Host") == http_origin.hostport
    assert "Proxy-Connection" not in q.headers


def test_curl_http_forward_post_and_keepalive(proxy, http_origin):
    """curl reuses its proxy connection for two URLs; bodies and framing arrive intact."""
    p = proxy()
    r = _curl(
        "-x",
        p.url,
        "--data-binary",
        "first",
        f"{http_origin.base}/echo",
        "--next",
        "-x",
        p.url,
        f"{http_origin.base}/chunked?n=3",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"firstchunk-0;chunk-1;chunk-2;"
    assert [q.body for q in http_origin.requests] == [b"first", b""]
    assert p.healthz()["connections"]["accepted"] <= 2  # one for curl (reused), one healthz


# -- requests ------------------------------------------------------------------------------------


def test_requests_https_through_tunnel(proxy, tls_origin, test_ca):
    p = proxy()
    proxies = {"http": p.url, "https": p.url}
    r = requests.get(
        f"{tls_origin.base}/hello", proxies=proxies, verify=str(test_ca.path), timeout=10
    )
    assert r.status_code == 200
    assert r.content == BODY
    payload = os.urandom(300_000)
    r = requests.post(
        f"{tls_origin.base}/echo",
        data=payload,
        proxies=proxies,
        verify=str(test_ca.path),
        timeout=10,
    )
    assert r.content == payload
    assert _tunnels_total(p) >= 1


def test_requests_http_forward(proxy, http_origin):
    p = proxy()
    proxies = {"http": p.url, "https": p.url}
    with requests.Session() as sess:
        sess.trust_env = False
        for i in range(3):
            r = sess.get(f"{http_origin.base}/chunked?n={i + 1}", proxies=proxies, timeout=10)
            assert r.status_code == 200
            assert r.content == b"".join(f"chunk-{j};".encode() for j in range(i + 1))
        r = sess.post(
            f"{http_origin.base}/echo", data=iter([b"gen-", b"erated"]), proxies=proxies, timeout=10
        )  # a generator body goes out chunked
        assert r.content == b"gen-erated"
    assert http_origin.requests[-1].body == b"gen-erated"
    assert all(q.target.startswith("/") for q in http_origin.requests)


def test_requests_tls_verification_failure_is_client_side(proxy, tls_origin):
    """Without the test CA the client refuses the origin's cert: the tunnel is end to end."""
    p = proxy()
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(
            f"{tls_origin.base}/hello",
            proxies={"https": p.url},
            verify=os.environ.get("SSL_CERT_FILE") or True,
            timeout=10,
        )


# -- httpx ----------------------------------------------------------------------------------------


def test_httpx_https_through_tunnel(proxy, tls_origin, client_ssl_ctx):
    p = proxy()
    with httpx.Client(proxy=p.url, verify=client_ssl_ctx, trust_env=False, timeout=10) as c:
        r = c.get(f"{tls_origin.base}/hello")
        assert r.status_code == 200
        assert r.content == BODY
        r = c.get(f"{tls_origin.base}/download", params={"n": 5_000_000})
        assert r.content == b"".join(origins.pattern_chunks(5_000_000))


def test_httpx_http_forward(proxy, http_origin, client_ssl_ctx):
    p = proxy()
    with httpx.Client(proxy=p.url, verify=client_ssl_ctx, trust_env=False, timeout=10) as c:
        r = c.put(f"{http_origin.base}/echo", content=b"httpx-body")
        assert r.status_code == 200
        assert r.content == b"httpx-body"
        r = c.head(f"{http_origin.base}/head-test")
        assert r.status_code == 200
        assert r.headers["content-length"] == "1234"
        r = c.get(f"{http_origin.base}/204")
        assert r.status_code == 204
    assert [q.request_line for q in http_origin.requests] == [
        "PUT /echo HTTP/1.1",
        "HEAD /head-test HTTP/1.1",
        "GET /204 HTTP/1.1",
    ]


# -- urllib --------------------------------------------------------------------------------------


def _urllib_opener(p, ctx: ssl.SSLContext) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": p.url, "https": p.url}),
        urllib.request.HTTPSHandler(context=ctx),
    )


def test_urllib_https_through_tunnel(proxy, tls_origin, client_ssl_ctx):
    p = proxy()
    opener = _urllib_opener(p, client_ssl_ctx)
    with opener.open(f"{tls_origin.base}/hello", timeout=10) as r:
        assert r.status == 200
        assert r.read() == BODY
    assert _tunnels_total(p) == 1


def test_urllib_http_forward(proxy, http_origin, client_ssl_ctx):
    p = proxy()
    opener = _urllib_opener(p, client_ssl_ctx)
    req = urllib.request.Request(f"{http_origin.base}/echo", data=b"urllib-data", method="POST")
    with opener.open(req, timeout=10) as r:
        assert r.status == 200
        assert r.read() == b"urllib-data"
    with opener.open(f"{http_origin.base}/close", timeout=10) as r:
        assert r.read().count(b"close-delimited part") == 4
    assert http_origin.requests[0].request_line == "POST /echo HTTP/1.1"


def test_urllib_error_status_from_proxy(proxy, refused_port, client_ssl_ctx):
    p = proxy()
    opener = _urllib_opener(p, client_ssl_ctx)
    with pytest.raises(urllib.error.HTTPError) as ei:
        opener.open(f"http://127.0.0.1:{refused_port}/", timeout=10)
    assert ei.value.code == 502


# -- access log ------------------------------------------------------------------------------------


def _json_log_records(p, timeout: float = 3.0, want: int = 1) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for line in p.stderr_lines:
            line = line.strip()
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
        access = [r for r in records if r.get("logger") == "elbasy.access"]
        if len(access) >= want or time.monotonic() > deadline:
            return access
        time.sleep(0.1)


def test_access_log_json_per_request_and_tunnel(proxy, http_origin, tls_origin, test_ca):
    p = proxy("--log-format", "json")
    r = _curl("-x", p.url, f"{http_origin.base}/echo", "--data-binary", "12345")
    assert r.returncode == 0, r.stderr
    r = _curl("-x", p.url, "--cacert", str(test_ca.path), f"{tls_origin.base}/hello")
    assert r.returncode == 0, r.stderr
    access = _json_log_records(p, want=2)
    assert len(access) >= 2, f"no JSON access lines; stderr:\n{p.stderr}"
    keys = {"client", "method", "host", "path", "status", "bytes_up", "bytes_down", "duration_ms"}
    for rec in access:
        assert keys <= set(rec), rec
    fwd = [a for a in access if a["method"] == "POST"]
    assert fwd, access
    assert fwd[0]["status"] == 200
    assert (fwd[0]["host"], fwd[0]["path"]) == (http_origin.hostport, "/echo")
    assert fwd[0]["client"].startswith("127.0.0.1")
    assert fwd[0]["bytes_up"] >= 5 and fwd[0]["bytes_down"] >= len("12345")
    tun = [a for a in access if a["method"] == "CONNECT"]
    assert tun, access
    assert (tun[0]["host"], tun[0]["path"]) == (tls_origin.hostport, None)
    assert tun[0]["status"] == 200
    assert tun[0]["bytes_up"] > 0 and tun[0]["bytes_down"] > 0
    assert isinstance(tun[0]["duration_ms"], (int, float))


def test_access_log_text_mentions_request(proxy, http_origin):
    p = proxy()
    r = _curl("-x", p.url, f"{http_origin.base}/hello")
    assert r.returncode == 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if any("/hello" in ln and "200" in ln for ln in p.stderr_lines):
            break
        time.sleep(0.1)
    assert any("/hello" in ln and "200" in ln for ln in p.stderr_lines), p.stderr


def test_startup_line_and_version(proxy):
    p = proxy()
    import elbasy

    assert p.version == elbasy.__version__
    startup = [ln for ln in p.stderr_lines if " listening on " in ln]
    assert startup == [f"elbasy {elbasy.__version__} listening on 127.0.0.1:{p.port}\n"]
    # and it really listens there
    assert p.healthz()["version"] == p.version
