"""elbasy as a process: stopping on Ctrl-C with traffic in flight, settings from a config file."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import origins
from origins import connect_tunnel, send_and_read


def test_ctrl_c_stops_cleanly_and_ends_open_tunnels(proxy, raw_origin):
    origin = raw_origin(origins.handler_sink_forever)
    p = proxy()
    sock, resp, _ = connect_tunnel(p, f"127.0.0.1:{origin.port}")
    assert resp.status == 200
    sock.sendall(b"x" * 1000)
    deadline = time.monotonic() + 5
    while p.healthz()["connections"]["tunnels_open"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    p.stopped_by_test = True
    p.proc.send_signal(signal.SIGINT)
    assert p.proc.wait(5) == 0, p.stderr
    # the tunnel's client side was closed by elbasy on the way out
    sock.settimeout(5)
    assert sock.recv(1) == b""
    sock.close()
    assert "Traceback" not in p.stderr
    # one access-log line for the tunnel, written as it was closed
    assert p.lines_with(f"CONNECT 127.0.0.1:{origin.port} 200", 1), p.stderr


def test_settings_come_from_the_config_file(proxy, tmp_path: Path, http_origin):
    config = tmp_path / "elbasy.toml"
    config.write_text(
        f'max-head-bytes = 2048\nconnect_to = ["origin.test:80:127.0.0.1:{http_origin.port}"]\n'
    )
    p = proxy("--config", str(config))
    big = b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nX-Pad: " + b"a" * 3000
    resp, closed = send_and_read(p, big + b"\r\n\r\n")
    assert resp.status == 431 and closed
    # connect_to from the same file: a made-up name reaches the local origin
    get = b"GET http://origin.test/hello HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n"
    resp, _ = send_and_read(p, get + b"\r\n")
    assert resp.status == 200, resp


def test_a_request_to_elbasy_through_itself_is_refused(proxy):
    """elbasy never dials its own address (loopback allowed or not): a request
    pointed at its own address is answered as one of its pages (here a 404)
    before any hop to itself is made; a CONNECT to itself is refused."""
    p = proxy("--keepalive-timeout", "1")
    base = p.fd_count()
    before = p.healthz()["connections"]["requests_total"]
    get = f"GET http://127.0.0.1:{p.port}/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    resp, closed = send_and_read(p, get.encode())
    assert resp.status == 404 and closed, resp
    assert resp.body == b"not found\n"  # its own pages' 404: nothing was dialed
    # this request and the /healthz that reads the count: no forwarded copy
    assert p.healthz()["connections"]["requests_total"] == before + 2
    deadline = time.monotonic() + 5
    while p.fd_count() > base and time.monotonic() < deadline:
        time.sleep(0.05)
    # nothing left behind (the baseline may still hold the start-up probe's
    # connection, which its worker closes on its own time)
    assert p.fd_count() <= base
